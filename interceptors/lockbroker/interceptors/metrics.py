"""Prometheus metrics of the gRPC server and of lock outcomes, recorded by two wrapping interceptors.

`GrpcMetricsInterceptor` goes outermost and keeps go-grpc-prometheus's names and labels, so the
dashboards and alerts written for Go services work unchanged:

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}       (histogram)
    grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}

`LockMetricsInterceptor` goes right after identity (it needs the tenant) and reads lock outcomes
from the answers the handlers give: grants and their wait, releases and (when this replica made
the grant) how long the lock was held, quota refusals by limit, and sessions found expired. A
grant is a lock granted by Acquire or one of the locks of an AcquireMany; an election won by
Campaign is not one (the lock metrics have a tenant label only, nothing to tell it apart).

Labels are bounded by construction: method names come from the registered services (unknown
methods are not wrapped), codes from grpc.StatusCode, tenants from the tenants file, limits from
the quota's fixed set. Lock names never become labels.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from lockbroker.interceptors.base import (
    CallInfo,
    Context,
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    state_of,
)
from lockbroker.interceptors.rpcstatus import rich_status

LOCK_SERVICE = "lockbroker.v1.LockService"

# go-grpc-prometheus's default buckets, in seconds; the broker's own calls sit in the lower half,
# a blocking Acquire in the upper.
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)
HOLD_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def grpc_type(call: CallInfo) -> str:
    if call.client_streaming:
        return "bidi_stream" if call.server_streaming else "client_stream"
    return "server_stream" if call.server_streaming else "unary"


def outcome_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status a finished call answered with.

    The one place that reads a call's outcome: when the per-call state object of the chain lands,
    this becomes a read of its code.
    """
    if isinstance(error, asyncio.CancelledError):
        left = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
    raw = context.code()
    if isinstance(raw, grpc.StatusCode):
        return raw
    if isinstance(raw, int):
        return next((c for c in grpc.StatusCode if c.value[0] == raw), grpc.StatusCode.UNKNOWN)
    # No code set: grpc answers OK for a returned value and UNKNOWN for an unexpected exception.
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def quota_limit(context: Context) -> str | None:
    """The limit a RESOURCE_EXHAUSTED answer names in its QuotaFailure (e.g. max_locks), if any."""
    status = rich_status(context.trailing_metadata())
    for detail in status.details if status is not None else ():
        failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(failure) and failure.violations:
            return failure.violations[0].quota_id or None
    return None


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received", "RPC stream messages received on the server.", labels, registry=registry
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "gRPC stream messages sent on the server.", labels, registry=registry
        )


class GrpcMetricsInterceptor(WrappingInterceptor):
    per_message = False  # grpc_server_* count gRPC calls and frames, not the messages a stream serves

    def __init__(self, metrics: GrpcMetrics) -> None:
        self.m = metrics

    def _labels(self, call: CallInfo) -> tuple[str, str, str]:
        return grpc_type(call), call.service, call.name

    def _done(self, labels: tuple[str, str, str], context: Context, error: BaseException | None, t0: float) -> None:
        self.m.handled.labels(*labels, outcome_code(context, error).name).inc()
        self.m.handling.labels(*labels).observe(time.perf_counter() - t0)

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        labels = self._labels(call)
        started, received, sent = (c.labels(*labels) for c in (self.m.started, self.m.received, self.m.sent))

        async def measured(request: Any, context: Context) -> Any:
            started.inc()
            t0 = time.perf_counter()
            if call.client_streaming:
                request = _counting(request, received)
            else:
                received.inc()
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                self._done(labels, context, error, t0)
            sent.inc()
            return response

        return measured

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        labels = self._labels(call)
        started, received, sent = (c.labels(*labels) for c in (self.m.started, self.m.received, self.m.sent))

        async def measured(request: Any, context: Context) -> AsyncIterator[Any]:
            started.inc()
            t0 = time.perf_counter()
            if call.client_streaming:
                request = _counting(request, received)
            else:
                received.inc()
            error: BaseException | None = None
            responses: Any = behavior(request, context)
            try:
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        sent.inc()
                        yield response
                else:
                    await responses  # a handler written against context.write
            except BaseException as e:
                error = e
                raise
            finally:
                if hasattr(responses, "aclose"):
                    await responses.aclose()
                self._done(labels, context, error, t0)

        return measured


async def _counting(requests: AsyncIterator[Any], counter: Any) -> AsyncIterator[Any]:
    async for r in requests:
        counter.inc()
        yield r


class LockMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.grants = Counter("lockbroker_grants", "Locks granted, by tenant.", ("tenant",), registry=registry)
        self.releases = Counter(
            "lockbroker_releases", "Locks released by their holder, by tenant.", ("tenant",), registry=registry
        )
        self.wait = Histogram(
            "lockbroker_lock_wait_seconds",
            "Time from an Acquire's (or AcquireMany's) arrival to its grant (the response's `waited`), by tenant.",
            ("tenant",),
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.hold = Histogram(
            "lockbroker_lock_hold_seconds",
            "Time from grant to release, for releases that reach the replica that made the grant.",
            ("tenant",),
            buckets=HOLD_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "lockbroker_quota_refusals",
            "Calls refused by a quota, by tenant and limit.",
            ("tenant", "limit"),
            registry=registry,
        )
        self.expiries = Counter(
            "lockbroker_session_expiries",
            "Sessions a KeepAlive stream found expired (their locks were lost), by tenant.",
            ("tenant",),
            registry=registry,
        )


class LockMetricsInterceptor(WrappingInterceptor):
    """Goes after identity, before quota: refusals by the rate limit are counted too."""

    # Grants this replica made and not yet saw released, for the hold time: (tenant, token) -> when.
    # Locks that end by expiry or session close are never released here, so the map is bounded.
    MAX_TRACKED = 100_000

    def __init__(self, metrics: LockMetrics, clock: Any = time.monotonic) -> None:
        self.m = metrics
        self._clock = clock
        self._granted: OrderedDict[tuple[str, int], float] = OrderedDict()

    def _refused(self, tenant: str, context: Context) -> None:
        if outcome_code(context, None) is grpc.StatusCode.RESOURCE_EXHAUSTED:
            limit = quota_limit(context)
            if limit is not None:
                self.m.refusals.labels(tenant, limit).inc()

    def _granted_now(self, tenant: str, waited: Any, tokens: list[int]) -> None:
        now = self._clock()
        wait = waited.ToTimedelta().total_seconds()
        for token in tokens:
            self.m.grants.labels(tenant).inc()
            self.m.wait.labels(tenant).observe(wait)
            self._granted[(tenant, token)] = now
        while len(self._granted) > self.MAX_TRACKED:
            self._granted.popitem(last=False)

    def _observe(self, method: str, tenant: str, request: Any, response: Any) -> None:
        if method == "Acquire" and response.HasField("grant"):
            self._granted_now(tenant, response.waited, [response.grant.fencing_token])
        elif method == "AcquireMany":
            # Each lock of the call is a grant of its own (released one by one by its token); the
            # call's `waited` (until its last grant) is each one's wait. ElectionService.Campaign
            # is not counted: the metrics carry no label to tell an election from a lock.
            self._granted_now(tenant, response.waited, [g.fencing_token for g in response.grants])
        elif method == "Release" and response.released:
            self.m.releases.labels(tenant).inc()
            since = self._granted.pop((tenant, request.fencing_token), None)
            if since is not None:
                self.m.hold.labels(tenant).observe(self._clock() - since)

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        if call.service != LOCK_SERVICE:
            return behavior

        async def observed(request: Any, context: Context) -> Any:
            tenant = state_of(context).tenant
            try:
                response = await behavior(request, context)
            except Exception:
                self._refused(tenant, context)
                raise
            self._observe(call.name, tenant, request, response)
            return response

        return observed

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        if call.service != LOCK_SERVICE:
            return behavior

        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            tenant = state_of(context).tenant
            responses: Any = behavior(request, context)
            try:
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        if getattr(response, "expired", False):
                            self.m.expiries.labels(tenant).inc()
                        yield response
                else:
                    await responses
            except Exception:
                self._refused(tenant, context)
                raise
            finally:
                if hasattr(responses, "aclose"):
                    await responses.aclose()

        return observed
