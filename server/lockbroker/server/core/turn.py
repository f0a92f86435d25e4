"""The waiting half of Acquire: a waiter's turn in its lock's queue (Acquirer inherits it).

A waiter watches only the entry just ahead of it (no herd), from the revision it read + 1; the
first waiter also re-reads the queue now and then, so a watch event that never came costs
HEAD_RECHECK; an etcd outage is ridden out for OUTAGE_RIDE_OUT, keeping the waiter's place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lockbroker.server.core.backend import ANSWER_MARGIN, LockBackend, WatchInterrupted, call_deadline
from lockbroker.server.core.errors import (
    DeadlineExceeded,
    LockHeld,
    NotAcquiredInfo,
    SessionLost,
    ShuttingDown,
    Unavailable,
    WaitExpired,
)
from lockbroker.server.core.model import Entry, EntryValue, Position
from lockbroker.server.core.names import session_id_of

if TYPE_CHECKING:
    from lockbroker.server.core.acquire import AcquireParams

log = logging.getLogger("lockbroker.core")

# How long a waiter keeps its place through an etcd outage (its watch broken, its reads failing)
# before it is answered UNAVAILABLE: longer than an etcd leader election under load (about 1-3 s
# with the default 1 s election timeout), far shorter than a dead etcd.
OUTAGE_RIDE_OUT = 5.0

# How often the first waiter of a lock re-reads the queue besides watching the holder (see
# _wait_turn), at one read per contended lock: a backstop, not how a turn is found. What the hub
# could get wrong by itself is fixed (a release's answer that hid a newer entry's deletion under
# the same key; an old stream's answer taken for the new stream's; a create left unanswered on a
# stream kept busy by other locks, never taken for stuck: tests/test_watch_races.py). It still
# bounds what this replica cannot see: a member that keeps the stream open and answers progress
# requests but applies nothing (cut off from its leader, until etcd ends its streams after about
# three election timeouts or a failed read moves the broker off it), an event etcd never sends,
# and whatever else made a fault-suite run (steady cluster, killed holder) grant a waiter 17 s
# after its holder died: `_recheck` logs each turn the watch did not report, which tells a watch
# miss from a lease etcd revoked late.
HEAD_RECHECK = 2.0


class _Wake:
    """What ends a wait other than its watch: its timer, or the broker's closing. Either cancels
    the waiting task (as asyncio.timeout does), and `instead` turns that cancellation back into
    TimeoutError or ShuttingDown."""

    __slots__ = ("cancelling", "task", "timer", "wakes", "why")

    def __init__(self, task: asyncio.Task[Any], wakes: set[_Wake], timeout: float, bare: contextvars.Context) -> None:
        self.task = task
        self.why: type[Exception] | None = None  # TimeoutError or ShuttingDown, once fired
        # Cancellations asked of the task before this wait (as asyncio.timeout counts them): only
        # one asked since, ours, is turned into TimeoutError or ShuttingDown.
        self.cancelling = task.cancelling()
        self.wakes = wakes
        wakes.add(self)
        # The wake itself is the timer's callback: no bound method kept with every waiter.
        self.timer = task.get_loop().call_later(timeout, self, context=bare)

    def __call__(self) -> None:  # the timer
        self.expire()

    def expire(self) -> None:
        self._fire(TimeoutError)

    def shut(self) -> None:
        self._fire(ShuttingDown)

    def _fire(self, why: type[Exception]) -> None:
        if self.why is None:
            self.why = why
            self.task.cancel()

    def disarm(self) -> None:
        self.timer.cancel()
        self.wakes.discard(self)

    def instead(self, cancelled: asyncio.CancelledError) -> BaseException:
        """What to raise for a CancelledError in the wait: TimeoutError or ShuttingDown if this
        wake cancelled the task and nothing else asked to meanwhile; else `cancelled` (the client
        going away, the stream ending: that cancellation goes on up)."""
        if self.why is None or self.task.uncancel() > self.cancelling:
            return cancelled
        if self.why is ShuttingDown:
            return ShuttingDown("the broker is shutting down", retry_after=0.5)
        return TimeoutError()


# Holders remembered for sharing among waiters (QueueWaits._kept): one per contended lock.
HOLDERS_KEPT = 1024

# The value of a predecessor a waiter keeps (see QueueWaits._kept): only its key is read.
_UNREAD = EntryValue("", "", 0.0)


def _shut(wakes: set[_Wake], _closing: asyncio.Future[None]) -> None:
    for wake in list(wakes):
        wake.shut()


class QueueWaits:
    """A waiter's turn; the class keeps the backend and the broker's closing future."""

    _backend: LockBackend
    _closing: Callable[[], asyncio.Future[None]]
    # The waits in progress, and the closing future whose one callback ends them all (_wakes_for).
    _wakes: set[_Wake]
    _wakes_of: asyncio.Future[None] | None
    # The context a wait's timer runs in: it only cancels a task, and a copy of the caller's
    # context per timer (asyncio's default) would be kept alive with every waiter. One per
    # broker, not per process: a context is entered by one thread at a time, and two brokers
    # may run their loops on two threads.
    _bare: contextvars.Context
    # The holders waiters here last read, by key: the waiters of a lock keep one entry of its
    # holder between them, not a decoded copy each (see _kept). A cache: cleared when full.
    _holders: dict[bytes, Entry]

    async def _wait_turn(self, p: AcquireParams, prefix: bytes, mine: Entry, pos: Position, started: float) -> Position:
        """Wait until no entry is ahead of `mine`, watching only the one just ahead (no herd)."""
        wait_until = started + p.wait
        rpc_deadline = call_deadline.get()
        away: float | None = None  # since when etcd has been away, in this wait
        while pos.predecessor is not None:
            if p.wait <= 0:
                raise await self._not_acquired(LockHeld, p.name, pos, started)
            until = wait_until if rpc_deadline is None else min(wait_until, rpc_deadline - ANSWER_MARGIN)
            left = until - time.monotonic()
            if left <= 0:
                if until < wait_until:
                    raise DeadlineExceeded("the RPC deadline passed while waiting for the lock")
                return await self._last_look(p, prefix, mine, pos, started)
            handed: Position | None = None
            # The first waiter also re-reads the queue every HEAD_RECHECK: a deletion of the holder
            # that never reached this replica's watch costs that long, not the rest of the wait.
            # Only the first waiter, so the reads grow with contended locks, not with waiters.
            head = pos.holder is not None and pos.predecessor.key == pos.holder.key
            capped = head and left > HEAD_RECHECK
            keys = (pos.predecessor.key, mine.key)
            pos = self._kept(pos)
            try:
                # _until_deleted, inline: its frame would be kept under every waiter.
                wake = self._arm(HEAD_RECHECK if capped else left)
                try:
                    handed = await self._backend.wait_deleted(prefix, keys, pos.revision, mine)
                except WatchInterrupted as e:
                    wake.disarm()  # before sleeping: its timer must not cancel the sleep
                    log.info("watch on %r interrupted (%s); reading the queue again", keys[0], e)
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError as e:
                    raise wake.instead(e) from None
                finally:
                    wake.disarm()
                # Handed over by a release on this replica: its transaction read our entry at the
                # head of the queue at its revision, which is the read we would make now.
                pos = handed or await self._backend.position(prefix, mine.key, mine.create_revision)
            except TimeoutError:
                if capped:
                    pos = await self._recheck(p.name, prefix, mine, pos)
                continue
            except ShuttingDown:
                raise
            except Unavailable as e:
                # etcd briefly away (an election): wait on, keeping the place. Failing here deleted
                # the entry under the client's retry, and sent waiters to the back at every election.
                # An outage longer than an election is answered UNAVAILABLE (the entry removed in
                # the background): the caller learns etcd is gone instead of waiting on blind.
                now = time.monotonic()
                if away is None:  # logged once per wait: an outage fails every waiter's reads
                    log.info("etcd unavailable while waiting for %r (%s); waiting on", p.name, e)
                    away = now
                elif now - away > OUTAGE_RIDE_OUT:
                    raise
                await asyncio.sleep(min(0.25, max(0.0, until - now)))
                continue
            if pos.mine is None:
                raise SessionLost(
                    f"the claim of session {session_id_of(mine.lease)} on {p.name!r} was removed while waiting "
                    "(the session ended, or the claim was released by its fencing token)"
                )
        # The read that found no predecessor (ours, or the releasing transaction's) also found our
        # own key, and a key lives only as long as its lease: the session was alive when we became
        # holder (etcd's Jepsen fix).
        return pos

    async def _last_look(self, p: AcquireParams, prefix: bytes, mine: Entry, pos: Position, started: float) -> Position:
        """The wait is over: read the queue before answering. A watch cut off (etcd partitioned
        away) may have missed our turn, and an entry that is already the holder is granted, not
        dropped."""
        latest = pos
        with contextlib.suppress(Unavailable):
            latest = await self._backend.position(prefix, mine.key, mine.create_revision)
        if latest.mine is None:
            raise SessionLost(f"session {session_id_of(mine.lease)} ended while waiting for {p.name!r}")
        if latest.predecessor is None:
            return latest
        raise await self._not_acquired(WaitExpired, p.name, latest, started)

    async def _recheck(self, name: str, prefix: bytes, mine: Entry, pos: Position) -> Position:
        """The first waiter's periodic read of the queue (HEAD_RECHECK); `pos` if etcd is away."""
        try:
            latest = await self._backend.position(prefix, mine.key, mine.create_revision)
        except Unavailable:
            return pos
        ahead = pos.predecessor.key if pos.predecessor is not None else None
        if latest.predecessor is None or latest.predecessor.key != ahead:
            # Usually a watch event still in flight; else a watch that lost one (worth knowing).
            log.info("the holder of %r left unseen by the watch; a periodic read found it", name)
        return latest

    async def _until_deleted(  # noqa: PLR0917 - the one watch of every kind of waiter
        self, prefix: bytes, keys: tuple[bytes, ...], revision: int, timeout: float, mine: Entry, need: int = 1
    ) -> Position | None:
        """Return when any of `keys` is deleted after `revision` (or the watch asks for a re-read):
        the predecessor (our turn may have come) or our own entry (our session ended: tell the
        caller now, not at the timeout). A Position: a release here handed us the lock.
        TimeoutError after `timeout`; ShuttingDown once the broker closes.

        The watch is awaited in the caller's own task, which a timer or the broker's closing
        cancels (as asyncio.timeout does), instead of in a task of its own raced against both in
        asyncio.wait: a waiter keeps one future and one timer alive while it waits, not a second
        task, its frames, asyncio.wait's futures and a callback on the closing future each."""
        wake = self._arm(timeout)
        try:
            return await self._backend.wait_deleted(prefix, keys, revision, mine, need)  # or WatchInterrupted
        except asyncio.CancelledError as e:
            raise wake.instead(e) from None
        finally:
            wake.disarm()

    def _arm(self, timeout: float) -> _Wake:
        """Bound the current task's wait (see _until_deleted): ShuttingDown if the broker closes."""
        closing = self._closing()
        if closing.done():
            raise ShuttingDown("the broker is shutting down", retry_after=0.5)
        task = asyncio.current_task()
        assert task is not None
        return _Wake(task, self._wakes_for(closing), timeout, self._bare)

    def _kept(self, pos: Position) -> Position:
        """What a waiter keeps of a read of its queue through its wait: the predecessor only for
        its key (or as the holder's entry, when it is the holder), not a decoded value of its own;
        the holder whole (the details of a not-acquired answer), shared with the lock's other
        waiters that read the same entry."""
        pred, holder = pos.predecessor, pos.holder
        if pred is None or pred.value is _UNREAD:
            return pos
        if holder is not None:
            known = self._holders.get(holder.key)
            if known is not None and known == holder:
                holder = known
            else:
                if len(self._holders) >= HOLDERS_KEPT:
                    self._holders.clear()
                self._holders[holder.key] = holder
        if holder is not None and pred.key == holder.key and pred.create_revision == holder.create_revision:
            kept = holder
        else:
            kept = Entry(pred.key, pred.create_revision, pred.lease, _UNREAD, pred.mod_revision)
        return Position(pos.revision, pos.mine, kept, holder, pos.count, pos.ahead)

    def _wakes_for(self, closing: asyncio.Future[None]) -> set[_Wake]:
        """The waits in progress, which the broker's closing ends: one callback on the closing
        future for all of them (a callback each was added and removed at every wait, the removal a
        scan of every other waiter's)."""
        if self._wakes_of is not closing:
            self._wakes, self._wakes_of = set(), closing
            closing.add_done_callback(functools.partial(_shut, self._wakes), context=self._bare)
        return self._wakes

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
