"""The whole interceptor chain on a real broker over a real etcd.

Audit completeness, client -> broker -> etcd span parentage, and a server retry across an etcd
restart that yields one grant, not two.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuditConfig, AuthConfig, Config, EtcdConfig
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.etcd.client import EtcdClient, LeaseNotFound
from lockbroker.server.telemetry import tracing_for
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config


def _with(cfg: Config, **sections: Any) -> Config:
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **sections})


@pytest.fixture
async def audited(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[tuple[Broker, Path, str]]:
    tfile = tmp_path / "tenants.toml"
    key = tenants.add_tenant(tfile, "acme")
    log = tmp_path / "audit.jsonl"
    cfg = _with(broker_config(etcd.endpoint, key_root), auth=AuthConfig(str(tfile)), audit=AuditConfig(file=str(log)))
    b = Broker(cfg)
    await b.start()
    try:
        yield b, log, key
    finally:
        await b.stop(grace=1.0)


async def test_audit_has_exactly_one_record_per_call_including_rejections(
    audited: tuple[Broker, Path, str],
) -> None:
    broker, log, key = audited
    md = (("x-api-key", key),)
    calls: Counter[tuple[str, str]] = Counter()
    async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        stub: Any = lock_pb2_grpc.LockServiceStub(ch)

        async def call(method: str, req: Any, metadata: Any = md) -> Any:
            try:
                resp = await getattr(stub, method)(req, metadata=metadata)
                calls[(method, "OK")] += 1
                return resp
            except aio.AioRpcError as e:
                calls[(method, e.code().name)] += 1
                return None

        s = await call("CreateSession", lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=10)))
        g = await call("Acquire", lock_pb2.AcquireRequest(name="a/1", session_id=s.session_id, request_id="r1"))
        await call("Acquire", lock_pb2.AcquireRequest(name="a/1", ttl=duration_pb2.Duration(seconds=5)))  # LOCK_HELD
        await call("Acquire", lock_pb2.AcquireRequest(name="bad//name", session_id=s.session_id))
        await call("Acquire", lock_pb2.AcquireRequest(name="a/2"), metadata=(("x-api-key", "nope"),))
        await call("Describe", lock_pb2.DescribeRequest(name="a/1"))
        await call("List", lock_pb2.ListRequest())
        await call("Refresh", lock_pb2.RefreshRequest(session_id=s.session_id))
        await call("Refresh", lock_pb2.RefreshRequest(session_id="0000000000000001"))  # NOT_FOUND
        await call("Release", lock_pb2.ReleaseRequest(name="a/1", fencing_token=g.grant.fencing_token))
        await call("CloseSession", lock_pb2.CloseSessionRequest(session_id=s.session_id))
        stream = stub.KeepAlive(metadata=md)
        await stream.write(lock_pb2.KeepAliveRequest(session_id=s.session_id))
        assert (await stream.read()).expired
        await stream.done_writing()
        assert await stream.read() == aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
        calls[("KeepAlive", "OK")] += 1
    await asyncio.sleep(0.2)  # the stream's record is written as it ends

    everything = [json.loads(line) for line in log.read_text().splitlines()]
    # One ResponseComplete record per call; mutating unary calls whose handler ran also have a
    # RequestReceived record (docs/audit.md, "Stages"), which their ResponseComplete one names.
    records = [r for r in everything if r["stage"] == "ResponseComplete"]
    seen = Counter((r["method"].rsplit("/", 1)[1], r["outcome"]["code"]) for r in records)
    assert seen == calls, (seen, calls)
    assert len({r["auditId"] for r in everything}) == len(everything)
    received = {r["auditId"]: r for r in everything if r["stage"] == "RequestReceived"}
    assert set(received) == {r["requestAuditId"] for r in records if r["requestAuditId"]}
    # CreateSession, 2 Acquires and the bad name (admitted, then refused by the edge), 2 Refresh,
    # Release, CloseSession; not the unauthenticated Acquire, the reads or the KeepAlive stream.
    assert len(received) == 8, sorted(r["method"] for r in received.values())
    assert key not in log.read_text()
    for r in records:
        assert r["schema"] == "lockbroker.audit/v1"
        if r["outcome"]["code"] != "UNAUTHENTICATED":
            assert r["tenant"] == "acme", r
    grant = next(r for r in records if r["method"].endswith("/Acquire") and r["outcome"]["code"] == "OK")
    assert grant["fencingToken"] == str(g.grant.fencing_token) and grant["requestId"] == "r1"
    held = next(r for r in records if r["outcome"].get("reason") == "LOCK_HELD")
    assert held["outcome"]["code"] == "ABORTED"


async def test_one_trace_spans_client_broker_and_etcd(etcd: EmbeddedEtcd, key_root: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = Broker(broker_config(etcd.endpoint, key_root), tracing=tracing_for(provider, {}))
    await broker.start()
    try:
        interceptors = aio_client_interceptors(tracer_provider=provider)
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}", interceptors=interceptors) as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            g = await stub.Acquire(
                lock_pb2.AcquireRequest(name="traced", ttl=duration_pb2.Duration(seconds=5), owner="t")
            )
    finally:
        await broker.stop(grace=1.0)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    client = next(s for s in spans if s.name.endswith("LockService/Acquire") and s.kind.name == "CLIENT")
    server = next(s for s in spans if s.name.endswith("LockService/Acquire") and s.kind.name == "SERVER")
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    etcd_calls = [
        s for s in spans if s.name.startswith("/etcdserverpb.") and s.context.trace_id == client.context.trace_id
    ]
    assert {s.name for s in etcd_calls} >= {"/etcdserverpb.Lease/LeaseGrant", "/etcdserverpb.KV/Txn"}
    for s in etcd_calls:
        assert s.parent is not None and by_id[s.parent.span_id] is server
        assert s.kind.name == "CLIENT"
        assert s.attributes is not None and s.attributes["rpc.system"] == "grpc"
        assert s.attributes["rpc.grpc.status_code"] == 0
    txn = next(s for s in etcd_calls if s.name == "/etcdserverpb.KV/Txn")
    assert txn.attributes is not None
    assert (txn.attributes["rpc.service"], txn.attributes["rpc.method"]) == ("etcdserverpb.KV", "Txn")
    assert server.attributes is not None
    assert server.attributes["lockbroker.lock.name"] == "traced"
    assert server.attributes["lockbroker.fencing_token"] == g.grant.fencing_token


async def test_server_retry_across_an_etcd_restart_yields_one_grant(tmp_path: Path, key_root: str) -> None:
    etcd = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd"))
    await etcd.start()
    broker = Broker(broker_config(etcd.endpoint, key_root))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30)))
            etcd.kill()

            async def restart_soon() -> None:
                await asyncio.sleep(0.6)
                await etcd.restart()

            restarting = asyncio.create_task(restart_soon())
            req = lock_pb2.AcquireRequest(
                name="r", session_id=s.session_id, request_id="retry-me", wait_timeout=duration_pb2.Duration(seconds=5)
            )
            try:
                first = await stub.Acquire(req, timeout=15)
            except aio.AioRpcError as e:
                # The broker's own retries may run out before etcd is back: the caller retries.
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                await restarting
                first = await stub.Acquire(req, timeout=15)
            await restarting
            again = await stub.Acquire(req, timeout=15)
            assert again.grant.fencing_token == first.grant.fencing_token
            d = await stub.Describe(lock_pb2.DescribeRequest(name="r"))
            assert d.holder.fencing_token == first.grant.fencing_token and list(d.waiters) == []
    finally:
        await broker.stop(grace=1.0)
        await etcd.stop()


async def test_a_failed_etcd_call_is_an_error_span(etcd: EmbeddedEtcd) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,)), tracer=provider.get_tracer("lockbroker.etcd"))
    try:
        with tracer.start_as_current_span("rpc") as parent, pytest.raises(LeaseNotFound):
            await client.lease_revoke(0x7E57)  # no such lease: etcd answers NOT_FOUND
    finally:
        await client.close()
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("/etcdserverpb.")]
    assert span.name == "/etcdserverpb.Lease/LeaseRevoke"
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
