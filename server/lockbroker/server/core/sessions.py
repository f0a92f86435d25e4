"""Sessions: a lease plus a session record (the proof that the lease is a session of this tenant).

Create, refresh and close, and `LeaseClock`, this replica's knowledge of when sessions expire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.errors import QuotaExceeded, RequestIdReused, SessionNotFound
from lockbroker.server.core.model import SessionInfo
from lockbroker.server.core.names import Keyspace, derived_lease_id, session_id_of
from lockbroker.server.core.quota import QuotaLookup, TenantQuota
from lockbroker.server.core.slots import SlotClaimer


def session_record(ttl: int, owner: str, implicit_lock: str | None) -> bytes:
    doc: dict[str, object] = {"ttl": ttl, "owner": owner, "created": round(time.time(), 3)}
    if implicit_lock is not None:
        doc["lock"] = implicit_lock
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
    ) -> None:
        self._backend = backend
        self._keyspace = keyspace
        self._quotas = quotas
        self.leases = leases
        self._claimer = claimer
        self._cleanups = cleanups

    async def create(self, tenant: str, ttl: int, owner: str, request_id: str) -> SessionInfo:
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
        record = session_record(lease.ttl, owner, None)
        try:
            claims = [(ks.session_pool(quota.max_sessions), key)] if quota.max_sessions else []
            await self._claimer.claiming(
                tenant, claims, lambda slots: self._backend.put_session(key, record, lease.lease_id, slots)
            )
        except BaseException:
            await self._cleanups.run(lambda: self._backend.revoke_lease(lease.lease_id))
            raise
        self.leases.note(lease.lease_id, started + lease.ttl)
        return SessionInfo(session_id_of(lease.lease_id), lease.ttl, started + lease.ttl)

    async def refresh(self, tenant: str, lease_id: int, *, owner_known: bool = False) -> SessionInfo:
        """Refresh once. `owner_known`: the caller already saw this tenant's session record for
        this lease (a lease never changes tenant, and a gone lease answers TTL 0 below), which
        saves the read on every refresh of a KeepAlive stream after its first."""
        # The session record is the proof that this lease is a session of this tenant.
        if not owner_known and not await self._backend.session_exists(self._keyspace(tenant).session_key(lease_id)):
            raise SessionNotFound(f"session {session_id_of(lease_id)} does not exist or has expired")
        before = time.time()
        ttl = await self._backend.keepalive(lease_id)
        if ttl <= 0:  # etcd's answer for a lease that is gone: never revived
            self.leases.forget(lease_id)
            raise SessionNotFound(f"session {session_id_of(lease_id)} has expired")
        self.leases.note(lease_id, before + ttl)
        return SessionInfo(session_id_of(lease_id), ttl, before + ttl)

    async def close(self, tenant: str, lease_id: int) -> bool:
        if not await self._backend.session_exists(self._keyspace(tenant).session_key(lease_id)):
            return False
        self.leases.forget(lease_id)
        return await self._backend.revoke_lease(lease_id)
