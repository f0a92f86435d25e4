"""The lock recipe: sessions, a FIFO queue per lock, fencing tokens, idempotent retries.

Modelled on etcd's own v3lock service and client/v3/concurrency.Mutex, with three differences:
- a waiter watches its predecessor from the revision it read + 1 (served at once by etcd, where
  etcd's recipe watches from the current revision and is served in 100 ms batches);
- try-lock is one conditional transaction that puts nothing when the lock is held;
- the request id is stored with the entry (and turned into the lease id of sessions a request
  creates), so a retry on any replica finds what the first attempt made.

Every path that does not end in a grant removes what it queued, even when cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from lockbroker.server.core.backend import (
    EntryConflict,
    LockBackend,
    SessionMissing,
    SessionTaken,
    SlotsTaken,
    WatchInterrupted,
    call_deadline,
)
from lockbroker.server.core.errors import (
    AlreadyQueued,
    DeadlineExceeded,
    LockBrokerError,
    LockHeld,
    NotAcquiredInfo,
    QuotaExceeded,
    RequestIdReused,
    SessionLost,
    SessionNotFound,
    ShuttingDown,
    Unavailable,
    WaitExpired,
)
from lockbroker.server.core.model import (
    Enqueued,
    Entry,
    EntryValue,
    Grant,
    HeldLock,
    LockState,
    Page,
    Position,
    ReleaseMark,
    SessionInfo,
)
from lockbroker.server.core.names import Keyspace, derived_lease_id, prefix_end, session_id_of
from lockbroker.server.core.quota import LIMITS, UNLIMITED, Pool, QuotaLookup, TenantQuota

log = logging.getLogger("lockbroker.core")

_T = TypeVar("_T")

# Answer this long before the RPC deadline, so the caller gets our answer rather than its own timeout.
DEADLINE_MARGIN = 0.05
# How long a caller waits for the clean-up of its abandoned wait, and how long clean-up keeps
# retrying in the background while etcd is unreachable.
CLEANUP_TIMEOUT = 3.0
CLEANUP_WINDOW = 60.0
# Attempts at claiming a free quota slot when the hashed one and then a read free one are taken
# (each later attempt reads again, so only a near-full pool under a race uses them all).
SLOT_ATTEMPTS = 4
# Random slots read when the hashed one is taken, before falling back to reading the whole pool:
# a pool of a million slots with a fifth taken would otherwise make etcd list 200,000 keys for
# one in five claims.
SLOT_PROBES = 16
# How soon a caller refused for held state may try again: state frees as locks are released.
QUOTA_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class AcquireParams:
    name: str
    lease_id: int | None  # None: create a session for this one lock
    ttl: int  # for the created session
    wait: float  # seconds; 0 = try once
    owner: str
    request_id: str  # "" = not retryable


def _session_record(ttl: int, owner: str, implicit_lock: str | None) -> bytes:
    doc: dict[str, object] = {"ttl": ttl, "owner": owner, "created": round(time.time(), 3)}
    if implicit_lock is not None:
        doc["lock"] = implicit_lock
    return json.dumps(doc, separators=(",", ":")).encode()


def _free_slot(pool: Pool, taken: set[bytes]) -> bytes | None:
    """A free slot of `pool` picked at random, or None if every slot is taken.

    Pools can be large (a million slots) and mostly empty: draw at random while at most half is
    taken, and list the free slots only when the pool is fuller than that."""
    if len(taken) * 2 <= pool.size:
        while True:
            key = pool.key(random.randrange(pool.size))  # noqa: S311 - spreading, not secrecy
            if key not in taken:
                return key
    free = [j for j in range(pool.size) if pool.key(j) not in taken]
    return pool.key(random.choice(free)) if free else None  # noqa: S311


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


class LockCore:
    def __init__(self, backend: LockBackend, key_root: str, quotas: QuotaLookup = lambda _t: UNLIMITED) -> None:
        self._backend = backend
        self._root = key_root
        self._quotas = quotas
        self._keyspaces: dict[str, Keyspace] = {}
        self.leases = LeaseClock()
        self._closing: asyncio.Future[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._waiting: Counter[str] = Counter()  # blocking Acquire calls in progress, per tenant
        # The quota slots of entries this replica granted, so Release deletes them in its one
        # transaction; a release of an entry not in here reads them from the deleted entry.
        self._slots: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}

    def keyspace(self, tenant: str) -> Keyspace:
        ks = self._keyspaces.get(tenant)
        if ks is None:
            ks = self._keyspaces[tenant] = Keyspace(self._root, tenant)
        return ks

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(self, tenant: str, ttl: int, owner: str, request_id: str) -> SessionInfo:
        ks = self.keyspace(tenant)
        quota = self._quotas(tenant)
        self._check_ttl(tenant, quota, ttl)
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
        record = _session_record(lease.ttl, owner, None)
        try:
            claims = [(ks.session_pool(quota.max_sessions), key)] if quota.max_sessions else []
            await self._claiming(
                tenant, claims, lambda slots: self._backend.put_session(key, record, lease.lease_id, slots)
            )
        except BaseException:
            await self._cleanup(lambda: self._backend.revoke_lease(lease.lease_id))
            raise
        self.leases.note(lease.lease_id, started + lease.ttl)
        return SessionInfo(session_id_of(lease.lease_id), lease.ttl, started + lease.ttl)

    async def refresh(self, tenant: str, lease_id: int, *, owner_known: bool = False) -> SessionInfo:
        """Refresh once. `owner_known`: the caller already saw this tenant's session record for
        this lease (a lease never changes tenant, and a gone lease answers TTL 0 below), which
        saves the read on every refresh of a KeepAlive stream after its first."""
        # The session record is the proof that this lease is a session of this tenant.
        if not owner_known and not await self._backend.session_exists(self.keyspace(tenant).session_key(lease_id)):
            raise SessionNotFound(f"session {session_id_of(lease_id)} does not exist or has expired")
        before = time.time()
        ttl = await self._backend.keepalive(lease_id)
        if ttl <= 0:  # etcd's answer for a lease that is gone: never revived
            self.leases.forget(lease_id)
            raise SessionNotFound(f"session {session_id_of(lease_id)} has expired")
        self.leases.note(lease_id, before + ttl)
        return SessionInfo(session_id_of(lease_id), ttl, before + ttl)

    async def close_session(self, tenant: str, lease_id: int) -> bool:
        if not await self._backend.session_exists(self.keyspace(tenant).session_key(lease_id)):
            return False
        self.leases.forget(lease_id)
        return await self._backend.revoke_lease(lease_id)

    # -- acquire ----------------------------------------------------------------------------

    async def acquire(self, tenant: str, p: AcquireParams) -> Grant:
        quota = self._quotas(tenant)
        if p.lease_id is None:
            self._check_ttl(tenant, quota, p.ttl)
        if quota.max_wait and p.wait > quota.max_wait:
            raise QuotaExceeded(
                tenant,
                "max_wait",
                quota.max_wait,
                f"wait_timeout {p.wait:g}s is above tenant {tenant!r}'s max_wait of {quota.max_wait:g}s",
                None,
            )
        if p.wait <= 0:
            return await self._acquire(tenant, p, quota)
        if quota.max_waiters and self._waiting[tenant] >= quota.max_waiters:
            raise QuotaExceeded(
                tenant,
                "max_waiters",
                quota.max_waiters,
                f"tenant {tenant!r} already has {quota.max_waiters} blocking Acquire calls waiting on this replica",
                QUOTA_RETRY_AFTER,
            )
        self._waiting[tenant] += 1
        try:
            return await self._acquire(tenant, p, quota)
        finally:
            self._waiting[tenant] -= 1
            if not self._waiting[tenant]:
                del self._waiting[tenant]

    async def _acquire(self, tenant: str, p: AcquireParams, quota: TenantQuota) -> Grant:
        ks = self.keyspace(tenant)
        started = time.monotonic()
        request_id = p.request_id or uuid.uuid4().hex
        attempt = uuid.uuid4().hex[:12]
        lease_id, created_lease, expires_at = await self._session_for(tenant, p)
        key = ks.entry_key(p.name, lease_id)
        mine: Entry | None = None
        try:
            pos = await self._enqueue(tenant, quota, p, lease_id, request_id, attempt=attempt)
            if pos.mine is None:
                raise await self._not_acquired(LockHeld, p.name, pos, started)
            mine = pos.mine
            if mine.value.slots:
                self._remember_slots(mine)
            queue_position = pos.ahead
            await self._wait_turn(p, ks.lock_prefix(p.name), mine, pos, started)
            expires_at = expires_at or self.leases.get(lease_id) or await self._expiry(lease_id)
        except BaseException as exc:
            # Did our enqueue perhaps reach etcd? A cancelled or failed call in flight may have;
            # only a definite answer (refused, not acquired, a write never sent) says it did not.
            unknown = mine is None and (
                isinstance(exc, asyncio.CancelledError)
                or (isinstance(exc, Unavailable) and exc.outcome_unknown)
                or not isinstance(exc, LockBrokerError)
            )
            mark = ks.mark(lease_id)
            await self._cleanup(lambda: self._abandon(key, mine, created_lease, attempt if unknown else None, mark))
            raise
        return Grant(
            p.name,
            mine.create_revision,
            session_id_of(lease_id),
            expires_at,
            p.owner,
            mine.value.queued_at,
            request_id,
            time.monotonic() - started,
            queue_position,
        )

    async def _session_for(self, tenant: str, p: AcquireParams) -> tuple[int, int | None, float | None]:
        """(lease, the lease if this call created it, its expiry if known) for an Acquire."""
        if p.lease_id is not None:
            return p.lease_id, None, None
        want = derived_lease_id(tenant, "acquire", p.request_id) if p.request_id else 0
        before = time.time()
        lease = await self._backend.grant_lease(p.ttl, want)
        if not lease.created:
            return lease.lease_id, None, None  # a retry: the first attempt's session
        self.leases.note(lease.lease_id, before + lease.ttl)
        return lease.lease_id, lease.lease_id, before + lease.ttl

    async def _enqueue(
        self, tenant: str, quota: TenantQuota, p: AcquireParams, lease_id: int, request_id: str, *, attempt: str
    ) -> Position:
        """Queue the entry (or find this request's earlier one); position.mine None: try-lock lost."""
        ks = self.keyspace(tenant)
        implicit = p.lease_id is None
        key = ks.entry_key(p.name, lease_id)
        session_key = ks.session_key(lease_id)
        queued_at = time.time()
        pools: list[tuple[Pool, bytes]] = []
        if implicit and quota.max_sessions:
            pools.append((ks.session_pool(quota.max_sessions), session_key))
        if quota.max_locks:
            pools.append((ks.entry_pool(quota.max_locks), key))
        if quota.max_waiters_per_lock:
            # The holder takes a slot too: the pool bounds the whole queue at holder + waiters.
            pools.append((ks.lock_pool(p.name, quota.max_waiters_per_lock + 1), key))

        def put(slots: Sequence[bytes]) -> Awaitable[Enqueued]:
            # The session's slot is put with (and owned by) the session record, not the entry.
            entry_slots = tuple(s for s in slots if not s.startswith(ks.quota_root + b"s/"))
            return self._backend.enqueue(
                ks.lock_prefix(p.name),
                key,
                EntryValue(p.owner, request_id, queued_at, implicit, entry_slots, attempt).encode(),
                lease_id,
                session_key=session_key,
                new_session_value=_session_record(p.ttl, p.owner, p.name) if implicit else None,
                only_if_free=p.wait <= 0,
                slots=slots,
                mark=ks.mark(lease_id).key,
            )

        try:
            enq = await self._claiming(tenant, pools, put)
        except SessionMissing:
            raise SessionNotFound(f"session {session_id_of(lease_id)} does not exist or has expired") from None
        except SessionTaken:
            raise RequestIdReused(f"request_id {request_id!r} was already used to acquire another lock") from None
        except EntryConflict as e:
            if implicit:  # the same session and lock under another request id: only a reused id gets here
                raise RequestIdReused(f"request_id {request_id!r} was already used to acquire another lock") from None
            raise AlreadyQueued(
                f"session {session_id_of(lease_id)} already holds or waits for lock {p.name!r} "
                f"(request_id {e.existing.request_id!r}); locks are not reentrant",
                {"lock": p.name, "request_id": e.existing.request_id, "fencing_token": str(e.existing.create_revision)},
            ) from None
        if enq.position.mine is None and not enq.created and p.wait > 0:
            raise SessionLost(f"the queue entry of request {request_id!r} was removed (session ended or released)")
        return enq.position

    @staticmethod
    def _check_ttl(tenant: str, quota: TenantQuota, ttl: int) -> None:
        if quota.max_ttl and ttl > quota.max_ttl:
            raise QuotaExceeded(
                tenant,
                "max_ttl",
                quota.max_ttl,
                f"ttl {ttl}s is above tenant {tenant!r}'s max_ttl of {quota.max_ttl}s",
                None,
            )

    async def _claiming(
        self,
        tenant: str,
        claims: Sequence[tuple[Pool, bytes]],
        write: Callable[[Sequence[bytes]], Awaitable[_T]],
    ) -> _T:
        """Run `write` with one free slot of each pool (claimed for its owner key); QuotaExceeded
        if a pool is full.

        The hashed slot first (no read); for a pool whose slot turned out taken, read the pool
        and pick a free slot at random, so racing claimants rarely pick the same one again.
        """
        slots = [pool.slot(owner) for pool, owner in claims]
        collided = claims[0][0] if claims else None
        for attempt in range(SLOT_ATTEMPTS):
            try:
                return await write(slots)
            except SlotsTaken as e:
                if attempt == SLOT_ATTEMPTS - 1:
                    break
                for i, (pool, _) in enumerate(claims):
                    if slots[i] not in e.taken:
                        continue
                    collided = pool
                    slot = await self._another_slot(pool, e.taken)
                    if slot is None:
                        raise self._full(tenant, pool) from None
                    slots[i] = slot
        assert collided is not None  # SlotsTaken needs a slot
        # Every attempt lost a race for the last free slots: as good as full, for now.
        raise self._full(tenant, collided)

    async def _another_slot(self, pool: Pool, taken: Sequence[bytes]) -> bytes | None:
        """A slot of `pool` that was free just now, or None if the pool is full.

        SLOT_PROBES random slots are read first, at a cost that does not grow with the pool;
        only when they are all taken (a pool about 85% full or more) is the whole pool read."""
        if pool.size > 4 * SLOT_PROBES:
            candidates = {pool.key(random.randrange(pool.size)) for _ in range(SLOT_PROBES)}  # noqa: S311
            candidates.difference_update(taken)
            if candidates:
                busy = await self._backend.taken_among(sorted(candidates))
                free = sorted(candidates - busy)
                if free:
                    return random.choice(free)  # noqa: S311 - spreading, not secrecy
        return _free_slot(pool, await self._backend.taken_slots(pool.prefix))

    @staticmethod
    def _full(tenant: str, pool: Pool) -> QuotaExceeded:
        size = pool.size - 1 if pool.limit == "max_waiters_per_lock" else pool.size
        return QuotaExceeded(
            tenant,
            pool.limit,
            size,
            f"tenant {tenant!r} is at its quota {pool.limit} = {size} ({LIMITS[pool.limit]})",
            QUOTA_RETRY_AFTER,
        )

    def _remember_slots(self, entry: Entry) -> None:
        if len(self._slots) >= LeaseClock.MAX:
            # Forget the oldest half: their releases read the slots back from the deleted entry.
            for k in list(self._slots)[: LeaseClock.MAX // 2]:
                del self._slots[k]
        self._slots[entry.key] = (entry.create_revision, entry.value.slots)

    async def _expiry(self, lease_id: int) -> float:
        """Ask etcd how long a session has left (one this replica has not seen refreshed)."""
        left = await self._backend.lease_ttl(lease_id)
        if left < 0:
            raise SessionLost(f"session {session_id_of(lease_id)} expired as the lock was granted")
        return time.time() + left

    async def _wait_turn(self, p: AcquireParams, prefix: bytes, mine: Entry, pos: Position, started: float) -> Position:
        """Wait until no entry is ahead of `mine`, watching only the one just ahead (no herd)."""
        wait_until = started + p.wait
        rpc_deadline = call_deadline.get()
        while pos.predecessor is not None:
            if p.wait <= 0:
                raise await self._not_acquired(LockHeld, p.name, pos, started)
            until = wait_until if rpc_deadline is None else min(wait_until, rpc_deadline - DEADLINE_MARGIN)
            left = until - time.monotonic()
            if left <= 0:
                if until < wait_until:
                    raise DeadlineExceeded("the RPC deadline passed while waiting for the lock")
                raise await self._not_acquired(WaitExpired, p.name, pos, started)
            try:
                await self._until_deleted(prefix, (pos.predecessor.key, mine.key), pos.revision, left)
            except WatchInterrupted as e:
                log.info("watch on %r interrupted (%s); reading the queue again", pos.predecessor.key, e)
                await asyncio.sleep(0.05)
            except TimeoutError:
                continue
            pos = await self._backend.position(prefix, mine.key, mine.create_revision)
            if pos.mine is None:
                raise SessionLost(f"session {session_id_of(mine.lease)} ended while waiting for {p.name!r}")
        # The read that found no predecessor also found our own key, and a key lives only as long
        # as its lease: the session was alive when we became holder (etcd's Jepsen fix).
        return pos

    async def _until_deleted(self, prefix: bytes, keys: tuple[bytes, ...], revision: int, timeout: float) -> None:
        """Return when any of `keys` is deleted after `revision` (or the watch asks for a re-read):
        the predecessor (our turn may have come) or our own entry (our session ended: tell the
        caller now, not at the timeout)."""
        if self.closing.done():
            raise ShuttingDown("the broker is shutting down", retry_after=0.5)
        watch = asyncio.ensure_future(self._backend.wait_deleted(prefix, keys, revision))
        try:
            done, _ = await asyncio.wait({watch, self.closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not watch.done():
                watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if watch in done:
            watch.result()  # raises WatchInterrupted
            return
        if self.closing in done:
            raise ShuttingDown("the broker is shutting down", retry_after=0.5)
        raise TimeoutError

    async def _not_acquired(
        self, kind: type[LockHeld] | type[WaitExpired], name: str, pos: Position, started: float
    ) -> LockHeld | WaitExpired:
        holder = pos.holder if pos.holder is not None and pos.holder != pos.mine else None
        expires: float | None = None
        if holder is not None:
            with contextlib.suppress(Unavailable):
                left = await self._backend.lease_ttl(holder.lease)
                expires = time.time() + left if left >= 0 else None
        waiters = max(0, pos.count - 1 - (1 if pos.mine is not None else 0))
        info = NotAcquiredInfo(name, holder, expires, waiters, time.monotonic() - started)
        if kind is LockHeld:
            return LockHeld(
                f"lock {name!r} is held" + (f" by {holder.owner!r}" if holder and holder.owner else ""), info
            )
        return WaitExpired(f"gave up waiting for lock {name!r} after {info.waited:.3f}s", info)

    async def _abandon(
        self,
        key: bytes,
        mine: Entry | None,
        created_lease: int | None,
        unknown_attempt: str | None,
        mark: ReleaseMark,
    ) -> None:
        """Remove what a failed Acquire queued: its entry, or the whole session it created.

        Only what this call made or adopted: a retry of the same request that has since adopted
        the entry (see LockBackend.enqueue) keeps it, and a session this call did not create is
        left to its owner.
        """
        if created_lease is not None:
            await self._backend.revoke_lease(created_lease)
            return
        if mine is None and unknown_attempt is not None:
            mine = await self._late_entry(key, unknown_attempt, mark)
        if mine is not None:
            await self._backend.delete_entry(key, mine.create_revision, mine.mod_revision, mine.value.slots, mark)

    async def _late_entry(self, key: bytes, attempt: str, mark: ReleaseMark) -> Entry | None:
        """The entry an enqueue of unknown outcome made, if it landed; and if it has not, make sure
        it never will.

        A transaction that was in flight when its caller gave up can still be applied: one
        forwarded to a frozen leader commits when the leader wakes, one stuck behind a partition
        arrives when it heals, and the entry would become a holder nobody knows of. Reading once
        cannot rule that out; moving the session's release mark does, since the enqueue carries
        the mark's revision as of its sending (see LockBackend.enqueue).
        """
        found = await self._backend.seal_entry(key, mark)
        # Ours only if this call made it and nobody has re-put it since: a retry of the request
        # adopts the entry (a new mod revision) and then owns its clean-up, and a retry that
        # found nothing made a fresh entry with its own attempt id.
        if found is not None and found.value.attempt == attempt and found.mod_revision == found.create_revision:
            return found
        return None

    async def _cleanup(self, work: Callable[[], Awaitable[object]]) -> None:
        """Run clean-up to the end even if the caller is cancelled or etcd is briefly away.

        The caller waits at most CLEANUP_TIMEOUT; past that the clean-up goes on in the background,
        retrying for up to CLEANUP_WINDOW, so a waiter cut off by an etcd outage is still removed
        from the queue once etcd is back (else the next release would hand the lock to a caller
        that was told it did not get it). The session's lease remains the last resort.
        """

        async def retrying() -> None:
            give_up = time.monotonic() + CLEANUP_WINDOW
            delay = 0.2
            while True:
                call_deadline.set(min(time.monotonic() + CLEANUP_TIMEOUT, give_up))
                try:
                    await work()
                    return
                except Unavailable as e:
                    if time.monotonic() + delay >= give_up:
                        log.warning("clean-up gave up; the session's lease will remove it: %s", e)
                        return
                except Exception as e:
                    log.warning("clean-up failed; the session's lease will remove it: %s", e)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

        deadline = call_deadline.get()
        task = asyncio.ensure_future(retrying())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        # The caller's answer must not wait past its own deadline: the clean-up goes on without it.
        wait = (
            CLEANUP_TIMEOUT if deadline is None else min(CLEANUP_TIMEOUT, deadline - DEADLINE_MARGIN - time.monotonic())
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=max(0.0, wait))

    # -- release, describe, list ------------------------------------------------------------

    async def release(self, tenant: str, name: str, fencing_token: int, lease_id: int | None) -> bool:
        ks = self.keyspace(tenant)
        if lease_id is not None:
            key = ks.entry_key(name, lease_id)
        else:
            found = await self._backend.find_entry(ks.lock_prefix(name), fencing_token)
            if found is None:
                return False
            key, lease_id = found.key, found.lease
        # Compare on the create revision: a stale token can never delete a newer grant.
        known = self._slots.pop(key, None)
        slots = known[1] if known is not None and known[0] == fencing_token else None
        mark = ks.mark(lease_id)
        deleted = await self._backend.delete_entry(key, fencing_token, slots=slots or (), mark=mark)
        if deleted is None:
            return False
        if slots is None and deleted.value.slots and not deleted.value.implicit_session:
            # Granted by another replica (or forgotten here): the entry named its slots.
            left = deleted.value.slots
            await self._cleanup(lambda: self._backend.delete_slots(left, fencing_token))
        if deleted.value.implicit_session:
            # The session existed only for this lock; end it now rather than at its TTL.
            await self._cleanup(lambda: self._backend.revoke_lease(deleted.lease))
        return True

    async def describe(self, tenant: str, name: str) -> LockState:
        entries = await self._backend.queue(self.keyspace(tenant).lock_prefix(name))
        if not entries:
            return LockState(name, None, None, [])
        holder = entries[0]
        left = await self._backend.lease_ttl(holder.lease)
        return LockState(name, holder, time.time() + left if left >= 0 else None, entries[1:])

    async def list(self, tenant: str, prefix: str, page_size: int, after: str | None) -> Page:
        ks = self.keyspace(tenant)
        # Key order is name order (see core.names), so the page after `after` starts past its entries.
        start = ks.after_lock(after) if after is not None else ks.names_prefix(prefix)
        end = prefix_end(ks.names_prefix(prefix))
        order: list[str] = []
        found: dict[str, tuple[Entry, int]] = {}
        more = True
        # Entries of one lock are contiguous in key order; stop once a page+1st name appears,
        # which proves every name before it is complete.
        while more and len(order) <= page_size:
            batch, more = await self._backend.scan(start, end, max(64, page_size * 4))
            for e in batch:
                name = ks.name_of(e.key)
                if name not in found:
                    order.append(name)
                    found[name] = (e, 1)
                else:
                    best, n = found[name]
                    found[name] = (e if e.create_revision < best.create_revision else best, n + 1)
            if batch:
                start = batch[-1].key + b"\0"
        page = order[:page_size]
        token = page[-1] if len(order) > page_size else ""
        return Page([HeldLock(n, found[n][0], found[n][1] - 1) for n in page], token)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closing(self) -> asyncio.Future[None]:
        """Done once the broker begins to shut down (made on first use: it needs the running loop)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def begin_shutdown(self) -> None:
        """Make every waiter give up (removing its entry) and refuse new waits."""
        if not self.closing.done():
            self.closing.set_result(None)

    async def drain_cleanups(self, timeout: float) -> None:
        """Give pending clean-ups `timeout` to finish on shutdown; leases remove the rest."""
        if self._cleanups:
            pending = list(self._cleanups)
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
