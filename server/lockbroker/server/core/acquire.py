"""Acquire and Release: the FIFO queue of one lock, fencing tokens, idempotent retries.

Modelled on etcd's own v3lock service and client/v3/concurrency.Mutex, with three differences:
- a waiter watches its predecessor from the revision it read + 1 (served at once by etcd, where
  etcd's recipe watches from the current revision and is served in 100 ms batches);
- try-lock is one conditional transaction that puts nothing when the lock is held;
- the request id is stored with the entry (and turned into the lease id of sessions a request
  creates), so a retry on any replica finds what the first attempt made.

Every path that does not end in a grant removes what it queued, even when cancelled. The
waiting itself (a turn in the queue) is core.turn.

The uncontended path is kept flat on purpose: LockCore.acquire -> Acquirer.acquire -> the backend
call (tests/core/test_frames.py counts it); only a slot collision or a wait goes one level deeper.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from lockbroker.server.core import delay as lock_delay
from lockbroker.server.core.backend import (
    BackendError,
    EntryConflict,
    LockBackend,
    SessionMissing,
    SessionTaken,
    SlotsTaken,
)
from lockbroker.server.core.claims import ClaimKeys, reenter, release_hold
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.errors import (
    AlreadyQueued,
    LockBrokerError,
    LockHeld,
    NotOwner,
    QuotaExceeded,
    RequestIdReused,
    SessionLost,
    SessionNotFound,
    Unavailable,
    WaitExpired,
)
from lockbroker.server.core.model import Enqueued, Entry, EntryValue, Grant, Position, ReleaseMark
from lockbroker.server.core.modes import wait_turn as modes_wait
from lockbroker.server.core.names import Keyspace, derived_lease_id, session_id_of
from lockbroker.server.core.owners import SessionOwners
from lockbroker.server.core.quota import Pool, QuotaLookup, TenantQuota
from lockbroker.server.core.resume import RESUME_WINDOW, keep_place
from lockbroker.server.core.sessions import LeaseClock, check_ttl, session_record
from lockbroker.server.core.slots import QUOTA_RETRY_AFTER, SlotClaimer
from lockbroker.server.core.turn import QueueWaits

log = logging.getLogger("lockbroker.core")

Claim = tuple[Pool, bytes]


@dataclass(frozen=True, slots=True)
class AcquireParams:
    name: str
    lease_id: int | None  # None: create a session for this one lock
    ttl: int  # for the created session
    wait: float  # seconds; 0 = try once
    owner: str
    request_id: str  # "" = not retryable
    # Which of the session's claims on the lock (see Keyspace.entry_key): "" the plain one, else
    # a new claim (new_claim) or the reentrant owner's claim.
    claim: str = ""
    reentrant_owner: str = ""  # set: a reentrant acquire (see core.claims)
    principal: str = ""  # who asks (core/owners.py): recorded in a session made for this lock
    max_hold: float = 0.0  # seconds; 0: the tenant's max_hold (core/holds.py)
    lock_delay: float = 0.0  # seconds; 0: the tenant's lock_delay (core/delay.py)
    shared: bool = False  # a shared (read) claim (core/modes.py)
    limit: int = 0  # a semaphore permit of this many; 0: a lock (core/modes.py)
    data: bytes = b""  # stored with the entry: an election candidate's value (core/election.py)


def _claims(ks: Keyspace, quota: TenantQuota, p: AcquireParams, key: bytes, session_key: bytes) -> list[Claim]:
    claims: list[Claim] = []
    if p.lease_id is None and quota.max_sessions:
        claims.append((ks.session_pool(quota.max_sessions), session_key))
    if quota.max_locks:
        claims.append((ks.entry_pool(quota.max_locks), key))
    if quota.max_waiters_per_lock:
        # The holder takes a slot too: the pool bounds the whole queue at holder + waiters (a
        # semaphore's N permit holders + waiters; shared holders count as waiters, core.modes).
        claims.append((ks.lock_pool(p.name, quota.max_waiters_per_lock + max(1, p.limit)), key))
    return claims


def _refusal(e: BackendError, p: AcquireParams, lease_id: int, request_id: str) -> LockBrokerError:
    """What the caller is told when the backend refused an enqueue for the session or the entry."""
    if isinstance(e, SessionMissing):
        return SessionNotFound(f"session {session_id_of(lease_id)} does not exist or has expired")
    reused = RequestIdReused(f"request_id {request_id!r} was already used to acquire another lock")
    if isinstance(e, SessionTaken):
        return reused
    assert isinstance(e, EntryConflict)
    if p.lease_id is None:  # the same session and lock under another request id: only a reused id gets here
        return reused
    return AlreadyQueued(
        f"session {session_id_of(lease_id)} already holds or waits for lock {p.name!r} "
        f"(request_id {e.existing.request_id!r}); locks are not reentrant: send new_claim for another claim, "
        "or reentrant with reentrant_owner to re-enter",
        {"lock": p.name, "request_id": e.existing.request_id, "fencing_token": str(e.existing.create_revision)},
    )


class _Admitted:
    """A blocking Acquire counted against its tenant's max_waiters while it runs (tenant None:
    not counted). A class, not a generator context manager: it lives as long as the wait."""

    __slots__ = ("_tenant", "_waiting")

    def __init__(self, waiting: Counter[str], tenant: str | None) -> None:
        self._waiting = waiting
        self._tenant = tenant

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        tenant = self._tenant
        if tenant is not None:
            self._waiting[tenant] -= 1
            if not self._waiting[tenant]:
                del self._waiting[tenant]


async def _held() -> None:
    """The wait of an entry that holds at once."""


class Acquirer(QueueWaits):
    def __init__(
        self,
        backend: LockBackend,
        *,
        keyspace: Callable[[str], Keyspace],
        quotas: QuotaLookup,
        leases: LeaseClock,
        claimer: SlotClaimer,
        cleanups: Cleanups,
        closing: Callable[[], asyncio.Future[None]],
    ) -> None:
        self._backend = backend
        self._keyspace = keyspace
        self._quotas = quotas
        self._leases = leases
        self._claimer = claimer
        self._cleanups = cleanups
        self._closing = closing
        self._wakes, self._wakes_of = set(), None  # see QueueWaits._wakes_for
        self._bare = contextvars.Context()  # see QueueWaits._bare
        self._holders: dict[bytes, Entry] = {}  # see QueueWaits._kept
        self._waiting: Counter[str] = Counter()  # blocking Acquire calls in progress, per tenant
        # How long a waiter whose call was cancelled keeps its place for a retry (core.resume).
        self.resume_window = RESUME_WINDOW
        self._claim_keys = ClaimKeys()  # for the release of new_claim claims granted here

    def _admitted(self, tenant: str, quota: TenantQuota, p: AcquireParams) -> _Admitted:
        """Count a blocking Acquire against the tenant's max_waiters on this replica."""
        if quota.max_wait and p.wait > quota.max_wait:
            raise QuotaExceeded(
                tenant,
                "max_wait",
                quota.max_wait,
                f"wait_timeout {p.wait:g}s is above tenant {tenant!r}'s max_wait of {quota.max_wait:g}s",
                None,
            )
        if p.lock_delay:
            lock_delay.delay_of(tenant, quota, p.lock_delay)  # above the tenant's maximum: refused
        if p.wait <= 0:
            return _Admitted(self._waiting, None)
        if quota.max_waiters and self._waiting[tenant] >= quota.max_waiters:
            raise QuotaExceeded(
                tenant,
                "max_waiters",
                quota.max_waiters,
                f"tenant {tenant!r} already has {quota.max_waiters} blocking Acquire calls waiting on this replica",
                QUOTA_RETRY_AFTER,
            )
        self._waiting[tenant] += 1
        return _Admitted(self._waiting, tenant)

    def _turn(self, p: AcquireParams, prefix: bytes, mine: Entry, pos: Position, started: float) -> Awaitable[object]:
        """The wait for `mine`'s turn, if it has one to wait for (not async: no frame of its own)."""
        if pos.predecessor is None:
            return _held()
        # Shared claims and permits (or a lock asked for where a semaphore is): core.modes.
        if p.shared or p.limit or (pos.holder is not None and pos.holder.value.limit):
            return modes_wait(self._backend, p, prefix, mine, started, self)
        return self._wait_turn(p, prefix, mine, pos, started)

    async def acquire(self, tenant: str, p: AcquireParams) -> Grant:
        quota = self._quotas(tenant)
        if p.lease_id is None:
            check_ttl(tenant, quota, p.ttl)
        with self._admitted(tenant, quota, p):
            ks = self._keyspace(tenant)
            started = time.monotonic()
            request_id = p.request_id or uuid.uuid4().hex
            # 48 random bits tell this call's entry from another attempt's (a clean-up deletes only
            # its own); no secret. uuid4 cost a urandom syscall and a UUID object per acquire.
            attempt = f"{random.getrandbits(48):012x}"
            # The session: the caller's, or one made for this lock (a retry finds the first attempt's).
            lease_id, created_lease, expires_at = p.lease_id, None, None
            if lease_id is None:
                before = time.time()
                lease = await self._backend.grant_lease(
                    p.ttl, derived_lease_id(tenant, "acquire", p.request_id) if p.request_id else 0
                )
                lease_id = lease.lease_id
                if lease.created:
                    self._leases.note(lease_id, before + lease.ttl)
                    created_lease, expires_at = lease_id, before + lease.ttl
            key = ks.entry_key(p.name, lease_id, p.claim)
            claims = _claims(ks, quota, p, key, ks.session_key(lease_id))
            put = self._putter(ks, p, lease_id, request_id, attempt)
            mine: Entry | None = None
            try:
                slots = self._claimer.first(claims)
                try:
                    try:
                        enq = await put(slots)
                        if not enq.created and enq.position.mine is None and p.wait > 0:
                            # The earlier attempt's entry this retry was adopting was removed by
                            # that attempt's clean-up (core.resume) in between; the session is alive
                            # (checked), so queue anew, once: the place is lost, never the session.
                            enq = await put(slots)
                    except SlotsTaken as e:
                        enq = await self._claimer.again(tenant, claims, slots, e, put)
                except (SessionMissing, SessionTaken, EntryConflict) as e:
                    if not (p.reentrant_owner and isinstance(e, EntryConflict)):
                        raise _refusal(e, p, lease_id, request_id) from None
                    # The owner's claim exists: count one more hold on it (core.claims).
                    return await reenter(self._backend, self._leases, p, e.existing, request_id, started)
                pos = enq.position
                if pos.mine is None:
                    if not enq.created and p.wait > 0:
                        raise SessionLost(
                            f"the queue entry of request {request_id!r} was removed (session ended or released)"
                        )
                    raise await self._not_acquired(LockHeld, p.name, pos, started)
                mine = pos.mine
                if mine.value.slots:
                    self._claimer.remember(mine)
                # ahead: entries ahead when this call entered the queue (not re-read later).
                ahead, turn = pos.ahead, self._turn(p, ks.lock_prefix(p.name), mine, pos, started)
                # What only the enqueue needed is not kept alive through the wait, nor the queue
                # it read: the wait keeps what it needs of that.
                del enq, put, claims, slots, pos
                await turn
                await lock_delay.before_grant(
                    self._backend, tenant, quota, ks, mine, p.name, p.lock_delay, p.wait, started, self._closing
                )
                expires_at = expires_at or self._leases.get(lease_id) or await self._expiry(lease_id)
            except BaseException as exc:
                await self._give_up(exc, p, ks, key, mine, created_lease, attempt)
                raise
            self._claim_keys.remember(mine)
            return Grant(
                p.name,
                mine.create_revision,
                session_id_of(lease_id),
                expires_at,
                p.owner,
                mine.value.queued_at,
                request_id,
                time.monotonic() - started,
                ahead,
                mine.value.hold_count,
                mine.value.shared,
                mine.value.limit,
            )

    async def _expiry(self, lease_id: int) -> float:
        """When a session this replica has not seen refreshed expires: asked of etcd."""
        left = await self._backend.lease_ttl(lease_id)
        if left < 0:
            raise SessionLost(f"session {session_id_of(lease_id)} expired as the lock was granted")
        return time.time() + left

    def _putter(
        self, ks: Keyspace, p: AcquireParams, lease_id: int, request_id: str, attempt: str
    ) -> Callable[[Sequence[bytes]], Awaitable[Enqueued]]:
        """The enqueue of this call's entry, given the quota slots to claim with it."""
        implicit = p.lease_id is None
        queued_at = round(time.time(), 6)  # as EntryValue.encode stores it
        session_value = session_record(p.ttl, p.owner, p.name, p.principal) if implicit else None
        reentrant = (p.reentrant_owner, (request_id,)) if p.reentrant_owner else ("", ())

        def put(slots: Sequence[bytes]) -> Awaitable[Enqueued]:
            # Not async: it hands back the backend's coroutine, so it is no frame of its own.
            # The session's slot is put with (and owned by) the session record, not the entry.
            entry_slots = tuple(s for s in slots if not s.startswith(ks.quota_root + b"s/"))
            return self._backend.enqueue(
                ks.lock_prefix(p.name),
                ks.entry_key(p.name, lease_id, p.claim),
                EntryValue(p.owner, request_id, queued_at, implicit, entry_slots, attempt, *reentrant)
                .moded(p.shared, p.limit)
                .with_data(p.data),
                lease_id,
                session_key=ks.session_key(lease_id),
                new_session_value=session_value,
                # A shared claim or a permit may be granted behind others: it is put, and removed
                # if it does not hold at once (core.modes).
                only_if_free=p.wait <= 0 and not (p.shared or p.limit),
                slots=slots,
                mark=ks.mark(lease_id).base,
            )

        return put

    async def _give_up(  # noqa: PLR0917 - one call site, the failure path of acquire()
        self,
        exc: BaseException,
        p: AcquireParams,
        ks: Keyspace,
        key: bytes,
        mine: Entry | None,
        created_lease: int | None,
        attempt: str,
    ) -> None:
        """Remove what a failed Acquire queued, at once or (a waiter cut off) after its resume window;
        raise instead of `exc` when `exc` would promise more than is known."""
        lease_id = Keyspace.lease_of(key)
        mark = ks.mark(lease_id)

        async def lease_gone() -> bool:  # what is left to remove ends with the session at the latest
            return await self._backend.lease_ttl(lease_id) < 0

        if (
            mine is not None
            and isinstance(exc, asyncio.CancelledError)
            and p.lease_id is not None
            and p.request_id
            and self.resume_window > 0
        ):
            # The caller went away while waiting: a dropped connection looks exactly like this.
            # Its retry (same request id) may adopt the entry and keep its place (core.resume).
            closing = self._closing()
            until = time.monotonic() + self.resume_window
            self._cleanups.start(
                lambda: keep_place(self._backend, ks.lock_prefix(p.name), mine, mark, until=until, closing=closing),
                lease_gone,
            )
            return
        # Did our enqueue perhaps reach the store? A cancelled or failed call in flight may
        # have; only a definite answer (refused, not acquired, a write never sent) says not.
        unknown = mine is None and (
            isinstance(exc, asyncio.CancelledError)
            or (isinstance(exc, Unavailable) and exc.outcome_unknown)
            or not isinstance(exc, LockBrokerError)
        )
        removed = await self._cleanups.run(
            self._abandon(key, mine, created_lease, attempt if unknown else None, mark), lease_gone
        )
        if isinstance(exc, WaitExpired) and not removed:
            # "Not acquired" is a promise that no entry of ours is left to become the holder.
            # Unconfirmed (etcd unreachable), the honest answer is "unknown": the clean-up goes on
            # in the background, and a retry with the same request id finds whatever is left
            # (issue 18, item 1).
            raise Unavailable(
                f"gave up waiting for lock {p.name!r}, but etcd did not confirm that the queue entry was "
                "removed; the outcome is unknown: retry with the same request_id",
                outcome_unknown=True,
            ) from exc

    def _abandon(
        self,
        key: bytes,
        mine: Entry | None,
        created_lease: int | None,
        unknown_attempt: str | None,
        mark: ReleaseMark,
    ) -> Callable[[], Awaitable[None]]:
        """The clean-up that removes what a failed Acquire queued: its entry, or the whole session
        it created.

        Only what this call made or adopted: a retry of the same request that has since adopted
        the entry (see LockBackend.enqueue) keeps it, and a session this call did not create is
        left to its owner.
        """

        async def abandon() -> None:
            if created_lease is not None:
                await self._backend.revoke_lease(created_lease)
                return
            entry = mine
            if entry is None and unknown_attempt is not None:
                entry = await self._late_entry(key, unknown_attempt, mark)
            if entry is not None:
                rev, mod = entry.create_revision, entry.mod_revision
                await self._backend.delete_entry(key, rev, mod, entry.value.slots, mark)

        return abandon

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

    async def release(
        self,
        tenant: str,
        name: str,
        fencing_token: int,
        lease_id: int | None,
        request_id: str = "",
        *,
        owners: SessionOwners | None = None,
        principal: str = "",
    ) -> tuple[bool, int]:
        """(released, holds left). Release names a claim by its fencing token. With the session
        given, a new_claim claim granted here is deleted at its remembered key, and otherwise the
        session's plain claim is tried, each without a read (the common cases); then its other
        claims (core.claims). With `owners`, only the grant's own session and the principal that
        made it may release it (core/owners.py): NotOwner otherwise."""
        ks = self._keyspace(tenant)
        if lease_id is not None:
            if owners is not None and not await owners.check(tenant, lease_id, principal):
                return await self._not_mine(ks, name, fencing_token), 0  # the named session is gone
            known = self._claim_keys.take(lease_id, fencing_token, ks.lock_prefix(name))
            if known is not None:
                # The token's claim of this session was at `known`: deleted, or already gone.
                return await self._delete(ks, known, fencing_token, lease_id), 0
            if await self._delete(ks, ks.entry_key(name, lease_id), fencing_token, lease_id):
                return True, 0
            found = await self._backend.find_entry(ks.lock_prefix(name), fencing_token)
            if found is not None and found.lease != lease_id:
                raise _not_owner(name, fencing_token, found)
        else:
            # No session named (older clients): the grant's session must be the caller's own.
            found = await self._backend.find_entry(ks.lock_prefix(name), fencing_token)
            if found is not None and owners is not None and not await owners.check(tenant, found.lease, principal):
                return False, 0  # its session ended meanwhile
        if found is None:
            return False, 0
        if found.value.hold_count > 1:
            held = await release_hold(self._backend, ks.lock_prefix(name), found, request_id)
            if held is not None:
                return held
        return await self._delete(ks, found.key, fencing_token, found.lease), 0

    async def _delete(self, ks: Keyspace, key: bytes, fencing_token: int, lease_id: int) -> bool:
        # Compare on the create revision: a stale token can never delete a newer grant.
        slots = self._claimer.take(key, fencing_token)
        deleted = await self._backend.delete_entry(key, fencing_token, slots=slots or (), mark=ks.mark(lease_id))
        if deleted is None:
            return False
        if slots is None and deleted.value.slots and not deleted.value.implicit_session:
            # Granted by another replica (or forgotten here): the entry named its slots.
            left = deleted.value.slots
            await self._cleanups.run(lambda: self._backend.delete_slots(left, fencing_token))
        if deleted.value.implicit_session:
            # The session existed only for this lock; end it now rather than at its TTL.
            await self._cleanups.run(lambda: self._backend.revoke_lease(deleted.lease))
        return True

    async def _not_mine(self, ks: Keyspace, name: str, fencing_token: int) -> bool:
        """After a Release deleted nothing: False if the grant is gone, NotOwner if another
        session holds it (a read only on this path)."""
        found = await self._backend.find_entry(ks.lock_prefix(name), fencing_token)
        if found is None:
            return False
        raise _not_owner(name, fencing_token, found)


def _not_owner(name: str, fencing_token: int, found: Entry) -> NotOwner:
    return NotOwner(
        f"grant {fencing_token} of lock {name!r} is held by session {session_id_of(found.lease)}, "
        "not by the session named; a grant is released only by its own session",
        {"lock": name},
    )
