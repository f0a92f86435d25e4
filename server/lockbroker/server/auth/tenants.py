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

An API key reads `lbk_<id>_<secret>`. The id is a lookup handle, not a secret (it is what logs and audit
records name); the 256-bit secret carries all the strength. Only a salted scrypt hash of the whole key is
stored, so a key is shown exactly once, by `add_tenant`/`add_key`, and is unrecoverable from the file.

Why scrypt (n=2^14, r=8, p=1, the scrypt paper's interactive-login setting, about 40 ms and 16 MiB here):
it is memory-hard, in hashlib, and its parameters travel inside each hash string, so they can be changed
for new keys without touching old ones. With 256-bit random secrets no work factor is what stops brute
force; the cost is paid on every uncached verification, so checks are cached, bounded and
scheduled by `keycheck.KeyChecker` (see `TenantRegistry.authenticate_key`).

The writers take an exclusive lock on the file's directory, rewrite the whole file in canonical form
(comments other than the header are not kept) into a 0600 temporary file, and `os.replace` it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lockbroker.interceptors.principal import Principal, tenant_problem
from lockbroker.server.auth.keycheck import KeyChecker

KEY_PREFIX = "lbk_"
_KEY_ID = re.compile(r"[a-z0-9]{4,32}")
_KEY_SECRET = re.compile(r"[A-Za-z0-9_\-]{32,128}")
_MAX_KEY_LEN = len(KEY_PREFIX) + 32 + 1 + 128
_B64URL = re.compile(r"[A-Za-z0-9_\-]+")
_SPIFFE = re.compile(r"spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)*")

# Default scrypt cost for new keys; old keys keep whatever their hash string says.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
# Bounds for parameters read from the file: a typo such as ln=24 would otherwise make every
# verification take seconds and a gigabyte.
_MAX_SCRYPT_MEMORY = 64 * 1024 * 1024
_SALT_BYTES = 16
_DIGEST_BYTES = 32

HEADER = (
    "# lockbroker tenants file. API keys are stored only as salted scrypt hashes.\n"
    "# Rewritten by `lockbroker tenants ...`: comments other than this header are not kept.\n"
)


class TenantsFileError(ValueError):
    """The tenants file cannot be read, parsed or changed; the message names the file and the place."""

    def __init__(self, message: str, *, tenant: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        # What the message is about, so `parse` can point at the line that holds it.
        self.tenant = tenant
        self.value = value


# --- hashing -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # The stdlib decoder skips characters outside the alphabet; a hash with any is corrupt, not short.
    if not _B64URL.fullmatch(text):
        raise ValueError(text)
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @staticmethod
    def parse(text: str) -> ScryptHash:
        """Raises ValueError (with a message fit for the file's error) when `text` is not a usable hash."""
        parts = text.split("$")
        if len(parts) != 4 or parts[0] != "scrypt":
            raise ValueError('is not of the form "scrypt$ln=N,r=N,p=N$<salt>$<digest>"')
        try:
            params = dict(kv.split("=", 1) for kv in parts[1].split(","))
            log2_n, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
        except (KeyError, ValueError):
            raise ValueError('has parameters other than "ln=N,r=N,p=N"') from None
        if params:
            raise ValueError(f"has unknown scrypt parameter(s) {sorted(params)}")
        if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 4) or 128 * r * (2**log2_n) > _MAX_SCRYPT_MEMORY:
            raise ValueError(f"has scrypt parameters outside the supported range (at most {_MAX_SCRYPT_MEMORY} bytes)")
        try:
            salt, digest = _unb64(parts[2]), _unb64(parts[3])
        except ValueError:
            raise ValueError("has a salt or digest that is not base64url") from None
        if len(salt) < _SALT_BYTES or len(digest) < _DIGEST_BYTES:
            raise ValueError(f"needs a salt of at least {_SALT_BYTES} and a digest of at least {_DIGEST_BYTES} bytes")
        return ScryptHash(log2_n, r, p, salt, digest)

    def __str__(self) -> str:
        return f"scrypt$ln={self.log2_n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.digest)}"

    def _derive(self, secret: bytes, length: int) -> bytes:
        n = 2**self.log2_n
        # OpenSSL needs 128*r*(n+2) bytes for V plus 128*r*p for B; a little slack for its bookkeeping.
        maxmem = 128 * self.r * (n + 2 + self.p) + 65536
        return hashlib.scrypt(secret, salt=self.salt, n=n, r=self.r, p=self.p, maxmem=maxmem, dklen=length)

    def matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(self._derive(secret, len(self.digest)), self.digest)


def hash_key(key: str, *, log2_n: int = SCRYPT_LOG2_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The storable hash of `key`, under a fresh random salt."""
    h = ScryptHash(log2_n, r, p, os.urandom(_SALT_BYTES), b"")
    return str(replace(h, digest=h._derive(key.encode("ascii"), _DIGEST_BYTES)))


def verify_hash(key: str, stored: str) -> bool:
    try:
        return ScryptHash.parse(stored).matches(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False


def parse_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed `lbk_<id>_<secret>`, else None. Cheap: runs before any hashing."""
    if len(key) > _MAX_KEY_LEN or not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not _KEY_ID.fullmatch(key_id) or not _KEY_SECRET.fullmatch(secret):
        return None
    return key_id, secret


def new_key(key_id: str | None = None) -> tuple[str, str]:
    """(id, plaintext key) for a fresh key; 48-bit ids, 256-bit secrets."""
    key_id = key_id or secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def mtls_identity_problem(identity: str) -> str | None:
    if identity.startswith("spiffe://"):
        if not _SPIFFE.fullmatch(identity):
            return "is not a SPIFFE ID (spiffe://<lowercase trust domain>/<path>)"
        return None
    if identity.startswith("CN="):
        cn = identity[3:]
        if not cn or cn != cn.strip() or any(not ch.isprintable() for ch in cn):
            return "has an empty, padded or non-printable common name"
        return None
    return 'must be "spiffe://..." (a SPIFFE ID in the URI SAN) or "CN=<subject common name>"'


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    hash: str
    created: str  # RFC 3339, UTC


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool = False
    api_keys: tuple[ApiKeyRecord, ...] = ()
    mtls_identities: tuple[str, ...] = ()
    quota: tuple[tuple[str, int | float], ...] = ()  # overrides of the server's default quota


@dataclass(frozen=True, slots=True)
class _IndexedKey:
    principal: Principal
    hash: ScryptHash


class TenantRegistry:
    """An immutable snapshot of the tenants file, indexed for per-call authentication.

    Reloading the file means building a new registry (and a new interceptor): its cache starts empty,
    so a removed key stops working at the reload whatever the cache TTL.
    """

    def __init__(
        self,
        tenants: Iterable[Tenant] = (),
        *,
        cache_ttl: float = 30.0,
        cache_size: int = 1024,
        max_concurrent_verifications: int = 4,
        per_key_id_verifications: int = 2,
        max_queued_verifications: int = 32,
        failed_cache_ttl: float = 60.0,
        failed_cache_size: int = 4096,
    ) -> None:
        self._keys: dict[str, _IndexedKey] = {}
        self._identities: dict[str, Principal] = {}
        tenants_by_name: dict[str, Tenant] = {}
        for t in tenants:
            if problem := tenant_problem(t.name):
                raise TenantsFileError(f"tenant {t.name!r}: name {problem}", tenant=t.name)
            if t.name in tenants_by_name:
                raise TenantsFileError(f"tenant {t.name!r} is defined twice", tenant=t.name)
            tenants_by_name[t.name] = t
            for k in t.api_keys:
                if not _KEY_ID.fullmatch(k.id):
                    raise TenantsFileError(
                        f"tenant {t.name!r}: api key id {k.id!r} must be 4-32 of a-z 0-9", tenant=t.name, value=k.id
                    )
                if (other := self._keys.get(k.id)) is not None:
                    raise TenantsFileError(
                        f"tenant {t.name!r}: api key id {k.id!r} is already used by tenant {other.principal.tenant!r}",
                        tenant=t.name,
                        value=k.id,
                    )
                try:
                    parsed = ScryptHash.parse(k.hash)
                except ValueError as e:
                    raise TenantsFileError(
                        f"tenant {t.name!r}: api key {k.id!r}: hash {e}", tenant=t.name, value=k.id
                    ) from None
                self._keys[k.id] = _IndexedKey(Principal(t.name, "api-key", k.id, t.admin), parsed)
            for ident in t.mtls_identities:
                if problem := mtls_identity_problem(ident):
                    raise TenantsFileError(
                        f"tenant {t.name!r}: mTLS identity {ident!r} {problem}", tenant=t.name, value=ident
                    )
                if (holder := self._identities.get(ident)) is not None:
                    raise TenantsFileError(
                        f"tenant {t.name!r}: mTLS identity {ident!r} is already mapped to tenant {holder.tenant!r}",
                        tenant=t.name,
                        value=ident,
                    )
                self._identities[ident] = Principal(t.name, "mtls", ident, t.admin)
        self.tenants = tenants_by_name
        # Checked against for well-formed keys whose id is unknown, so that they cost what a wrong
        # secret costs (a random digest: nothing matches it).
        self._dummy = ScryptHash(SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, os.urandom(_SALT_BYTES), os.urandom(_DIGEST_BYTES))
        # Bounds the scrypts (16 MiB and a thread each) that wrong keys can make us spend.
        self.checks = KeyChecker(
            self.verify_key,
            cache_ttl=cache_ttl,
            cache_size=cache_size,
            failed_ttl=failed_cache_ttl,
            failed_size=failed_cache_size,
            concurrency=max_concurrent_verifications,
            per_key_id=per_key_id_verifications,
            max_queued=max_queued_verifications,
        )

    def __len__(self) -> int:
        return len(self.tenants)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self.tenants.values())

    def key_id(self, key: str) -> str:
        """The public id of an API key, for logs (the key itself is never logged)."""
        parsed = parse_key(key)
        return parsed[0] if parsed else "(malformed)"

    def for_identity(self, identity: str) -> Principal | None:
        """The principal of an mTLS identity ("spiffe://..." or "CN=...") if the file maps it."""
        return self._identities.get(identity)

    def verify_key(self, key: str) -> Principal | None:
        """Uncached and blocking: one scrypt for every well-formed key, whether or not its id is
        known (against a dummy hash if not), so the time taken does not tell which ids exist.
        `authenticate_key` is the per-call path."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        entry = self._keys.get(parsed[0])
        matched = (entry.hash if entry is not None else self._dummy).matches(key.encode("ascii"))
        return entry.principal if entry is not None and matched else None

    async def authenticate_key(self, key: str, alive: Callable[[], bool] | None = None) -> Principal | None:
        """The principal of an API key, or None. Never blocks the event loop on scrypt.

        A malformed key costs nothing (the format is public). A well-formed one, known id or not,
        costs one scrypt in a worker thread unless the same key passed or failed recently;
        concurrent calls with one key share it. `keycheck` bounds the rest: it raises
        `CredentialCheckBusy` rather than queue past its limits, and CancelledError when `alive()`
        says the caller left before its key was checked.
        """
        parsed = parse_key(key)
        if parsed is None:
            return None
        return await self.checks.check(key, parsed[0], alive)


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
