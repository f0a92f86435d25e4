"""The shared per-lock watch (WatchHub) on a real etcd: one etcd watch per lock with waiters,
no missed deletion for a waiter that joins late, and a broker's waiters sharing it end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.server.config import EtcdConfig
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import EtcdClient
from lockbroker.server.etcd.streams import WatchHub
from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe
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


@pytest.fixture
async def tracker(stub: Any, probe: EtcdProbe) -> AsyncIterator[Tracker]:
    t = Tracker(stub, probe)
    try:
        yield t
    finally:
        await t.cleanup()


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
    broker: Any, stub: Any, tracker: Tracker
) -> None:
    holder = await tracker.session()
    g = await stub.Acquire(lock_pb2.AcquireRequest(name="shared", session_id=holder))
    sessions = [await tracker.session() for _ in range(5)]
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
