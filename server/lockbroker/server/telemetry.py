"""Tracing: OpenTelemetry from the standard OTEL_* variables.

`configure_tracing()` reads OTEL_TRACES_EXPORTER (otlp, console, none; a comma-separated list is
allowed) and OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (`sampler_from`). Unlike the OTel
default, "none" is the default exporter here: then no SDK provider is installed and no
interceptor returned, so tracing costs nothing and spans from libraries stay no-ops.
Otherwise it returns the aio server interceptor of opentelemetry-instrumentation-grpc (it reads
W3C `traceparent` from the caller's metadata and makes the server span current for everything
inside it) and a tracer with which the broker's etcd client makes a CLIENT span per etcd call (so
etcd calls become children of the RPC that made them). Lock attributes on the server span are
`lockbroker.interceptors.tracing.LockSpanInterceptor`'s.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as _otel_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from lockbroker.interceptors.base import OPEN_SERVICES

DEFAULT_SERVICE_NAME: Final = "lockbroker"
EXPORTERS: Final = frozenset({"otlp", "console", "none"})

# The OTLP exporters are optional packages; named here so the error can say which to install.
_OTLP: Final[Mapping[str, tuple[str, str]]] = {
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry-exporter-otlp-proto-grpc"),
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
}


# The instrumentation package ships no type hints.
otel_grpc: Any = _otel_grpc


class TracingConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Tracing:
    """What `configure_tracing` set up; everything empty when tracing is off."""

    provider: TracerProvider | None
    exporters: tuple[str, ...]
    server_interceptor: aio.ServerInterceptor | None
    # For spans the broker makes itself around its outbound (etcd) calls; see EtcdClient.
    backend_tracer: trace.Tracer | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[aio.ServerInterceptor]:
        """The head of the server chain: the OTel interceptor (LockSpanInterceptor goes inside it)."""
        return [self.server_interceptor] if self.server_interceptor is not None else []

    def shutdown(self) -> None:
        """Flush and stop the exporters (BatchSpanProcessor holds spans for a few seconds)."""
        if self.provider is not None:
            self.provider.shutdown()


DISABLED: Final = Tracing(None, (), None)


def _exporter_names(env: Mapping[str, str]) -> tuple[str, ...]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    raw = env.get("OTEL_TRACES_EXPORTER", "none")
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        # A typo must not silently switch tracing off.
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter(s) {unknown}; use otlp, console or none")
    return tuple(n for n in names if n != "none")


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        # stderr is the broker's JSON-lines log: spans go elsewhere, one compact JSON object per
        # line, to OTEL_EXPORTER_CONSOLE_FILE (appended) or else stdout. stdout also carries the
        # audit log when [audit] stdout is on: then name a file (docs/operating.md).
        path = env.get("OTEL_EXPORTER_CONSOLE_FILE", "").strip()
        out: TextIO = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stdout  # noqa: SIM115
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    protocol = protocol.strip()
    if protocol not in _OTLP:
        raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported; use grpc or http/protobuf")
    module, package = _OTLP[protocol]
    try:
        exporter_cls: Any = importlib.import_module(module).OTLPSpanExporter
    except ImportError:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER=otlp over {protocol} needs the {package} package (pip install {package})"
        ) from None
    # The exporter reads OTEL_EXPORTER_OTLP_* (endpoint, headers, certificates) itself.
    exporter: SpanExporter = exporter_cls()
    return exporter


def sampler_from(env: Mapping[str, str]) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG name (the OTel SDK's names and its
    default, parentbased_always_on), read from `env` rather than the process environment.

    parentbased_*: a call whose caller sent a W3C traceparent follows the caller's sampled flag;
    a call without one is a root and takes the named decision (for traceidratio, ARG is the
    fraction of trace ids kept, 0..1, 1.0 when unset). Unlike the SDK, which warns and falls back,
    an unknown name or a bad ratio is an error: a typo must not silently change what is traced.
    """
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    fixed = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    root_name = name.removeprefix("parentbased_")
    if root_name in fixed:
        root: Sampler = fixed[root_name]
    elif root_name == "traceidratio":
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, not {raw!r}")
        root = TraceIdRatioBased(ratio)
    else:
        raise TracingConfigError(
            f"OTEL_TRACES_SAMPLER {name!r} is not supported; use always_on, always_off, traceidratio, "
            "parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
        )
    return ParentBased(root) if name.startswith("parentbased_") else root


class Presampled(Sampler):
    """The provider's sampler when `PresampledServerInterceptor` draws the root calls' lots.

    A root SERVER span (no valid parent) exists only for a call the interceptor already drew as
    sampled, so it is sampled; everything else (calls with a caller's traceparent, spans of the
    broker's own) is `inner`'s decision, as without the interceptor.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(  # noqa: PLR0917  # the SDK's signature
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        sampler = self.inner
        if kind is SpanKind.SERVER and not trace.get_current_span(parent_context).get_span_context().is_valid:
            sampler = ALWAYS_ON
        return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"Presampled{{{self.inner.get_description()}}}"


_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_HandlerCache = dict[str, tuple["grpc.RpcMethodHandler[Any, Any]", "grpc.RpcMethodHandler[Any, Any]"]]


class PresampledServerInterceptor(aio.ServerInterceptor):
    """OTel's server interceptor, for the calls that will be traced only.

    OTel's interceptor starts a span for every call, sampled or not (about 35 us of the broker's
    CPU per call here, before the handler runs). This one draws the lot of a call without a
    caller's `traceparent` first, from `root` (the configured sampler), and sends only the winners
    through OTel's interceptor (`Presampled` then records their root span). The others get a
    non-recording span with a fresh trace id made current, as OTel would have made: the audit
    record still names a trace id, and the etcd client makes no spans under it. Calls that carry a
    traceparent go through OTel's interceptor, whose parent-based sampler follows the caller's flag.
    """

    def __init__(self, otel: aio.ServerInterceptor, root: Sampler, traced: Callable[[Any], bool]) -> None:
        self._otel = otel
        self._root = root
        self._traced = traced
        self._unsampled: _HandlerCache = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if not self._traced(details):
            return await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "traceparent":
                if isinstance(value, str) and _TRACEPARENT.fullmatch(value):
                    return await self._otel.intercept_service(continuation, details)
                break  # unreadable: OTel too would start a root span
        lot = self._root.should_sample(None, random.getrandbits(128), details.method, SpanKind.SERVER)
        if lot.decision is not Decision.DROP:
            return await self._otel.intercept_service(continuation, details)
        handler = await continuation(details)
        if handler is None:
            return None
        known = self._unsampled.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = otel_grpc._server._wrap_rpc_behavior(handler, _unsampled)
        self._unsampled[details.method] = (handler, wrapped)
        return wrapped


def _unsampled_context() -> otel_context.Context:
    span = NonRecordingSpan(
        SpanContext(random.getrandbits(128), random.getrandbits(64), is_remote=False, trace_flags=TraceFlags(0))
    )
    return trace.set_span_in_context(span)


def _unsampled(behavior: Any, request_streaming: bool, response_streaming: bool) -> Any:
    if response_streaming:

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            token = otel_context.attach(_unsampled_context())
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                otel_context.detach(token)

        return stream

    async def unary(request: Any, context: Any) -> Any:
        token = otel_context.attach(_unsampled_context())
        try:
            return await behavior(request, context)
        finally:
            otel_context.detach(token)

    return unary


def _resource(env: Mapping[str, str]) -> Resource:
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME from the process env.
    return Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})


def _server_filter(env: Mapping[str, str]) -> Callable[[grpc.HandlerCallDetails], bool]:
    # Health checks every second would drown the traces that matter.
    excluded = set(OPEN_SERVICES)
    excluded.update(s.strip() for s in env.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(",") if s.strip())

    def traced(details: grpc.HandlerCallDetails) -> bool:
        return details.method.lstrip("/").split("/", 1)[0] not in excluded

    return traced


def tracing_for(
    provider: TracerProvider, env: Mapping[str, str] | None = None, exporters: Sequence[str] = ()
) -> Tracing:
    """Interceptors bound to an existing provider (tests pass one with an InMemorySpanExporter)."""
    env = os.environ if env is None else env
    traced = _server_filter(env)
    interceptor: aio.ServerInterceptor = otel_grpc.aio_server_interceptor(tracer_provider=provider, filter_=traced)
    if isinstance(provider.sampler, Presampled):
        interceptor = PresampledServerInterceptor(interceptor, provider.sampler.inner, traced)
    return Tracing(
        provider=provider,
        exporters=tuple(exporters),
        server_interceptor=interceptor,
        backend_tracer=provider.get_tracer("lockbroker.etcd"),
    )


def configure_tracing(
    env: Mapping[str, str] | None = None,
    *,
    set_global: bool = True,
    span_processors: Sequence[SpanProcessor] = (),
) -> Tracing:
    """Tracing as the OTEL_* environment asks; `DISABLED` (no provider, no interceptors) by default.

    `set_global` installs the provider for `trace.get_tracer()` users; OTel allows that once per
    process, so tests pass False. `span_processors` are added to the configured exporters (and
    turn tracing on by themselves).
    """
    env = os.environ if env is None else env
    names = _exporter_names(env)
    if not names and not span_processors:
        return DISABLED
    sampler = sampler_from(env)
    exporters = [_exporter(n, env) for n in names]  # all resolved before anything is installed
    # The sampler is passed, not left to the SDK: the SDK would read os.environ, not `env`.
    # Presampled: PresampledServerInterceptor draws the root calls' lots (see there).
    provider = TracerProvider(sampler=Presampled(sampler), resource=_resource(env))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in span_processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return tracing_for(provider, env, names)


__all__ = [
    "DISABLED",
    "Presampled",
    "PresampledServerInterceptor",
    "Tracing",
    "TracingConfigError",
    "configure_tracing",
    "sampler_from",
    "tracing_for",
]
