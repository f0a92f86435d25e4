"""Retrying transient failures: inside the broker (around handlers) and in Python clients.

Server side. An aio handler cannot be retried once it has called `context.abort`: abort sends the
status to the caller at once, a second abort raises `UsageError("Abort already called!")`, and a
response returned afterwards is silently dropped (all verified on grpcio 1.85.1). So the retry
interceptor and the service agree on a contract instead: while `ServerRetryInterceptor` runs a
handler it sets a context variable, and the service's error path calls `abort_or_defer`, which
then raises `DeferredAbort` (carrying the exact code, message and trailers the service would have
sent) instead of aborting. The interceptor retries the transient ones and aborts with the rest,
so the caller sees precisely what the service produced. A handler that aborts by itself is never
retried: the interceptor cannot tell, and does not need to.

Client side. `ClientRetryInterceptor` re-sends the same request object (the same bytes, so the
same request_id) on UNAVAILABLE, and on RESOURCE_EXHAUSTED only when the server attached a
google.rpc.RetryInfo; `SERVICE_CONFIG` is the equivalent retry policy for gRPC clients in other
languages (`python -m lockbroker.interceptors.retry` prints docs/service-config.json).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar

import grpc
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

from lockbroker.interceptors.base import CallInfo, Context, UnaryBehavior, WrappingInterceptor
from lockbroker.interceptors.rpcstatus import error_info, error_reason, retry_delay, rich_status
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.retry")

LOCK_SERVICE: Final = "lockbroker.v1.LockService"
TRANSIENT_REASON: Final = ErrorReason.BACKEND_UNAVAILABLE

# Idempotent however often they are repeated.
ALWAYS_IDEMPOTENT: Final = frozenset({"Refresh", "Describe", "List", "CloseSession"})
# Idempotent only through the request_id the broker remembers; without one a repeat could take a
# second lock entry or a second session.
IDEMPOTENT_WITH_REQUEST_ID: Final = frozenset({"Acquire", "Release", "CreateSession"})

retry_attempts: contextvars.ContextVar[int] = contextvars.ContextVar("lockbroker_retry_attempts", default=0)
"""Retries (attempts after the first) the current RPC's handler took; read by audit and tracing."""

_defer_abort: contextvars.ContextVar[bool] = contextvars.ContextVar("lockbroker_defer_abort", default=False)

_rng = random.SystemRandom()  # forked workers must not share a jitter sequence


# --- google.rpc.Status in trailers ------------------------------------------------------------


# --- the service's side of the contract ---------------------------------------------------------


class DeferredAbort(Exception):
    """What the service would have aborted with, handed to the retry interceptor instead."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, str | bytes]]
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)

    @property
    def reason(self) -> str | None:
        return error_reason(self.trailing_metadata)


async def abort_or_defer(
    context: Context,
    code: grpc.StatusCode,
    details: str = "",
    trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
) -> NoReturn:
    """`context.abort(...)`, unless a ServerRetryInterceptor around this handler may retry it.

    The one call the service's error path makes; with no retry interceptor (or a call it will not
    retry) it is exactly `context.abort`.
    """
    if _defer_abort.get():
        raise DeferredAbort(code, details, trailing_metadata)
    await context.abort(code, details, tuple(trailing_metadata))


def is_idempotent(method_name: str, request: object) -> bool:
    """Whether repeating this LockService call with the same request cannot change the outcome."""
    if method_name in ALWAYS_IDEMPOTENT:
        return True
    if method_name in IDEMPOTENT_WITH_REQUEST_ID:
        return bool(getattr(request, "request_id", ""))
    return False


def _is_transient(exc: BaseException) -> bool:
    # Only "etcd did not answer": SHUTTING_DOWN is UNAVAILABLE too but means "go to another
    # replica", which a retry on this one cannot achieve.
    return (
        isinstance(exc, DeferredAbort)
        and exc.code == grpc.StatusCode.UNAVAILABLE
        and error_reason(exc.trailing_metadata) == TRANSIENT_REASON
    )


def _span_event(name: str, attributes: Mapping[str, str | int | float]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, dict(attributes))


class ServerRetryInterceptor(WrappingInterceptor):
    """Re-runs idempotent unary LockService handlers that failed with BACKEND_UNAVAILABLE.

    Place it innermost (last in the chain), so quota is charged and identity checked once per
    RPC and the audit record shows the final outcome with `retryAttempts`. Full-jitter backoff;
    never sleeps past the RPC's deadline (minus `min_attempt` seconds the next attempt needs to
    be worth starting); at most `max_attempts` attempts; `max_elapsed` seconds when the caller
    set no deadline.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        multiplier: float = 0.05,
        max_backoff: float = 0.5,
        max_elapsed: float = 2.0,
        min_attempt: float = 0.05,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.multiplier = multiplier
        self.max_backoff = max_backoff
        self.max_elapsed = max_elapsed
        self.min_attempt = min_attempt

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        if call.service != LOCK_SERVICE or call.client_streaming or self.max_attempts == 1:
            return behavior
        if call.name not in ALWAYS_IDEMPOTENT | IDEMPOTENT_WITH_REQUEST_ID:
            return behavior

        async def retried(request: Any, context: Context) -> Any:
            if not is_idempotent(call.name, request):
                return await behavior(request, context)
            left = context.time_remaining()
            budget = self.max_elapsed if left is None else left - self.min_attempt
            if budget <= 0:
                return await behavior(request, context)
            started = time.monotonic()
            token = _defer_abort.set(True)
            try:
                try:
                    # The first attempt runs bare: tenacity's bookkeeping costs ~0.1 ms a call,
                    # as much as the rest of the chain, and almost every call succeeds at once.
                    retry_attempts.set(0)
                    return await behavior(request, context)
                except DeferredAbort as first:
                    if not _is_transient(first):
                        raise
                    failed = first
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_is_transient),
                    wait=wait_random_exponential(multiplier=self.multiplier, max=self.max_backoff),
                    stop=stop_after_attempt(self.max_attempts)
                    | stop_before_delay(budget - (time.monotonic() - started)),
                    before_sleep=_before_sleep(call),
                    reraise=True,
                ):
                    with attempt:
                        number = attempt.retry_state.attempt_number
                        if number == 1:
                            raise failed  # the attempt made above: tenacity counts it and backs off from it
                        retry_attempts.set(number - 1)
                        return await behavior(request, context)
            except DeferredAbort as deferred:
                await context.abort(deferred.code, deferred.details, deferred.trailing_metadata)
            finally:
                _defer_abort.reset(token)
            raise AssertionError("unreachable: AsyncRetrying either returns or raises")

        return retried


def _before_sleep(call: CallInfo) -> Callable[[RetryCallState], None]:
    def note(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        reason = exc.reason if isinstance(exc, DeferredAbort) else None
        sleep = state.upcoming_sleep
        _span_event(
            "lockbroker.retry",
            {"attempt": state.attempt_number, "reason": reason or "", "sleep_ms": round(sleep * 1000, 3)},
        )
        log.info(
            "retrying %s after %s (attempt %d, sleeping %.3fs)",
            call.name,
            reason,
            state.attempt_number,
            sleep,
            extra={"method": call.method, "attempt": state.attempt_number},
        )

    return note


# --- clients ------------------------------------------------------------------------------------

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True, slots=True)
class ClientRetryPolicy:
    max_attempts: int = 4
    multiplier: float = 0.1  # full jitter: attempt n sleeps uniform(0, min(max_backoff, multiplier * 2**(n-1)))
    max_backoff: float = 2.0
    max_elapsed: float = 10.0  # total budget when the call has no timeout
    min_attempt: float = 0.02  # an attempt with less time left would only turn the error into DEADLINE_EXCEEDED


def client_may_retry(method: str, request: object) -> bool:
    """LockService calls retry only when idempotent; other services' calls always may."""
    service, _, name = method.lstrip("/").partition("/")
    return service != LOCK_SERVICE or is_idempotent(name, request)


class ClientRetryInterceptor(aio.UnaryUnaryClientInterceptor):
    """Retries unary calls on UNAVAILABLE, or RESOURCE_EXHAUSTED that carries RetryInfo.

    The same request object is sent again, so an Acquire keeps its request_id and the broker
    answers a repeat with the grant it already made. Each attempt's timeout is what is left of the
    call's own, so retries never stretch a call past what the caller asked for. A server's
    RetryInfo delay is a floor for the pause. Do not also enable `SERVICE_CONFIG`'s retryPolicy on
    the same channel, or attempts multiply.
    """

    def __init__(
        self, policy: ClientRetryPolicy | None = None, *, may_retry: Callable[[str, Any], bool] = client_may_retry
    ) -> None:
        self.policy = policy or ClientRetryPolicy()
        self.may_retry = may_retry

    def _pause(self, attempt: int, code: grpc.StatusCode, trailers: Iterable[Any] | None) -> float | None:
        """Seconds to wait before the next attempt, or None if this outcome is not retried."""
        hint = retry_delay(trailers)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is None:
            return None  # a cap, not a rate: waiting would not help
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return None
        p = self.policy
        jittered = _rng.uniform(0.0, min(p.max_backoff, p.multiplier * 2 ** min(attempt - 1, 32)))
        return max(jittered, hint or 0.0)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Req], Awaitable[aio.UnaryUnaryCall[Req, Resp]]],
        client_call_details: aio.ClientCallDetails,
        request: Req,
    ) -> Resp | aio.UnaryUnaryCall[Req, Resp]:
        d = client_call_details
        method = d.method.decode() if isinstance(d.method, bytes) else d.method
        if not self.may_retry(method, request):
            return await continuation(d, request)
        p = self.policy
        deadline = time.monotonic() + (d.timeout if d.timeout is not None else p.max_elapsed)
        attempt = 0
        while True:
            attempt += 1
            details = d
            if d.timeout is not None:
                details = aio.ClientCallDetails(
                    d.method, max(deadline - time.monotonic(), 0.0), d.metadata, d.credentials, d.wait_for_ready
                )
            call = await continuation(details, request)
            code = await call.code()
            if code == grpc.StatusCode.OK or attempt >= p.max_attempts:
                return call
            pause = self._pause(attempt, code, await call.trailing_metadata())
            # Stop when the pause leaves no room for an attempt: the caller should see the real
            # cause rather than a DEADLINE_EXCEEDED of our own making.
            if pause is None or time.monotonic() + pause + p.min_attempt >= deadline:
                return call
            _span_event("lockbroker.client.retry", {"attempt": attempt, "code": code.name, "sleep_ms": pause * 1000})
            log.debug("retrying %s after %s in %.3fs", method, code.name, pause)
            await asyncio.sleep(pause)


# --- service config for other languages -----------------------------------------------------------

SERVICE_CONFIG: Final[Mapping[str, Any]] = {
    "methodConfig": [
        {
            # Every LockService method. Acquire, Release and CreateSession are safe to repeat only
            # with a request_id: clients using this policy must always set one.
            "name": [{"service": LOCK_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Stops a client from multiplying load on a broker whose etcd is down: once more than half
    # the tokens are spent by failures, retries pause until successes earn them back.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

SERVICE_CONFIG_JSON: Final = json.dumps(SERVICE_CONFIG, indent=2) + "\n"
"""For `grpc.service_config` channel options; identical to docs/service-config.json."""


def main() -> None:
    sys.stdout.write(SERVICE_CONFIG_JSON)


if __name__ == "__main__":
    main()


__all__ = [
    "ALWAYS_IDEMPOTENT",
    "IDEMPOTENT_WITH_REQUEST_ID",
    "SERVICE_CONFIG",
    "SERVICE_CONFIG_JSON",
    "ClientRetryInterceptor",
    "ClientRetryPolicy",
    "DeferredAbort",
    "ServerRetryInterceptor",
    "abort_or_defer",
    "client_may_retry",
    "error_info",
    "error_reason",
    "is_idempotent",
    "retry_attempts",
    "retry_delay",
    "rich_status",
]
