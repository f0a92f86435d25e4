"""OTEL_TRACES_EXPORTER=otlp end to end: a `lockbroker serve` process exports its spans over OTLP/gRPC
to a collector this test runs on loopback, configured only through the standard OTEL_* environment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lockbroker.server.embedded import EmbeddedEtcd, free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.lockutil import dur, eventually
from tests.procutil import clean_env, lockbroker_command, stop_process


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    c = Collector()
    server = aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield c, port
    finally:
        await server.stop(None)


async def test_otlp_exporter_sends_client_server_and_etcd_spans(
    etcd: EmbeddedEtcd, key_root: str, collector: tuple[Collector, int], tmp_path: Path
) -> None:
    spans, otlp_port = collector
    port = free_port()
    env = clean_env(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_SERVICE_NAME="lockbroker-otlp-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--etcd-endpoints",
        etcd.endpoint,
        "--etcd-key-root",
        key_root,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(tmp_path / "broker.log").open("wb"),
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 20)
            stub = lock_pb2_grpc.LockServiceStub(ch)
            resp = await stub.Acquire(lock_pb2.AcquireRequest(name="otlp/1", ttl=dur(5)), timeout=10)
            await stub.Release(
                lock_pb2.ReleaseRequest(
                    name="otlp/1", fencing_token=resp.grant.fencing_token, session_id=resp.grant.session_id
                ),
                timeout=10,
            )

        def acquire_span() -> Any:
            return next((s for s in spans.spans if s.name == "/lockbroker.v1.LockService/Acquire"), None)

        async def exported() -> Any:
            return acquire_span()

        server_span = await eventually(exported, 15, "the Acquire span to reach the collector")

        # The broker's own etcd calls are children of the server span, in the same trace.
        async def etcd_children() -> list[Any]:
            return [
                s
                for s in spans.spans
                if s.trace_id == server_span.trace_id
                and s.parent_span_id == server_span.span_id
                and s.name.startswith("/etcdserverpb.")
            ]

        children = await eventually(etcd_children, 10, "etcd spans under the Acquire span")
        assert {c.name for c in children} >= {"/etcdserverpb.KV/Txn"}
        attrs = {a.key: a.value for a in server_span.attributes}
        assert attrs["lockbroker.lock.name"].string_value == "otlp/1"
        assert int(attrs["lockbroker.fencing_token"].int_value) == resp.grant.fencing_token
        assert any(r.get("service.name") == "lockbroker-otlp-test" for r in spans.resources)
    finally:
        await stop_process(proc)
    assert proc.returncode == 0, (tmp_path / "broker.log").read_text()[-2000:]
