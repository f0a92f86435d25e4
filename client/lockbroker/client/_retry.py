"""Retrying calls that failed with UNAVAILABLE (or RESOURCE_EXHAUSTED with a RetryInfo hint),
within the call's overall deadline.

Kept private and small on purpose: a shared client interceptor is meant to replace it, and
the only contract callers rely on is "the same request is re-sent until it succeeds, fails
for another reason, or the deadline leaves no room for another attempt".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from grpc import aio

from lockbroker.client.errors import LockBrokerError, QuotaExceeded, Unavailable, from_rpc_error
from lockbroker.v1.reasons import ErrorReason

T = TypeVar("T")

log = logging.getLogger("lockbroker.client.retry")

# Jitter only spreads retries out; it need not be unpredictable, but SystemRandom keeps
# forked workers from sharing one seed and retrying in lockstep.
_rng = random.SystemRandom()
# An attempt with less time than this left would only turn UNAVAILABLE into DEADLINE_EXCEEDED.
_MIN_ATTEMPT = 0.02


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n sleeps uniform(0, min(cap, base * 2**n))."""

    base: float = 0.05
    cap: float = 2.0
    max_attempts: int | None = None

    def delay(self, attempt: int, hint: float | None = None) -> float:
        jittered = _rng.uniform(0.0, min(self.cap, self.base * (2 ** min(attempt, 32))))
        # The broker's RetryInfo knows better than our guess how long it needs (e.g. draining).
        return max(jittered, hint or 0.0)


def retryable(err: LockBrokerError) -> bool:
    # A quota refusal is final: only a rate limit (RATE_LIMITED with RetryInfo) says when a retry
    # will pass. QUOTA_EXCEEDED on held state (max_locks, ...) carries RetryInfo as a hint for the
    # caller, but nothing frees that state by waiting inside one call: retrying it silently ran the
    # whole deadline out and hid the QuotaFailure behind a timeout.
    if isinstance(err, QuotaExceeded):
        return err.reason == ErrorReason.RATE_LIMITED and err.retry_after is not None
    return isinstance(err, Unavailable)


async def call_with_retry(
    attempt: Callable[[float], Awaitable[T]],
    *,
    deadline: float,
    backoff: Backoff,
    should_retry: Callable[[LockBrokerError], bool] = retryable,
    on_retry: Callable[[int, LockBrokerError, float], None] | None = None,
) -> T:
    """Run `attempt(timeout_left)` until it succeeds, translating gRPC errors.

    `deadline` is a time.monotonic() instant; each attempt gets what is left of it as its
    own gRPC timeout, so retries never stretch the call past what the caller asked for.
    """
    n = 0
    while True:
        left = deadline - time.monotonic()
        try:
            return await attempt(max(left, 0.0))
        except aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            n += 1
            if not should_retry(err) or (backoff.max_attempts is not None and n >= backoff.max_attempts):
                raise err from exc
            pause = backoff.delay(n - 1, getattr(err, "retry_after", None))
            # Give up when the pause would leave no time for the retry itself, so the caller sees
            # the real cause (UNAVAILABLE) rather than a DEADLINE_EXCEEDED of our own making.
            if time.monotonic() + pause + _MIN_ATTEMPT >= deadline:
                raise err from exc
            # One INFO line per retry: `lockbroker -v` shows them, a library user's logging decides.
            log.info("retry %d in %.2fs after %s", n, pause, err)
            if on_retry is not None:
                on_retry(n, err, pause)
            await asyncio.sleep(pause)


__all__ = ["Backoff", "call_with_retry", "retryable"]
