"""Server interceptors built by wrapping the handler's behavior.

grpc.aio calls `intercept_service` once per call with only the method name; the request, the
context and the outcome exist only inside the handler. So each interceptor here returns the
same handler with its behavior wrapped, and the chain is the nesting of those wrappers: the
first interceptor given to `grpc.aio.server(interceptors=[...])` is the outermost. Context
variables set by a wrapper before awaiting the inner behavior are seen by everything inside it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

Context = aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]

# Infrastructure every client and load balancer must reach without credentials or quota.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


@dataclass(frozen=True, slots=True)
class CallInfo:
    method: str  # "/lockbroker.v1.LockService/Acquire"
    service: str  # "lockbroker.v1.LockService"
    name: str  # "Acquire"
    client_streaming: bool
    server_streaming: bool

    @property
    def open(self) -> bool:
        return self.service in OPEN_SERVICES

    @staticmethod
    def of(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> CallInfo:
        service, _, name = method.lstrip("/").partition("/")
        return CallInfo(method, service, name, handler.request_streaming, handler.response_streaming)


class WrappingInterceptor(aio.ServerInterceptor):
    """Subclasses override `wrap_unary` and/or `wrap_stream`; both default to no wrapping."""

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        return behavior

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        """Wraps server-streaming behaviors (unary-stream and stream-stream)."""
        return behavior

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        call = CallInfo.of(handler_call_details.method, handler)
        h: Any = handler
        if h.unary_unary is not None:
            return h._replace(unary_unary=self.wrap_unary(h.unary_unary, call))  # type: ignore[no-any-return]
        if h.stream_unary is not None:
            return h._replace(stream_unary=self.wrap_unary(h.stream_unary, call))  # type: ignore[no-any-return]
        if h.unary_stream is not None:
            return h._replace(unary_stream=self.wrap_stream(h.unary_stream, call))  # type: ignore[no-any-return]
        return h._replace(stream_stream=self.wrap_stream(h.stream_stream, call))  # type: ignore[no-any-return]


def metadata_value(context: Context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None
