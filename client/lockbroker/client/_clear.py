"""An API key about to cross a network in clear: how the client tells (a non-loopback target
without TLS) and the warning it gives. Re-exported from lockbroker.client.aio."""

from __future__ import annotations

import ipaddress
import warnings

import grpc


class InsecureApiKeyWarning(UserWarning):
    """An API key is about to cross a network in clear: a non-loopback target without TLS."""


def is_loopback_target(target: str) -> bool:
    """True when `target` (a gRPC target string) names this machine: a loopback address,
    localhost, or a Unix socket. Anything we cannot read as such counts as remote."""
    rest = target
    for scheme in ("unix:", "unix-abstract:", "vsock:"):
        if rest.startswith(scheme):
            return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    if "/" in rest:  # dns://authority/host:port
        rest = rest.rsplit("/", 1)[1]
    rest = rest.split(",", 1)[0]  # ipv4:a:p,b:p lists: judge by the first
    if rest.startswith("["):
        host = rest[1 : rest.find("]")] if "]" in rest else rest[1:]
    elif rest.count(":") == 1:
        host = rest.split(":", 1)[0]
    else:
        host = rest  # no port, or a bare IPv6 address
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_key_in_clear(target: str, api_key: str | None, credentials: grpc.ChannelCredentials | None) -> bool:
    """Warn (InsecureApiKeyWarning) when an API key would go to a remote target without TLS;
    True if it warned. Not an error: a trusted network (a service mesh that adds mTLS, a private
    link) is a legitimate setup, as the broker's own --insecure-remote is; the warning makes the
    choice visible. Silence it with warnings.filterwarnings("ignore", category=InsecureApiKeyWarning)."""
    if not api_key or credentials is not None or is_loopback_target(target):
        return False
    warnings.warn(
        f"sending an API key to {target} without TLS: anyone on the network path can read it and act as "
        "your tenant. Pass credentials=grpc.ssl_channel_credentials(...) (CLI: --tls or --ca-file).",
        InsecureApiKeyWarning,
        stacklevel=3,
    )
    return True
