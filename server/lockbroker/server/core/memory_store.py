"""The store under the memory backend: etcd's keyspace, revisions, leases and deletion events.

A model of etcd reduced to what lockbroker uses:
- a keyspace of key -> (value, create revision, mod revision, lease);
- one revision per write transaction: every key a transaction puts gets that revision as its mod
  revision (and as its create revision if it is new); a transaction that changes nothing (all its
  compares failed, or it deletes keys that are not there) does not move the revision;
- leases with a TTL on a clock (injectable: tests move a `ManualClock` instead of sleeping); a lease
  that expires or is revoked deletes its keys in one transaction (one revision);
- a put bound to a lease that is gone fails the whole transaction (etcd's "lease not found");
- deletions are kept as events (the last HISTORY of them), so a watch is served from the revision
  its caller read; older revisions are "compacted".

`memory.MemoryLockBackend` speaks the lock core's `LockBackend` over it; this module knows nothing
of locks, queues or sessions.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lockbroker.server.core.backend import BackendError
from lockbroker.server.core.model import Position
from lockbroker.server.core.names import prefix_end

HISTORY = 10_000  # deletion events kept for watches


class ManualClock:
    """Seconds that pass only when a test says so; leases due by then expire at once."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for listener in list(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)


class _LeaseGone(BackendError):
    """A put named a lease that does not exist: the transaction was not applied."""


@dataclass(slots=True)
class _KV:
    value: bytes
    create: int
    mod: int
    lease: int


@dataclass(slots=True)
class _Lease:
    ttl: int
    deadline: float
    keys: set[bytes] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class _Waiter:
    """A wait for deletions: done once `need` distinct keys it watches are deleted, or `own` is
    (the waiter's own entry: its session ended, no count to reach)."""

    done: asyncio.Future[Position | None]
    need: int = 1
    own: bytes | None = None
    gone: set[bytes] = field(default_factory=set)

    def note(self, key: bytes) -> None:
        if self.done.done():
            return
        self.gone.add(key)
        if key == self.own or len(self.gone) >= self.need:
            self.done.set_result(None)


class MemoryStore:
    """etcd's keyspace, revisions, leases and deletion events in memory (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock: Callable[[], float] = clock or time.monotonic
        self._kv: dict[bytes, _KV] = {}
        self._sorted: list[bytes] = []
        self._leases: dict[int, _Lease] = {}
        self._due: list[tuple[float, int]] = []  # heap of (deadline, lease); stale rows skipped
        self._rev = 1  # etcd's first revision; the first write makes 2
        self._deleted: deque[tuple[int, bytes]] = deque()
        self._forgotten = 0  # deletion events at or below this revision are no longer kept
        self._waits: dict[bytes, set[_Waiter]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._manual = isinstance(clock, ManualClock)
        if isinstance(clock, ManualClock):
            clock.subscribe(self._expire)

    # -- reads for tests (they change nothing) ---------------------------------------------

    @property
    def revision(self) -> int:
        return self._rev

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        """Every key under `prefix`, in key order (a read for tests; changes nothing)."""
        return list(self._range(prefix, _end(prefix)))

    def kv(self, key: bytes) -> tuple[bytes, int, int, int] | None:
        """(value, create revision, mod revision, lease) of `key`, or None."""
        kv = self._kv.get(key)
        return None if kv is None else (kv.value, kv.create, kv.mod, kv.lease)

    def lease_ids(self) -> set[int]:
        self._expire()
        return set(self._leases)

    # -- the store --------------------------------------------------------------------------

    def _range(self, start: bytes, end: bytes) -> list[bytes]:
        lo = bisect.bisect_left(self._sorted, start)
        hi = bisect.bisect_left(self._sorted, end) if end else len(self._sorted)
        return self._sorted[lo:hi]

    def _commit(self, puts: Iterable[tuple[bytes, bytes, int]] = (), deletes: Iterable[bytes] = ()) -> int:
        """Apply one write transaction; its revision. Raises _LeaseGone (and applies nothing) if a
        put names a lease that is gone."""
        puts = list(puts)
        gone = [k for k in deletes if k in self._kv]
        if any(lease and lease not in self._leases for _, _, lease in puts):
            raise _LeaseGone
        if not puts and not gone:
            return self._rev
        self._rev += 1
        rev = self._rev
        for key in gone:
            self._drop(key, rev)
        for key, value, lease in puts:
            old = self._kv.get(key)
            if old is None:
                bisect.insort(self._sorted, key)
            elif old.lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            self._kv[key] = _KV(value, old.create if old is not None else rev, rev, lease)
            if lease:
                self._leases[lease].keys.add(key)
        return rev

    def _drop(self, key: bytes, rev: int) -> None:
        kv = self._kv.pop(key)
        del self._sorted[bisect.bisect_left(self._sorted, key)]
        if kv.lease in self._leases:
            self._leases[kv.lease].keys.discard(key)
        self._deleted.append((rev, key))
        if len(self._deleted) > HISTORY:
            self._forgotten = self._deleted.popleft()[0]
        for waiter in self._waits.pop(key, ()):
            waiter.note(key)

    def _expire(self) -> None:
        """Revoke every lease whose deadline has passed, each in its own transaction (as etcd's
        leader does)."""
        now = self._clock()
        while self._due and self._due[0][0] <= now:
            deadline, lease_id = heapq.heappop(self._due)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.deadline == deadline:
                self._revoke(lease_id)
        if not self._manual:
            self._schedule()

    def _revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        self._commit(deletes=sorted(lease.keys))

    def _schedule(self) -> None:
        """With a real clock, wake up when the next lease is due (nobody else would notice)."""
        while self._due and self._leases.get(self._due[0][1], _NO_LEASE).deadline != self._due[0][0]:
            heapq.heappop(self._due)
        at = self._due[0][0] if self._due else None
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None
        if at is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call expires it
                self._timer = asyncio.get_running_loop().call_later(max(0.0, at - self._clock()), self._fire)
                self._timer_at = at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, None
        self._expire()

    def _set_deadline(self, lease_id: int, lease: _Lease) -> None:
        lease.deadline = self._clock() + lease.ttl
        heapq.heappush(self._due, (lease.deadline, lease_id))
        if not self._manual:
            self._schedule()


_NO_LEASE = _Lease(0, -1.0)


def _end(prefix: bytes) -> bytes:
    """The end of the range of keys starting with `prefix` (b"" : no end)."""
    end = prefix_end(prefix) if prefix else b""
    return b"" if end == b"\0" else end
