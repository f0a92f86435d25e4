"""Lock attributes on the server span: what a lock operation means, for the trace.

`LockSpanInterceptor` adds the tenant, lock name, fencing token, how long an Acquire waited and its
queue position, the request id, the error reason and how often the call was retried (the service
edge adds one span event per retry), all read from the request, the response and the call's
`CallState` when the call ends. The OTel SDK and the server span itself are set up by
`lockbroker.server.telemetry`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.message import Message
from opentelemetry import trace

from lockbroker.interceptors.base import (
    CallInfo,
    Context,
    Layer,
    StreamBehavior,
    WrappingInterceptor,
    scoped,
    state_of,
)

# --- lock attributes ----------------------------------------------------------------------------


def _duration_ms(value: Any) -> float:
    return float(value.seconds * 1000 + value.nanos / 1e6)


def _request_attributes(request: object) -> dict[str, str | int]:
    if not isinstance(request, Message):
        return {}
    fields = request.DESCRIPTOR.fields_by_name
    attrs: dict[str, str | int] = {}
    for attr, name in (
        ("lockbroker.lock.name", "name"),
        ("lockbroker.session_id", "session_id"),
        ("lockbroker.fencing_token", "fencing_token"),
        ("lockbroker.request_id", "request_id"),
    ):
        if name in fields and (value := getattr(request, name)):
            attrs[attr] = value
    # Shared claims and semaphores (issue 17): the mode by its enum name, the semaphore's limit.
    r: Any = request
    mode_field = fields.get("mode")
    if mode_field is not None and mode_field.enum_type is not None and r.mode:
        known = mode_field.enum_type.values_by_number.get(r.mode)
        attrs["lockbroker.lock.mode"] = known.name if known is not None else r.mode
    if "limit" in fields and r.limit:
        attrs["lockbroker.lock.limit"] = r.limit
    if "locks" in fields and r.locks:  # AcquireMany
        attrs["lockbroker.lock.names"] = ",".join(c.name for c in r.locks)
    return attrs


def _response_attributes(response: object) -> dict[str, str | int | float]:
    if not isinstance(response, Message):
        return {}
    fields = response.DESCRIPTOR.fields_by_name
    attrs: dict[str, str | int | float] = {}
    r: Any = response
    if "grant" in fields and r.HasField("grant"):
        attrs["lockbroker.fencing_token"] = r.grant.fencing_token
        attrs["lockbroker.lock.name"] = r.grant.name
        attrs["lockbroker.session_id"] = r.grant.session_id
    if "waited" in fields and r.HasField("waited"):
        attrs["lockbroker.waited_ms"] = _duration_ms(r.waited)
    if "queue_position" in fields:
        attrs["lockbroker.queue_position"] = r.queue_position
    if "session_id" in fields and r.session_id:
        attrs["lockbroker.session_id"] = r.session_id
    return attrs


async def _responses(result: Any) -> AsyncIterator[Any]:
    # A stream handler may write with context.write() and return a coroutine instead.
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


async def _annotate_request(request: Any, context: Context) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_request_attributes(request))


def _annotate_state(span: trace.Span, context: Context) -> None:
    state = state_of(context)
    if state.principal is not None:  # None: authentication failed, the call acts for nobody
        span.set_attribute("lockbroker.tenant", state.tenant)
    if state.attempts:
        span.set_attribute("lockbroker.retry_attempts", state.attempts)


async def _annotate_response(request: Any, response: Any, context: Context) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _annotate_state(span, context)
        span.set_attributes(_response_attributes(response))


async def _annotate_failure(request: Any, context: Context, exc: BaseException) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _annotate_state(span, context)
        if reason := state_of(context).reason:
            span.set_attribute("lockbroker.error.reason", reason)


_LOCK_SPAN = Layer(before=_annotate_request, after=_annotate_response, failed=_annotate_failure)


class LockSpanInterceptor(WrappingInterceptor):
    """Lock attributes on the current (server) span, from the request, the response and the call's state.

    The tenant, the error reason and the retry attempts are read from the `CallState` when the
    call ends, so this layer may sit anywhere inside the OTel interceptor. A no-op when the span
    is not recording, so it may stay in the chain with tracing off.
    """

    def layer(self, call: CallInfo) -> Layer | None:
        return None if call.open else _LOCK_SPAN

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        if call.open:
            return behavior

        async def annotated(request: Any, context: Context) -> AsyncIterator[Any]:
            span = trace.get_current_span()
            if not span.is_recording():
                async for response in _responses(behavior(request, context)):
                    yield response
                return
            context = scoped(context, call)
            state = state_of(context)
            sent = 0
            try:
                async for response in _responses(behavior(request, context)):
                    sent += 1
                    yield response
            finally:
                span.set_attribute("lockbroker.tenant", state.tenant)
                span.set_attribute("lockbroker.messages_sent", sent)

        return annotated


__all__ = ["LockSpanInterceptor"]
