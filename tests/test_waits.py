"""Waits without a cap (issue 19 item 3): `[limits] max_wait = 0` means a wait_timeout of any length.

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
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS, dur, rich

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
