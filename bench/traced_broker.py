"""`lockbroker serve` with tracing on, exporting to an in-process exporter that keeps nothing.

The broker as deployed reads OTEL_TRACES_EXPORTER, whose exporters (otlp, console) would add
serialisation and I/O of their own. This measures what tracing costs the broker itself: spans
made for every RPC and every etcd call, batched by the BatchSpanProcessor a deployment uses,
then dropped. Same arguments as `lockbroker serve`. On exit it writes how many spans it saw to
$BENCH_SPAN_COUNT_FILE, so the benchmark can check tracing really was on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from lockbroker.server import config, logs, loops
from lockbroker.server.app import Broker
from lockbroker.server.cli import build_parser
from lockbroker.server.telemetry import configure_tracing


class CountingExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = config.load(args, os.environ)
    logs.setup(cfg.server.log_level)
    exporter = CountingExporter()
    # Only the sampler comes from the environment (the bench's 1% target sets it); exporters never.
    env = {k: v for k, v in os.environ.items() if k in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")}
    tracing = configure_tracing(env, span_processors=[BatchSpanProcessor(exporter)])
    try:
        # The same loop `lockbroker serve` picks, so the traced targets differ only by tracing.
        loops.run(Broker(cfg, tracing=tracing).run_until_signal, cfg.server.event_loop)
    finally:
        tracing.shutdown()  # flushes the batch still queued
        if path := os.environ.get("BENCH_SPAN_COUNT_FILE"):
            with open(path, "w") as f:
                f.write(str(exporter.spans))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
