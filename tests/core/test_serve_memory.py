"""`lockbroker serve --backend memory`: the dev mode serves the real API over a real channel, says
loudly that it is not durable, and starts no etcd."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.config import Config, ConfigError, ServerConfig, load
from lockbroker.server.core.memory import MemoryLockBackend
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.procutil import stop_process
from tests.test_cli import FAST_RECONNECT, GRACE, etcd_children, start_serve, wait_serving


async def test_serve_backend_memory_takes_and_releases_a_lock(tmp_path: Path) -> None:
    served = await start_serve(tmp_path, tmp_path / "state", "--backend", "memory")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{served.port}", FAST_RECONNECT) as ch:
            await wait_serving(served, ch)
            assert etcd_children(served.proc.pid) == []
            stub = lock_pb2_grpc.LockServiceStub(ch)
            s = await stub.CreateSession(
                lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30)), timeout=10
            )
            g = await stub.Acquire(lock_pb2.AcquireRequest(name="dev/job", session_id=s.session_id), timeout=10)
            assert g.grant.fencing_token > 0
            d = await stub.Describe(lock_pb2.DescribeRequest(name="dev/job"), timeout=10)
            assert d.holder.fencing_token == g.grant.fencing_token
            r = await stub.Release(
                lock_pb2.ReleaseRequest(name="dev/job", fencing_token=g.grant.fencing_token), timeout=10
            )
            assert r.released
            d = await stub.Describe(lock_pb2.DescribeRequest(name="dev/job"), timeout=10)
            assert not d.HasField("holder")
    finally:
        await stop_process(served.proc, grace=GRACE + 5)
    log = served.log()
    assert "--backend memory" in log
    assert "Nothing is durable" in log
    assert not (tmp_path / "state").exists(), "the memory backend wrote an etcd data dir"


def scrape(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(resp.status)


@pytest.fixture
async def memory_stub() -> AsyncIterator[Any]:
    # With metrics on too: the etcd state gauges must not be wired to a client the broker lacks.
    b = Broker(
        Config(
            server=ServerConfig(listen="127.0.0.1:0", grace_period=1.0, backend="memory", metrics_listen="127.0.0.1:0")
        )
    )
    await b.start()
    try:
        assert isinstance(b.backend, MemoryLockBackend)
        assert b.client is None
        assert b.embedded is None
        assert b.metrics is not None
        url = f"http://127.0.0.1:{b.metrics.port}/metrics"
        assert await asyncio.to_thread(scrape, url) == 200
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            yield lock_pb2_grpc.LockServiceStub(ch)
    finally:
        await b.stop(grace=1.0)


async def test_acquire_through_the_memory_broker_is_fifo_with_increasing_tokens(memory_stub: Any) -> None:
    stub = memory_stub
    name = "dev/fifo"

    async def session() -> str:
        return str((await stub.CreateSession(lock_pb2.CreateSessionRequest())).session_id)

    holder = await session()
    held = await stub.Acquire(lock_pb2.AcquireRequest(name=name, session_id=holder))
    sids = [await session() for _ in range(5)]
    order: list[int] = []
    tokens: dict[int, int] = {}

    async def waiter(i: int) -> None:
        req = lock_pb2.AcquireRequest(name=name, session_id=sids[i], request_id=f"w{i}")
        req.wait_timeout.seconds = 20
        g = await stub.Acquire(req)
        order.append(i)
        tokens[i] = g.grant.fencing_token
        assert g.queue_position == i + 1
        await stub.Release(lock_pb2.ReleaseRequest(name=name, fencing_token=g.grant.fencing_token))

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        for _ in range(200):
            d = await stub.Describe(lock_pb2.DescribeRequest(name=name))
            if len(d.waiters) == i + 1:
                break
            await asyncio.sleep(0.01)
        assert [w.session_id for w in d.waiters] == sids[: i + 1]
    await stub.Release(lock_pb2.ReleaseRequest(name=name, fencing_token=held.grant.fencing_token))
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == list(range(5))
    seq = [held.grant.fencing_token, *(tokens[i] for i in range(5))]
    assert all(a < b for a, b in itertools.pairwise(seq))


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"BACKEND.*expected one of etcd, memory"):
        load(None, {"LOCKBROKER_BACKEND": "redis"})
    assert load(None, {}).server.backend == "etcd"
    assert load(None, {"LOCKBROKER_BACKEND": "memory"}).server.backend == "memory"
