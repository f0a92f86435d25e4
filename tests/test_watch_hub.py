"""The shared per-lock watch (WatchHub) on a real etcd: one etcd watch per lock with waiters,
no missed deletion for a waiter that joins late, and a broker's waiters sharing it end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import EtcdClient
from lockbroker.server.etcd.streams import _FEW, WatchHub, _PrefixWatch, _Wait
from lockbroker.v1 import lock_pb2
from tests.lockutil import Tracker, active_watches, dur


@pytest.fixture
async def hub(etcd: EmbeddedEtcd) -> AsyncIterator[tuple[EtcdClient, WatchHub]]:
    client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,)))
    watches = WatchHub(client)
    try:
        yield client, watches
    finally:
        await watches.close()
        await client.close()


async def put(client: EtcdClient, key: bytes) -> int:
    return (await client.put(pb.PutRequest(key=key, value=b"x"))).header.revision


async def delete(client: EtcdClient, key: bytes) -> int:
    resp = await client.txn(pb.TxnRequest(success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))]))
    return resp.header.revision


async def until(predicate: Any, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_waiters_of_one_lock_share_one_watch_and_wake_only_for_their_keys(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    client, watches = hub
    prefix = f"{key_root}/l/a#".encode()
    keys = [prefix + bytes([65 + i]) for i in range(4)]
    rev = 0
    for k in keys:
        rev = await put(client, k)
    tasks = [asyncio.ensure_future(watches.wait_deleted(prefix, (k,), rev)) for k in keys]
    await until(lambda: watches.active == 4)
    assert watches.watches == 1
    await delete(client, keys[2])
    await asyncio.wait_for(tasks[2], 5)
    await asyncio.sleep(0.2)
    assert [t.done() for t in tasks] == [False, False, True, False]  # no herd
    for k in (keys[0], keys[1], keys[3]):
        await delete(client, k)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert watches.active == 0 and watches.watches == 0  # the last waiter to leave cancels it


async def test_a_waiter_joining_late_learns_of_a_deletion_it_did_not_see(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    client, watches = hub
    prefix = f"{key_root}/l/b#".encode()
    first, second = prefix + b"1", prefix + b"2"
    await put(client, first)
    read = await put(client, second)  # a second waiter reads the queue here ...
    holder = asyncio.ensure_future(watches.wait_deleted(prefix, (first,), read))
    await until(lambda: watches.watches == 1)
    await delete(client, second)  # ... its predecessor goes before it registers ...
    await asyncio.sleep(0.2)  # (the shared watch has seen the deletion)
    # ... so it returns at once instead of waiting for an event that has passed.
    await asyncio.wait_for(watches.wait_deleted(prefix, (second,), read), 1)
    assert not holder.done()
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    assert watches.watches == 0


async def test_a_waiter_older_than_the_watch_is_told_to_read_again(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    client, watches = hub
    prefix = f"{key_root}/l/c#".encode()
    old = await put(client, prefix + b"1")
    newer = await put(client, prefix + b"2")
    waiting = asyncio.ensure_future(watches.wait_deleted(prefix, (prefix + b"2",), newer))
    await until(lambda: watches.watches == 1)
    # The watch starts after `old`: it cannot vouch for what happened between, so no wait.
    await asyncio.wait_for(watches.wait_deleted(prefix, (prefix + b"1",), old), 1)
    assert not waiting.done()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_a_brokers_waiters_on_one_lock_use_one_etcd_watch_and_are_served_in_order(
    broker: Any, stub: Any, track: Tracker
) -> None:
    holder = await track.session()
    g = await stub.Acquire(lock_pb2.AcquireRequest(name="shared", session_id=holder))
    sessions = [await track.session() for _ in range(5)]
    order: list[int] = []

    async def wait(i: int) -> None:
        got = await stub.Acquire(lock_pb2.AcquireRequest(name="shared", session_id=sessions[i], wait_timeout=dur(20)))
        order.append(i)
        await stub.Release(
            lock_pb2.ReleaseRequest(name="shared", session_id=sessions[i], fencing_token=got.grant.fencing_token)
        )

    tasks = []
    for i in range(5):
        tasks.append(asyncio.ensure_future(wait(i)))
        await until(lambda n=i + 1: active_watches(broker) == n)
    assert broker.core._backend.watches.watches == 1
    await stub.Release(lock_pb2.ReleaseRequest(name="shared", session_id=holder, fencing_token=g.grant.fencing_token))
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert order == [0, 1, 2, 3, 4]
    assert broker.core._backend.watches.watches == 0


def spy(watches: WatchHub) -> list[tuple[int, bool, bool, int]]:
    """What etcd sends on the hub's Watch stream: (watch id, created, canceled, events)."""
    seen: list[tuple[int, bool, bool, int]] = []
    real = watches._on_response

    def record(resp: pb.WatchResponse) -> None:
        seen.append((resp.watch_id, resp.created, resp.canceled, len(resp.events)))
        real(resp)

    watches._on_response = record  # type: ignore[method-assign]
    return seen


async def test_a_watch_etcd_refuses_wakes_its_waiters_instead_of_leaving_them(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    client, watches = hub
    seen = spy(watches)
    a, b = f"{key_root}/l/d#".encode(), f"{key_root}/l/e#".encode()
    rev = await put(client, b + b"1")
    first = asyncio.ensure_future(watches.wait_deleted(a, (a + b"1",), rev))
    await until(lambda: bool(seen))
    # etcd refuses a create with watch id -1 (a stale token, permission denied, here a duplicate
    # id): the waiters of that lock must hear of it, or they would sit until their timeout.
    watches._next_id = 1
    with pytest.raises(WatchInterrupted, match="refused"):
        await asyncio.wait_for(watches.wait_deleted(b, (b + b"1",), rev), 2)
    assert (-1, True, True, 0) in seen
    # Waiting again (as the core does, after reading the queue) gets a working watch.
    watches._next_id = 100
    again = asyncio.ensure_future(watches.wait_deleted(b, (b + b"1",), rev))
    await until(lambda: (100, True, False, 0) in seen)
    await delete(client, b + b"1")
    await asyncio.wait_for(again, 2)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_a_watch_no_waiter_wants_any_more_is_never_created(
    hub: tuple[EtcdClient, WatchHub], key_root: str
) -> None:
    client, watches = hub
    seen = spy(watches)
    prefix = f"{key_root}/l/f#".encode()
    rev = await put(client, prefix + b"1")
    await watches._write_lock.acquire()  # another write in flight: the create waits its turn
    waiting = asyncio.ensure_future(watches.wait_deleted(prefix, (prefix + b"1",), rev))
    await asyncio.sleep(0.05)
    waiting.cancel()  # its only waiter leaves before the create is sent
    await asyncio.gather(waiting, return_exceptions=True)
    watches._write_lock.release()
    await asyncio.sleep(0.2)
    await delete(client, prefix + b"1")
    await asyncio.sleep(0.3)
    assert seen == []  # no create was sent, so etcd sends this lock's deletions to nobody
    assert watches.watches == 0 and watches.active == 0


def test_a_keys_waits_stay_exact_as_they_grow_past_a_tuple_and_shrink_back() -> None:
    # The waits on one key are the wait itself, a tuple of a few, or a set of more (a semaphore's
    # waiters all watch the same entries): whatever the form, `at` names exactly the waits there.
    loop = asyncio.new_event_loop()
    try:
        watch = _PrefixWatch(1, b"p#", 1)
        waits = [_Wait((b"p#shared", b"p#own%d" % i), 0, loop.create_future()) for i in range(3 * _FEW)]
        for n, wait in enumerate(waits, start=1):
            watch.add(wait)
            assert set(watch.at(b"p#shared")) == set(waits[:n])
            assert len(watch.at(b"p#shared")) == n
        left = list(waits)
        for wait in waits[::2] + waits[1::2]:  # out of the order they came in
            watch.remove(wait)
            left.remove(wait)
            assert set(watch.at(b"p#shared")) == set(left)
            assert len(watch.at(b"p#shared")) == len(left)
            assert watch.at(wait.keys[1]) == ()
        assert watch.waits == {}
        assert watch.count == 0
    finally:
        loop.close()
