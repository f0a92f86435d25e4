"""Sampling from OTEL_TRACES_SAMPLER(_ARG), no spans for health checks, one span per KeepAlive stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from lockbroker.interceptors.base import Context
from lockbroker.interceptors.tracing import LockSpanInterceptor
from lockbroker.server.telemetry import Tracing, TracingConfigError, configure_tracing, sampler_from
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
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
