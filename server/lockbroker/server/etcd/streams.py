"""The two long-lived etcd streams a broker shares among all its calls.

A broker opens one Watch stream and one LeaseKeepAlive stream (per current endpoint) and multiplexes
every waiter and every refresh over them, instead of one stream per call; on the Watch stream,
all waiters of one lock share one watch. Both carry etcd's
"hasleader" metadata, so a member cut off from its leader ends them rather than going silent; a
lost stream fails whatever was pending on it (waiters then re-read state and watch again).

A frozen member (SIGSTOP, a stalled VM) ends nothing and answers nothing. So a watchdog drops a
stream that owes an answer for `stall_after` seconds having received nothing; its next use opens
it where the unary calls go (moved off the stuck member). A create on the Watch stream counts as
owed from when it was sent, whatever else the stream delivers meanwhile (other locks' events must
not hide a watch that was never made). The Watch stream, quiet for long, sends
etcd's progress request when it has watches and has heard nothing. Refreshes caught on a lost
stream are sent again (a keepalive is idempotent); waiters get WatchInterrupted and re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection, Coroutine

from grpc import aio

from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.model import Entry, Position
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import REQUIRE_LEADER, EtcdClient
from lockbroker.server.etcd.shared_stream import STALL_AFTER, SharedStream


class _Wait:
    """One call waiting for deletions (see WatchHub.wait_deleted); slotted: one per queued waiter."""

    __slots__ = ("after", "done", "gone", "keys", "mine", "need")

    def __init__(
        self,
        keys: tuple[bytes, ...],
        after: int,
        done: asyncio.Future[Position | None],
        mine: Entry | None = None,
        need: int = 1,
    ) -> None:
        self.keys = keys
        self.after = after  # the revision the caller read; only deletions after it count
        # None: `need` of `keys` deleted (or mine); a Position: a release here made `mine` the head (handoff)
        self.done = done
        self.mine = mine  # the caller's own entry, which a handoff names
        self.need = need  # distinct keys of `keys` whose deletion ends the wait (a semaphore permit's count)
        self.gone: set[bytes] | None = None  # the keys seen deleted, counted only when need > 1

    def note(self, key: bytes, revision: int) -> None:
        """`key` was deleted at `revision`: count it, and end the wait once the count is reached
        (at once for the caller's own entry: its session ended)."""
        if revision <= self.after or self.done.done():
            return
        if self.need > 1 and (self.mine is None or key != self.mine.key):
            if self.gone is None:
                self.gone = set()
            self.gone.add(key)
            if len(self.gone) < self.need:
                return
        self.done.set_result(None)


# Waits on one key kept in a tuple up to this many (a set beyond: a semaphore's waiters each
# watch every entry ahead of them, shared readers all watch the same writer).
_FEW = 8


class _PrefixWatch:
    """One etcd watch on the entries of one lock, shared by every waiter of that lock here.

    It remembers the last deletions it saw, so a waiter that joins after the watch started can
    tell whether its predecessor went in between."""

    MEMORY = 1024

    def __init__(self, wid: int, prefix: bytes, start: int) -> None:
        self.wid = wid
        self.prefix = prefix
        self.start = start
        # The waits on each key: the one wait itself, a tuple of a few, or a set of more. A lock's
        # queue makes each key the own entry of one waiter and the watched predecessor of the next:
        # two waits on most keys, a tuple of 56 bytes where a set is 216 (one per waiter).
        self.waits: dict[bytes, _Wait | tuple[_Wait, ...] | set[_Wait]] = {}
        self.count = 0
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=self.MEMORY)
        self.forgotten = start - 1  # deletions at or below this revision are not in `recent`
        self.sent_at = 0.0  # when its create was written (loop time)

    def covers(self, after: int) -> bool:
        """Whether every deletion after revision `after` has been or will be seen here."""
        return after + 1 >= self.start and after >= self.forgotten

    def seen(self, wait: _Wait) -> None:
        """Count for `wait` the deletions of its keys this watch saw after the wait's revision."""
        for revision, key in reversed(self.recent):
            if revision <= wait.after:
                break
            if key in wait.keys:
                wait.note(key, revision)

    def at(self, key: bytes) -> Collection[_Wait]:
        """The waits on `key`, as a snapshot (waking one may change the others)."""
        waits = self.waits.get(key, ())
        return (waits,) if isinstance(waits, _Wait) else waits if isinstance(waits, tuple) else list(waits)

    def add(self, wait: _Wait) -> None:
        for key in wait.keys:
            waits = self.waits.get(key)
            if waits is None:
                self.waits[key] = wait
            elif isinstance(waits, _Wait):
                self.waits[key] = (waits, wait)
            elif isinstance(waits, tuple):
                self.waits[key] = (*waits, wait) if len(waits) < _FEW else {*waits, wait}
            else:
                waits.add(wait)
        self.count += 1

    def remove(self, wait: _Wait) -> None:
        for key in wait.keys:
            waits = self.waits.get(key)
            if waits is wait:
                del self.waits[key]
                continue
            if isinstance(waits, set):
                waits.discard(wait)
                if len(waits) > _FEW // 2:
                    continue
                left = tuple(waits)
            elif isinstance(waits, tuple):
                left = tuple(w for w in waits if w is not wait)
            else:
                continue
            if not left:
                del self.waits[key]
            else:
                self.waits[key] = left[0] if len(left) == 1 else left
        self.count -= 1

    def deleted(self, key: bytes, revision: int, *, wake: bool = True) -> None:
        if len(self.recent) == self.MEMORY:
            self.forgotten = self.recent[0][0]
        self.recent.append((revision, key))
        if not wake:
            return
        for wait in self.at(key):
            wait.note(key, revision)

    def interrupt(self, error: Callable[[], Exception]) -> None:
        """Fail every wait, each with its own exception instance (they are raised in different tasks)."""
        for key in list(self.waits):
            for wait in self.at(key):
                if not wait.done.done():
                    wait.done.set_exception(error())


class WatchHub(SharedStream[pb.WatchRequest, pb.WatchResponse]):
    """Waits for deletions of queue entries over one Watch stream, with one etcd watch per lock
    that has waiters here (not one per waiter): a handoff then costs no watch set-up or tear-down,
    and a deletion reaches this broker once however many of its calls wait on that lock."""

    kind = "watch"

    def __init__(self, client: EtcdClient, *, stall_after: float = STALL_AFTER) -> None:
        super().__init__(client, stall_after=stall_after)
        self._next_id = 1
        self._by_prefix: dict[bytes, _PrefixWatch] = {}
        self._by_id: dict[int, _PrefixWatch] = {}
        self._waiting = 0
        self.handoffs = 0  # waiters told by a release here that they hold the lock
        self._releasing: dict[bytes, int] = {}  # entry keys a release Txn of this replica is deleting
        self._background: set[asyncio.Task[None]] = set()
        # Watches whose create request is sent and not yet answered, in the order sent: etcd
        # answers creates in order, and a refused one comes back with watch id -1.
        self._creating: deque[_PrefixWatch] = deque()

    def _open(self) -> aio.StreamStreamCall[pb.WatchRequest, pb.WatchResponse]:
        _, stubs = self._client.current()
        return stubs.watch.Watch(metadata=self._client.metadata(REQUIRE_LEADER))

    def _owes(self) -> bool:
        return bool(self._creating)

    def _owed_from(self, heard: float) -> float | None:
        # From when the oldest unanswered create was sent, not from the last answer: etcd answers
        # creates in order within milliseconds on a stream that answers anything, and a create
        # left unanswered while other locks' events keep the stream busy would otherwise never
        # count as stuck (the watchdog saw only a silent stream): its waiters would sleep through
        # their turn with nothing to wake them but their timeout.
        return self._creating[0].sent_at if self._creating else None

    def _probe(self) -> pb.WatchRequest | None:
        # Only with watches: etcd 3.5 answers a progress request through one of the stream's
        # watchers, so a stream without any would never answer it. Its answer carries watch id -1,
        # which _on_response ignores.
        if not self._by_id:
            return None
        return pb.WatchRequest(progress_request=pb.WatchProgressRequest())

    @property
    def active(self) -> int:
        """Calls waiting for a deletion."""
        return self._waiting

    @property
    def watches(self) -> int:
        """etcd watches open (one per lock with waiters here)."""
        return len(self._by_id)

    async def wait_deleted(
        self, prefix: bytes, keys: tuple[bytes, ...], after_revision: int, mine: Entry | None = None, need: int = 1
    ) -> Position | None:
        """Return None once `need` distinct keys of `keys` (under `prefix`) are deleted at revisions
        > after_revision, or `mine`'s key is (see LockBackend.wait_deleted).

        May also return early when the shared watch cannot vouch for the revisions since
        `after_revision` (it started later, or forgot them): the caller reads the queue again,
        at a revision the watch then covers.

        With `mine` (the caller's entry, one of `keys`): if a release on this replica makes it
        the head of the queue first, returns what that release read (see `handoff`) instead."""
        watch = self._by_prefix.get(prefix)
        if watch is not None and not watch.covers(after_revision):
            return None
        wait = _Wait(keys, after_revision, asyncio.get_running_loop().create_future(), mine, need)
        if watch is not None:
            watch.seen(wait)
            if wait.done.done():
                return None
        created = watch is None
        if watch is None:
            # Starting at the revision read + 1 puts the watcher in etcd's synced group, served as
            # events happen; starting at or below the current revision would queue it for etcd's
            # 100 ms catch-up loop, which is what slows handoffs in etcd's own Lock service.
            watch = _PrefixWatch(self._next_id, prefix, after_revision + 1)
            self._next_id += 1
            self._by_prefix[prefix] = self._by_id[watch.wid] = watch
        watch.add(wait)
        self._waiting += 1
        if created:
            # Not in the caller's task: its cancellation must not leave the others on a watch
            # that was never created.
            self._spawn(self._create(watch))
        try:
            return await wait.done
        finally:
            if wait.done.done() and not wait.done.cancelled():
                wait.done.exception()  # retrieved: set in the same turn as this call's cancellation
            self._waiting -= 1
            watch.remove(wait)
            if not watch.count and self._by_id.get(watch.wid) is watch:
                self._forget(watch)
                self._spawn(self._cancel(watch.wid))

    def waiting_on(self, prefix: bytes) -> bool:
        """Whether calls here wait on the lock with entries under `prefix`."""
        return prefix in self._by_prefix

    def releasing(self, key: bytes) -> None:
        """A release Txn of this replica is about to delete `key`. Its waiters here are then woken
        by the release's answer (see `released`), not by the watch event: that event can arrive
        before the answer, and would cost the next holder a read the answer makes needless."""
        self._releasing[key] = self._releasing.get(key, 0) + 1

    def released(self, prefix: bytes, key: bytes, head: Entry | None, revision: int, count: int) -> None:
        """The release Txn deleting `key` ended. head: the first entry its transaction read after
        the deletion, at `revision` (None: the Txn failed, was refused, or the queue is empty).
        The head, if it waits here, is handed the lock; every other wait on `key` counts the
        deletion (as the watch event would have). A Txn that failed or whose outcome is unknown
        wakes them all to read the queue again: `key` may or may not be gone."""
        left = self._releasing.get(key, 0) - 1
        if left > 0:
            self._releasing[key] = left
        else:
            self._releasing.pop(key, None)
        if head is not None:
            self.handoff(prefix, head, revision, count)
        watch = self._by_prefix.get(prefix)
        if watch is not None:
            for wait in watch.at(key):
                if not revision:
                    if not wait.done.done():
                        wait.done.set_result(None)
                    continue
                wait.note(key, revision)
                # `key` is "<lock>#<session>": the session's next entry on this lock reuses it. A
                # wait that read after `revision` waits on such a newer entry, and that entry's
                # deletion, if heard while this release was in flight, was muted too: it is in the
                # watch's memory, and counts now (tests/test_watch_races.py).
                watch.seen(wait)

    def handoff(self, prefix: bytes, head: Entry, revision: int, count: int) -> bool:
        """A release on this replica committed at `revision`, and its transaction read `head` as
        the first entry of the queue at that revision: if `head` is a waiter here, it is the
        holder, and learns it now, with no watch event or read. The read shows its key (with the
        waiter's create revision) existing at that revision, so its session was alive then
        (etcd's Jepsen fix: a lock is held only while its key exists). Whether a waiter was told."""
        watch = self._by_prefix.get(prefix)
        if watch is None:
            return False
        told = False
        for wait in watch.at(head.key):
            mine = wait.mine
            if (
                mine is not None
                and mine.key == head.key
                and mine.create_revision == head.create_revision
                and revision > wait.after
                and not wait.done.done()
            ):
                wait.done.set_result(Position(revision, head, None, head, count, -1))
                told = True
        if told:
            self.handoffs += 1
        return told

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _create(self, watch: _PrefixWatch) -> None:
        request = pb.WatchRequest(
            create_request=pb.WatchCreateRequest(
                key=watch.prefix,
                range_end=prefix_end(watch.prefix),
                start_revision=watch.start,
                watch_id=watch.wid,
                filters=[pb.WatchCreateRequest.NOPUT],
            )
        )
        try:
            # Asked again once the stream is ours: every waiter may have left (or the stream been
            # lost) while this waited, and a watch created then would never be cancelled.
            await self.write(
                request,
                wanted=lambda: self._by_id.get(watch.wid) is watch,
                sending=lambda: self._sending(watch),
            )
        except Unavailable as e:
            lost, delay = str(e), e.retry_after
            self._forget(watch)
            watch.interrupt(lambda: Unavailable(lost, retry_after=delay))
        except Exception as e:
            broke = str(e)
            self._forget(watch)
            watch.interrupt(lambda: WatchInterrupted(broke))

    def _sending(self, watch: _PrefixWatch) -> None:
        watch.sent_at = asyncio.get_running_loop().time()
        self._creating.append(watch)

    def _refused(self, watch: _PrefixWatch, reason: str) -> None:
        self._forget(watch)
        watch.interrupt(lambda: WatchInterrupted(f"etcd refused the watch: {reason}"))
        if any(word in reason for word in ("permission denied", "token", "auth")):
            # The stream carries the token it was opened with: only a new stream, with a new
            # token, can watch again. Its other waiters read the queue and come back on it.
            self._client.forget_token()
            if self._call is not None:
                self._lose(self._call, Unavailable(f"etcd refused a watch: {reason}", retry_after=0.5))

    def _forget(self, watch: _PrefixWatch) -> None:
        self._by_id.pop(watch.wid, None)
        if self._by_prefix.get(watch.prefix) is watch:
            del self._by_prefix[watch.prefix]

    async def _cancel(self, wid: int) -> None:
        if self._call is None:
            return
        with contextlib.suppress(Exception):
            await self.write(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=wid)))

    def _on_response(self, resp: pb.WatchResponse) -> None:
        if resp.created:
            sent = self._creating.popleft() if self._creating else None
            if sent is not None and (resp.canceled or resp.watch_id != sent.wid):
                self._refused(sent, resp.cancel_reason or "no reason given")
                return
        watch = self._by_id.get(resp.watch_id)
        if watch is None:
            return  # a watch already given up (its cancellation's answer, or events in flight)
        if resp.canceled or resp.compact_revision:
            self._forget(watch)
            reason = resp.cancel_reason or f"compacted at {resp.compact_revision}"
            watch.interrupt(lambda: WatchInterrupted(reason))
            return
        for ev in resp.events:
            if ev.type == pb.Event.DELETE:
                # A deletion's kv carries the key and, as mod revision, the revision it happened at.
                # One a release here is making is reported by the release (see `releasing`).
                watch.deleted(ev.kv.key, ev.kv.mod_revision, wake=ev.kv.key not in self._releasing)

    def _on_lost(self, error: Exception) -> None:
        watches = list(self._by_id.values())
        self._by_id, self._by_prefix = {}, {}
        self._creating.clear()
        for watch in watches:
            watch.interrupt(lambda: WatchInterrupted(str(error)))

    async def close(self) -> None:
        await super().close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class KeepAliveStream(SharedStream[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]):
    """Refreshes leases; every refresh of this broker shares one LeaseKeepAlive stream."""

    kind = "keepalive"
    ATTEMPTS = 3

    def __init__(self, client: EtcdClient, *, stall_after: float = STALL_AFTER) -> None:
        super().__init__(client, stall_after=stall_after)
        self._pending: dict[int, deque[asyncio.Future[int]]] = {}

    def _open(self) -> aio.StreamStreamCall[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]:
        _, stubs = self._client.current()
        return stubs.lease.LeaseKeepAlive(metadata=self._client.metadata(REQUIRE_LEADER))

    async def keepalive(self, lease_id: int, timeout: float) -> int:
        """Refresh `lease_id` once: the TTL etcd answered (0: the lease is gone).

        A stream lost, or dropped as stuck, under this refresh gave no answer: the refresh is sent
        again on the next stream while `timeout` lasts (a keepalive is idempotent), at most
        ATTEMPTS times in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lost: Unavailable | None = None
        for _ in range(self.ATTEMPTS):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                return await asyncio.wait_for(self._once(lease_id), left)
            except TimeoutError:
                lost = None
                break
            except Unavailable as e:
                if self._closed:
                    raise
                lost = e
        if lost is not None:
            raise lost
        raise Unavailable("etcd did not answer the keepalive in time", retry_after=1.0)

    async def _once(self, lease_id: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            # Pending from the moment it is written, on the stream it is written to.
            await self.write(
                pb.LeaseKeepAliveRequest(ID=lease_id),
                sending=lambda: self._pending.setdefault(lease_id, deque()).append(fut),
            )
            return await fut
        finally:
            # A stream lost during the write fails `fut` (in _on_lost) as well as the write: the
            # write's error is the one raised, and this retrieves the other (issue 18 item 3).
            if fut.done() and not fut.cancelled():
                fut.exception()
            queue = self._pending.get(lease_id)
            if queue is not None and fut in queue:
                queue.remove(fut)
                if not queue:
                    del self._pending[lease_id]

    def _owes(self) -> bool:
        return bool(self._pending)

    def _on_response(self, resp: pb.LeaseKeepAliveResponse) -> None:
        queue = self._pending.get(resp.ID)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(resp.TTL)  # etcd answers TTL 0 for a lease that is gone
                break
        if queue is not None and not queue:
            self._pending.pop(resp.ID, None)

    def _on_lost(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for queue in pending.values():
            for fut in queue:
                if not fut.done():
                    fut.set_exception(error)


__all__ = ["STALL_AFTER", "KeepAliveStream", "WatchHub"]
