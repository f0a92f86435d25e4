"""Configuration: frozen dataclasses, loaded once from flags, environment and a TOML file.

Precedence: command-line flag > LOCKBROKER_* environment variable > TOML file > default.
Every field is reachable all three ways; names are derived from the field, so they cannot drift:

    section [server]  field listen         flag --listen           env LOCKBROKER_LISTEN
    section [etcd]    field endpoints      flag --etcd-endpoints   env LOCKBROKER_ETCD_ENDPOINTS
    section [limits]  field max_ttl        flag --limits-max-ttl   env LOCKBROKER_LIMITS_MAX_TTL
    section [quota]   field max_locks      flag --quota-max-locks  env LOCKBROKER_QUOTA_MAX_LOCKS
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockbroker.server.core.names import MAX_NAME_BYTES
from lockbroker.server.core.quota import TenantQuota


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(default="127.0.0.1:50051", metadata={"help": "host:port to serve gRPC on"})
    grace_period: float = field(default=10.0, metadata={"help": "seconds to drain on SIGTERM/SIGINT"})
    insecure_remote: bool = field(
        default=False, metadata={"help": "allow a non-loopback listen address without authentication (unsafe)"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    health_interval: float = field(default=1.0, metadata={"help": "seconds between etcd health probes"})
    # Unauthenticated like every Prometheus endpoint; it shows tenant names and counts, never lock
    # names or keys, and cannot change anything: so any address is allowed (docs/operating.md).
    metrics_listen: str | None = field(
        default=None, metadata={"help": "host:port to serve Prometheus /metrics on (unset: no metrics)"}
    )
    backend: str = field(
        default="etcd",
        metadata={
            "help": "where locks live: etcd, or memory (a single-process dev mode: nothing is durable, "
            "and several replicas would each have their own locks)"
        },
    )

    def __post_init__(self) -> None:
        if self.grace_period < 0 or self.health_interval <= 0:
            raise ConfigError("server: grace_period must be >= 0 and health_interval > 0")
        if self.backend not in ("etcd", "memory"):
            raise ConfigError(f"server: backend must be etcd or memory, not {self.backend!r}")


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = field(
        default=(),
        metadata={"help": "comma-separated etcd URLs (http://host:port or https://...); none: start an embedded etcd"},
    )
    ca_file: str | None = field(default=None, metadata={"help": "CA bundle to verify etcd's certificate"})
    cert_file: str | None = field(default=None, metadata={"help": "client certificate for etcd (mTLS)"})
    key_file: str | None = field(default=None, metadata={"help": "client key for etcd (mTLS)"})
    tls_server_name: str | None = field(default=None, metadata={"help": "override the TLS name checked"})
    username: str | None = field(default=None, metadata={"help": "etcd user (etcd auth)"})
    password: str | None = field(default=None, metadata={"help": "etcd password (prefer the env variable)"})
    request_timeout: float = field(default=5.0, metadata={"help": "seconds an etcd call may take at most"})
    key_root: str = field(default="/lockbroker/v1", metadata={"help": "etcd key prefix of all broker data"})

    def __post_init__(self) -> None:
        if self.request_timeout <= 0:
            raise ConfigError("etcd: request_timeout must be > 0")


@dataclass(frozen=True)
class EmbeddedConfig:
    binary: str | None = field(default=None, metadata={"help": "etcd binary for the embedded etcd"})
    state_dir: str = field(
        default="./lockbroker-state", metadata={"help": "directory holding the embedded etcd's data"}
    )


@dataclass(frozen=True)
class LockLimits:
    min_ttl: int = field(default=2, metadata={"help": "smallest session TTL in seconds (etcd's floor is 2)"})
    max_ttl: int = field(default=3600, metadata={"help": "largest session TTL in seconds"})
    default_ttl: int = field(default=10, metadata={"help": "TTL when a request leaves it unset"})
    max_wait: float = field(default=300.0, metadata={"help": "longest Acquire wait_timeout in seconds (0: no cap)"})
    max_name_bytes: int = field(
        default=MAX_NAME_BYTES, metadata={"help": "longest lock name in UTF-8 bytes (at least 256, at most 65536)"}
    )

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


@dataclass(frozen=True)
class AuthConfig:
    tenants_file: str | None = field(
        default=None,
        metadata={"help": "tenants file (API key hashes, mTLS identities); unset: no authentication, loopback only"},
    )


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str | None = field(default=None, metadata={"help": "server certificate (PEM); enables TLS"})
    key_file: str | None = field(default=None, metadata={"help": "server private key (PEM)"})
    # grpcio either requires and verifies a client certificate or never asks for one; there is no
    # "verify if offered". So a client CA means every client presents a certificate.
    client_ca_file: str | None = field(
        default=None,
        metadata={"help": "CA that signs client certificates: every client must then present one (mTLS)"},
    )


@dataclass(frozen=True)
class AuditConfig:
    stdout: bool = field(default=False, metadata={"help": "write one JSON line per RPC to stdout"})
    file: str | None = field(default=None, metadata={"help": "append one JSON line per RPC to this file"})
    fsync: str = field(default="always", metadata={"help": "when to fsync the file: always, interval or never"})
    fsync_interval: float = field(default=1.0, metadata={"help": "seconds between fsyncs with fsync=interval"})
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
    return "--" + stem.replace("_", "-"), "LOCKBROKER_" + stem.upper()


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(raw: Any, tp: Any, where: str) -> Any:
    base = _base_type(tp)
    try:
        if typing.get_origin(base) is tuple:
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
        if base is int and isinstance(raw, float):
            raise ValueError(raw)
        return base(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {raw!r} is not a valid {getattr(base, '__name__', base)}") from None


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
                group.add_argument(flag, dest=f"{section}.{f.name}", default=None, help=help_text)


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
                    values[f.name] = _convert(raw, hints[f.name], where)
                    break
        try:
            sections[section] = cls(**values)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"[{section}] {e}") from None
    return Config(**sections)
