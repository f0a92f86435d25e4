"""Server interceptors built by wrapping the handler's behavior.

grpc.aio calls `intercept_service` once per call with only the method name; the request, the
context and the outcome exist only inside the handler. So each interceptor here returns the
same handler with its behavior wrapped: the first interceptor given to
`grpc.aio.server(interceptors=[...])` is the outermost. For unary calls an interceptor gives its
work as a `Layer` of hooks (before the handler, after it, on failure) and `Chain` runs the layers
of all its interceptors in one wrapper, top to bottom, instead of nesting one coroutine frame per
interceptor; streams nest `wrap_stream` wrappers.

The layers share one `CallState` per call, the way temporalio's interceptors pass one typed input
object down `next`: the outermost lockbroker wrapper replaces grpc's context by a `CallContext`
that delegates to it, carries `.state`, and records the outcome when `abort` or `set_code` run
(as OpenTelemetry's `_OpenTelemetryAioServicerContext` does). Identity writes the principal on
it, the service edge the retry attempts, and audit and the lock span read it when the call ends.
So behaviors keep grpc's `(request, context)` shape, no layer passes data to another through a
ContextVar, and the trailers a layer builds are never parsed back to learn the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias, cast

import grpc
from grpc import aio

from lockbroker.interceptors.principal import ANONYMOUS, DEFAULT_TENANT, Principal

log = logging.getLogger("lockbroker.calls")

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


@dataclass(slots=True)
class CallState:
    """Everything our layers learn about one call, created once by the outermost of them.

    `principal` is ANONYMOUS until identity replaces it, and None when authentication failed.
    `attempts` counts retries after the first attempt (the service edge retries transient
    backend failures). `code`/`reason`/`message` are the outcome as the call ended it; a call
    that returns normally leaves `code` None, which means OK.

    The request id, the deadline and the span are not copied here: the request message,
    `context.time_remaining()` (and, below the edge, `core.backend.call_deadline`) and OTel's
    current span already hold them, each in one place.
    """

    info: CallInfo
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    principal: Principal | None = ANONYMOUS
    attempts: int = 0
    code: grpc.StatusCode | None = None
    reason: str | None = None
    message: str | None = None
    # (API key id, certificate identity) the caller presented, public parts only; identity writes
    # it whether or not they verify, so audit can name what a rejected caller tried.
    credential: tuple[str | None, str | None] | None = None
    # The audit layer's own: the call's RequestReceived record and the future of its write, from
    # its request stage (before the handler) to its completion record (after it).
    audit: Any = None

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal is not None else DEFAULT_TENANT


class CallContext:
    """grpc's servicer context with the call's `state`, recording the outcome as the call ends it.

    Everything but `abort`, `set_code` and `set_details` goes straight to grpc's context. The
    reason comes from the `Trailers` object the aborting layer built (its `.reason`), not from
    parsing the serialized status back.
    """

    __slots__ = ("_context", "state")

    def __init__(self, context: Context, state: CallState) -> None:
        self._context = context
        self.state = state

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> NoReturn:
        state = self.state
        state.code, state.message = code, details or None
        state.reason = getattr(trailing_metadata, "reason", None)
        await self._context.abort(code, details, tuple(trailing_metadata))
        raise AssertionError("abort returned")

    def set_code(self, code: grpc.StatusCode) -> None:
        self.state.code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self.state.message = details or None
        self._context.set_details(details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def scoped(context: Context, info: CallInfo) -> Context:
    """`context` as a CallContext: the outermost wrapper creates the call's state, inner ones reuse it.

    Each wrapper starts with this instead of the chain adding a layer of its own, so sharing the
    state costs no extra frame on the call path.
    """
    if isinstance(context, CallContext):
        return context
    return cast(Context, CallContext(context, CallState(info)))


def state_of(context: Context) -> CallState:
    """The call's state; a fresh one (anonymous, unshared) when no lockbroker layer wrapped the call."""
    state = getattr(context, "state", None)
    if isinstance(state, CallState):
        return state
    method = "/unknown/unknown"
    return CallState(CallInfo(method, "unknown", "unknown", False, False))


# grpc's handler type is generic only in its stubs: these aliases must stay strings at runtime.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


@dataclass(frozen=True, slots=True)
class Layer:
    """One interceptor's part of a unary call, as hooks the chain runs in one frame, top to bottom.

    `before(request, context)` runs in chain order before the handler and may end the call by
    aborting; `after(request, response, context)` runs innermost first once the handler answered,
    and may still abort; `failed(request, context, exc)` runs, innermost first, for every layer when
    the call ends with an exception (an abort included) before a response, whether or not that
    layer's `before` ran, so a rejection by one layer is seen by all (audit records it).
    """

    before: Callable[[Any, Context], Awaitable[None]] | None = None
    after: Callable[[Any, Any, Context], Awaitable[None]] | None = None
    failed: Callable[[Any, Context, BaseException], Awaitable[None]] | None = None


# How long a unary call may take to send its request message after its headers (issue 18, item 7).
FIRST_MESSAGE_TIMEOUT = 10.0


class FirstMessage:
    """Reads a unary call's request message within `timeout` seconds, or ends the call.

    For a unary method grpc reads the request before any interceptor's behavior runs, and waits
    for it as long as the client's deadline, forever without one: a call that sends its headers
    and never its message (no credentials needed) held about 15 KB and was never audited. So
    `Chain` serves unary methods as stream-unary ones, which grpc starts at once, and reads the
    one message here: a call without it within `timeout` ends DEADLINE_EXCEEDED (recorded by audit,
    counted in `timeouts`, and logged at most every `LOG_EVERY` seconds). Nobody is established
    for such a call, so its principal is None, like an unauthenticated call's.
    """

    LOG_EVERY = 10.0

    def __init__(self, timeout: float = FIRST_MESSAGE_TIMEOUT) -> None:
        self.timeout = timeout
        self.timeouts = 0  # calls ended for want of a request message, since start
        self._logged_at = float("-inf")
        self._logged_count = 0

    async def read(self, context: Context) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                request = await context.read()
        except TimeoutError:
            self._count()
            state_of(context).principal = None
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request message within {self.timeout:g}s")
        if request is aio.EOF:  # the client closed its side without sending one
            state_of(context).principal = None
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message")
        return request

    def _count(self) -> None:
        self.timeouts += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY:
            log.warning(
                "%d call(s) sent no request message within %gs; ended DEADLINE_EXCEEDED (%d since start)",
                self.timeouts - self._logged_count,
                self.timeout,
                self.timeouts,
            )
            self._logged_at, self._logged_count = now, self.timeouts


def layered(
    layers: Sequence[Layer], behavior: UnaryBehavior, call: CallInfo, first: FirstMessage | None = None
) -> UnaryBehavior:
    """`behavior` inside `layers` (outermost first), as one wrapper: one frame for all of them.

    With `first`, the wrapper is a stream-unary behavior that reads the request itself (see
    `FirstMessage`), inside the layers' error handling so that audit records a call that never
    sent one."""
    befores = tuple(layer.before for layer in layers if layer.before is not None)
    afters = tuple(layer.after for layer in reversed(layers) if layer.after is not None)
    faileds = tuple(layer.failed for layer in reversed(layers) if layer.failed is not None)

    async def run(request: Any, context: Context) -> Any:
        context = scoped(context, call)
        try:
            if first is not None:
                request = await first.read(context)
            for before in befores:
                await before(request, context)
            response = await behavior(request, context)
        except BaseException as exc:
            for failed in faileds:
                await failed(request, context, exc)
            raise
        for after in afters:
            await after(request, response, context)
        return response

    return run


class WrappingInterceptor(aio.ServerInterceptor):
    """Subclasses give their unary work as a `Layer` (preferred: `Chain` then runs every layer of a
    call in one frame) or override `wrap_unary`, and may override `wrap_stream`; by default none.

    A wrap or a layer must depend only on the method and this interceptor's configuration, never
    on the call: `Chain` builds each method's wrapped handler once and reuses it for every call.
    """

    def layer(self, call: CallInfo) -> Layer | None:
        """This interceptor's hooks for unary calls of `call`'s method, or None to stay out of them."""
        return None

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        layer = self.layer(call)
        return behavior if layer is None else layered((layer,), behavior, call)

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        """Wraps server-streaming behaviors (unary-stream and stream-stream)."""
        return behavior

    def handle_missing(self, method: str) -> Handler | None:
        """A handler for a method no service has; None leaves it to grpc (UNIMPLEMENTED)."""
        return None

    def wrap(self, handler: Handler | None, method: str) -> Handler | None:
        if handler is None:
            return self.handle_missing(method)
        call = CallInfo.of(method, handler)
        h: Any = handler
        if h.unary_unary is not None:
            return h._replace(unary_unary=self.wrap_unary(h.unary_unary, call))  # type: ignore[no-any-return]
        if h.stream_unary is not None:
            return h._replace(stream_unary=self.wrap_unary(h.stream_unary, call))  # type: ignore[no-any-return]
        if h.unary_stream is not None:
            return h._replace(unary_stream=self.wrap_stream(h.unary_stream, call))  # type: ignore[no-any-return]
        return h._replace(stream_stream=self.wrap_stream(h.stream_stream, call))  # type: ignore[no-any-return]

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        return self.wrap(await continuation(handler_call_details), handler_call_details.method)


class Chain(aio.ServerInterceptor):
    """Several wrapping interceptors as one, outermost first, with each method's handler wrapped once.

    grpc.aio runs every interceptor's `intercept_service` coroutine for every call, and each one
    built its wrappers anew; for a broker whose calls are a few hundred microseconds of work,
    that per-call assembly was a visible share of the CPU. Here a call costs one lookup.
    """

    def __init__(
        self, interceptors: Sequence[WrappingInterceptor], first_message_timeout: float | None = FIRST_MESSAGE_TIMEOUT
    ) -> None:
        self.interceptors = tuple(interceptors)
        # None: leave unary calls to grpc, which waits for their message as long as their deadline.
        self.first_message = FirstMessage(first_message_timeout) if first_message_timeout else None
        # method -> (the handler grpc found, the same handler wrapped by the whole chain). Only
        # methods that exist are kept, so callers inventing method names cannot grow it.
        self._wrapped: dict[str, tuple[Handler, Handler | None]] = {}

    def wrap(self, handler: Handler | None, method: str) -> Handler | None:
        h: Any = handler
        unary = h is not None and (h.unary_unary is not None or h.stream_unary is not None)
        if not unary:
            for interceptor in reversed(self.interceptors):
                handler = interceptor.wrap(handler, method)
            return handler
        # Unary: consecutive interceptors that give layers share one wrapper (one frame).
        call = CallInfo.of(method, h)
        field = "unary_unary" if h.unary_unary is not None else "stream_unary"
        behavior: UnaryBehavior = getattr(h, field)
        first = self.first_message if field == "unary_unary" else None
        group: list[Layer] = []
        for interceptor in reversed(self.interceptors):
            if type(interceptor).wrap_unary is WrappingInterceptor.wrap_unary:
                layer = interceptor.layer(call)
                if layer is not None:
                    group.insert(0, layer)
                continue
            if group:
                behavior, group = layered(group, behavior, call), []
            behavior = interceptor.wrap_unary(behavior, call)
        if group or first is not None:
            # The outermost group reads the request: no frame of its own unless the outermost
            # interceptor wraps unary calls itself.
            behavior = layered(group, behavior, call, first)
        if first is not None:
            return h._replace(unary_unary=None, stream_unary=behavior, request_streaming=True)  # type: ignore[no-any-return]
        return h._replace(**{field: behavior})  # type: ignore[no-any-return]

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return self.wrap(None, method)
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def chain(
    interceptors: Sequence[aio.ServerInterceptor], first_message_timeout: float | None = FIRST_MESSAGE_TIMEOUT
) -> list[aio.ServerInterceptor]:
    """`interceptors` with each run of consecutive wrapping interceptors folded into one `Chain`.

    Only the first (outermost) Chain reads unary requests itself (`FirstMessage`): the ones inside
    it get the request as usual. With no wrapping interceptor at all, an empty Chain is added
    last, so the first-message bound holds in every setup."""
    out: list[aio.ServerInterceptor] = []
    run: list[WrappingInterceptor] = []
    timeout = first_message_timeout
    for interceptor in [*interceptors, None]:
        if isinstance(interceptor, WrappingInterceptor):
            run.append(interceptor)
            continue
        if run:
            out.append(Chain(run, timeout))
            run, timeout = [], None
        if interceptor is not None:
            out.append(interceptor)
    if timeout is not None:
        out.append(Chain((), timeout))
    return out


def metadata_value(context: Context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None
