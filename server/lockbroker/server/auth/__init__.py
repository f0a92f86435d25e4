"""Who may call the broker, and over what: the tenants file, TLS, and the setup rules joining them.

`tenants` is the tenants file (its format, and the writers behind `lockbroker tenants`); `registry`
the registry the identity interceptor checks credentials against; `credentials` the API key format,
its scrypt hashes and mTLS identity forms (`tenants` re-exports both); `tls` loads certificates.
`security(config)` is what the broker builds from them, refusing setups that would expose locks or
keys.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import grpc

from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.server.auth import tenants, tls
from lockbroker.server.auth.tenants import TenantRegistry, TenantsFileError
from lockbroker.server.auth.tls import TlsFileError
from lockbroker.server.config import Config, ConfigError

log = logging.getLogger("lockbroker.server")


@dataclass(frozen=True, slots=True)
class Security:
    registry: TenantRegistry | None  # None: no tenants file
    identity: IdentityInterceptor | None  # None: authentication off (no tenants file)
    credentials: grpc.ServerCredentials | None  # None: plaintext


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security(cfg: Config) -> Security:
    """Who may call, and over what; refuses setups that would expose locks or keys."""
    registry = None
    if cfg.auth.tenants_file:
        try:
            registry = tenants.load(cfg.auth.tenants_file)
        except TenantsFileError as e:
            raise ConfigError(str(e)) from None
        if len(registry) == 0:
            # An emptied file (every tenant removed, a truncated deploy) must not turn
            # authentication off: that would open every lock to anyone who can connect.
            raise ConfigError(
                f"{cfg.auth.tenants_file}: the tenants file lists no tenants; add one "
                "(lockbroker tenants add) or drop --auth-tenants-file to run without authentication"
            )
    identity = IdentityInterceptor.from_registry(registry)
    credentials = None
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls: --tls-cert-file and --tls-key-file go together")
    if cfg.tls.client_ca_file is not None and cfg.tls.cert_file is None:
        raise ConfigError("tls: --tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    if cfg.tls.cert_file and cfg.tls.key_file:
        try:
            credentials = tls.server_credentials(
                cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file, cfg.tls.client_ca_file is not None
            )
        except TlsFileError as e:
            raise ConfigError(str(e)) from None
    if not is_loopback(cfg.server.listen) and not cfg.server.insecure_remote:
        if identity is None:
            raise ConfigError(
                f"refusing to listen on {cfg.server.listen} without authentication: anyone who can reach "
                "it could take and release every lock. Listen on 127.0.0.1 or ::1, configure "
                "--auth-tenants-file, or pass --insecure-remote if the network itself is trusted."
            )
        if credentials is None:
            raise ConfigError(
                f"refusing to listen on {cfg.server.listen} without TLS: API keys would cross the network "
                "in clear. Configure --tls-cert-file and --tls-key-file, or pass --insecure-remote."
            )
    return Security(registry, identity, credentials)
