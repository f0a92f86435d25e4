"""The tenants registry: who each credential acts for, indexed for per-call authentication.

Built from `Tenant` records (tenants.py reads them from the file and writes them back); checks the
records against each other (unique ids and identities, well-formed hashes) so a registry, once built,
only answers. Key checks are cached, bounded and scheduled by `keycheck.KeyChecker`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from lockbroker.interceptors.principal import Principal, tenant_problem
from lockbroker.server.auth.credentials import (
    ScryptHash,
    key_id_problem,
    mtls_identity_problem,
    parse_key,
    unmatchable_hash,
)
from lockbroker.server.auth.keycheck import KeyChecker


class TenantsFileError(ValueError):
    """The tenants file cannot be read, parsed or changed; the message names the file and the place."""

    def __init__(self, message: str, *, tenant: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        # What the message is about, so `parse` can point at the line that holds it.
        self.tenant = tenant
        self.value = value


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
                if problem := key_id_problem(k.id):
                    raise TenantsFileError(
                        f"tenant {t.name!r}: api key id {k.id!r} {problem}", tenant=t.name, value=k.id
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
        self._dummy = unmatchable_hash()
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


__all__ = ["ApiKeyRecord", "Tenant", "TenantRegistry", "TenantsFileError"]
