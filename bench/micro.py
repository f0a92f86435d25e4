"""Micro-benchmarks of single server wrappers, in-process: CPU per call, no network, no etcd.

    uv run python -m bench.micro retry          # the service edge's `rpc` (retry included) around an Acquire
    uv run python -m bench.micro audit [SINK]   # one call's audit records; SINK: memory, never, always
    uv run python -m bench.micro tracing        # the server's tracing layers, 1% sampled and always on

They answer "how much of a broker cycle is this layer" when the full benchmark's run-to-run noise
(about ±15% on the 2-core machine) hides it. The handler behind each wrapper does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import grpc

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog, FileSink, FsyncPolicy, Sink
from lockbroker.interceptors.base import CallInfo, layered
from lockbroker.server.service import RetryPolicy, rpc
from lockbroker.v1 import lock_pb2

ACQUIRE = CallInfo("/lockbroker.v1.LockService/Acquire", "lockbroker.v1.LockService", "Acquire", False, False)


class _Metadatum(NamedTuple):
    key: str
    value: str


class Context:
    """What the wrappers read from a grpc.aio servicer context on the success path."""

    def time_remaining(self) -> float:
        return 10.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        # grpc.aio's entries are (key, value) tuples with .key and .value (OTel reads those).
        return (_Metadatum("user-agent", "grpc-python-asyncio/1.85.1 grpc-c/58.0.0 (linux; chttp2)"),)

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def trailing_metadata(self) -> tuple[()]:
        return ()


class MemorySink:
    name = "memory"

    async def write(self, lines: Sequence[bytes]) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def _response() -> lock_pb2.AcquireResponse:
    resp = lock_pb2.AcquireResponse()
    resp.grant.fencing_token = 5
    resp.grant.session_id = "0123456789abcdef"
    resp.grant.name = "a"
    return resp


async def measure(
    label: str, call: Callable[[Any, Any], Awaitable[Any]], request: Any, *, workers: int, calls: int
) -> None:
    """`workers` concurrent loops of `calls` calls each, after a warm-up; CPU and wall per call."""
    context = Context()

    async def loop(n: int) -> None:
        for _ in range(n):
            await call(request, context)

    await loop(200)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(loop(calls) for _ in range(workers)))
    n = workers * calls
    print(
        f"{label}: {(time.process_time() - cpu) / n * 1e6:.1f} µs CPU per call, "
        f"{(time.perf_counter() - wall) / n * 1e6:.1f} µs wall ({workers} x {calls} calls)"
    )


async def retry() -> None:
    response = _response()

    async def handler(request: Any, context: Any) -> Any:
        return response

    class Edge:
        draining = False
        retry = RetryPolicy()

        @rpc()
        async def Acquire(self, request: Any, context: Any) -> Any:
            return response

    edge = Edge()
    request = lock_pb2.AcquireRequest(name="a", session_id="0123456789abcdef", request_id="r-1")
    await measure("bare handler", handler, request, workers=1, calls=20_000)
    await measure("edge-wrapped (rpc, retry)", edge.Acquire, request, workers=1, calls=20_000)


async def audit(sink_kind: str) -> None:
    response = _response()

    async def handler(request: Any, context: Any) -> Any:
        return response

    with tempfile.TemporaryDirectory() as tmp:
        fsync = cast("FsyncPolicy", sink_kind)  # argparse's choices: never or always
        sink: Sink = MemorySink() if sink_kind == "memory" else FileSink(Path(tmp) / "audit.jsonl", fsync=fsync)
        log = AuditLog([sink])
        interceptor = AuditInterceptor(log)
        # As the broker chains it: the audit layer and, innermost, its request stage (a
        # RequestReceived and a ResponseComplete record per call).
        layers = [interceptor.layer(ACQUIRE), interceptor.request_stage.layer(ACQUIRE)]
        wrapped = layered([layer for layer in layers if layer is not None], handler, ACQUIRE)
        request = lock_pb2.AcquireRequest(name="a", session_id="0123456789abcdef", request_id="r-1")
        try:
            await measure("bare handler", handler, request, workers=64, calls=300)
            await measure(f"audit to {sink_kind}", wrapped, request, workers=64, calls=300)
        finally:
            await log.close()


class _Details:
    """grpc.HandlerCallDetails as grpc.aio hands it to a server interceptor."""

    method = ACQUIRE.method
    invocation_metadata = (("user-agent", "grpc-python-asyncio/1.85.1 grpc-c/58.0.0 (linux; chttp2)"),)


async def tracing() -> None:
    """What the server's tracing costs one unary call, as the broker chains it: OTel's server
    interceptor behind PresampledServerInterceptor (a grpc interceptor: the lookup of the handler
    per call) and the lock-attributes layer, around a handler that does nothing. Not counted:
    the etcd client's spans (none under an unsampled call) and the export (a BatchSpanProcessor's
    thread; here spans are dropped)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415 - only this mode

    from bench.traced_broker import CountingExporter  # noqa: PLC0415
    from lockbroker.interceptors.tracing import LockSpanInterceptor  # noqa: PLC0415
    from lockbroker.server.telemetry import configure_tracing  # noqa: PLC0415

    response = _response()

    async def handler(request: Any, context: Any) -> Any:
        return response

    request = lock_pb2.AcquireRequest(name="a", session_id="0123456789abcdef", request_id="r-1")
    await measure("bare handler", handler, request, workers=64, calls=300)
    for label, env in (
        ("tracing, 1% sampled", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
        ("tracing, every call", {}),
    ):
        setup = configure_tracing(env, set_global=False, span_processors=[BatchSpanProcessor(CountingExporter())])
        layer = LockSpanInterceptor().layer(ACQUIRE)
        assert layer is not None and setup.server_interceptor is not None
        inner = layered([layer], handler, ACQUIRE)
        rpc_handler: Any = grpc.unary_unary_rpc_method_handler(inner)
        interceptor = setup.server_interceptor

        async def continuation(details: Any, rpc_handler: Any = rpc_handler) -> Any:
            return rpc_handler

        async def traced(req: Any, context: Any, interceptor: Any = interceptor) -> Any:
            # What grpc.aio does per call: the interceptor's handler lookup, then the handler.
            found = await interceptor.intercept_service(continuation, _Details())
            return await found.unary_unary(req, context)

        try:
            await measure(label, traced, request, workers=64, calls=300)
        finally:
            setup.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("retry", help="the service edge's cost (retry included) on the success path")
    a = sub.add_parser("audit", help="one audit record's cost")
    a.add_argument("sink", nargs="?", default="always", choices=["memory", "never", "always"])
    sub.add_parser("tracing", help="the server's tracing layers per call, 1% sampled and always on")
    args = p.parse_args(argv)
    if args.what == "tracing":
        asyncio.run(tracing())
        return
    asyncio.run(retry() if args.what == "retry" else audit(args.sink))


if __name__ == "__main__":
    main()
