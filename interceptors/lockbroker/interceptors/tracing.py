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
    StreamBehavior,
    UnaryBehavior,
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


class LockSpanInterceptor(WrappingInterceptor):
    """Lock attributes on the current (server) span, from the request, the response and the call's state.

    The tenant, the error reason and the retry attempts are read from the `CallState` when the
    call ends, so this layer may sit anywhere inside the OTel interceptor. A no-op when the span
    is not recording, so it may stay in the chain with tracing off.
    """

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        if call.open:
            return behavior

        async def annotated(request: Any, context: Context) -> Any:
            span = trace.get_current_span()
            if not span.is_recording():
                return await behavior(request, context)
            context = scoped(context, call)
            state = state_of(context)
            span.set_attributes(_request_attributes(request))
            try:
                response = await behavior(request, context)
            except BaseException:
                if state.reason:
                    span.set_attribute("lockbroker.error.reason", state.reason)
                raise
            finally:
                span.set_attribute("lockbroker.tenant", state.tenant)
                if state.attempts:
                    span.set_attribute("lockbroker.retry_attempts", state.attempts)
            span.set_attributes(_response_attributes(response))
            return response

        return annotated

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
