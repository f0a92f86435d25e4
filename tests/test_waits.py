"""Waits without a cap (issue 19 item 3): `[limits] max_wait = 0` means a wait_timeout of any length;
and a waiter whose connection dropped keeps its place for a retry with its request id.

Over a real etcd and broker. The cap is made small (1 s) so that "2x max_wait" stays short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.core.resume import RESUME_WINDOW
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS, Tracker, active_watches, dur, rich, wait_waiters

SMALL_CAP = 1.0


async def _stub_for(etcd: EmbeddedEtcd, key_root: str, **limits: Any) -> AsyncIterator[Any]:
    broker = Broker(broker_config(etcd.endpoint, key_root, **limits))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            yield lock_pb2_grpc.LockServiceStub(ch)
    finally:
        await broker.stop(grace=1.0)


@pytest.fixture
async def capped(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Any]:
    async for stub in _stub_for(etcd, key_root, max_wait=SMALL_CAP):
        yield stub


@pytest.fixture
async def uncapped(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Any]:
    async for stub in _stub_for(etcd, key_root, max_wait=0):
        yield stub


async def test_a_wait_above_the_cap_is_refused(capped: Any, probe: EtcdProbe) -> None:
    with pytest.raises(aio.AioRpcError) as ei:
        await capped.Acquire(lock_pb2.AcquireRequest(name="w", ttl=dur(10), wait_timeout=dur(2 * SMALL_CAP)))
    r = rich(ei.value)
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.fields == ["wait_timeout"]
    assert await probe.keys() == []


async def test_a_wait_of_twice_the_cap_succeeds_when_the_cap_is_off(uncapped: Any, probe: EtcdProbe) -> None:
    holder = await uncapped.Acquire(lock_pb2.AcquireRequest(name="w", ttl=dur(10)))
    waiter = asyncio.ensure_future(
        uncapped.Acquire(
            lock_pb2.AcquireRequest(name="w", ttl=dur(10), wait_timeout=dur(2 * SMALL_CAP), request_id="long")
        )
    )
    try:
        # Released only after the small cap has passed: the waiter waits longer than it would allow.
        await asyncio.sleep(SMALL_CAP * 1.2)
        assert not waiter.done()
        released = await uncapped.Release(lock_pb2.ReleaseRequest(name="w", fencing_token=holder.grant.fencing_token))
        assert released.released
        got = await waiter
    finally:
        waiter.cancel()
    assert got.grant.name == "w" and got.grant.fencing_token > holder.grant.fencing_token
    assert got.waited.seconds + got.waited.nanos / 1e9 > SMALL_CAP
    await uncapped.Release(lock_pb2.ReleaseRequest(name="w", fencing_token=got.grant.fencing_token))
    assert await probe.keys(LOCKS) == []


async def test_an_uncapped_wait_is_still_bounded_by_the_deadline(uncapped: Any, probe: EtcdProbe) -> None:
    holder = await uncapped.Acquire(lock_pb2.AcquireRequest(name="w", ttl=dur(10)))
    # A year: no cap refuses it, and the RPC deadline ends it, leaving nothing queued.
    with pytest.raises(aio.AioRpcError) as ei:
        await uncapped.Acquire(
            lock_pb2.AcquireRequest(name="w", ttl=dur(10), wait_timeout=dur(365 * 86400)), timeout=1.0
        )
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await uncapped.Release(lock_pb2.ReleaseRequest(name="w", fencing_token=holder.grant.fencing_token))
    for _ in range(60):
        if await probe.keys(LOCKS) == []:
            break
        await asyncio.sleep(0.05)
    assert await probe.keys(LOCKS) == []


# -- a waiter that comes back after a dropped connection keeps its place ---------------------------


def _acquirer(broker: Broker) -> Any:
    assert broker.core is not None
    return broker.core._acquirer


async def _waiting_calls(broker: Broker, n: int) -> None:
    """Until the broker has exactly `n` blocking Acquire calls in progress (a dropped call has
    been noticed and ended on the server's side)."""
    for _ in range(200):
        if sum(_acquirer(broker)._waiting.values()) == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the broker never had {n} waiting calls")


async def _dropped_waiter(broker: Broker, session_id: str, request_id: str) -> None:
    """Queue an Acquire on a connection of its own, then drop that connection."""
    ch = aio.insecure_channel(f"127.0.0.1:{broker.port}")
    call = lock_pb2_grpc.LockServiceStub(ch).Acquire(
        lock_pb2.AcquireRequest(name="r", session_id=session_id, wait_timeout=dur(20), request_id=request_id)
    )
    # Dropped once it waits on the watch, so its entry is in the queue: counted as waiting (before
    # it enqueues), a call dropped on a loaded machine left no entry, and the tests saw one waiter.
    for _ in range(200):
        if active_watches(broker) >= 1:
            break
        await asyncio.sleep(0.02)
    await ch.close()  # the connection goes; the server sees the call cancelled
    with pytest.raises((aio.AioRpcError, asyncio.CancelledError)):
        await call


async def test_a_waiter_back_after_a_dropped_connection_keeps_its_place(
    broker: Broker, stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    # Longer than the default, so a slow machine cannot make the retry late.
    _acquirer(broker).resume_window = 5 * RESUME_WINDOW
    h, a, b = await track.session(), await track.session(), await track.session()
    held = await stub.Acquire(lock_pb2.AcquireRequest(name="r", session_id=h))
    await _dropped_waiter(broker, a, "resume-a")
    await _waiting_calls(broker, 0)  # the dropped call has ended on the broker
    behind = asyncio.ensure_future(
        stub.Acquire(lock_pb2.AcquireRequest(name="r", session_id=b, wait_timeout=dur(20), request_id="b"))
    )
    retry = None
    try:
        d = await wait_waiters(stub, "r", 2)
        assert [w.session_id for w in d.waiters] == [a, b]  # a's entry outlived its call
        a_token = d.waiters[0].fencing_token
        retry = asyncio.ensure_future(
            stub.Acquire(lock_pb2.AcquireRequest(name="r", session_id=a, wait_timeout=dur(20), request_id="resume-a"))
        )
        await _waiting_calls(broker, 2)
        d = await stub.Describe(lock_pb2.DescribeRequest(name="r"))
        assert [(w.session_id, w.fencing_token) for w in d.waiters] == [(a, a_token), (b, d.waiters[1].fencing_token)]
        await stub.Release(lock_pb2.ReleaseRequest(name="r", fencing_token=held.grant.fencing_token))
        # The abandoned call's clean-up sees its entry at the head, adopted: it leaves it to the retry.
        got = await retry
        assert (got.grant.session_id, got.grant.fencing_token) == (a, a_token)  # its old place and token
        assert not behind.done()
        await stub.Release(lock_pb2.ReleaseRequest(name="r", fencing_token=a_token))
        assert (await behind).grant.session_id == b
    finally:
        behind.cancel()
        if retry is not None:
            retry.cancel()


async def test_a_waiter_that_does_not_come_back_never_holds_and_is_removed(
    broker: Broker, stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    # A long window: the lock must pass over the abandoned entry long before the window ends.
    _acquirer(broker).resume_window = 60.0
    h, a, b = await track.session(), await track.session(), await track.session()
    held = await stub.Acquire(lock_pb2.AcquireRequest(name="r", session_id=h))
    await _dropped_waiter(broker, a, "gone-a")
    await _waiting_calls(broker, 0)
    behind = asyncio.ensure_future(
        stub.Acquire(lock_pb2.AcquireRequest(name="r", session_id=b, wait_timeout=dur(20), request_id="b"))
    )
    try:
        await wait_waiters(stub, "r", 2)
        await stub.Release(lock_pb2.ReleaseRequest(name="r", fencing_token=held.grant.fencing_token))
        got = await behind  # a's entry reached the head unadopted: deleted, the lock passed on
        assert got.grant.session_id == b
    finally:
        behind.cancel()
    assert [k.decode().rsplit("#", 1)[1] for k in await probe.keys(LOCKS)] == [b]

    # With a short window, an abandoned waiter is gone once it ends, though the lock stays held.
    _acquirer(broker).resume_window = 0.3
    await _dropped_waiter(broker, a, "gone-again")
    for _ in range(200):
        if len(await probe.keys(LOCKS)) == 1:
            break
        await asyncio.sleep(0.05)
    assert [k.decode().rsplit("#", 1)[1] for k in await probe.keys(LOCKS)] == [b]
