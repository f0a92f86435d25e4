"""The tenants file: which credentials act for which tenant.

    # lockbroker tenants file
    [tenants.acme]
    admin = false
    api_keys = [
      {id = "3f9c0a1b2c4d", hash = "scrypt$ln=14,r=8,p=1$<salt>$<digest>", created = "2026-11-23T02:28:09Z"},
    ]
    mtls_identities = ["spiffe://example.org/ns/acme/sa/worker", "CN=acme-worker"]
    quota = {max_locks = 500, acquire_rate = 50}   # optional: this tenant's own limits

The quota table is kept as numbers here and checked by the server (which knows the limits);
writers keep it as it is.

This module is the file: reading it into a `TenantRegistry` and rewriting it. The credentials
themselves (the API key format, scrypt hashes, mTLS identity forms) are credentials.py's, the
registry that maps them to tenants is registry.py's; this module re-exports their names, which tests,
the CLI and the docs import from here.

The writers take an exclusive lock on the file's directory, rewrite the whole file in canonical form
(comments other than the header are not kept) into a 0600 temporary file, and `os.replace` it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lockbroker.interceptors.principal import tenant_problem
from lockbroker.server.auth.credentials import (
    KEY_PREFIX,
    SCRYPT_LOG2_N,
    SCRYPT_P,
    SCRYPT_R,
    ScryptHash,
    hash_key,
    mtls_identity_problem,
    new_key,
    parse_key,
    verify_hash,
)
from lockbroker.server.auth.registry import ApiKeyRecord, Tenant, TenantRegistry, TenantsFileError

HEADER = (
    "# lockbroker tenants file. API keys are stored only as salted scrypt hashes.\n"
    "# Rewritten by `lockbroker tenants ...`: comments other than this header are not kept.\n"
)


# --- reading -------------------------------------------------------------------------------------

_TENANT_KEYS = frozenset({"admin", "api_keys", "mtls_identities", "quota"})
_QUOTA_NAME = re.compile(r"[a-z_]{1,40}")
_API_KEY_KEYS = frozenset({"id", "hash", "created"})


def _header_line(text: str, name: str) -> int | None:
    pattern = re.compile(
        rf"""^\s*\[\s*tenants\s*\.\s*(?:{re.escape(name)}|"{re.escape(name)}"|'{re.escape(name)}')\s*\]"""
    )
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _value_line(text: str, value: str, after: int | None) -> int | None:
    lines = text.splitlines()
    for number in range((after or 1), len(lines) + 1):
        if f'"{value}"' in lines[number - 1] or f"'{value}'" in lines[number - 1]:
            return number
    return after


def _created(value: Any, where: str) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    if not isinstance(value, str):
        raise TenantsFileError(f"{where}: created must be an RFC 3339 date-time")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise TenantsFileError(f"{where}: created {value!r} is not an RFC 3339 date-time") from None
    return value


def _tenant(name: str, table: Any, where: str) -> Tenant:
    if not isinstance(table, dict):
        raise TenantsFileError(f"{where}: must be a table")
    if unknown := set(table) - _TENANT_KEYS:
        raise TenantsFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TENANT_KEYS)}")
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise TenantsFileError(f"{where}: admin must be true or false")
    raw_keys = table.get("api_keys", [])
    if not isinstance(raw_keys, list):
        raise TenantsFileError(f"{where}: api_keys must be an array of tables")
    keys = []
    for i, k in enumerate(raw_keys):
        kw = f"{where} api_keys[{i}]"
        if not isinstance(k, dict):
            raise TenantsFileError(f"{kw}: must be a table {{id = ..., hash = ..., created = ...}}")
        if unknown := set(k) - _API_KEY_KEYS:
            raise TenantsFileError(f"{kw}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_API_KEY_KEYS)}")
        if not isinstance(k.get("id"), str) or not isinstance(k.get("hash"), str):
            raise TenantsFileError(f"{kw}: id and hash are required strings")
        keys.append(ApiKeyRecord(k["id"], k["hash"], _created(k.get("created", ""), kw) if "created" in k else ""))
    identities = table.get("mtls_identities", [])
    if not isinstance(identities, list) or not all(isinstance(i, str) for i in identities):
        raise TenantsFileError(f"{where}: mtls_identities must be an array of strings")
    if len(set(identities)) != len(identities):
        raise TenantsFileError(f"{where}: mtls_identities lists an identity twice")
    raw_quota = table.get("quota", {})
    if not isinstance(raw_quota, dict) or not all(
        isinstance(k, str) and _QUOTA_NAME.fullmatch(k) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in raw_quota.items()
    ):
        raise TenantsFileError(f"{where}: quota must be a table of limit names to numbers, e.g. {{max_locks = 500}}")
    return Tenant(name, admin, tuple(keys), tuple(identities), tuple(sorted(raw_quota.items())))


def parse(text: str, path: str = "<tenants>", **registry_options: Any) -> TenantRegistry:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TenantsFileError(f"{path}: {e}") from None
    if unknown := set(doc) - {"tenants"}:
        raise TenantsFileError(f"{path}: unknown top-level key(s) {sorted(unknown)}; tenants go in [tenants.<name>]")
    tables = doc.get("tenants", {})
    if not isinstance(tables, dict):
        raise TenantsFileError(f"{path}: tenants must be a table of [tenants.<name>] tables")
    tenants = []
    for name, table in tables.items():
        line = _header_line(text, name)
        where = f"{path}:{line}: [tenants.{name}]" if line else f"{path}: [tenants.{name}]"
        if problem := tenant_problem(name):
            raise TenantsFileError(f"{where}: tenant name {problem}")
        tenants.append(_tenant(name, table, where))
    try:
        return TenantRegistry(tenants, **registry_options)
    except TenantsFileError as e:
        line = _header_line(text, e.tenant) if e.tenant else None
        if e.value:
            line = _value_line(text, e.value, line)
        where = f"{path}:{line}" if line else path
        raise TenantsFileError(f"{where}: {e}", tenant=e.tenant, value=e.value) from None


def load(path: str | os.PathLike[str], **registry_options: Any) -> TenantRegistry:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TenantsFileError(f"tenants file {p}: not found") from None
    except PermissionError:
        raise TenantsFileError(f"tenants file {p}: permission denied") from None
    except UnicodeDecodeError:
        raise TenantsFileError(f"tenants file {p}: not UTF-8 text") from None
    except OSError as e:
        raise TenantsFileError(f"tenants file {p}: {e.strerror}") from None
    return parse(text, str(p), **registry_options)


# --- writing -------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(tenants: Iterable[Tenant]) -> str:
    parts = [HEADER]
    for t in sorted(tenants, key=lambda t: t.name):
        parts.append(f"\n[tenants.{t.name}]\nadmin = {'true' if t.admin else 'false'}\n")
        if t.api_keys:
            parts.append("api_keys = [\n")
            for k in t.api_keys:
                created = f", created = {_toml_str(k.created)}" if k.created else ""
                parts.append(f"  {{id = {_toml_str(k.id)}, hash = {_toml_str(k.hash)}{created}}},\n")
            parts.append("]\n")
        else:
            parts.append("api_keys = []\n")
        parts.append(f"mtls_identities = [{', '.join(_toml_str(i) for i in t.mtls_identities)}]\n")
        if t.quota:
            parts.append(f"quota = {{{', '.join(f'{k} = {v!r}' for k, v in t.quota)}}}\n")
    return "".join(parts)


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    # Serialises concurrent `lockbroker tenants ...` runs; a lock on the directory leaves no stray file.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            # `sudo lockbroker tenants add` must not leave a file the broker's own user cannot read.
            st = path.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _update(path: str | os.PathLike[str], change: Callable[[dict[str, Tenant]], None]) -> None:
    """Read-modify-write under the directory lock; `change(dict name -> Tenant)` edits in place."""
    p = Path(path)
    if not p.parent.is_dir():
        raise TenantsFileError(f"tenants file {p}: directory {p.parent} does not exist")
    with _locked_dir(p.parent):
        tenants = {t.name: t for t in load(p)} if p.exists() else {}
        change(tenants)
        text = render(tenants.values())
        parse(text, str(p))  # never replace a good file with one the broker would refuse
        _atomic_write(p, text)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fresh_key(tenants: Mapping[str, Tenant]) -> tuple[ApiKeyRecord, str]:
    used = {k.id for t in tenants.values() for k in t.api_keys}
    key_id, key = new_key()
    while key_id in used:
        key_id, key = new_key()
    return ApiKeyRecord(key_id, hash_key(key), _now()), key


def add_tenant(path: str | os.PathLike[str], name: str, admin: bool = False) -> str:
    """Creates the tenant (and the file if needed) with one API key; returns that key, the only time it is shown."""
    if problem := tenant_problem(name):
        raise TenantsFileError(f"tenant name {name!r} {problem}")
    key = ""

    def change(tenants: dict[str, Tenant]) -> None:
        nonlocal key
        if name in tenants:
            raise TenantsFileError(
                f"tenants file {path}: tenant {name!r} already exists; add a key with `lockbroker tenants add-key`"
            )
        record, key = _fresh_key(tenants)
        tenants[name] = Tenant(name, admin, (record,))

    _update(path, change)
    return key


def add_key(path: str | os.PathLike[str], name: str) -> str:
    """Adds an API key to an existing tenant (old keys keep working, for rotation); returns the new key once."""
    key = ""

    def change(tenants: dict[str, Tenant]) -> None:
        nonlocal key
        if name not in tenants:
            raise TenantsFileError(f"tenants file {path}: no tenant {name!r}")
        record, key = _fresh_key(tenants)
        tenants[name] = replace(tenants[name], api_keys=(*tenants[name].api_keys, record))

    _update(path, change)
    return key


def remove_key(path: str | os.PathLike[str], key_id: str) -> str:
    """Revokes the key with this id (for a running broker: at its next reload); returns the tenant it was in."""
    owner = ""

    def change(tenants: dict[str, Tenant]) -> None:
        nonlocal owner
        for t in tenants.values():
            if any(k.id == key_id for k in t.api_keys):
                owner = t.name
                tenants[t.name] = replace(t, api_keys=tuple(k for k in t.api_keys if k.id != key_id))
                return
        raise TenantsFileError(f"tenants file {path}: no api key with id {key_id!r}")

    _update(path, change)
    return owner


def add_mtls_identity(path: str | os.PathLike[str], name: str, identity: str) -> None:
    """Maps a client certificate identity ("spiffe://..." or "CN=...") to an existing tenant."""
    if problem := mtls_identity_problem(identity):
        raise TenantsFileError(f"mTLS identity {identity!r} {problem}")

    def change(tenants: dict[str, Tenant]) -> None:
        if name not in tenants:
            raise TenantsFileError(f"tenants file {path}: no tenant {name!r}")
        if identity not in tenants[name].mtls_identities:
            tenants[name] = replace(tenants[name], mtls_identities=(*tenants[name].mtls_identities, identity))

    _update(path, change)


__all__ = [
    "HEADER",
    "KEY_PREFIX",
    "SCRYPT_LOG2_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "ApiKeyRecord",
    "ScryptHash",
    "Tenant",
    "TenantRegistry",
    "TenantsFileError",
    "add_key",
    "add_mtls_identity",
    "add_tenant",
    "hash_key",
    "load",
    "mtls_identity_problem",
    "new_key",
    "parse",
    "parse_key",
    "remove_key",
    "render",
    "verify_hash",
]
