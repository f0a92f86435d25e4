"""Races of the shared Watch stream (WatchHub) that could leave a waiter unwoken or wrongly woken.

Each test builds its interleaving by hand (a real etcd where the race is between etcd's answers and
this replica's own bookkeeping; a scripted stream where it is between two streams' reader tasks), so
it fails the same way every time without the fix. None goes through the core, so the first waiter's
periodic re-read (core/turn.py HEAD_RECHECK) cannot hide what they check.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core import turn
from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.model import Grant
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.client import EtcdClient
from lockbroker.server.etcd.streams import WatchHub
from tests.etcdutil import EtcdProbe
from tests.test_watch_hub import delete, hub, put, until

__all__ = ["hub"]  # the hub fixture, shared with test_watch_hub: pytest finds it by its name here

TENANT = "default"


def deletions_heard(watches: WatchHub) -> list[tuple[int, bytes]]:
    """(revision, key) of every deletion etcd sends on the hub's stream, as it arrives."""
    heard: list[tuple[int, bytes]] = []
    real = watches._on_response

    def record(resp: pb.WatchResponse) -> None:
        heard.extend((ev.kv.mod_revision, ev.kv.key) for ev in resp.events if ev.type == pb.Event.DELETE)
        real(resp)

    watches._on_response = record  # type: ignore[method-assign]
    return heard


# -- 1. a deletion heard while a release of the same key is in flight ------------------------------


async def test_a_deletion_heard_while_an_older_entry_of_its_key_is_being_released_still_wakes_the_waiter(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    """An entry key is "<lock>#<session>": a session that queues again on a lock reuses its key.

    A release on this replica (WatchHub.releasing) mutes the watch events of its key until the
    release's own answer wakes that key's waiters, noting the deletion at the release's revision.
    If, before that answer is handled, the session's next entry under the same key was queued
    (through another replica), a waiter here queued behind that newer entry, and the newer entry
    went too (its session expired), then the newer deletion was muted as if it were the release's
    own, and the release's answer notes only its older revision, which the waiter, having read
    later, ignores. The waiter then slept through its turn until its wait ran out (or, with the
    core's periodic re-read, HEAD_RECHECK longer than it should)."""
    client, watches = hub
    heard = deletions_heard(watches)
    prefix = f"{key_root}/l/reuse#".encode()
    key, mine = prefix + b"00000000000000aa", prefix + b"00000000000000bb"
    await put(client, key)  # the session's first entry
    watches.releasing(key)  # a release of it on this replica is in flight ...
    released_at = await delete(client, key)  # ... and commits; its answer is not handled yet
    await put(client, key)  # the same session queues again, through another replica
    read = await put(client, mine)  # a waiter here queues behind that newer entry, reading here
    waiting = asyncio.ensure_future(watches.wait_deleted(prefix, (key, mine), read))
    await until(lambda: watches.watches == 1 and not watches._creating)
    gone = await delete(client, key)  # the newer entry's session expires
    await until(lambda: (gone, key) in heard)  # heard while the release is still in flight
    assert not waiting.done()
    # The release's answer: it deleted the older entry at `released_at`, and read an empty queue.
    watches.released(prefix, key, None, released_at, 0)
    assert await asyncio.wait_for(waiting, 2) is None, "the waiter never learnt its predecessor went"
    assert watches.watches == 0


async def test_a_release_still_wakes_only_for_deletions_after_the_waiters_read(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    """The control: deletions of the key muted during the release that the waiter's own read
    already reflects (at or before its revision) do not wake it."""
    client, watches = hub
    heard = deletions_heard(watches)
    prefix = f"{key_root}/l/reuse-control#".encode()
    key, mine, other = prefix + b"00000000000000aa", prefix + b"00000000000000bb", prefix + b"00000000000000cc"
    await put(client, other)
    first = await put(client, key)
    early = asyncio.ensure_future(watches.wait_deleted(prefix, (other,), first))  # opens the watch
    await until(lambda: watches.watches == 1 and not watches._creating)
    watches.releasing(key)
    released_at = await delete(client, key)
    await until(lambda: (released_at, key) in heard)
    await put(client, key)
    read = await put(client, mine)  # reads after the muted deletion of the older entry
    waiting = asyncio.ensure_future(watches.wait_deleted(prefix, (key, mine), read))
    await until(lambda: watches.active == 2)
    watches.released(prefix, key, None, released_at, 0)
    await asyncio.sleep(0.3)
    assert not waiting.done(), "woken for a deletion its own read had already seen"
    await delete(client, key)  # after the release: heard, and wakes it
    assert await asyncio.wait_for(waiting, 2) is None
    early.cancel()
    await asyncio.gather(early, return_exceptions=True)


# -- what was verified and found sound: pinned -----------------------------------------------------


async def test_after_a_lost_stream_a_waiter_watching_again_from_its_old_read_hears_what_went_meanwhile(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    """The hub never re-creates a watch on its own after a stream is lost (which could only start
    it from a newer revision): it fails the waits, and each waiter watches again from the revision
    it read, its old one while etcd cannot be read (the core rides out an election that way)."""
    client, watches = hub
    prefix = f"{key_root}/l/lost#".encode()
    key = prefix + b"1"
    read = await put(client, key)
    first = asyncio.ensure_future(watches.wait_deleted(prefix, (key,), read))
    await until(lambda: watches.watches == 1 and not watches._creating)
    current: Any = watches._call
    watches._lose(current, Unavailable("etcd is unavailable; retry", retry_after=0.5))
    with pytest.raises(WatchInterrupted):
        await first
    assert watches.watches == 0
    await delete(client, key)  # goes while nothing watches
    await put(client, prefix + b"2")  # and etcd moves on
    assert await asyncio.wait_for(watches.wait_deleted(prefix, (key,), read), 2) is None


async def test_a_waiter_joining_as_the_last_one_leaves_watches_from_its_own_read(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    """The last waiter's leaving forgets the lock's watch at once and cancels it in the background;
    a waiter joining right then gets a new watch from its own read, never the cancelled one."""
    client, watches = hub
    prefix = f"{key_root}/l/rejoin#".encode()
    k1, k2 = prefix + b"1", prefix + b"2"
    await put(client, k1)
    read = await put(client, k2)
    leaving = asyncio.ensure_future(watches.wait_deleted(prefix, (k1,), read))
    await until(lambda: watches.watches == 1 and not watches._creating)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert watches.watches == 0  # forgotten at once; its cancel is sent in the background
    await delete(client, k2)  # between the leaving and the joining
    joining = asyncio.ensure_future(watches.wait_deleted(prefix, (k2,), read))
    assert await asyncio.wait_for(joining, 2) is None
    assert watches.watches == 0 and watches.active == 0


# -- 2. an answer of a lost stream handled after a new stream took over ----------------------------


_END = pb.WatchResponse()


class _ScriptedCall:
    """One Watch stream whose answers the test sends. With `hold` cleared, an answer that has
    arrived waits in the reader (whose task has not run yet: a loaded loop) until `hold` is set,
    whatever happened to the stream meanwhile."""

    def __init__(self) -> None:
        self.sent: list[pb.WatchRequest] = []
        self.inbox: asyncio.Queue[pb.WatchResponse] = asyncio.Queue()
        self.hold = asyncio.Event()
        self.hold.set()
        self.cancelled = False

    async def write(self, request: pb.WatchRequest) -> None:
        if self.cancelled:
            raise asyncio.InvalidStateError("RPC already finished")
        self.sent.append(request)

    async def read(self) -> pb.WatchResponse:
        resp = await self.inbox.get()
        if resp is _END:
            raise asyncio.CancelledError  # as grpc.aio reads a call cancelled locally
        await self.hold.wait()
        return resp

    def cancel(self) -> bool:
        self.cancelled = True
        self.inbox.put_nowait(_END)
        return True


class _ScriptedHub(WatchHub):
    def __init__(self, client: EtcdClient, stall_after: float = 3600.0) -> None:
        super().__init__(client, stall_after=stall_after)  # by default no watchdog in the way
        self.calls: list[Any] = []  # _ScriptedCall, standing in for grpc.aio calls

    def _open(self) -> Any:
        call = _ScriptedCall()
        self.calls.append(call)
        return call


def _created(wid: int) -> pb.WatchResponse:
    return pb.WatchResponse(watch_id=wid, created=True)


def _deleted(wid: int, key: bytes, revision: int) -> pb.WatchResponse:
    kv = pb.KeyValue(key=key, mod_revision=revision)
    return pb.WatchResponse(watch_id=wid, events=[pb.Event(type=pb.Event.DELETE, kv=kv)])


async def test_an_answer_of_a_lost_stream_read_late_does_not_refuse_a_watch_of_the_new_stream() -> None:
    """A lost stream fails what was pending on it, and waiters make new watches on the next stream.
    An answer the old stream had already received, but whose reader task ran only after that (a
    busy loop), was handled as if it came on the new stream: its "created" was matched to the new
    stream's oldest pending create (etcd answers creates in order), which then looked refused.
    That waiter was woken for nothing, and the etcd watch really created for it on the new stream
    was never cancelled. An answer is handled only while its stream is the current one."""
    client = EtcdClient(EtcdConfig(endpoints=("127.0.0.1:1",)))  # never dialled: the streams are scripted
    watches = _ScriptedHub(client)
    try:
        a, b = b"/l/a#", b"/l/b#"
        first = asyncio.ensure_future(watches.wait_deleted(a, (a + b"1",), 10))
        await until(lambda: len(watches.calls) == 1 and len(watches.calls[0].sent) == 1)
        old = watches.calls[0]
        old.hold.clear()
        old.inbox.put_nowait(_created(old.sent[0].create_request.watch_id))  # arrived; its reader runs late
        await asyncio.sleep(0.05)
        current: Any = watches._call
        assert current is old and watches._creating
        watches._lose(current, Unavailable("etcd is unavailable; retry", retry_after=0.5))
        with pytest.raises(WatchInterrupted):
            await first
        second = asyncio.ensure_future(watches.wait_deleted(b, (b + b"1",), 20))
        await until(lambda: len(watches.calls) == 2 and len(watches.calls[1].sent) == 1)
        new = watches.calls[1]
        wid = new.sent[0].create_request.watch_id
        old.hold.set()  # the old stream's reader finally runs
        await asyncio.sleep(0.05)
        assert not second.done(), f"woken by the old stream's answer: {second}"
        new.inbox.put_nowait(_created(wid))
        new.inbox.put_nowait(_deleted(wid, b + b"1", 21))
        assert await asyncio.wait_for(second, 2) is None
        assert watches.watches == 0
    finally:
        await watches.close()
        await client.close()


# -- 3. a create left unanswered on a stream kept busy by other locks --------------------------------


async def test_a_create_left_unanswered_while_other_watches_keep_the_stream_busy_counts_as_stuck() -> None:
    """The watchdog dropped a stream that owed an answer and had received nothing for stall_after.
    Every answer restarted that clock, so on a stream busy with other locks' events a create that
    was never answered never counted as stuck, and its waiter slept until its own timeout: the
    shape of the fault-suite run (background load on other locks) that granted a waiter 17 s after
    its holder died. An unanswered create now counts from when it was sent."""
    client = EtcdClient(EtcdConfig(endpoints=("127.0.0.1:1",)))  # never dialled: the streams are scripted
    watches = _ScriptedHub(client, stall_after=1.0)
    feeding: asyncio.Task[None] | None = None
    try:
        busy, quiet = b"/l/busy#", b"/l/quiet#"
        other = asyncio.ensure_future(watches.wait_deleted(busy, (busy + b"1",), 10))
        await until(lambda: len(watches.calls) == 1 and len(watches.calls[0].sent) == 1)
        stream = watches.calls[0]
        busy_id = stream.sent[0].create_request.watch_id
        stream.inbox.put_nowait(_created(busy_id))

        async def feed() -> None:  # another lock's queue keeps moving: deletions of keys nobody here waits on
            for revision in range(11, 200):
                stream.inbox.put_nowait(_deleted(busy_id, busy + b"x%d" % revision, revision))
                await asyncio.sleep(0.05)

        feeding = asyncio.ensure_future(feed())
        waiting = asyncio.ensure_future(watches.wait_deleted(quiet, (quiet + b"1",), 10))
        await until(lambda: len(stream.sent) == 2)  # its create is sent, and never answered
        with pytest.raises(WatchInterrupted):  # dropped as stuck: the waiter reads the queue again
            await asyncio.wait_for(waiting, 5)
        assert watches.reopened == 1
        with pytest.raises(WatchInterrupted):
            await other
    finally:
        if feeding is not None:
            feeding.cancel()
        await watches.close()
        await client.close()


_KEY = b"/l/a#"


@asynccontextmanager
async def _one_watch_created(stall_after: float) -> AsyncIterator[tuple[_ScriptedHub, asyncio.Future[Any]]]:
    """A scripted hub whose stream has one waiter's create sent and not yet answered."""
    client = EtcdClient(EtcdConfig(endpoints=("127.0.0.1:1",)))  # never dialled: the streams are scripted
    watches = _ScriptedHub(client, stall_after=stall_after)
    try:
        waiting = asyncio.ensure_future(watches.wait_deleted(_KEY, (_KEY + b"1",), 10))
        await until(lambda: len(watches.calls) == 1 and len(watches.calls[0].sent) == 1)
        yield watches, waiting
    finally:
        await watches.close()
        await client.close()


async def test_an_answer_held_up_by_a_busy_event_loop_does_not_make_the_stream_stuck() -> None:
    """The watchdog judged silence on the loop's clock: when an overloaded broker's loop ran
    later than stall_after, an answer already in grpc's buffers (its reader not yet run) made a
    healthy stream look stuck, and the drop re-created every watch on it. The loop's own
    lateness now does not count as the member's silence."""
    async with _one_watch_created(stall_after=1.0) as (watches, waiting):
        stream = watches.calls[0]
        wid = stream.sent[0].create_request.watch_id
        stream.hold.clear()  # its answer arrives; the reader gets to it only after the watchdog
        stream.inbox.put_nowait(_created(wid))
        time.sleep(1.6)  # noqa: ASYNC251 - the loop busy for longer than stall_after
        asyncio.get_running_loop().call_later(0.05, stream.hold.set)
        await asyncio.sleep(0.6)
        assert watches.reopened == 0
        stream.inbox.put_nowait(_deleted(wid, _KEY + b"1", 12))
        assert await asyncio.wait_for(waiting, 2) is None


async def test_a_stream_owing_an_answer_past_the_ceiling_is_dropped_however_late_the_loop_ran() -> None:
    """The loop's lateness is not the member's silence, up to a point: an overloaded broker must
    still leave a frozen member, so a stream owing an answer for STALL_CEILING x stall_after is
    dropped at the watchdog's next look, late loop or not."""
    async with _one_watch_created(stall_after=1.0) as (watches, waiting):
        time.sleep(2.5)  # noqa: ASYNC251 - the loop busy past the ceiling; the create is never answered
        await asyncio.sleep(0.1)  # the watchdog's timer was due: it looks now, once
        assert watches.reopened == 1
        with pytest.raises(WatchInterrupted):
            await asyncio.wait_for(waiting, 5)


# -- 1 again, through the core: the session queues again through another replica ------------------


@dataclass
class _Replica:
    core: LockCore
    backend: EtcdLockBackend
    client: EtcdClient
    heard: list[tuple[int, bytes]] = field(default_factory=list)

    async def session(self) -> int:
        return int((await self.core.create_session(TENANT, 30, "", "")).session_id, 16)

    def acquire(self, name: str, lease: int, wait: float) -> asyncio.Future[Grant]:
        return asyncio.ensure_future(
            self.core.acquire(TENANT, AcquireParams(name, lease, 30, wait, "", uuid.uuid4().hex))
        )


@pytest.fixture
async def replicas(etcd: EmbeddedEtcd) -> AsyncIterator[tuple[_Replica, _Replica, EtcdProbe]]:
    root = f"/lbtest/{uuid.uuid4().hex[:10]}"
    made: list[_Replica] = []
    for _ in range(2):
        client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), key_root=root, request_timeout=5.0))
        backend = EtcdLockBackend(client)
        replica = _Replica(LockCore(backend, root), backend, client)
        replica.heard = deletions_heard(backend.watches)
        made.append(replica)
    probe = EtcdProbe(etcd.endpoint, root)
    try:
        yield made[0], made[1], probe
    finally:
        for lease in await probe.leases():
            await probe.revoke(lease)
        for r in made:
            await r.core.drain_cleanups(1.0)
            await r.backend.close()
            await r.client.close()
        await probe.close()


async def test_a_waiter_behind_the_next_entry_of_a_session_whose_release_here_is_slow_is_granted(
    replicas: tuple[_Replica, _Replica, EtcdProbe], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session s releases lock L through replica one, whose answer from etcd is slow to come back
    (a loaded broker); meanwhile s takes L again through replica two (same entry key), a waiter
    queues behind it on replica one, and s's session then ends. Replica one hears that deletion
    while its release of s's older entry is still in flight, so the watch event is muted; the
    release's answer must still wake the waiter. HEAD_RECHECK is off (an hour): before the fix the
    waiter was granted only when its wait ran out."""
    monkeypatch.setattr(turn, "HEAD_RECHECK", 3600.0)
    one, two, _probe = replicas
    s, w = await one.session(), await one.session()
    first = await one.core.acquire(TENANT, AcquireParams("reuse", s, 30, 0.0, "", "first"))
    key = one.core.keyspace(TENANT).entry_key("reuse", s)

    committed, answered = asyncio.Event(), asyncio.Event()
    real = one.backend.batch.txn

    def slow_release(request: pb.TxnRequest, keys: Any, *, urgent: bool = False) -> Any:
        sent = real(request, keys, urgent=urgent)
        if not any(op.request_delete_range.key == key for op in request.success):
            return sent

        async def late() -> pb.TxnResponse:
            resp = await sent  # committed in etcd ...
            committed.set()
            await answered.wait()  # ... and its answer handled only later
            return resp

        return late()

    one.backend.batch.txn = slow_release  # type: ignore[method-assign]
    releasing = asyncio.ensure_future(one.core.release(TENANT, "reuse", first.fencing_token, s))
    await asyncio.wait_for(committed.wait(), 5)
    again = await two.core.acquire(TENANT, AcquireParams("reuse", s, 30, 0.0, "", "again"))
    assert again.fencing_token > first.fencing_token
    waiting = one.acquire("reuse", w, wait=10.0)
    await until(lambda: one.backend.watches.active == 1)
    heard = len(one.heard)
    await _probe.revoke(s)  # s's session ends: its newer entry goes
    await until(lambda: any(k == key for _, k in one.heard[heard:]))  # heard, muted: the release is in flight
    assert not waiting.done()
    answered.set()
    assert await asyncio.wait_for(releasing, 5)
    got = await asyncio.wait_for(waiting, 4)  # not the 10 s wait
    assert got.session_id == f"{w:016x}" and got.fencing_token > again.fencing_token
