"""Rate limits: a token bucket per tenant and kind of call, and one per peer address for calls
that fail authentication, on this replica.

Limits on state a tenant holds (sessions, queued entries, queue length) are enforced in etcd by
the lock core, so they hold across replicas. A rate is a limit on flow: counting it in etcd would
cost a write per call to protect against too many calls, so it is counted here, per replica, and
documented so (N replicas behind a balancer admit up to N times the rate).

Every LockService method spends a token from one of three buckets of the caller's tenant
(`BUCKETS`): Acquire its own, reads (Describe, List) a cheap separate one, and the session calls
(CreateSession, Refresh, CloseSession, Release, and opening a KeepAlive stream) a third. So one
tenant's flood of any kind is refused RATE_LIMITED before it reaches etcd, and another tenant's
calls go on.

`RateLimitInterceptor` sits after identity (the buckets are the caller's tenant's) and outside the
service edge, whose retries therefore spend one token per call, not one per attempt. A refused
call reaches no handler and changes nothing.

`PeerLimitInterceptor` sits before identity: a peer address whose calls keep failing
authentication spends its bucket, and once it is empty that address's calls are refused before
their credentials are even checked, until the bucket refills.

The worker processes of one broker (`serve --workers N`) are not separate replicas to the user:
each takes `1/N` of the rate and of the burst (at least one token), so the broker as a whole
admits the configured rate. A client whose calls all land on one worker (one channel, one
connection) sees only that worker's share; clients with several connections spread over all.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from lockbroker.interceptors.base import (
    CallInfo,
    Context,
    Layer,
    StreamBehavior,
    WrappingInterceptor,
    scoped,
    state_of,
)
from lockbroker.interceptors.rpcstatus import quota_details, trailers
from lockbroker.v1.reasons import ErrorReason

RATE_LIMITED = ErrorReason.RATE_LIMITED
_SERVICE = "/lockbroker.v1.LockService/"
_ELECTION = "/lockbroker.v1.ElectionService/"
# The bucket each method spends a token from. Every LockService method is here: a method added
# to the service without a bucket fails tests/test_abuse_rates.py.
BUCKETS: dict[str, str] = {
    _SERVICE + "Acquire": "acquire",
    _SERVICE + "AcquireMany": "acquire",
    _SERVICE + "Describe": "read",
    _SERVICE + "List": "read",
    _SERVICE + "CheckFence": "read",
    _SERVICE + "Watch": "read",  # one token per stream opened; max_streams bounds the open ones
    _SERVICE + "CreateSession": "session",
    _SERVICE + "Refresh": "session",
    _SERVICE + "CloseSession": "session",
    _SERVICE + "Release": "session",
    _SERVICE + "KeepAlive": "session",  # one token per stream opened, not per message
    _SERVICE + "Session": "session",  # likewise; its messages are charged as the unary calls are
    # Acquire and AcquireMany messages on a Session stream are charged like the unary calls
    # (server/session_stream.py), and so is opening a session on it (create, as CreateSession;
    # resume, as Refresh): one batch holds up to 1,024 opens, each an etcd lease. Release,
    # KeepAlive and Close messages are not charged: each follows an Open or Acquire that was, and
    # charging every Release would cap a stream's lock cycles at session_rate.
    _SERVICE + "Session/Acquire": "acquire",
    _SERVICE + "Session/AcquireMany": "acquire",
    _SERVICE + "Session/Open": "session",
    # ElectionService (server/election_service.py): a campaign is an Acquire, reads are reads, and
    # Proclaim and Resign are charged as Release is.
    _ELECTION + "Campaign": "acquire",
    _ELECTION + "Leader": "read",
    _ELECTION + "Observe": "read",  # one token per stream opened
    _ELECTION + "Proclaim": "session",
    _ELECTION + "Resign": "session",
}
LIMITED_METHODS = frozenset(BUCKETS)
_WHAT = {"acquire": "Acquire", "read": "read (Describe, List, CheckFence)", "session": "session (and Release)"}


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float  # 0: unlimited
    burst: int


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; a call takes one or is told when one is due."""

    __slots__ = ("_last", "_tokens", "rate")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = float(rate.burst)
        self._last = now

    def _refill(self, now: float) -> None:
        self._tokens = min(float(self.rate.burst), self._tokens + (now - self._last) * self.rate.per_second)
        self._last = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate.per_second

    def peek(self, now: float) -> float:
        """0.0 if a token is there (none is taken), else the seconds until one will be."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate.per_second

    def spend(self, now: float) -> None:
        """Take a token even if that leaves the bucket in debt (a cost known only afterwards)."""
        self._refill(now)
        self._tokens = max(self._tokens - 1.0, -float(self.rate.burst))


MAX_BUCKETS = 100_000  # buckets kept per limiter; beyond this they are all dropped (refilled)


class _Buckets:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[Any, TokenBucket] = {}

    def get(self, key: Any, rate: Rate) -> tuple[TokenBucket, float]:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()
            bucket = self._buckets[key] = TokenBucket(rate, now)
        return bucket, now


def _retry_after(wait: float) -> float:
    return math.ceil(wait * 1000) / 1000


class RateLimitInterceptor(WrappingInterceptor):
    MAX_TENANTS = MAX_BUCKETS

    def __init__(
        self, rate_of: Callable[[str, str], Rate], clock: Callable[[], float] = time.monotonic, *, shares: int = 1
    ) -> None:
        """`rate_of(tenant, bucket)`: the rate of one of the tenant's buckets ("acquire", "read", "session").
        `shares`: how many processes split each tenant's rates (the broker's worker count)."""
        self._rate_of = rate_of
        self._shares = max(1, shares)
        self._buckets = _Buckets(clock)

    def check(self, tenant: str, bucket: str = "acquire") -> float:
        """0.0 if the call may go on; else the seconds to wait."""
        rate = self._share(self._rate_of(tenant, bucket))
        if rate.per_second <= 0:
            return 0.0
        b, now = self._buckets.get((tenant, bucket), rate)
        return b.take(now)

    def _share(self, rate: Rate) -> Rate:
        if self._shares == 1 or rate.per_second <= 0:
            return rate
        return Rate(rate.per_second / self._shares, max(1, rate.burst // self._shares))

    def layer(self, call: CallInfo) -> Layer | None:
        bucket = BUCKETS.get(call.method)
        if bucket is None:
            return None

        async def limit(request: Any, context: Context) -> None:
            await self._limit(context, bucket)

        return Layer(before=limit)

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        bucket = BUCKETS.get(call.method)
        if bucket is None:
            return behavior

        async def limited(request: Any, context: Context) -> AsyncIterator[Any]:
            context = scoped(context, call)
            await self._limit(context, bucket)
            async for response in _relay(behavior(request, context)):
                yield response

        return limited

    async def _limit(self, context: Context, bucket: str) -> None:
        tenant = state_of(context).tenant
        wait = self.check(tenant, bucket)
        if wait > 0:
            rate = self._rate_of(tenant, bucket)
            limit = f"{bucket}_rate"
            where = " on this replica" if self._shares == 1 else f" on this replica, shared by {self._shares} workers"
            message = (
                f"tenant {tenant!r} is over its {_WHAT[bucket]} rate of {rate.per_second:g}/s "
                f"(burst {rate.burst}){where}; retry in {wait:.3f}s"
            )
            details = quota_details(tenant, limit, rate.per_second, message, _retry_after(wait))
            meta = {"tenant": tenant, "limit": limit, "value": f"{rate.per_second:g}"}
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, message, trailers(code, message, RATE_LIMITED, meta, details))


async def _relay(responses: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behavior (an async iterator, or a coroutine that writes them
    itself), closing the iterator however the call ends so its cleanup runs now."""
    if not hasattr(responses, "__aiter__"):
        await responses
        return
    try:
        async for response in responses:
            yield response
    finally:
        await responses.aclose()


def peer_address(peer: str) -> str:
    """The address part of grpc's peer string ("ipv4:10.0.0.7:5123" -> "10.0.0.7"): one bucket per
    host, not per connection, which a flood would open anew for each call."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer  # unix sockets and the like: the whole string


class PeerLimitInterceptor(WrappingInterceptor):
    """Calls that fail authentication, per peer address: `rate` of them per second (burst `burst`).

    Placed before identity. Each call whose authentication failed spends a token of its peer
    address's bucket; while that bucket is empty, every call from the address is refused
    RATE_LIMITED before identity checks its credentials (so a flood of bad keys costs no key
    checks). Authenticated callers that share the address (behind one NAT) are refused with it
    while the flood lasts: a documented trade-off (docs/security.md, item 9).
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._buckets = _Buckets(clock)

    def layer(self, call: CallInfo) -> Layer | None:
        if call.open or self.rate.per_second <= 0:
            return None
        return Layer(before=self._before, failed=self._failed)

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        if call.open or self.rate.per_second <= 0:
            return behavior

        async def limited(request: Any, context: Context) -> AsyncIterator[Any]:
            context = scoped(context, call)
            await self._before(request, context)
            try:
                async for response in _relay(behavior(request, context)):
                    yield response
            except BaseException as exc:
                await self._failed(request, context, exc)
                raise

        return limited

    async def _before(self, request: Any, context: Context) -> None:
        address = peer_address(context.peer() or "")
        bucket, now = self._buckets.get(address, self.rate)
        wait = bucket.peek(now)
        if wait > 0:
            message = (
                f"too many calls that failed authentication from {address}; retry in {wait:.3f}s"
                " (check the API key or client certificate)"
            )
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(_retry_after(wait) * 1e9))
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=f"peer:{address}",
                description=message,
                api_service="lockbroker.v1.LockService",
                quota_metric="lockbroker/unauthenticated_rate",
                quota_id="unauthenticated_rate",
                quota_value=int(self.rate.per_second),
            )
            details = [
                error_details_pb2.QuotaFailure(violations=[violation]),
                error_details_pb2.RetryInfo(retry_delay=delay),
            ]
            meta = {"limit": "unauthenticated_rate", "value": f"{self.rate.per_second:g}"}
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, message, trailers(code, message, RATE_LIMITED, meta, details))

    async def _failed(self, request: Any, context: Context, exc: BaseException) -> None:
        state = state_of(context)
        if state.principal is None and state.code == grpc.StatusCode.UNAUTHENTICATED:
            bucket, now = self._buckets.get(peer_address(context.peer() or ""), self.rate)
            bucket.spend(now)
