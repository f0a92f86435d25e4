"""Tracing: OpenTelemetry from the standard OTEL_* variables.

`configure_tracing()` reads OTEL_TRACES_EXPORTER (otlp, console, none; a comma-separated list is
allowed). Unlike the OTel default, "none" is the default here: then no SDK provider is installed
and no interceptor returned, so tracing costs nothing and spans from libraries stay no-ops.
Otherwise it returns the aio server interceptor of opentelemetry-instrumentation-grpc (it reads
W3C `traceparent` from the caller's metadata and makes the server span current for everything
inside it) and a tracer with which the broker's etcd client makes a CLIENT span per etcd call (so
etcd calls become children of the RPC that made them). Lock attributes on the server span are
`lockbroker.interceptors.tracing.LockSpanInterceptor`'s.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as _otel_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

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
    return Tracing(
        provider=provider,
        exporters=tuple(exporters),
        server_interceptor=otel_grpc.aio_server_interceptor(tracer_provider=provider, filter_=_server_filter(env)),
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
    exporters = [_exporter(n, env) for n in names]  # all resolved before anything is installed
    provider = TracerProvider(resource=_resource(env))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in span_processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return tracing_for(provider, env, names)


__all__ = [
    "DISABLED",
    "Tracing",
    "TracingConfigError",
    "configure_tracing",
    "tracing_for",
]
