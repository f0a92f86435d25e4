"""Configuration: frozen dataclasses, loaded once from flags, environment and a TOML file.

Precedence: command-line flag > LOCKBROKER_* environment variable > TOML file > default.
Every field is reachable all three ways; names are derived from the field, so they cannot drift:

    section [server]  field listen         flag --listen           env LOCKBROKER_LISTEN
    section [etcd]    field endpoints      flag --etcd-endpoints   env LOCKBROKER_ETCD_ENDPOINTS
    section [limits]  field max_ttl        flag --limits-max-ttl   env LOCKBROKER_LIMITS_MAX_TTL
    section [quota]   field max_locks      flag --quota-max-locks  env LOCKBROKER_QUOTA_MAX_LOCKS

(one exception: [embedded] binary is LOCKBROKER_ETCD_BINARY, the name the embedded etcd module reads).
Every value is checked where it is read, so an error names the flag, variable or TOML key it came
from and the form it accepts. Durations accept 250ms, 10s, 5m, 1h or plain seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockbroker.server.core.names import MAX_NAME_BYTES
from lockbroker.server.core.quota import TenantQuota


class ConfigError(ValueError):
    pass


LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 64


# -- field checks: each raises ValueError(accepted form) for a value it refuses ------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_FORM = "a duration such as 250ms, 10s, 5m, 1h or plain seconds"


def parse_duration(raw: object) -> float:
    """Seconds from 250ms / 10s / 5m / 1h / 2.5 (plain seconds); ValueError otherwise."""
    if isinstance(raw, bool):
        raise ValueError(DURATION_FORM)
    if isinstance(raw, int | float):
        return float(raw)
    m = _DURATION.match(str(raw))
    if m is None:
        raise ValueError(DURATION_FORM)
    return float(m.group(1)) * _UNIT[m.group(2)]


def check_listen(value: str) -> None:
    """HOST:PORT, with an IPv6 host in brackets; the port 0-65535 (0: any free port)."""
    form = "HOST:PORT such as 127.0.0.1:50051 or [::1]:50051"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(form)
    if host.startswith("["):
        try:
            if not host.endswith("]") or ipaddress.ip_address(host[1:-1]).version != 6:
                raise ValueError(form)
        except ValueError:
            raise ValueError(form) from None
    elif ":" in host or not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise ValueError(form)


def _choice(*allowed: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in allowed:
            raise ValueError("one of " + ", ".join(allowed))

    return check


def _duration(default: float, help_text: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": f"{help_text} (e.g. 10s, 250ms)", "duration": True, **meta})


# Fields of dataclasses defined elsewhere that are durations too.
_EXTERNAL_DURATIONS = {("quota", "max_ttl"), ("quota", "max_wait")}


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(
        default="127.0.0.1:50051", metadata={"help": "host:port to serve gRPC on", "check": check_listen}
    )
    grace_period: float = _duration(10.0, "how long to drain on SIGTERM/SIGINT")
    insecure_remote: bool = field(
        default=False, metadata={"help": "allow a non-loopback listen address without authentication (unsafe)"}
    )
    log_level: str = field(
        default="info",
        metadata={"help": "debug, info, warning or error (SIGHUP re-reads it)", "check": _choice(*LOG_LEVELS)},
    )
    health_interval: float = _duration(1.0, "time between etcd health probes")
    health_listen: str | None = field(
        default=None,
        metadata={
            "help": "also serve gRPC health alone, in plaintext, on this host:port (for kubelet probes)",
            "check": check_listen,
        },
    )
    # Unauthenticated like every Prometheus endpoint; it shows tenant names and counts, never lock
    # names or keys, and cannot change anything: so any address is allowed (docs/operating.md).
    metrics_listen: str | None = field(
        default=None,
        metadata={"help": "host:port to serve Prometheus /metrics on (unset: no metrics)", "check": check_listen},
    )
    # 1 by default: on the 2-core machine we measure on, etcd and the clients need the second core
    # (bench/README.md, "Many cores"); raise it where cores are spare. See docs/operating.md.
    workers: int = field(
        default=1,
        metadata={
            "help": f"broker processes sharing the listen port (SO_REUSEPORT), 1-{MAX_WORKERS}; "
            "each one core's worth of gRPC (needs the etcd backend)",
        },
    )
    # asyncio by default: uvloop (the optional extra lockbroker[uvloop]) saved the broker no
    # measurable CPU in the full benchmark, where grpc's own poller thread does the I/O
    # (bench/README.md, "Event loop"). auto: uvloop if it is installed.
    event_loop: str = field(
        default="asyncio",
        metadata={
            "help": "the event loop the broker runs on: asyncio, uvloop (pip install 'lockbroker[uvloop]') "
            "or auto (uvloop if installed)",
            "check": _choice("auto", "uvloop", "asyncio"),
        },
    )
    backend: str = field(
        default="etcd",
        metadata={
            "help": "where locks live: etcd, or memory (a single-process dev mode: nothing is durable, "
            "and several replicas would each have their own locks)",
            "check": _choice("etcd", "memory"),
        },
    )

    def __post_init__(self) -> None:
        if self.grace_period < 0 or self.health_interval <= 0:
            raise ConfigError("server: grace_period must be >= 0 and health_interval > 0")
        if self.backend not in ("etcd", "memory"):
            raise ConfigError(f"server: backend must be etcd or memory, not {self.backend!r}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"--workers / LOCKBROKER_WORKERS / [server] workers: {self.workers} is not valid; "
                f"expected a whole number from 1 to {MAX_WORKERS}"
            )
        if self.workers > 1 and self.backend == "memory":
            # Each process would have locks of its own: two holders of one lock.
            raise ConfigError(
                "--workers / LOCKBROKER_WORKERS / [server] workers: more than 1 needs --backend etcd "
                "(memory locks live in one process: each worker would grant the same lock)"
            )


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = field(
        default=(),
        metadata={"help": "comma-separated etcd URLs (http://host:port or https://...); none: start an embedded etcd"},
    )
    ca_file: str | None = field(default=None, metadata={"help": "CA bundle to verify etcd's certificate", "file": True})
    cert_file: str | None = field(default=None, metadata={"help": "client certificate for etcd (mTLS)", "file": True})
    key_file: str | None = field(default=None, metadata={"help": "client key for etcd (mTLS)", "file": True})
    tls_server_name: str | None = field(default=None, metadata={"help": "override the TLS name checked"})
    username: str | None = field(default=None, metadata={"help": "etcd user (etcd auth)"})
    password: str | None = field(default=None, metadata={"help": "etcd password (prefer the env variable)"})
    request_timeout: float = _duration(5.0, "longest an etcd call may take")
    key_root: str = field(default="/lockbroker/v1", metadata={"help": "etcd key prefix of all broker data"})
    group_commit: bool = field(
        default=True,
        metadata={"help": "send concurrent writes to etcd as one nested Txn when safe (etcd >= 3.3)"},
    )

    def __post_init__(self) -> None:
        if self.request_timeout <= 0:
            raise ConfigError("etcd: request_timeout must be > 0")


@dataclass(frozen=True)
class EmbeddedConfig:
    binary: str | None = field(
        default=None, metadata={"help": "etcd binary for the embedded etcd", "env": "LOCKBROKER_ETCD_BINARY"}
    )
    # None: $XDG_STATE_HOME/lockbroker (~/.local/state/lockbroker), whatever the working directory.
    state_dir: str | None = field(
        default=None,
        metadata={"help": "directory holding the embedded etcd's data (default $XDG_STATE_HOME/lockbroker)"},
    )

    def resolved_state_dir(self, env: Mapping[str, str] | None = None) -> Path:
        """The state dir as an absolute path: the setting, else XDG's (never the working directory)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser().absolute()
        env = os.environ if env is None else env
        base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base).expanduser().absolute() / "lockbroker"


@dataclass(frozen=True)
class LockLimits:
    min_ttl: int = _duration(2, "smallest session TTL, whole seconds (etcd's floor is 2)")
    max_ttl: int = _duration(3600, "largest session TTL, whole seconds")
    default_ttl: int = _duration(10, "TTL when a request leaves it unset, whole seconds")
    max_wait: float = _duration(300.0, "longest Acquire wait_timeout (0: no cap)")
    max_name_bytes: int = field(
        default=MAX_NAME_BYTES, metadata={"help": "longest lock name in UTF-8 bytes (at least 256, at most 65536)"}
    )
    # Server-wide, not per tenant: these protect the broker from callers that have no tenant yet.
    unauthenticated_rate: float = field(
        default=20.0,
        metadata={"help": "calls failing authentication per second, per peer address, before it is refused (0: off)"},
    )
    unauthenticated_burst: int = field(
        default=100, metadata={"help": "calls failing authentication allowed at once above unauthenticated_rate"}
    )
    max_connections: int = field(
        default=0,
        metadata={
            "help": "client connections open at once; more are closed as they arrive "
            "(0: the open-files limit minus a reserve)"
        },
    )
    handshake_timeout: float = _duration(
        10.0, "close a connection that has not completed its TLS/HTTP2 handshake within this"
    )
    connection_idle: float = _duration(300.0, "close a client connection that has had no call for this long")

    def __post_init__(self) -> None:
        if not 2 <= self.min_ttl <= self.default_ttl <= self.max_ttl:
            # etcd silently raises a TTL below its minimum (about 2 s) and the caller would never know
            raise ConfigError("limits: need 2 <= min_ttl <= default_ttl <= max_ttl")
        if self.max_wait < 0:
            raise ConfigError("limits: max_wait must not be negative")
        # 256 bytes was the limit before any-UTF-8 names: a smaller one would strand existing locks.
        # 64 KiB keeps an escaped key (at most 3 bytes a byte) far below etcd's request size limit.
        if not 256 <= self.max_name_bytes <= 65536:
            raise ConfigError("limits: max_name_bytes must be between 256 and 65536")
        if self.unauthenticated_rate < 0 or self.max_connections < 0:
            raise ConfigError("limits: unauthenticated_rate and max_connections must not be negative")
        if self.unauthenticated_rate and self.unauthenticated_burst < 1:
            raise ConfigError("limits: unauthenticated_burst must be at least 1 when unauthenticated_rate is set")
        if self.handshake_timeout <= 0 or self.connection_idle <= 0:
            raise ConfigError("limits: handshake_timeout and connection_idle must be positive")


@dataclass(frozen=True)
class AuthConfig:
    tenants_file: str | None = field(
        default=None,
        metadata={
            "help": "tenants file (API key hashes, mTLS identities); unset: no authentication, loopback only",
            "file": True,
        },
    )


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str | None = field(
        default=None, metadata={"help": "server certificate (PEM); enables TLS", "file": True}
    )
    key_file: str | None = field(default=None, metadata={"help": "server private key (PEM)", "file": True})
    # grpcio either requires and verifies a client certificate or never asks for one; there is no
    # "verify if offered". So a client CA means every client presents a certificate.
    client_ca_file: str | None = field(
        default=None,
        metadata={"help": "CA that signs client certificates: every client must then present one (mTLS)", "file": True},
    )


@dataclass(frozen=True)
class AuditConfig:
    stdout: bool = field(default=False, metadata={"help": "write one JSON line per RPC to stdout"})
    file: str | None = field(default=None, metadata={"help": "append one JSON line per RPC to this file"})
    fsync: str = field(
        default="always",
        metadata={
            "help": "when to fsync the file: always, interval or never",
            "check": _choice("always", "interval", "never"),
        },
    )
    fsync_interval: float = _duration(1.0, "time between fsyncs with fsync=interval")
    fail_open: bool = field(
        default=False, metadata={"help": "serve mutating calls even when the audit log cannot be written"}
    )

    def __post_init__(self) -> None:
        if self.fsync not in ("always", "interval", "never"):
            raise ConfigError("audit: fsync must be always, interval or never")

    @property
    def enabled(self) -> bool:
        return self.stdout or self.file is not None


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = field(
        default=3, metadata={"help": "attempts of an idempotent call on a transient etcd error (1: no retry)"}
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("retry: max_attempts must be at least 1")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    limits: LockLimits = field(default_factory=LockLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # The default quota of every tenant; the tenants file can set a tenant's own ([tenants.<name>.quota]).
    quota: TenantQuota = field(default_factory=TenantQuota)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "etcd": EtcdConfig,
    "embedded": EmbeddedConfig,
    "limits": LockLimits,
    "auth": AuthConfig,
    "tls": TlsConfig,
    "audit": AuditConfig,
    "retry": RetryConfig,
    "quota": TenantQuota,
}


def _names(section: str, name: str) -> tuple[str, str]:
    stem = name if section == "server" else f"{section}_{name}"
    cls = _SECTIONS.get(section)
    meta: Mapping[str, Any] = {}
    if cls is not None:
        meta = next((f.metadata for f in dataclasses.fields(cls) if f.name == name), {})
    return "--" + stem.replace("_", "-"), str(meta.get("env") or "LOCKBROKER_" + stem.upper())


def setting_names(section: str, name: str) -> str:
    """Every name of one setting, for messages: "--listen / LOCKBROKER_LISTEN / [server] listen"."""
    flag, env = _names(section, name)
    return f"{flag} / {env} / [{section}] {name}"


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _form(base: Any, is_duration: bool) -> str:
    if is_duration:
        return DURATION_FORM + (" (whole seconds)" if base is int else "")
    if base is bool:
        return "true or false"
    if typing.get_origin(base) is tuple:
        return "a comma-separated list (TOML: an array of strings)"
    return {int: "a whole number", float: "a number", str: "a string"}.get(base, getattr(base, "__name__", str(base)))


def _parse(raw: Any, base: Any, is_duration: bool) -> Any:
    """`raw` as a value of type `base`; ValueError or TypeError if it is not one."""
    if is_duration:
        seconds = parse_duration(raw)
        if seconds < 0:
            raise ValueError(raw)
        if base is int:
            if not float(seconds).is_integer():
                raise ValueError(raw)
            return int(seconds)
        return seconds
    if typing.get_origin(base) is tuple:
        if not isinstance(raw, str | list | tuple):
            raise ValueError(raw)
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(raw)
    if base is str:
        # `listen = 50081` in TOML is a mistake, not the string "50081".
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    if isinstance(raw, bool) or (base is int and isinstance(raw, float)):
        raise ValueError(raw)
    return base(raw)


def _convert(raw: Any, tp: Any, where: str, meta: Mapping[str, Any] | None = None, duration: bool = False) -> Any:
    """The value of one setting from its raw text (flag, env) or TOML value; ConfigError naming
    `where` and the accepted form otherwise."""
    meta = meta or {}
    base = _base_type(tp)
    is_duration = duration or bool(meta.get("duration"))
    check = meta.get("check")
    try:
        value = _parse(raw, base, is_duration)
    except (TypeError, ValueError):
        form = _form(base, is_duration)
        if check is not None:
            try:
                check("")  # every check refuses "", and its message is the accepted form
            except ValueError as e:
                form = f"a string, {e}"
        raise ConfigError(f"{where}: {raw!r} is not valid; expected {form}") from None
    if check is not None:
        try:
            check(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {raw!r} is not valid; expected {e}") from None
    return value


def _metavar(section: str, f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("duration") or (section, f.name) in _EXTERNAL_DURATIONS:
        return "DURATION"
    if f.metadata.get("check") is check_listen:
        return "HOST:PORT"
    if f.metadata.get("file"):
        return "FILE"
    return f.name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every field; all default to None so that 'not given' is visible."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with [server], [etcd], [embedded], [limits]")
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            flag, env = _names(section, f.name)
            help_text = f"{f.metadata.get('help', '')} (env {env})"
            if _base_type(typing.get_type_hints(cls)[f.name]) is bool:
                group.add_argument(
                    flag, dest=f"{section}.{f.name}", action="store_const", const=True, default=None, help=help_text
                )
            else:
                group.add_argument(
                    flag, dest=f"{section}.{f.name}", default=None, help=help_text, metavar=_metavar(section, f)
                )


def load(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None, config_file: str | None = None
) -> Config:
    flags = vars(args) if args is not None else {}
    env = env if env is not None else {}
    path = config_file or flags.get("config") or env.get("LOCKBROKER_CONFIG")
    doc: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        unknown = set(doc) - set(_SECTIONS)
        if unknown:
            raise ConfigError(f"config file {path}: unknown section(s) {sorted(unknown)}")
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        table = doc.get(section, {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(table) - known:
            raise ConfigError(f"config file {path}: unknown key(s) in [{section}]: {sorted(set(table) - known)}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            flag, env_name = _names(section, f.name)
            for raw, where in (
                (flags.get(f"{section}.{f.name}"), flag),
                # An empty variable is unset: LOCKBROKER_ETCD_ENDPOINTS="" must not silently swap a
                # configured cluster for a private embedded etcd.
                (env.get(env_name) or None, env_name),
                (table.get(f.name), f"[{section}] {f.name}"),
            ):
                if raw is not None:
                    values[f.name] = _convert(
                        raw, hints[f.name], where, f.metadata, (section, f.name) in _EXTERNAL_DURATIONS
                    )
                    break
        try:
            sections[section] = cls(**values)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"[{section}] {e}") from None
    return Config(**sections)


def check_files(cfg: Config) -> None:
    """Every file setting names a readable file: a missing CA must stop the start, not fail every
    etcd call (or every health probe) later."""
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("file"):
                continue
            path = getattr(getattr(cfg, section), f.name)
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                why = e.strerror or str(e)
                raise ConfigError(
                    f"{setting_names(section, f.name)}: cannot read {path!r} ({why}); expected a readable file"
                ) from None
