"""Sampling from OTEL_TRACES_SAMPLER(_ARG), no spans for health checks, one span per KeepAlive stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import Context
from lockbroker.interceptors.tracing import LockSpanInterceptor
from lockbroker.server.app import Broker
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.telemetry import (
    Presampled,
    PresampledServerInterceptor,
    Tracing,
    TracingConfigError,
    configure_tracing,
    sampler_from,
)
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.interceptors.test_tracing import Locks, locks, request, traced_server

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Streams(Locks):
    async def KeepAlive(
        self, request_iterator: AsyncIterator[lock_pb2.KeepAliveRequest], context: Context
    ) -> AsyncIterator[lock_pb2.KeepAliveResponse]:
        async for req in request_iterator:
            yield lock_pb2.KeepAliveResponse(session_id=req.session_id)


@contextlib.contextmanager
def sampled(env: dict[str, str]) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    t = configure_tracing(
        {"OTEL_TRACES_EXPORTER": "none", **env}, set_global=False, span_processors=[SimpleSpanProcessor(spans)]
    )
    try:
        yield t, spans
    finally:
        t.shutdown()


def server_spans(spans: InMemorySpanExporter) -> list[str]:
    return [s.name for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]


async def _acquires(tracing: Tracing, n: int, flags: str | None = None) -> None:
    async with (
        traced_server(tracing, locks(), LockSpanInterceptor()) as port,
        aio.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        stub = lock_pb2_grpc.LockServiceStub(ch)
        md = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-{flags}"),) if flags is not None else ()
        for _ in range(n):
            await stub.Acquire(request(), metadata=md, timeout=5)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, 0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, 0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, 5),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"}, 5),
        ({}, 5),  # the OTel default: parentbased_always_on
    ],
)
async def test_ratio_0_makes_no_spans_and_1_makes_them(env: dict[str, str], expected: int) -> None:
    with sampled(env) as (tracing, spans):
        await _acquires(tracing, 5)
        assert len(server_spans(spans)) == expected


@pytest.mark.parametrize(("flags", "expected"), [("01", 1), ("00", 0)])
@pytest.mark.parametrize("arg", ["0", "1"])
async def test_parentbased_follows_the_callers_sampled_flag(flags: str, expected: int, arg: str) -> None:
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg}
    with sampled(env) as (tracing, spans):
        await _acquires(tracing, 1, flags)
        names = server_spans(spans)
    assert len(names) == expected  # whatever the ratio: the caller decided
    if expected:
        (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        assert format(span.context.trace_id, "032x") == TRACE_ID


def test_sampler_names_and_bad_values() -> None:
    s = sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert isinstance(s, ParentBased)
    assert "TraceIdRatioBased{0.01}" in s.get_description()
    assert isinstance(sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio"}), TraceIdRatioBased)
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_SAMPLER "):
        sampler_from({"OTEL_TRACES_SAMPLER": "sometimes"})
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(TracingConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
            configure_tracing(
                {
                    "OTEL_TRACES_EXPORTER": "console",
                    "OTEL_TRACES_SAMPLER": "traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": bad,
                },
                set_global=False,
            )


async def test_health_checks_from_outside_make_no_server_span() -> None:
    with sampled({}) as (tracing, spans):
        async with (
            traced_server(tracing, locks(), LockSpanInterceptor()) as port,
            aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            health = health_pb2_grpc.HealthStub(ch)
            md = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)  # even a sampled caller
            for _ in range(3):
                await health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=5)
            watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=md, timeout=5)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            await lock_pb2_grpc.LockServiceStub(ch).Acquire(request(), timeout=5)
        assert server_spans(spans) == [f"/{lock_pb2.DESCRIPTOR.package}.LockService/Acquire"]


async def test_a_keepalive_stream_is_one_server_span_whatever_its_messages() -> None:
    with sampled({}) as (tracing, spans):
        async with (
            traced_server(tracing, Streams(), LockSpanInterceptor()) as port,  # type: ignore[abstract]
            aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):

            async def beats() -> AsyncIterator[lock_pb2.KeepAliveRequest]:
                for _ in range(5):
                    yield lock_pb2.KeepAliveRequest(session_id="s-1")

            replies = [r async for r in lock_pb2_grpc.LockServiceStub(ch).KeepAlive(beats(), timeout=5)]
        assert len(replies) == 5
        (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        assert span.name.endswith("/KeepAlive")
        assert dict(span.attributes or {})["lockbroker.messages_sent"] == 5


# --- unsampled calls skip OTel's interceptor ----------------------------------------------------------


def test_presampled_records_root_server_spans_and_leaves_the_rest_to_the_configured_sampler() -> None:
    sampler = Presampled(ALWAYS_OFF)
    root = sampler.should_sample(None, 1, "x", SpanKind.SERVER)
    assert root.decision is Decision.RECORD_AND_SAMPLE  # the interceptor drew this call's lot already
    assert sampler.should_sample(None, 1, "x", SpanKind.CLIENT).decision is Decision.DROP
    parent = trace.set_span_in_context(
        NonRecordingSpan(SpanContext(5, 6, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    )
    assert sampler.should_sample(parent, 5, "x", SpanKind.SERVER).decision is Decision.DROP


class Probe(Locks):
    """Describe reports what a handler sees: the current span and the context's type."""

    seen: list[tuple[bool, bool, str]]

    async def Describe(self, request: lock_pb2.DescribeRequest, context: Context) -> lock_pb2.DescribeResponse:
        span = trace.get_current_span()
        grpc_context = getattr(context, "_context", context)  # under our CallContext: grpc's or OTel's
        self.seen.append((span.is_recording(), span.get_span_context().is_valid, type(grpc_context).__name__))
        return lock_pb2.DescribeResponse(name=request.name)


@pytest.mark.parametrize(("arg", "recording"), [("0", False), ("1", True)])
async def test_an_unsampled_call_bypasses_otel_yet_has_a_trace_id(arg: str, recording: bool) -> None:
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg}
    probe = Probe()  # type: ignore[abstract]
    probe.seen = []
    sink = MemorySink()
    log = AuditLog([sink])
    with sampled(env) as (tracing, spans):
        assert isinstance(tracing.server_interceptor, PresampledServerInterceptor)
        async with (
            traced_server(tracing, probe, AuditInterceptor(log), LockSpanInterceptor()) as port,
            aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            for _ in range(3):
                await lock_pb2_grpc.LockServiceStub(ch).Describe(lock_pb2.DescribeRequest(name="a"), timeout=5)
        await log.close()
        assert len(server_spans(spans)) == (3 if recording else 0)
    # Unsampled: no OTel context wrapper, but a valid (non-recording) span is current, so the etcd
    # client makes no spans under it and the audit record still names a trace id.
    wrapper = "_OpenTelemetryAioServicerContext"
    assert [(rec, valid, name == wrapper) for rec, valid, name in probe.seen] == [(recording, True, recording)] * 3
    trace_ids = [r["traceId"] for r in sink.records()]
    assert all(t is not None and len(t) == 32 for t in trace_ids)
    assert len(set(trace_ids)) == 3


async def test_unsampled_calls_on_the_broker_make_no_spans_at_all(etcd: EmbeddedEtcd, key_root: str) -> None:
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    with sampled(env) as (tracing, spans):
        broker = Broker(broker_config(etcd.endpoint, key_root), tracing=tracing)
        await broker.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
                stub = lock_pb2_grpc.LockServiceStub(ch)
                ttl = duration_pb2.Duration(seconds=5)
                g = await stub.Acquire(lock_pb2.AcquireRequest(name="quiet", ttl=ttl, owner="t"), timeout=10)
                await stub.Release(
                    lock_pb2.ReleaseRequest(name="quiet", fencing_token=g.grant.fencing_token), timeout=10
                )
        finally:
            await broker.stop(grace=1.0)
        assert spans.get_finished_spans() == ()  # neither server spans nor etcd CLIENT spans
