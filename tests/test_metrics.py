"""Prometheus metrics, scraped over HTTP from a real broker on a real etcd through a real channel."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from lockbroker.server.app import Broker
from lockbroker.server.config import ConfigError
from lockbroker.server.core.quota import TenantQuota
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.metrics import tally
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe

LOCK_NAME = "orders/metrics-secret-name-7f3a"


def secs(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(n * 1e9))
    return d


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels` (0 if none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(port: int) -> Scrape:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body: bytes = r.read()
            return body.decode()

    # The state collector hands its etcd read to this loop: the HTTP request must not block it.
    return Scrape(await asyncio.to_thread(fetch))


@pytest.fixture
async def mbroker(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Broker]:
    cfg = broker_config(etcd.endpoint, key_root)
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, metrics_listen="127.0.0.1:0"),
        quota=TenantQuota(max_locks=2),
    )
    b = Broker(cfg)
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


@pytest.fixture
async def mstub(mbroker: Broker) -> AsyncIterator[Any]:
    async with aio.insecure_channel(f"127.0.0.1:{mbroker.port}") as ch:
        yield lock_pb2_grpc.LockServiceStub(ch)


def port_of(b: Broker) -> int:
    assert b.metrics is not None
    return b.metrics.port


async def test_handled_counts_exactly_the_calls_made(mbroker: Broker, mstub: Any) -> None:
    before = await scrape(port_of(mbroker))
    ok = dict(grpc_service="lockbroker.v1.LockService", grpc_method="Acquire", grpc_code="OK", grpc_type="unary")
    for i in range(3):
        r = await mstub.Acquire(lock_pb2.AcquireRequest(name=f"{LOCK_NAME}-{i % 2}-{i}", ttl=secs(10)))
        await mstub.Release(
            lock_pb2.ReleaseRequest(name=f"{LOCK_NAME}-{i % 2}-{i}", fencing_token=r.grant.fencing_token)
        )
    after = await scrape(port_of(mbroker))
    assert after.get("grpc_server_handled_total", **ok) - before.get("grpc_server_handled_total", **ok) == 3
    started = dict(grpc_service="lockbroker.v1.LockService", grpc_method="Acquire")
    assert after.get("grpc_server_started_total", **started) - before.get("grpc_server_started_total", **started) == 3
    assert (
        after.get("grpc_server_handling_seconds_count", **started)
        - before.get("grpc_server_handling_seconds_count", **started)
        == 3
    )
    assert (
        after.get("lockbroker_grants_total", tenant="default") - before.get("lockbroker_grants_total", tenant="default")
        == 3
    )
    assert (
        after.get("lockbroker_releases_total", tenant="default")
        - before.get("lockbroker_releases_total", tenant="default")
        == 3
    )
    # Each release reached the replica that made the grant: every hold was measured.
    assert after.get("lockbroker_lock_hold_seconds_count", tenant="default") == 3
    assert after.get("lockbroker_etcd_request_duration_seconds_count", method="Txn") > 0


async def test_try_lock_refused_is_aborted_and_waits_are_observed(mbroker: Broker, mstub: Any) -> None:
    port = port_of(mbroker)
    held = await mstub.Acquire(lock_pb2.AcquireRequest(name=LOCK_NAME, ttl=secs(10)))
    before = await scrape(port)
    with pytest.raises(aio.AioRpcError) as ei:
        await mstub.Acquire(lock_pb2.AcquireRequest(name=LOCK_NAME, ttl=secs(10)))  # try-lock: no wait
    assert ei.value.code() == grpc.StatusCode.ABORTED
    after = await scrape(port)
    aborted = dict(grpc_method="Acquire", grpc_code="ABORTED")
    assert after.get("grpc_server_handled_total", **aborted) - before.get("grpc_server_handled_total", **aborted) == 1

    # A waiter, and the gauges read from etcd while it waits: one lock held, one waiter.
    waiter = asyncio.ensure_future(
        mstub.Acquire(lock_pb2.AcquireRequest(name=LOCK_NAME, ttl=secs(10), wait_timeout=secs(30)))
    )
    for _ in range(100):
        mid = await scrape(port)
        if mid.get("lockbroker_waiters", tenant="default") == 1:
            break
        await asyncio.sleep(0.05)
    assert mid.get("lockbroker_waiters", tenant="default") == 1
    assert mid.get("lockbroker_locks_held", tenant="default") == 1
    assert mid.get("lockbroker_sessions", tenant="default") == 2  # each Acquire made its own session
    assert mid.get("lockbroker_state_up") == 1
    await asyncio.sleep(0.3)
    await mstub.Release(lock_pb2.ReleaseRequest(name=LOCK_NAME, fencing_token=held.grant.fencing_token))
    granted = await waiter
    assert granted.waited.ToTimedelta().total_seconds() >= 0.3
    end = await scrape(port)
    # One grant, and it came after a wait: the histogram saw it with its wait.
    assert (
        end.get("lockbroker_lock_wait_seconds_count", tenant="default")
        - before.get("lockbroker_lock_wait_seconds_count", tenant="default")
        == 1
    )
    assert (
        end.get("lockbroker_lock_wait_seconds_sum", tenant="default")
        - before.get("lockbroker_lock_wait_seconds_sum", tenant="default")
        >= 0.3
    )
    # No lock name anywhere in the exposition, not even as part of a label.
    assert "metrics-secret-name" not in end.text
    assert "orders" not in end.text


async def test_quota_refusal_is_counted_by_limit(mbroker: Broker, mstub: Any) -> None:
    port = port_of(mbroker)
    before = await scrape(port)
    for i in range(2):
        await mstub.Acquire(lock_pb2.AcquireRequest(name=f"q{i}", ttl=secs(10)))
    with pytest.raises(aio.AioRpcError) as ei:
        await mstub.Acquire(lock_pb2.AcquireRequest(name="q2", ttl=secs(10)))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = await scrape(port)
    key = dict(tenant="default", limit="max_locks")
    assert (
        after.get("lockbroker_quota_refusals_total", **key) - before.get("lockbroker_quota_refusals_total", **key) == 1
    )
    exhausted = dict(grpc_method="Acquire", grpc_code="RESOURCE_EXHAUSTED")
    assert after.get("grpc_server_handled_total", **exhausted) == 1


async def test_keepalive_stream_messages_are_counted(mbroker: Broker, mstub: Any) -> None:
    s = await mstub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(10)))
    call = mstub.KeepAlive()
    for _ in range(2):
        await call.write(lock_pb2.KeepAliveRequest(session_id=s.session_id))
        await call.read()
    await call.done_writing()
    assert await call.read() is aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    m = await scrape(port_of(mbroker))
    labels = dict(grpc_method="KeepAlive", grpc_type="bidi_stream")
    assert m.get("grpc_server_msg_received_total", **labels) == 2
    assert m.get("grpc_server_msg_sent_total", **labels) == 2
    assert m.get("grpc_server_handled_total", grpc_code="OK", **labels) == 1


def test_tally_counts_holders_waiters_and_sessions_per_tenant() -> None:
    root = b"/r"
    keys = [
        b"/r/t/a/s/01",
        b"/r/t/a/s/02",
        b"/r/t/a/l/x#01",
        b"/r/t/a/l/x#02",
        b"/r/t/a/l/x/y#02",
        b"/r/t/a/m/01",
        b"/r/t/a/q/e/0",
        b"/r/t/b/l/x#03",
    ]
    st = tally(keys, root)
    assert (st.sessions["a"], st.held["a"], st.waiters["a"]) == (2, 2, 1)
    assert (st.sessions["b"], st.held["b"], st.waiters["b"]) == (0, 1, 0)


async def test_a_metrics_port_in_use_is_a_config_error(etcd: EmbeddedEtcd, key_root: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = broker_config(etcd.endpoint, key_root)
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, metrics_listen=f"127.0.0.1:{port}"))
        b = Broker(cfg)
        try:
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await b.start()
        finally:
            await b.stop(grace=0.5)


async def test_a_session_found_expired_by_keepalive_is_counted(mbroker: Broker, mstub: Any, etcd: EmbeddedEtcd) -> None:
    s = await mstub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(10)))
    probe = EtcdProbe(etcd.endpoint, mbroker.config.etcd.key_root)
    try:
        await probe.revoke(int(s.session_id, 16))  # the lease ends behind the client's back
    finally:
        await probe.close()
    call = mstub.KeepAlive()
    await call.write(lock_pb2.KeepAliveRequest(session_id=s.session_id))
    answer = await call.read()
    assert answer.expired
    await call.done_writing()
    assert await call.read() is aio.EOF
    m = await scrape(port_of(mbroker))
    assert m.get("lockbroker_session_expiries_total", tenant="default") == 1


async def test_a_rate_limit_refusal_is_counted_under_acquire_rate(etcd: EmbeddedEtcd, key_root: str) -> None:
    cfg = broker_config(etcd.endpoint, key_root)
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, metrics_listen="127.0.0.1:0"),
        quota=TenantQuota(acquire_rate=0.001, acquire_burst=1),
    )
    b = Broker(cfg)
    await b.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            await stub.Acquire(lock_pb2.AcquireRequest(name="r0", ttl=secs(10)))
            with pytest.raises(aio.AioRpcError) as ei:
                await stub.Acquire(lock_pb2.AcquireRequest(name="r1", ttl=secs(10)))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        m = await scrape(port_of(b))
        assert m.get("lockbroker_quota_refusals_total", tenant="default", limit="acquire_rate") == 1
        assert m.get("lockbroker_quota_refusals_total", limit="max_locks") == 0
    finally:
        await b.stop(grace=1.0)


async def test_acquire_many_counts_each_of_its_grants(mbroker: Broker, mstub: Any) -> None:
    """Every lock of an AcquireMany is a grant (counted, its wait observed) whose Release is then
    measured as a hold, like an Acquire's (the interceptor counted only Acquire)."""
    port = port_of(mbroker)
    session = (await mstub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(10)))).session_id
    names = [f"{LOCK_NAME}-many-a", f"{LOCK_NAME}-many-b"]
    before = await scrape(port)
    req = lock_pb2.AcquireManyRequest(session_id=session, locks=[lock_pb2.LockClaim(name=n) for n in names])
    got = await mstub.AcquireMany(req)
    assert [g.name for g in got.grants] == names
    mid = await scrape(port)

    def delta(now: Scrape, name: str) -> float:
        return now.get(name, tenant="default") - before.get(name, tenant="default")

    assert delta(mid, "lockbroker_grants_total") == 2
    assert delta(mid, "lockbroker_lock_wait_seconds_count") == 2
    for g in got.grants:
        rel = lock_pb2.ReleaseRequest(name=g.name, fencing_token=g.fencing_token, session_id=session)
        assert (await mstub.Release(rel)).released
    end = await scrape(port)
    assert delta(end, "lockbroker_releases_total") == 2
    assert delta(end, "lockbroker_lock_hold_seconds_count") == 2
