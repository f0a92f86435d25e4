"""Sessions: a lease plus a session record (the proof that the lease is a session of this tenant).

Create, refresh and close, and `LeaseClock`, this replica's knowledge of when sessions expire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.errors import QuotaExceeded, RequestIdReused, SessionNotFound, SessionRevoked
from lockbroker.server.core.model import Revocation, SessionInfo
from lockbroker.server.core.names import Keyspace, derived_lease_id, prefix_end, session_id_of
from lockbroker.server.core.owners import SessionOwners
from lockbroker.server.core.quota import QuotaLookup, TenantQuota
from lockbroker.server.core.slots import SlotClaimer


def session_record(ttl: int, owner: str, implicit_lock: str | None, principal: str = "") -> bytes:
    doc: dict[str, object] = {"ttl": ttl, "owner": owner, "created": round(time.time(), 3)}
    if implicit_lock is not None:
        doc["lock"] = implicit_lock
    if principal:
        doc["p"] = principal  # see core/owners.py
    return json.dumps(doc, separators=(",", ":")).encode()


def check_ttl(tenant: str, quota: TenantQuota, ttl: int) -> None:
    if quota.max_ttl and ttl > quota.max_ttl:
        raise QuotaExceeded(
            tenant,
            "max_ttl",
            quota.max_ttl,
            f"ttl {ttl}s is above tenant {tenant!r}'s max_ttl of {quota.max_ttl}s",
            None,
        )


class LeaseClock:
    """The latest lower bound this replica has seen on each session's expiry.

    A lease granted or refreshed after time T with TTL t lives at least until T + t (etcd only
    ever extends it, or revokes it, which also deletes its keys). Knowing this saves Acquire a
    LeaseTimeToLive call. Sessions refreshed through another replica are simply not here.
    """

    MAX = 100_000

    def __init__(self) -> None:
        self._expiry: dict[int, float] = {}

    def note(self, lease_id: int, expires_at: float) -> None:
        if len(self._expiry) >= self.MAX:
            now = time.time()
            self._expiry = {k: v for k, v in self._expiry.items() if v > now}
            if len(self._expiry) >= self.MAX:
                self._expiry.clear()
        if expires_at > self._expiry.get(lease_id, 0.0):
            self._expiry[lease_id] = expires_at

    def get(self, lease_id: int) -> float | None:
        expires = self._expiry.get(lease_id)
        return expires if expires is not None and expires > time.time() else None

    def forget(self, lease_id: int) -> None:
        self._expiry.pop(lease_id, None)


class Sessions:
    def __init__(
        self,
        backend: LockBackend,
        *,
        keyspace: Callable[[str], Keyspace],
        quotas: QuotaLookup,
        leases: LeaseClock,
        claimer: SlotClaimer,
        cleanups: Cleanups,
        owners: SessionOwners,
    ) -> None:
        self._backend = backend
        self._keyspace = keyspace
        self._quotas = quotas
        self.leases = leases
        self._claimer = claimer
        self._cleanups = cleanups
        self.owners = owners

    async def create(self, tenant: str, ttl: int, owner: str, request_id: str, principal: str = "") -> SessionInfo:
        ks = self._keyspace(tenant)
        quota = self._quotas(tenant)
        check_ttl(tenant, quota, ttl)
        want = derived_lease_id(tenant, "session", request_id) if request_id else 0
        started = time.time()
        lease = await self._backend.grant_lease(ttl, want)
        key = ks.session_key(lease.lease_id)
        if not lease.created:
            # A retry: the first attempt's lease exists. It must be a session of this tenant.
            if not await self._backend.session_exists(key):
                raise RequestIdReused(f"request_id {request_id!r} was already used for another request")
            left = await self._backend.lease_ttl(lease.lease_id)
            if left < 0:
                raise SessionNotFound("the session created by this request_id has expired")
            return SessionInfo(session_id_of(lease.lease_id), ttl, time.time() + left)
        record = session_record(lease.ttl, owner, None, principal)
        try:
            claims = [(ks.session_pool(quota.max_sessions), key)] if quota.max_sessions else []
            await self._claimer.claiming(
                tenant, claims, lambda slots: self._backend.put_session(key, record, lease.lease_id, slots)
            )
        except BaseException:
            await self._cleanups.run(lambda: self._backend.revoke_lease(lease.lease_id))
            raise
        self.leases.note(lease.lease_id, started + lease.ttl)
        self.owners.note(tenant, lease.lease_id, principal)
        return SessionInfo(session_id_of(lease.lease_id), lease.ttl, started + lease.ttl)

    async def refresh(
        self, tenant: str, lease_id: int, *, owner_known: bool = False, principal: str = ""
    ) -> SessionInfo:
        """Refresh once. `owner_known`: the caller already saw this tenant's session record for
        this lease and was allowed to use it (a lease never changes tenant or owner, and a gone
        lease answers TTL 0 below), which saves the check on every refresh of a KeepAlive stream
        after its first. NotOwner when the session is another principal's.

        The answer lists the grants an admin revoked from the session (one more read)."""
        # The session record is the proof that this lease is a session of this tenant.
        if not owner_known and not await self.owners.check(tenant, lease_id, principal):
            raise await self._gone(tenant, lease_id, "does not exist or has expired")
        before = time.time()
        ttl = await self._backend.keepalive(lease_id)
        if ttl <= 0:  # etcd's answer for a lease that is gone: never revived
            self.leases.forget(lease_id)
            self.owners.forget(tenant, lease_id)
            raise await self._gone(tenant, lease_id, "has expired")
        self.leases.note(lease_id, before + ttl)
        return SessionInfo(session_id_of(lease_id), ttl, before + ttl, await self._revocations(tenant, lease_id))

    async def _revocations(self, tenant: str, lease_id: int) -> tuple[Revocation, ...]:
        prefix = self._keyspace(tenant).revocations(lease_id)
        found, _ = await self._backend.values(prefix, prefix_end(prefix), 0)
        return tuple(r for _, raw, _ in found if (r := Revocation.decode(raw)) is not None)

    async def _gone(self, tenant: str, lease_id: int, why: str) -> SessionNotFound:
        """SessionRevoked if an admin revoked the session (its tombstone says so), else SessionNotFound."""
        raw = await self._backend.get_value(self._keyspace(tenant).tomb(lease_id))
        tomb = Revocation.decode(raw) if raw is not None else None
        if tomb is not None:
            return SessionRevoked(
                f"session {session_id_of(lease_id)} was revoked by an admin: {tomb.message}",
                {"session": session_id_of(lease_id), "admin_reason": tomb.message},
            )
        return SessionNotFound(f"session {session_id_of(lease_id)} {why}")

    async def close(self, tenant: str, lease_id: int, principal: str = "") -> bool:
        if not await self.owners.check(tenant, lease_id, principal):
            return False
        self.leases.forget(lease_id)
        self.owners.forget(tenant, lease_id)
        return await self._backend.revoke_lease(lease_id)
