"""The broker's Prometheus endpoint: `/metrics` on `--metrics-listen`, off by default.

What is measured where:
- gRPC and lock-outcome counters: `lockbroker.interceptors.metrics` (per replica; sum them).
- etcd calls: `EtcdCallMetrics`, fed by `EtcdClient`'s observer hook (per replica).
- held locks, waiters and sessions per tenant: `StateCollector`, read from etcd at scrape time, so
  every replica reports the same cluster-wide numbers (aggregate them with max(), not sum()).

The endpoint is a small threaded HTTP server (prometheus_client's) beside the asyncio loop; the
state collector hands its etcd read to the loop and waits for it.

With `serve --workers N` the parent process serves the endpoint (`WorkersMetrics`): each worker
records its counters and histograms in prometheus_client's multiprocess files (the parent sets
PROMETHEUS_MULTIPROC_DIR for them), and a scrape sums them over every worker that has run since
the start, restarted ones included, so counters never go back. The state gauges are read from
etcd once, by the parent. One endpoint, the same names and labels as with one process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from lockbroker.interceptors.metrics import GrpcMetrics, LockMetrics
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import EtcdClient

log = logging.getLogger("lockbroker.metrics")

# The `_created` series double every counter's cardinality and nothing we ship reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# The state collector reads at most this many keys per scrape; past it the gauges are partial
# and lockbroker_state_truncated says so (a broker this big wants a recording rule, not a scan).
MAX_STATE_KEYS = 200_000


class EtcdCallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "lockbroker_etcd_request_duration_seconds",
            "Latency of the broker's unary etcd calls, by etcd method.",
            ("method",),
            buckets=ETCD_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "lockbroker_etcd_request_errors",
            "etcd calls that failed, by etcd method and gRPC code.",
            ("method", "code"),
            registry=registry,
        )

    def observe(self, method: str, seconds: float, code: str | None) -> None:
        """`EtcdClient`'s observer: one call of `method` took `seconds` and failed with `code` (None: OK)."""
        self.latency.labels(method).observe(seconds)
        if code is not None:
            self.errors.labels(method, code).inc()


@dataclass
class State:
    sessions: Tally[str] = field(default_factory=Tally)
    held: Tally[str] = field(default_factory=Tally)
    waiters: Tally[str] = field(default_factory=Tally)
    truncated: bool = False


def tally(keys: Iterable[bytes], root: bytes) -> State:
    """Per-tenant counts from the keys under `<root>/t/` (layout in core.names).

    A lock's entries are `l/<name>#<lease>`; its first entry holds it, the rest wait. So held
    locks are the distinct names and waiters the entries beyond one per name.
    """
    state = State()
    names: set[tuple[str, bytes]] = set()
    entries: Tally[str] = Tally()
    start = len(root) + 3  # "<root>/t/"
    for key in keys:
        tenant_b, _, rest = key[start:].partition(b"/")
        tenant = tenant_b.decode()
        kind, _, tail = rest.partition(b"/")
        if kind == b"s":
            state.sessions[tenant] += 1
        elif kind == b"l":
            entries[tenant] += 1
            names.add((tenant, tail.rpartition(b"#")[0]))
    for tenant, _ in names:
        state.held[tenant] += 1
    for tenant, n in entries.items():
        state.waiters[tenant] = n - state.held[tenant]
    return state


class StateCollector(Collector):
    """Held locks, waiters and sessions per tenant, read from etcd when scraped (cached `ttl` s).

    One keys-only, serializable range over the tenants' keys: the count comes from the member the
    broker talks to and costs etcd no consensus round; values are not read.
    """

    def __init__(self, client: EtcdClient, key_root: str, loop: asyncio.AbstractEventLoop, *, ttl: float = 1.0) -> None:
        self._client = client
        self._root = key_root.encode()
        self._loop = loop
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, State] | None = None

    async def read(self) -> State:
        prefix = self._root + b"/t/"
        req = pb.RangeRequest(
            key=prefix, range_end=prefix_end(prefix), keys_only=True, serializable=True, limit=MAX_STATE_KEYS
        )
        with suppress_instrumentation():  # a scrape is not a call worth a trace
            resp = await self._client.range(req)
        state = tally((kv.key for kv in resp.kvs), self._root)
        state.truncated = resp.more
        return state

    def _state(self) -> State | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
            try:
                state = asyncio.run_coroutine_threadsafe(self.read(), self._loop).result(timeout=5.0)
            except Exception as e:
                log.warning("metrics: cannot read lock state from etcd", extra={"error": repr(e)})
                return None
            self._cached = (now, state)
            return state

    def collect(self) -> Iterable[Metric]:
        state = self._state()
        up = GaugeMetricFamily(
            "lockbroker_state_up", "1 if the last scrape could read the lock state from etcd, else 0."
        )
        up.add_metric([], 0 if state is None else 1)
        yield up
        if state is None:
            return
        families: list[tuple[str, str, Tally[str]]] = [
            ("lockbroker_locks_held", "Locks with a holder, by tenant (cluster-wide, from etcd).", state.held),
            ("lockbroker_waiters", "Queued Acquire calls not yet granted, by tenant (cluster-wide).", state.waiters),
            ("lockbroker_sessions", "Live sessions, by tenant (cluster-wide, from etcd).", state.sessions),
        ]
        for name, doc, counts in families:
            g = GaugeMetricFamily(name, doc, labels=["tenant"])
            for tenant, n in sorted(counts.items()):
                g.add_metric([tenant], n)
            yield g
        t = GaugeMetricFamily("lockbroker_state_truncated", f"1 if more than {MAX_STATE_KEYS} keys were skipped.")
        t.add_metric([], 1 if state.truncated else 0)
        yield t


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Endpoint:
    """A registry served on /metrics, with the state gauges read from etcd."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def watch_state(self, client: EtcdClient, key_root: str) -> None:
        self.registry.register(StateCollector(client, key_root, asyncio.get_running_loop()))

    def serve(self, listen: str) -> int:
        """Serve /metrics on `listen` (host:port); the port actually bound (for port 0)."""
        host, _, port = listen.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host.strip("[]"), self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class Metrics(_Endpoint):
    """Every metric of one broker, in its own registry (tests run several brokers in one process)."""

    def __init__(self) -> None:
        super().__init__()
        self.grpc = GrpcMetrics(self.registry)
        self.locks = LockMetrics(self.registry)
        self.etcd = EtcdCallMetrics(self.registry)


class WorkersMetrics(_Endpoint):
    """The parent's endpoint with `serve --workers N`: the workers' metrics from `directory`
    (their PROMETHEUS_MULTIPROC_DIR), summed per series."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
