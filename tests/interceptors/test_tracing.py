"""Tracing on real grpc.aio servers (127.0.0.1): configuration, propagation, lock attributes, retry events."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import Context
from lockbroker.interceptors.tracing import LockSpanInterceptor
from lockbroker.server import status
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.service import RetryPolicy, rpc
from lockbroker.server.telemetry import DISABLED, Tracing, TracingConfigError, configure_tracing
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

SERVICE = "lockbroker.v1.LockService"


class Locks(lock_pb2_grpc.LockServiceServicer):
    """Acquire answers with a grant after `fail` transient failures (retried by the service edge's `rpc`)."""

    draining = False

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.retry = RetryPolicy(max_attempts=5, multiplier=0.01, max_backoff=0.02)

    @rpc()
    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Context) -> lock_pb2.AcquireResponse:
        if request.owner == "broken":
            await context.abort(*status.to_status(Unavailable("etcd did not answer")))
        if self.fail > 0:
            self.fail -= 1
            raise Unavailable("etcd did not answer")
        return lock_pb2.AcquireResponse(
            grant=lock_pb2.Grant(name=request.name, fencing_token=42, session_id=request.session_id),
            waited=duration_pb2.Duration(seconds=1, nanos=250_000_000),
            queue_position=3,
        )


def locks(fail: int = 0) -> Locks:
    # The generated stubs mark every servicer method abstract; the runtime base answers UNIMPLEMENTED.
    return Locks(fail)  # type: ignore[abstract]


@contextlib.asynccontextmanager
async def traced_server(tracing: Tracing, servicer: Locks, *inner: aio.ServerInterceptor) -> AsyncIterator[int]:
    server = aio.server(interceptors=[*tracing.server_interceptors(), *inner])
    lock_pb2_grpc.add_LockServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(spans: InMemorySpanExporter) -> Tracing:
    # No exporter from the environment; the in-memory one alone turns tracing on.
    t = configure_tracing(
        {"OTEL_TRACES_EXPORTER": "none"}, set_global=False, span_processors=[SimpleSpanProcessor(spans)]
    )
    assert t.enabled
    return t


def server_span(spans: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    return span


def request(**kw: Any) -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(name="jobs/a", session_id="s-1", request_id="r-1", **kw)


# --- configuration ----------------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_costs_nothing():
    assert configure_tracing({}) is DISABLED
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "none"}) is DISABLED
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is DISABLED
    assert DISABLED.server_interceptors() == []
    assert not DISABLED.enabled
    DISABLED.shutdown()


def test_console_exporter_and_bad_names():
    t = configure_tracing({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "lb-test"}, set_global=False)
    try:
        assert t.enabled
        assert t.exporters == ("console",)
        assert t.server_interceptor is not None
        assert t.provider is not None
    finally:
        t.shutdown()
    with pytest.raises(TracingConfigError, match="jaegr"):
        configure_tracing({"OTEL_TRACES_EXPORTER": "jaegr"}, set_global=False)
    with pytest.raises(TracingConfigError, match="protocol"):
        configure_tracing({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_otlp_needs_its_exporter_package():
    env = {"OTEL_TRACES_EXPORTER": "otlp"}
    try:
        installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    except ModuleNotFoundError:  # not even the opentelemetry.exporter namespace
        installed = False
    if not installed:
        with pytest.raises(TracingConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
            configure_tracing(env, set_global=False)
    else:
        t = configure_tracing(env, set_global=False)
        assert t.exporters == ("otlp",)
        t.shutdown()


# --- spans --------------------------------------------------------------------------------------------


async def test_server_span_is_the_child_of_the_client_span_with_lock_attributes(
    tracing: Tracing, spans: InMemorySpanExporter
):
    sink = MemorySink()
    log = AuditLog([sink])
    async with (
        traced_server(tracing, locks(), AuditInterceptor(log), LockSpanInterceptor()) as port,
        aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=aio_client_interceptors(tracer_provider=tracing.provider)
        ) as ch,
    ):
        resp = await lock_pb2_grpc.LockServiceStub(ch).Acquire(request(), timeout=5)
    await log.close()
    assert resp.grant.fencing_token == 42
    client = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT)
    server = server_span(spans)
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    attrs = dict(server.attributes or {})
    assert attrs["rpc.method"] == "Acquire"
    assert attrs["lockbroker.tenant"] == "default"
    assert attrs["lockbroker.lock.name"] == "jobs/a"
    assert attrs["lockbroker.fencing_token"] == 42
    assert attrs["lockbroker.waited_ms"] == 1250.0
    assert attrs["lockbroker.queue_position"] == 3
    assert attrs["lockbroker.request_id"] == "r-1"
    assert attrs["lockbroker.session_id"] == "s-1"
    # The audit record names the same trace, so an auditor can jump from a record to its trace.
    (record,) = [json.loads(x) for x in sink.lines]
    assert record["traceId"] == format(server.context.trace_id, "032x")


async def test_w3c_traceparent_from_any_caller_is_the_server_span_parent(tracing: Tracing, spans: InMemorySpanExporter):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with (
        traced_server(tracing, locks(), LockSpanInterceptor()) as port,
        aio.insecure_channel(f"127.0.0.1:{port}") as ch,  # no OTel on this side: just the header
    ):
        stub = lock_pb2_grpc.LockServiceStub(ch)
        md = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
        with pytest.raises(aio.AioRpcError):
            await stub.Acquire(request(owner="broken"), metadata=md, timeout=5)
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    server = server_span(spans)  # exactly one: health checks are not traced
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None and format(server.parent.span_id, "016x") == parent_id
    attrs = dict(server.attributes or {})
    assert attrs["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert attrs["lockbroker.error.reason"] == "BACKEND_UNAVAILABLE"


async def test_retries_become_span_events_and_an_attribute(tracing: Tracing, spans: InMemorySpanExporter):
    async with (
        traced_server(tracing, locks(fail=2), LockSpanInterceptor()) as port,
        aio.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        await lock_pb2_grpc.LockServiceStub(ch).Acquire(request(), timeout=5)
    server = server_span(spans)
    events = [e for e in server.events if e.name == "lockbroker.retry"]
    assert [dict(e.attributes or {})["attempt"] for e in events] == [1, 2]
    assert {dict(e.attributes or {})["reason"] for e in events} == {"BACKEND_UNAVAILABLE"}
    assert dict(server.attributes or {})["lockbroker.retry_attempts"] == 2


async def test_lock_span_interceptor_is_a_no_op_without_tracing():
    assert not trace.get_current_span().is_recording()
    async with (
        traced_server(DISABLED, locks(), LockSpanInterceptor()) as port,
        aio.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        resp = await lock_pb2_grpc.LockServiceStub(ch).Acquire(request(), timeout=5)
    assert resp.queue_position == 3
