"""`LockBackend` in memory: a faithful model of the etcd adapter, for tests and a dev server.

The etcd part of the model (keyspace, one revision per write transaction, leases on an injectable
clock, deletion events for watches) is `memory_store.MemoryStore`; this module speaks the lock core's
queue entries, compares, release marks, slots and handoffs over it, as `etcd.backend` does over etcd.

Every method applies its transaction at once, so each is atomic, and state changes only through
the methods of `LockBackend`. Faults can be injected per method (`fail`): the write applied and
then Unavailable(outcome_unknown=True), not applied, or applied later (a write held in the network
that lands after its caller gave up), to test the core's paths for writes of unknown outcome.

Nothing here is durable, and two processes never share it: `lockbroker serve --backend memory` is
a single-process dev mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from lockbroker.server.core.backend import (
    BackendError,
    EntryConflict,
    SessionMissing,
    SessionTaken,
    SlotsTaken,
    WatchInterrupted,
)
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.memory_store import HISTORY, ManualClock, MemoryStore, _end, _Lease, _LeaseGone, _Waiter
from lockbroker.server.core.model import Enqueued, Entry, EntryValue, LeaseGrant, Position, ReleaseMark, mark_key

_T = TypeVar("_T")

MIN_TTL = 2  # etcd raises a smaller TTL to its minimum (about 2 s with default election settings)


@dataclass(slots=True)
class _Fault:
    applied: bool
    gate: asyncio.Event | None
    count: int


class MemoryLockBackend(MemoryStore):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        # Waiters by their own entry's key, with its create revision: a delete_entry that leaves
        # one at the head of its queue hands it the lock (see LockBackend.wait_deleted).
        self._heads: dict[bytes, dict[asyncio.Future[Position | None], int]] = {}
        self.handoffs = 0
        self._faults: dict[str, _Fault] = {}
        self._late: set[asyncio.Task[None]] = set()

    # -- test hooks -------------------------------------------------------------------------

    def fail(self, method: str, *, applied: bool, gate: asyncio.Event | None = None, count: int = 1) -> None:
        """Make the next `count` calls of `method` raise Unavailable(outcome_unknown=True).

        applied: the write is applied first (the answer was lost), else it is never applied;
        gate: with applied, the write is applied only once `gate` is set (held in the network)."""
        if not hasattr(self, method):
            raise AttributeError(method)
        self._faults[method] = _Fault(applied, gate, count)

    @property
    def watches(self) -> int:
        """Calls waiting in wait_deleted (read by tests)."""
        return len({w for ws in self._waits.values() for w in ws})

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._late):
            task.cancel()
        await asyncio.gather(*self._late, return_exceptions=True)

    async def ping(self, key: bytes, timeout: float) -> None:
        """Always reachable: it is this process."""

    # -- lock-level reads of the store ------------------------------------------------------

    def _entries(self, prefix: bytes) -> list[Entry]:
        """The entries under `prefix`, oldest (smallest create revision) first."""
        return sorted((self._entry(k) for k in self._range(prefix, _end(prefix))), key=lambda e: e.create_revision)

    def _entry(self, key: bytes) -> Entry:
        kv = self._kv[key]
        return Entry(key, kv.create, kv.lease, EntryValue.decode(kv.value), kv.mod)

    def _get(self, key: bytes) -> Entry | None:
        return self._entry(key) if key in self._kv else None

    async def _call(self, method: str, apply: Callable[[], _T]) -> _T:
        """Run one method's transaction, or the fault injected for it."""
        self._expire()
        fault = self._faults.get(method)
        if fault is None:
            return apply()
        fault.count -= 1
        if fault.count <= 0:
            del self._faults[method]
        if fault.applied and fault.gate is None:
            with contextlib.suppress(BackendError):
                apply()
        elif fault.applied and fault.gate is not None:
            gate = fault.gate

            async def late() -> None:
                await gate.wait()
                self._expire()
                with contextlib.suppress(BackendError):
                    apply()

            task = asyncio.get_running_loop().create_task(late())
            self._late.add(task)
            task.add_done_callback(self._late.discard)
        raise Unavailable(f"injected fault in {method}: outcome unknown", retry_after=0.1, outcome_unknown=True)

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int, lease_id: int = 0) -> LeaseGrant:
        def apply() -> LeaseGrant:
            if lease_id in self._leases:
                return LeaseGrant(lease_id, ttl, created=False)
            new_id = lease_id
            while not new_id or new_id in self._leases:
                new_id = random.getrandbits(63) or 1
            lease = self._leases[new_id] = _Lease(max(ttl, MIN_TTL), 0.0)
            self._set_deadline(new_id, lease)
            return LeaseGrant(new_id, lease.ttl, created=True)

        return await self._call("grant_lease", apply)

    async def revoke_lease(self, lease_id: int) -> bool:
        def apply() -> bool:
            if lease_id not in self._leases:
                return False
            self._revoke(lease_id)
            return True

        return await self._call("revoke_lease", apply)

    async def keepalive(self, lease_id: int) -> int:
        def apply() -> int:
            lease = self._leases.get(lease_id)
            if lease is None:
                return 0
            self._set_deadline(lease_id, lease)
            return lease.ttl

        return await self._call("keepalive", apply)

    async def lease_ttl(self, lease_id: int) -> int:
        def apply() -> int:
            lease = self._leases.get(lease_id)
            return -1 if lease is None else int(max(0.0, lease.deadline - self._clock()))

        return await self._call("lease_ttl", apply)

    # -- sessions ---------------------------------------------------------------------------

    async def put_session(self, session_key: bytes, value: bytes, lease_id: int, slots: Sequence[bytes] = ()) -> None:
        def apply() -> None:
            taken = [s for s in slots if s in self._kv]
            if taken:
                raise SlotsTaken(taken)
            try:
                self._commit([(session_key, value, lease_id), *((s, session_key, lease_id) for s in slots)])
            except _LeaseGone:
                raise SessionMissing(session_key.decode()) from None

        await self._call("put_session", apply)

    async def session_exists(self, session_key: bytes) -> bool:
        return await self._call("session_exists", lambda: session_key in self._kv)

    # -- queues -----------------------------------------------------------------------------

    async def enqueue(
        self,
        prefix: bytes,
        key: bytes,
        value: EntryValue,
        lease_id: int,
        *,
        session_key: bytes,
        new_session_value: bytes | None,
        only_if_free: bool,
        slots: Sequence[bytes] = (),
        mark: bytes = b"",
    ) -> Enqueued:
        # The revision this call was sent at: a write applied later (see `fail`) is refused if the
        # release mark of `key` moved since, as the etcd adapter's guard does.
        seen = self._rev
        raw = value.encode()
        mark = mark_key(mark, key) if mark else b""

        def apply() -> Enqueued:
            queue = self._entries(prefix)
            session_ok = (session_key in self._kv) == (new_session_value is None)
            free = not queue or not only_if_free
            mark_kv = self._kv.get(mark) if mark else None
            unmarked = mark_kv is None or mark_kv.mod <= seen
            if key not in self._kv and session_ok and free and unmarked and not any(s in self._kv for s in slots):
                puts = [] if new_session_value is None else [(session_key, new_session_value, lease_id)]
                puts += [*((s, key, lease_id) for s in slots), (key, raw, lease_id)]
                try:
                    rev = self._commit(puts)
                except _LeaseGone:
                    raise SessionMissing(session_key.decode()) from None
                queue = self._entries(prefix)
                mine = Entry(key, rev, lease_id, EntryValue.decode(raw), rev)
                pred = queue[-2] if len(queue) > 1 else None
                return Enqueued(True, Position(rev, mine, pred, queue[0], len(queue), len(queue) - 1))
            existing = self._get(key)
            if existing is not None:
                if existing.request_id != value.request_id:
                    raise EntryConflict(existing)
                return Enqueued(False, self._adopt(prefix, existing))
            if new_session_value is None and session_key not in self._kv:
                raise SessionMissing(session_key.decode())
            if new_session_value is not None and session_key in self._kv:
                raise SessionTaken(session_key.decode())
            if not (only_if_free and queue):
                taken = [s for s in slots if s in self._kv]
                if taken:
                    raise SlotsTaken(taken)
            holder = queue[0] if queue else None
            return Enqueued(False, Position(self._rev, None, None, holder, len(queue), len(queue)))

        return await self._call("enqueue", apply)

    def _adopt(self, prefix: bytes, existing: Entry) -> Position:
        """Take over an entry a previous attempt of the same request made: put it again unchanged."""
        rev = existing.create_revision
        kv = self._kv[existing.key]
        self._commit([(existing.key, kv.value, kv.lease)])
        ahead = sum(1 for e in self._entries(prefix) if e.create_revision < rev)
        return self._position(prefix, existing.key, rev, ahead)

    def _position(self, prefix: bytes, key: bytes, create_revision: int, ahead: int = -1) -> Position:
        queue = self._entries(prefix)
        mine = self._get(key)
        if mine is not None and mine.create_revision != create_revision:
            mine = None  # a newer entry of the same session: ours is gone
        before = [e for e in queue if e.create_revision < create_revision]
        return Position(self._rev, mine, before[-1] if before else None, queue[0] if queue else None, len(queue), ahead)

    async def position(self, prefix: bytes, key: bytes, create_revision: int) -> Position:
        return await self._call("position", lambda: self._position(prefix, key, create_revision))

    async def wait_deleted(
        self, prefix: bytes, keys: tuple[bytes, ...], after_revision: int, mine: Entry | None = None, need: int = 1
    ) -> Position | None:
        self._expire()
        if after_revision < self._forgotten:
            raise WatchInterrupted(f"revision {after_revision} has been compacted")
        done: asyncio.Future[Position | None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(done, need, mine.key if mine is not None else None)
        # Deletions since the caller's read count as well (as the etcd adapter's watch history).
        for rev, key in reversed(self._deleted):
            if rev <= after_revision:
                break
            if key in keys:
                waiter.note(key)
        if done.done():
            return None
        for key in keys:
            self._waits.setdefault(key, set()).add(waiter)
        if mine is not None:
            self._heads.setdefault(mine.key, {})[done] = mine.create_revision
        try:
            return await done
        finally:
            for key in keys:
                waiters = self._waits.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waits[key]
            if mine is not None:
                heads = self._heads.get(mine.key)
                if heads is not None:
                    heads.pop(done, None)
                    if not heads:
                        del self._heads[mine.key]

    def _hand_off(self, prefix: bytes, gone: bytes) -> None:
        """Before a delete_entry of `gone` commits: if the entry then at the head of the queue
        waits here, hand it the position read at the deletion's revision (as the etcd adapter's
        release transaction does). Set first, so the deletion's own wake-up does not pre-empt it."""
        queue = [e for e in self._entries(prefix) if e.key != gone]
        if not queue:
            return
        head = queue[0]
        told = False
        for waiter, create_revision in self._heads.get(head.key, {}).items():
            if create_revision == head.create_revision and not waiter.done():
                waiter.set_result(Position(self._rev + 1, head, None, head, len(queue), -1))
                told = True
        self.handoffs += told

    async def delete_entry(
        self,
        key: bytes,
        create_revision: int,
        mod_revision: int = 0,
        slots: Sequence[bytes] = (),
        mark: ReleaseMark | None = None,
    ) -> Entry | None:
        def apply() -> Entry | None:
            kv = self._kv.get(key)
            if kv is None or kv.create != create_revision or (mod_revision and kv.mod != mod_revision):
                return None
            entry = self._entry(key)
            # The put of the mark cannot fail: the entry exists, so its lease (the mark's) does.
            self._hand_off(key[: key.rindex(b"#") + 1], key)
            self._commit([(mark.of(key), b"", mark.lease)] if mark is not None else [], [key, *slots])
            return entry

        return await self._call("delete_entry", apply)

    async def update_entry(self, entry: Entry, value: EntryValue) -> Entry | None:
        def apply() -> Entry | None:
            kv = self._kv.get(entry.key)
            if kv is None or (kv.create, kv.mod) != (entry.create_revision, entry.mod_revision):
                return None
            self._commit([(entry.key, value.encode(), kv.lease)])
            return self._entry(entry.key)

        return await self._call("update_entry", apply)

    async def seal_entry(self, key: bytes, mark: ReleaseMark) -> Entry | None:
        def apply() -> Entry | None:
            if key in self._kv:
                return self._entry(key)
            with contextlib.suppress(_LeaseGone):  # the session has ended: nothing can land
                self._commit([(mark.of(key), b"", mark.lease)])
            return None

        return await self._call("seal_entry", apply)

    async def delete_slots(self, slots: Sequence[bytes], create_revision: int) -> None:
        def apply() -> None:
            if slots and all(s in self._kv and self._kv[s].create == create_revision for s in slots):
                self._commit(deletes=slots)

        await self._call("delete_slots", apply)

    async def taken_slots(self, pool_prefix: bytes) -> set[bytes]:
        return await self._call("taken_slots", lambda: set(self._range(pool_prefix, _end(pool_prefix))))

    async def taken_among(self, slots: Sequence[bytes]) -> set[bytes]:
        return await self._call("taken_among", lambda: {s for s in slots if s in self._kv})

    async def find_entry(self, prefix: bytes, create_revision: int) -> Entry | None:
        def apply() -> Entry | None:
            return next((e for e in self._entries(prefix) if e.create_revision == create_revision), None)

        return await self._call("find_entry", apply)

    async def queue(self, prefix: bytes) -> list[Entry]:
        return await self._call("queue", lambda: self._entries(prefix))

    async def queue_at(self, prefix: bytes) -> tuple[int, list[Entry]]:
        return await self._call("queue_at", lambda: (self._rev, self._entries(prefix)))

    async def scan(self, start: bytes, end: bytes, limit: int) -> tuple[list[Entry], bool]:
        def apply() -> tuple[list[Entry], bool]:
            keys = self._range(start, end)
            if limit <= 0:  # etcd: no limit
                return [self._entry(k) for k in keys], False
            return [self._entry(k) for k in keys[:limit]], len(keys) > limit

        return await self._call("scan", apply)

    # -- the admin plane and fences ------------------------------------------------------------

    async def holder(self, prefix: bytes) -> Entry | None:
        def apply() -> Entry | None:
            queue = self._entries(prefix)
            return queue[0] if queue else None

        return await self._call("holder", apply)

    async def get_value(self, key: bytes) -> bytes | None:
        return await self._call("get_value", lambda: self._kv[key].value if key in self._kv else None)

    async def put_value(self, key: bytes, value: bytes, lease_id: int) -> None:
        def apply() -> None:
            try:
                self._commit([(key, value, lease_id)])
            except _LeaseGone:
                raise SessionMissing(key.decode()) from None

        await self._call("put_value", apply)

    async def delete_value(self, key: bytes) -> None:
        await self._call("delete_value", lambda: self._commit(deletes=[key]))

    async def values(self, start: bytes, end: bytes, limit: int) -> tuple[list[tuple[bytes, bytes, int]], bool]:
        def apply() -> tuple[list[tuple[bytes, bytes, int]], bool]:
            keys = self._range(start, end)
            shown = keys if limit <= 0 else keys[:limit]
            return [(k, self._kv[k].value, self._kv[k].lease) for k in shown], len(shown) < len(keys)

        return await self._call("values", apply)

    async def revoke_entry(self, entry: Entry, mark: ReleaseMark, marker: bytes, note: bytes) -> bool:
        def apply() -> bool:
            kv = self._kv.get(entry.key)
            if kv is None or kv.create != entry.create_revision:
                return False
            puts = [(mark.of(entry.key), b"", mark.lease), (marker, note, kv.lease)]
            self._commit(puts, [entry.key, *entry.value.slots])
            return True

        return await self._call("revoke_entry", apply)


__all__ = ["HISTORY", "MIN_TTL", "ManualClock", "MemoryLockBackend"]
