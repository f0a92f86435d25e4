"""Issue 18, item 1 through a real broker on a real etcd that stops answering (SIGSTOP) just as a
waiter's wait runs out: the waiter must not be told WAIT_EXPIRED while its entry is still queued.
The contract suite (tests/core/test_wait_expiry.py) covers the same with injected faults."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.lockutil import dur, eventually
from tests.overload_util import refusal

# Long enough that even a loaded machine queues the waiter and reaches the freeze before it.
WAIT = 8.0
FREEZE_BEFORE = 0.5  # seconds before the wait runs out (as the client counts it)


@pytest.fixture
async def own_etcd(tmp_path: Path) -> AsyncIterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", start_timeout=10.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_wait_running_out_while_etcd_is_frozen_is_not_told_wait_expired(
    own_etcd: EmbeddedEtcd, key_root: str
) -> None:
    config = broker_config(own_etcd.endpoint, key_root)
    broker = Broker(dataclasses.replace(config, etcd=dataclasses.replace(config.etcd, request_timeout=1.0)))
    await broker.start()
    pid = own_etcd.pid
    assert pid is not None
    frozen = False
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            held = await stub.Acquire(lock_pb2.AcquireRequest(name="frozen", ttl=dur(60)), timeout=10)
            loop = asyncio.get_running_loop()
            started = loop.time()
            waiter = asyncio.ensure_future(
                stub.Acquire(
                    lock_pb2.AcquireRequest(name="frozen", ttl=dur(60), wait_timeout=dur(WAIT), request_id="w-1"),
                    timeout=30,
                )
            )

            async def queued() -> bool:
                d = await stub.Describe(lock_pb2.DescribeRequest(name="frozen"), timeout=5)
                return len(d.waiters) == 1

            await eventually(queued, 30, "the waiter is queued")
            # Freeze etcd just before the wait runs out: the broker's stall detection (item 2)
            # drops a silent watch after about a second, so the wait must run out first for the
            # waiter to reach its "wait expired" answer with etcd unreachable.
            await asyncio.sleep(max(0.0, started + WAIT - FREEZE_BEFORE - loop.time()))
            # A machine too slow to get here before the wait ran out cannot show the fix: fail, never
            # skip (a skipped check passes CI silently).
            assert not waiter.done(), "the machine was too slow to freeze etcd before the wait ran out"
            os.kill(pid, signal.SIGSTOP)  # etcd stops answering, without an error, as in a partition
            frozen = True
            with pytest.raises(aio.AioRpcError) as caught:
                await waiter
            os.kill(pid, signal.SIGCONT)
            frozen = False
            # The answer came while etcd was frozen, so nobody can know that the entry is gone:
            # "unknown" (UNAVAILABLE), never WAIT_EXPIRED, which the broker answered before the fix.
            r = refusal(caught.value)
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"), r
            assert r.retry_after

            # The clean-up goes on once etcd answers: the entry is removed, and releasing the
            # holder leaves the lock free (the waiter's entry never becomes a holder nobody knows).
            async def removed() -> bool:
                d = await stub.Describe(lock_pb2.DescribeRequest(name="frozen"), timeout=5)
                return not d.waiters

            await eventually(removed, 30, "the waiter's entry is removed")
            released = await stub.Release(
                lock_pb2.ReleaseRequest(name="frozen", fencing_token=held.grant.fencing_token), timeout=10
            )
            assert released.released
            d = await stub.Describe(lock_pb2.DescribeRequest(name="frozen"), timeout=5)
            assert not d.HasField("holder"), d
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        await broker.stop(grace=1.0)
