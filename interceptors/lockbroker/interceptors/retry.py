"""Retrying transient failures in Python clients, and the retry policy for other languages.

`ClientRetryInterceptor` re-sends the same request object (the same bytes, so the same
request_id) on UNAVAILABLE, and on RESOURCE_EXHAUSTED only when the server attached a
google.rpc.RetryInfo; `SERVICE_CONFIG` is the equivalent retry policy for gRPC clients in other
languages (`python -m lockbroker.interceptors.retry` prints docs/service-config.json).

The broker's own retry of transient etcd failures lives in the service edge
(`lockbroker.server.service.rpc`), the one layer that knows which calls are idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from grpc import aio
from opentelemetry import trace

from lockbroker.interceptors.rpcstatus import error_reason, retry_delay

log = logging.getLogger("lockbroker.retry")

LOCK_SERVICE: Final = "lockbroker.v1.LockService"

# Idempotent however often they are repeated.
ALWAYS_IDEMPOTENT: Final = frozenset({"Refresh", "Describe", "List", "CloseSession"})
# Idempotent only through the request_id the broker remembers; without one a repeat could take a
# second lock entry or a second session.
IDEMPOTENT_WITH_REQUEST_ID: Final = frozenset({"Acquire", "Release", "CreateSession"})

_rng = random.SystemRandom()  # forked workers must not share a jitter sequence


def is_idempotent(method_name: str, request: object) -> bool:
    """Whether repeating this LockService call with the same request cannot change the outcome."""
    if method_name in ALWAYS_IDEMPOTENT:
        return True
    if method_name in IDEMPOTENT_WITH_REQUEST_ID:
        return bool(getattr(request, "request_id", ""))
    return False


def _span_event(name: str, attributes: Mapping[str, str | int | float]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, dict(attributes))


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
    "client_may_retry",
    "error_reason",
    "is_idempotent",
    "retry_delay",
]
