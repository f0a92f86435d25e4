"""The operators' plane and the fence check: CheckFence, ForceRelease, RevokeSession, ListSessions.

A forced release deletes each holder's entry (every holder of a shared lock or a semaphore) and, in
the same transaction, puts a revocation marker bound to that holder's lease (names.py:
r/<lease>/<token>). The holder learns of it on its next
keepalive or refresh (Sessions.refresh lists the markers), so its client fires the loss signal
with reason REVOKED within one keepalive interval; the marker goes when the session ends. The next
grant's fencing token is greater because tokens are etcd create revisions.

A revoked session leaves a tombstone on a lease of its own (names.py: x/<lease>) for
REVOKED_SESSION_TTL, so a refresh that finds the session gone can say REVOKED rather than
"expired". Everything lives in etcd: any replica answers the same, also after a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from lockbroker.server.core import delay as lock_delay
from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.model import Entry, Revocation
from lockbroker.server.core.modes import holders
from lockbroker.server.core.names import Keyspace, prefix_end, session_id_of
from lockbroker.server.core.owners import SessionOwners, record_principal
from lockbroker.v1.reasons import ErrorReason

# How long "this session was revoked" is remembered after the session is gone: long enough for a
# client to send its next keepalive (every TTL/3) even after a hiccup.
REVOKED_SESSION_TTL = 60


@dataclass(frozen=True, slots=True)
class Fence:
    current: bool
    holder_token: int  # 0: the lock is free


@dataclass(frozen=True, slots=True)
class SessionSummary:
    lease: int
    owner: str
    principal: str
    ttl: int
    expires_at: float | None  # None: the lease is gone (the record is about to go too)
    held: list[tuple[str, int]]
    waiting: list[str]


class Admin:
    def __init__(self, backend: LockBackend, keyspace: Callable[[str], Keyspace], owners: SessionOwners) -> None:
        self._backend = backend
        self._keyspace = keyspace
        self._owners = owners

    async def check_fence(self, tenant: str, name: str, token: int) -> Fence:
        prefix = self._keyspace(tenant).lock_prefix(name)
        holder = await self._backend.holder(prefix)
        held = holder.create_revision if holder is not None else 0
        if holder is not None and held < token and (holder.value.shared or holder.value.limit):
            # Shared claims and permits: any entry that holds is current (core.modes).
            _, entries = await self._backend.queue_at(prefix)
            return Fence(any(e.create_revision == token for e in holders(entries)), held)
        return Fence(held == token, held)

    async def force_release(self, tenant: str, name: str, reason: str, admin: str) -> list[Entry]:
        """Remove every current grant of the lock and tell each one's session; the grants removed,
        oldest first ([] if the lock was free).

        Every grant that holds at the read goes: the holder of a lock, and every reader of a shared
        lock or permit holder of a semaphore (all of them hold, so none is "the" holder to pick).
        Waiters are left in place; those the removal lets in are granted as after any release."""
        ks = self._keyspace(tenant)
        prefix = ks.lock_prefix(name)
        for _ in range(3):  # the holders can change under us: a release, an expiry
            head = await self._backend.holder(prefix)
            if head is None:
                return []
            held = [head]
            if head.value.shared or head.value.limit:  # more than one may hold (core.modes)
                _, entries = await self._backend.queue_at(prefix)
                held = holders(entries)
            removed: list[Entry] = []
            for holder in held:
                note = Revocation(name, holder.create_revision, ErrorReason.REVOKED, reason, admin)
                marker = ks.revocation(holder.lease, holder.create_revision)
                if await self._backend.revoke_entry(holder, ks.mark(holder.lease), marker, note.encode()):
                    await lock_delay.start_now(self._backend, ks, name, holder.create_revision)
                    removed.append(holder)
            if removed:
                return removed
        return []

    async def revoke_session(self, tenant: str, lease_id: int, reason: str, admin: str) -> bool:
        ks = self._keyspace(tenant)
        if not await self._backend.session_exists(ks.session_key(lease_id)):
            return False
        # The tombstone first: a refresh that finds the session gone must find why.
        tomb = await self._backend.grant_lease(REVOKED_SESSION_TTL)
        note = Revocation("", 0, ErrorReason.REVOKED, reason, admin)
        await self._backend.put_value(ks.tomb(lease_id), note.encode(), tomb.lease_id)
        self._owners.forget(tenant, lease_id)
        return await self._backend.revoke_lease(lease_id)

    async def list_sessions(self, tenant: str, page_size: int, after: str | None) -> tuple[list[SessionSummary], str]:
        """A page of the tenant's sessions (by id) and the next page's token ("" at the end).

        Reads every lock entry of the tenant once to find what the page's sessions hold and wait
        for: an operator's call, not one for the hot path."""
        ks = self._keyspace(tenant)
        start = ks.sessions_root + (after.encode() + b"\0" if after else b"")
        records, more = await self._backend.values(start, prefix_end(ks.sessions_root), page_size)
        leases = {lease: raw for _, raw, lease in records}
        held: dict[int, list[tuple[str, int]]] = {lease: [] for lease in leases}
        waiting: dict[int, list[str]] = {lease: [] for lease in leases}
        if leases:
            entries, _ = await self._backend.scan(ks.locks_root, prefix_end(ks.locks_root), 0)
            queues: dict[str, list[Entry]] = {}
            for e in entries:
                queues.setdefault(ks.name_of(e.key), []).append(e)
            for n, queue in queues.items():
                queue.sort(key=lambda e: e.create_revision)
                # Shared claims and permits: more than one may hold (core.modes).
                holding = {e.create_revision for e in holders(queue)}
                for e in queue:
                    if e.lease in leases:
                        if e.create_revision in holding:
                            held[e.lease].append((n, e.create_revision))
                        else:
                            waiting[e.lease].append(n)
        out: list[SessionSummary] = []
        for lease, raw in leases.items():
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {}
            doc = doc if isinstance(doc, dict) else {}
            left = await self._backend.lease_ttl(lease)
            out.append(
                SessionSummary(
                    lease,
                    str(doc.get("owner", "")),
                    record_principal(raw),
                    int(doc.get("ttl", 0) or 0),
                    time.time() + left if left >= 0 else None,
                    sorted(held[lease]),
                    sorted(waiting[lease]),
                )
            )
        token = session_id_of(out[-1].lease) if more and out else ""
        return out, token
