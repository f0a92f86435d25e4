"""The edge's retry of a failed call: which calls may be repeated, and how.

`Idempotency` reads from lock.proto (and admin.proto) whether repeating a call cannot change its
outcome; `RetryPolicy` bounds the repeats; `_retried` makes them after a first attempt failed
transiently. The `rpc` decorator in service.py calls `_retried` only on that failure path, so this
module adds no frame to a call that succeeds at once (issue 13's frame budget, tests/test_frames.py).
Kept apart from service.py because it is a policy of its own, with its own tests
(tests/interceptors/test_retry.py, tests/test_error_reasons.py); service.py re-exports its names.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from lockbroker.interceptors.base import CallState
from lockbroker.server.core.backend import ANSWER_MARGIN
from lockbroker.server.core.errors import LockBrokerError, ShuttingDown, Unavailable
from lockbroker.v1 import lock_pb2

_SERVICE_DESC = lock_pb2.DESCRIPTOR.services_by_name["LockService"]

log = logging.getLogger("lockbroker.server")  # the service's logger, as before the split

Resp = TypeVar("Resp")


class Idempotency(enum.Enum):
    """Whether repeating a call with the same request cannot change its outcome."""

    NEVER = "never"
    ALWAYS = "always"  # Refresh, Describe, List, CloseSession
    # Acquire, Release, CreateSession: the broker remembers the request_id; without one a repeat
    # could take a second lock entry or a second session.
    WITH_REQUEST_ID = "with_request_id"

    def holds_for(self, request: object) -> bool:
        if self is Idempotency.ALWAYS:
            return True
        return self is Idempotency.WITH_REQUEST_ID and bool(getattr(request, "request_id", ""))

    @staticmethod
    def of(method: str, service: ServiceDescriptor = _SERVICE_DESC) -> Idempotency:
        """What lock.proto declares for `method`: its `idempotency_level` (NO_SIDE_EFFECTS or
        IDEMPOTENT: always), else a unary request with a `request_id` field (only with one), else
        never. Read from the descriptor so the proto stays the one place that says it."""
        desc = service.methods_by_name[method]
        if desc.GetOptions().idempotency_level != descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN:
            return Idempotency.ALWAYS
        if not desc.client_streaming and "request_id" in desc.input_type.fields_by_name:
            return Idempotency.WITH_REQUEST_ID
        return Idempotency.NEVER


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The edge's retry of transient backend failures: full-jitter backoff, at most `max_attempts`
    attempts, never past the RPC's deadline minus `min_attempt` (the time an attempt needs to be
    worth starting), and `max_elapsed` seconds after the first failure when the caller set no
    deadline."""

    max_attempts: int = 3
    multiplier: float = 0.05
    max_backoff: float = 0.5
    max_elapsed: float = 2.0
    min_attempt: float = 0.05

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


NO_RETRY = RetryPolicy(max_attempts=1)


def _transient(exc: BaseException) -> bool:
    # Only "the backend did not answer": SHUTTING_DOWN is Unavailable too but means "go to another
    # replica", which a retry on this one cannot achieve.
    return isinstance(exc, Unavailable) and not isinstance(exc, ShuttingDown)


async def _retried(
    attempt: Callable[[], Awaitable[Resp]],
    first: Unavailable,
    policy: RetryPolicy,
    state: CallState,
    context: aio.ServicerContext[object, object],
) -> Resp:
    """Attempts after a first one failed with `first`; the last failure is raised as it is."""
    left = context.time_remaining()
    # An attempt needs min_attempt of etcd time, and etcd calls end ANSWER_MARGIN before the
    # deadline: without the margin here, a last attempt began inside it, failed at once, and the
    # answer went out after the caller's deadline under load (invariant 8 in the fault suite).
    budget = policy.max_elapsed if left is None else left - ANSWER_MARGIN - policy.min_attempt
    if budget <= 0:
        raise first
    started = time.monotonic()
    async for retry in AsyncRetrying(
        retry=retry_if_exception(_transient),
        wait=wait_random_exponential(multiplier=policy.multiplier, max=policy.max_backoff),
        stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(budget - (time.monotonic() - started)),
        before_sleep=functools.partial(_before_sleep, state),
        reraise=True,
    ):
        with retry:
            number = retry.retry_state.attempt_number
            if number == 1:
                raise first  # the attempt already made: tenacity counts it and backs off from it
            state.attempts = number - 1
            return await attempt()
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


def _before_sleep(state: CallState, retry: RetryCallState) -> None:
    exc = retry.outcome.exception() if retry.outcome is not None else None
    reason = exc.reason if isinstance(exc, LockBrokerError) else ""
    sleep = retry.upcoming_sleep
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "lockbroker.retry",
            {"attempt": retry.attempt_number, "reason": reason, "sleep_ms": round(sleep * 1000, 3)},
        )
    log.info(
        "retrying %s after %s (attempt %d, sleeping %.3fs)",
        state.info.name,
        reason,
        retry.attempt_number,
        sleep,
        extra={"method": state.info.method, "attempt": retry.attempt_number},
    )


__all__ = ["NO_RETRY", "Idempotency", "RetryPolicy"]
