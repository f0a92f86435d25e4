"""The acquire rate limit: a token bucket per tenant, on this replica.

Limits on state a tenant holds (sessions, queued entries, queue length) are enforced in etcd by
the lock core, so they hold across replicas. A rate is a limit on flow: counting it in etcd would
cost a write per call to protect against too many calls, so it is counted here, per replica, and
documented so (N replicas behind a balancer admit up to N times the rate).

The worker processes of one broker (`serve --workers N`) are not separate replicas to the user:
each takes `1/N` of the rate and of the burst (at least one token), so the broker as a whole
admits the configured rate. A client whose calls all land on one worker (one channel, one
connection) sees only that worker's share; clients with several connections spread over all.

It sits after identity (the bucket is the caller's tenant's) and outside the service edge, whose
retries therefore spend one token per call, not one per attempt. A refused call reaches no
handler and changes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from lockbroker.interceptors.base import CallInfo, Context, Layer, WrappingInterceptor, state_of
from lockbroker.interceptors.rpcstatus import quota_details, trailers
from lockbroker.v1.reasons import ErrorReason

RATE_LIMITED = ErrorReason.RATE_LIMITED
# Methods that spend a token: the ones that create state in etcd on every call.
LIMITED_METHODS = frozenset({"/lockbroker.v1.LockService/Acquire"})


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

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        self._tokens = min(float(self.rate.burst), self._tokens + (now - self._last) * self.rate.per_second)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate.per_second


class RateLimitInterceptor(WrappingInterceptor):
    MAX_TENANTS = 100_000  # buckets kept; beyond this, full (idle) buckets are dropped first

    def __init__(
        self, rate_of: Callable[[str], Rate], clock: Callable[[], float] = time.monotonic, *, shares: int = 1
    ) -> None:
        """`shares`: how many processes split each tenant's rate (the broker's worker count)."""
        self._rate_of = rate_of
        self._clock = clock
        self._shares = max(1, shares)
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, tenant: str) -> float:
        """0.0 if the call may go on; else the seconds to wait."""
        rate = self._share(self._rate_of(tenant))
        if rate.per_second <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != rate:
            if len(self._buckets) >= self.MAX_TENANTS:
                self._buckets.clear()
            bucket = self._buckets[tenant] = TokenBucket(rate, now)
        return bucket.take(now)

    def _share(self, rate: Rate) -> Rate:
        if self._shares == 1 or rate.per_second <= 0:
            return rate
        return Rate(rate.per_second / self._shares, max(1, rate.burst // self._shares))

    def layer(self, call: CallInfo) -> Layer | None:
        return Layer(before=self._limit) if call.method in LIMITED_METHODS else None

    async def _limit(self, request: Any, context: Context) -> None:
        tenant = state_of(context).tenant
        wait = self.check(tenant)
        if wait > 0:
            rate = self._rate_of(tenant)
            where = " on this replica" if self._shares == 1 else f" on this replica, shared by {self._shares} workers"
            message = (
                f"tenant {tenant!r} is over its acquire rate of {rate.per_second:g}/s "
                f"(burst {rate.burst}){where}; retry in {wait:.3f}s"
            )
            details = quota_details(tenant, "acquire_rate", rate.per_second, message, math.ceil(wait * 1000) / 1000)
            meta = {"tenant": tenant, "limit": "acquire_rate", "value": f"{rate.per_second:g}"}
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, message, trailers(code, message, RATE_LIMITED, meta, details))
