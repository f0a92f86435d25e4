"""Lock-delay over a real etcd and real brokers (core/delay.py): the next grant after a lost holder
waits for the delay (asserted as order, with generous slack: tests never assert tight timings),
Describe shows its end, a clean release hands on at once, and a broker restart keeps the rule."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.client import Client, InvalidArgument, LockHeld
from lockbroker.server.app import Broker
from lockbroker.server.config import Config
from lockbroker.server.core.quota import TenantQuota
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.lockutil import expect_error, wait_waiters

DELAY = 2.0
SLACK = 3.0  # generous: a loaded CI machine, etcd's lease expiry, the broker's sweep


def _config(etcd: EmbeddedEtcd, key_root: str) -> Config:
    cfg = broker_config(etcd.endpoint, key_root)
    quota = TenantQuota(lock_delay=DELAY, max_lock_delay=10.0)
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "quota": quota})


@pytest.fixture
async def served(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Any]:
    b = Broker(_config(etcd, key_root))
    await b.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            yield lock_pb2_grpc.LockServiceStub(ch)
    finally:
        await b.stop(grace=1.0)


async def _session(stub: Any, ttl: int = 30) -> str:
    req = lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=ttl))
    return str((await stub.CreateSession(req)).session_id)


def _acquire(stub: Any, name: str, session_id: str, wait: float = 0, **kw: Any) -> Any:
    req = lock_pb2.AcquireRequest(name=name, session_id=session_id, **kw)
    if wait:
        req.wait_timeout.FromSeconds(int(wait))
    return stub.Acquire(req, timeout=60)


async def test_a_waiter_is_granted_after_the_delay_not_before(served: Any) -> None:
    a, b = await _session(served), await _session(served)
    await _acquire(served, "ld/x", a)
    waiter = asyncio.ensure_future(_acquire(served, "ld/x", b, wait=30))
    await wait_waiters(served, "ld/x", 1)
    lost = time.monotonic()
    await served.CloseSession(lock_pb2.CloseSessionRequest(session_id=a))  # gone without a Release
    d = await served.Describe(lock_pb2.DescribeRequest(name="ld/x"))
    assert not waiter.done()
    g = (await asyncio.wait_for(waiter, DELAY + SLACK + 5)).grant
    after = time.monotonic() - lost
    assert DELAY - 0.1 <= after <= DELAY + SLACK, f"granted {after:.2f}s after the loss, delay {DELAY:g}s"
    assert g.session_id == b
    assert d.holder.session_id == b and d.HasField("delay_until"), "during the delay: next in line, and its end"


async def test_a_clean_release_hands_on_at_once(served: Any) -> None:
    a, b = await _session(served), await _session(served)
    g = (await _acquire(served, "ld/clean", a)).grant
    await served.Release(lock_pb2.ReleaseRequest(name="ld/clean", fencing_token=g.fencing_token, session_id=a))
    nxt = (await _acquire(served, "ld/clean", b)).grant  # a try-lock: LOCK_HELD if a delay ran
    assert nxt.fencing_token > g.fencing_token


async def test_a_lock_delay_above_the_tenants_maximum_is_invalid_argument(served: Any) -> None:
    a = await _session(served)
    r = await expect_error(
        _acquire(served, "ld/big", a, lock_delay=duration_pb2.Duration(seconds=11)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert r.bad_request is not None and r.bad_request.field_violations[0].field == "lock_delay"
    d = await served.Describe(lock_pb2.DescribeRequest(name="ld/big"))
    assert not d.HasField("holder") and not d.waiters


async def test_a_broker_restart_inside_the_delay_keeps_it(etcd: EmbeddedEtcd, key_root: str) -> None:
    cfg = _config(etcd, key_root)
    first = Broker(cfg)
    await first.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            a, b = await _session(stub), await _session(stub)
            await _acquire(stub, "ld/restart", a, lock_delay=duration_pb2.Duration(seconds=4))
            waiter = asyncio.ensure_future(_acquire(stub, "ld/restart", b, wait=30))
            await wait_waiters(stub, "ld/restart", 1)
            lost = time.monotonic()
            await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=a))

            async def running() -> lock_pb2.DescribeResponse | None:
                d = await stub.Describe(lock_pb2.DescribeRequest(name="ld/restart"))
                return d if d.HasField("delay_until") else None

            for _ in range(100):  # the waiter's replica starts the delay when it sees the loss
                if (d := await running()) is not None:
                    break
                await asyncio.sleep(0.05)
            assert d is not None, "the delay started"
            until = d.delay_until.seconds + d.delay_until.nanos / 1e9
    finally:
        await first.stop(grace=0.2)  # down inside the delay: the waiter's call ends with it
    await asyncio.gather(waiter, return_exceptions=True)  # cut off with its broker
    assert time.monotonic() - lost < 4, "the restart began inside the delay"
    second = Broker(cfg)
    await second.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{second.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            # The cut-off waiter's session too (in case its entry outlived the shutdown): it never
            # held the lock, so it adds no delay of its own.
            await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=b))
            c = await _session(stub)
            if time.time() < until - 0.5:
                r = await expect_error(_acquire(stub, "ld/restart", c), grpc.StatusCode.ABORTED, "LOCK_HELD")
                assert r.info is not None and float(r.info.metadata["lock_delay_until"]) == pytest.approx(
                    until, abs=0.01
                )
            g = (await _acquire(stub, "ld/restart", c, wait=20)).grant
            assert time.time() >= until - 0.05, "granted before the delay recorded in etcd ended"
            assert time.monotonic() - lost <= 4 + SLACK
            assert g.session_id == c
    finally:
        await second.stop(grace=0.5)


async def test_the_python_client_sends_lock_delay_and_shows_delay_until(etcd: EmbeddedEtcd, key_root: str) -> None:
    b = Broker(_config(etcd, key_root))
    await b.start()
    try:
        async with Client(f"127.0.0.1:{b.port}") as client:
            with pytest.raises(InvalidArgument):
                await client.acquire("ld/client", ttl=10, lock_delay=11)
            s = await client.create_session(ttl=10)
            await client.acquire("ld/client", session_id=s.session_id, lock_delay=5)
            before = time.time()
            await client.close_session(s.session_id)
            with pytest.raises(LockHeld):
                await client.acquire("ld/client", ttl=10)
            state = await client.describe("ld/client")
            assert state.delay_until is not None and state.delay_until.timestamp() >= before + 5 - 0.1, "5 s, not 2"
    finally:
        await b.stop(grace=0.5)
