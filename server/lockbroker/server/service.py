"""The gRPC edge: a few lines per RPC over the lock core, like etcd's v3lock service."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from lockbroker.interceptors.retry import DeferredAbort, abort_or_defer
from lockbroker.interceptors.tenancy import tenant_of
from lockbroker.server import convert, status, validation
from lockbroker.server.core.backend import call_deadline
from lockbroker.server.core.errors import (
    FieldViolation,
    InvalidArgument,
    LockBrokerError,
    SessionNotFound,
    ShuttingDown,
)
from lockbroker.server.core.names import parse_session_id, session_id_of
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

if TYPE_CHECKING:
    from lockbroker.server.config import LockLimits
    from lockbroker.server.core.locks import LockCore

log = logging.getLogger("lockbroker.server")

Req = TypeVar("Req")
T = TypeVar("T")
Resp = TypeVar("Resp")
Ctx = aio.ServicerContext[object, object]


def _deadline(context: Ctx) -> None:
    left = context.time_remaining()
    call_deadline.set(None if left is None else time.monotonic() + left)


async def _fail(context: Ctx, exc: Exception, method: str) -> None:
    """End a call with the status of `exc`.

    Domain errors become their documented status (under the retry interceptor this raises
    DeferredAbort instead of aborting, so the call can run again); anything else is a bug, logged
    with its stack under an incident id, and the caller gets INTERNAL with that id and nothing more.
    """
    if isinstance(exc, LockBrokerError):
        await abort_or_defer(context, *status.to_status(exc))
        return
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(*status.internal(incident))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Malformed:
    """A request body that did not parse (e.g. a string field holding invalid UTF-8).

    grpcio answers a deserializer's exception itself, with UNKNOWN and no details, before any of
    our code runs. So the deserializer hands this to the handler instead, and `rpc` answers
    INVALID_ARGUMENT like any other bad input.
    """

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(str(e))

    return deserialize


def add_to_server(service: LockService, server: aio.Server) -> None:
    """Register `service` like the generated add_LockServiceServicer_to_server, with unary requests
    deserialized by `_tolerant` (streams read their messages in the handler: see `_until_draining`)."""
    desc = lock_pb2.DESCRIPTOR.services_by_name["LockService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in desc.methods:
        request: Any = getattr(lock_pb2, m.input_type.name)
        response: Any = getattr(lock_pb2, m.output_type.name)
        behavior = getattr(service, m.name)
        if m.client_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(request.FromString),
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def rpc(
    handler: Callable[[LockService, Req, Ctx], Awaitable[Resp]],
) -> Callable[[LockService, Req, Ctx], Coroutine[Any, Any, Resp]]:
    """Give a unary handler its deadline, and turn every error into a status with details."""

    @functools.wraps(handler)
    async def wrapped(self: LockService, request: Req, context: Ctx) -> Resp:
        _deadline(context)
        try:
            if self.draining:
                raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation("request", f"is not a valid request message: {request.error}")])
            return await handler(self, request, context)
        except (aio.AbortError, asyncio.CancelledError, DeferredAbort):
            raise
        except Exception as exc:
            await _fail(context, exc, handler.__name__)
        raise AssertionError("abort returned")

    return wrapped


class LockService(lock_pb2_grpc.LockServiceServicer):
    def __init__(self, core: LockCore, limits: LockLimits) -> None:
        self.core = core
        self.limits = limits
        self.draining = False

    @rpc
    async def CreateSession(
        self, request: lock_pb2.CreateSessionRequest, context: Ctx
    ) -> lock_pb2.CreateSessionResponse:
        ttl, owner, request_id = validation.create_session(request, self.limits)
        s = await self.core.create_session(tenant_of(context), ttl, owner, request_id)
        ttl_pb, expires = convert.session(s)
        return lock_pb2.CreateSessionResponse(session_id=s.session_id, ttl=ttl_pb, expires_at=expires)

    @rpc
    async def Refresh(self, request: lock_pb2.RefreshRequest, context: Ctx) -> lock_pb2.RefreshResponse:
        s = await self.core.refresh(tenant_of(context), validation.session_id(request.session_id))
        ttl_pb, expires = convert.session(s)
        return lock_pb2.RefreshResponse(ttl=ttl_pb, expires_at=expires)

    @rpc
    async def CloseSession(self, request: lock_pb2.CloseSessionRequest, context: Ctx) -> lock_pb2.CloseSessionResponse:
        closed = await self.core.close_session(tenant_of(context), validation.session_id(request.session_id))
        return lock_pb2.CloseSessionResponse(closed=closed)

    @rpc
    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Ctx) -> lock_pb2.AcquireResponse:
        g = await self.core.acquire(tenant_of(context), validation.acquire(request, self.limits))
        return lock_pb2.AcquireResponse(
            grant=convert.grant(g), waited=convert.dur(g.waited), queue_position=g.queue_position
        )

    @rpc
    async def Release(self, request: lock_pb2.ReleaseRequest, context: Ctx) -> lock_pb2.ReleaseResponse:
        name, token, lease = validation.release(request)
        return lock_pb2.ReleaseResponse(released=await self.core.release(tenant_of(context), name, token, lease))

    @rpc
    async def Describe(self, request: lock_pb2.DescribeRequest, context: Ctx) -> lock_pb2.DescribeResponse:
        state = await self.core.describe(tenant_of(context), validation.describe(request))
        now = time.time()
        resp = lock_pb2.DescribeResponse(
            name=state.name,
            waiters=[
                lock_pb2.Waiter(
                    position=i,
                    owner=w.owner,
                    session_id=session_id_of(w.lease),
                    since=convert.ts(w.value.queued_at),
                    waited=convert.dur(max(0.0, now - w.value.queued_at)),
                )
                for i, w in enumerate(state.waiters, start=1)
            ],
        )
        if state.holder is not None:
            resp.holder.CopyFrom(convert.holder(state.holder, state.holder_expires_at))
        return resp

    @rpc
    async def List(self, request: lock_pb2.ListRequest, context: Ctx) -> lock_pb2.ListResponse:
        prefix, size, after = validation.list_locks(request)
        page = await self.core.list(tenant_of(context), prefix, size, after)
        token = base64.urlsafe_b64encode(page.next_page_token.encode()).decode() if page.next_page_token else ""
        return lock_pb2.ListResponse(
            next_page_token=token,
            locks=[
                lock_pb2.HeldLock(name=h.name, holder=convert.holder(h.holder), waiters=h.waiters) for h in page.locks
            ],
        )

    async def _until_draining(self, requests: AsyncIterator[T]) -> AsyncIterator[T]:
        """The stream's requests, ending with SHUTTING_DOWN when the broker begins to drain, so
        clients move their keepalives to another replica while their sessions are still alive."""
        it = aiter(requests)
        closing = self.core.closing
        while True:
            nxt = asyncio.ensure_future(anext(it))
            # However the call ends, the read's outcome is retrieved (a cancelled call can leave it
            # finished with StopAsyncIteration that nobody reads, which asyncio logs as an error).
            nxt.add_done_callback(_retrieve)
            waits: set[asyncio.Future[Any]] = {nxt, closing}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pending = not nxt.done()
                if pending:
                    nxt.cancel()
            if pending:
                raise ShuttingDown("the broker is shutting down; reconnect to another replica", retry_after=0.5)
            try:
                request = nxt.result()
            except StopAsyncIteration:
                return
            except DecodeError as e:
                # grpc deserializes stream messages as we read them, so a malformed one surfaces here.
                raise InvalidArgument([FieldViolation("request", f"is not a valid request message: {e}")]) from None
            yield request

    async def KeepAlive(
        self, request_iterator: AsyncIterator[lock_pb2.KeepAliveRequest], context: Ctx
    ) -> AsyncIterator[lock_pb2.KeepAliveResponse]:
        tenant = tenant_of(context)
        owned: set[int] = set()  # sessions of this tenant already seen on this stream
        try:
            if self.draining:
                raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
            async for req in self._until_draining(request_iterator):
                _deadline(context)
                lease = parse_session_id(req.session_id)
                try:
                    if isinstance(lease, FieldViolation):
                        raise SessionNotFound(lease.description)
                    s = await self.core.refresh(tenant, lease, owner_known=lease in owned)
                    owned.add(lease)
                except SessionNotFound:
                    # One gone (or never valid) session must not end the stream the others share.
                    if isinstance(lease, int):
                        owned.discard(lease)
                    yield lock_pb2.KeepAliveResponse(session_id=req.session_id, expired=True)
                    continue
                ttl_pb, expires = convert.session(s)
                yield lock_pb2.KeepAliveResponse(session_id=req.session_id, ttl=ttl_pb, expires_at=expires)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _fail(context, exc, "KeepAlive")
