"""The gRPC edge: a few lines per RPC over the lock core, like etcd's v3lock service.

The edge owns a failed call: `rpc` retries an idempotent call whose backend failed transiently
(`Unavailable`, but not `ShuttingDown`), records the attempts on the call's state, and maps the
final exception to a status once. The interceptors around it see one call, so audit and tracing
show one call with N attempts and identity and quota are charged once. Which calls may be retried,
and how, is edge_retry.py's (`Idempotency`, `RetryPolicy`, re-exported here for their importers).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc import aio

from lockbroker.interceptors.base import CallInfo, scoped, state_of
from lockbroker.server import convert, status, validation
from lockbroker.server.core.backend import call_deadline
from lockbroker.server.core.errors import (
    FieldViolation,
    InvalidArgument,
    LockBrokerError,
    NotOwner,
    QuotaExceeded,
    SessionNotFound,
    SessionRevoked,
    ShuttingDown,
    Unavailable,
)
from lockbroker.server.core.names import parse_session_id, session_id_of
from lockbroker.server.core.quota import UNLIMITED, QuotaLookup
from lockbroker.server.core.slots import QUOTA_RETRY_AFTER
from lockbroker.server.edge_retry import NO_RETRY, Idempotency, RetryPolicy, _retried, _transient
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.session_stream import SessionStreams
from lockbroker.server.watch import key_range, watch
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

_SERVICE_DESC = lock_pb2.DESCRIPTOR.services_by_name["LockService"]

if TYPE_CHECKING:
    from lockbroker.server.config import LockLimits
    from lockbroker.server.core.locks import LockCore

log = logging.getLogger("lockbroker.server")

Req = TypeVar("Req")
T = TypeVar("T")
Resp = TypeVar("Resp")
Ctx = aio.ServicerContext[object, object]


def tenant_of(context: Ctx) -> str:
    """The tenant the call acts for, as identity wrote it on the call's state."""
    return state_of(context).tenant


def principal_of(context: Ctx) -> str:
    """Who the call acts for within its tenant, as session records keep it (core/owners.py):
    "api-key:<key id>" or "mtls:<identity>"; "" for the anonymous caller."""
    p = state_of(context).principal
    return "" if p is None or p.kind == "anonymous" else f"{p.kind}:{p.id}"


def _deadline(context: Ctx) -> None:
    left = context.time_remaining()
    call_deadline.set(None if left is None else time.monotonic() + left)


async def _fail(context: Ctx, exc: Exception, method: str) -> None:
    """End a call with the status of `exc`.

    Domain errors become their documented status; anything else is a bug, logged with its stack
    under an incident id, and the caller gets INTERNAL with that id and nothing more. (The
    context's `abort` records code and reason on the call's state from the trailers object.)
    """
    if isinstance(exc, LockBrokerError):
        await context.abort(*status.to_status(exc))
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


def add_to_server(service: object, server: aio.Server, desc: ServiceDescriptor = _SERVICE_DESC) -> None:
    """Register `service` (LockService, AdminService, ElectionService: any of our services) like the
    generated add_<Service>Servicer_to_server, with single requests deserialized by `_tolerant`
    (client streams read their messages in the handler: see `_until_draining`)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in desc.methods:
        request: Any = GetMessageClass(m.input_type)
        response: Any = GetMessageClass(m.output_type)
        behavior = getattr(service, m.name)
        if m.client_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )
        elif m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(request.FromString),
                response_serializer=response.SerializeToString,
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(request.FromString),
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


Handler = Callable[[Any, Req, Ctx], Awaitable[Resp]]
SERVICE = _SERVICE_DESC.full_name


def _call_info(name: str, *, streaming: bool, service: str = SERVICE) -> CallInfo:
    return CallInfo(f"/{service}/{name}", service, name, streaming, streaming)


def rpc(
    service: ServiceDescriptor = _SERVICE_DESC,
) -> Callable[[Handler[Req, Resp]], Callable[[Any, Req, Ctx], Coroutine[Any, Any, Resp]]]:
    """Give a unary handler its deadline, retry it per its method's idempotency in lock.proto
    (`Idempotency.of`) and the servicer's `retry` policy, and turn its final error into a status
    with details.

    The servicer provides `draining: bool` and `retry: RetryPolicy`. The first attempt runs bare:
    tenacity's bookkeeping costs about as much as the rest of the chain, and almost every call
    succeeds at once.
    """

    def decorate(handler: Handler[Req, Resp]) -> Callable[[Any, Req, Ctx], Coroutine[Any, Any, Resp]]:
        info = _call_info(handler.__name__, streaming=False, service=service.full_name)
        idempotency = Idempotency.of(handler.__name__, service)

        @functools.wraps(handler)
        async def wrapped(self: Any, request: Req, context: Ctx) -> Resp:
            context = scoped(context, info)  # the chain's state, or this call's own without a chain
            _deadline(context)
            try:
                if self.draining:
                    raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
                if isinstance(request, Malformed):
                    raise InvalidArgument(
                        [FieldViolation("request", f"is not a valid request message: {request.error}")]
                    )
                try:
                    return await handler(self, request, context)
                except Unavailable as first:
                    policy: RetryPolicy = self.retry
                    if policy.max_attempts == 1 or not _transient(first) or not idempotency.holds_for(request):
                        raise
                    return await _retried(
                        lambda: handler(self, request, context), first, policy, state_of(context), context
                    )
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await _fail(context, exc, handler.__name__)
            raise AssertionError("abort returned")

        return wrapped

    return decorate


_KEEPALIVE = _call_info("KeepAlive", streaming=True)
_SESSION = _call_info("Session", streaming=True)
_WATCH = CallInfo(f"/{SERVICE}/Watch", SERVICE, "Watch", False, True)


class LockService(lock_pb2_grpc.LockServiceServicer):
    def __init__(
        self,
        core: LockCore,
        limits: LockLimits,
        retry: RetryPolicy = NO_RETRY,
        quotas: QuotaLookup = lambda _t: UNLIMITED,
    ) -> None:
        self.core = core
        self.limits = limits
        self.retry = retry
        self.draining = False
        self.quotas = quotas
        self._streams: Counter[str] = Counter()  # KeepAlive streams open on this replica, per tenant
        self.sessions = SessionStreams(self)

    @rpc()
    async def CreateSession(
        self, request: lock_pb2.CreateSessionRequest, context: Ctx
    ) -> lock_pb2.CreateSessionResponse:
        ttl, owner, request_id = validation.create_session(request, self.limits)
        s = await self.core.create_session(tenant_of(context), ttl, owner, request_id, principal_of(context))
        ttl_pb, expires = convert.session(s)
        return lock_pb2.CreateSessionResponse(session_id=s.session_id, ttl=ttl_pb, expires_at=expires)

    @rpc()
    async def Refresh(self, request: lock_pb2.RefreshRequest, context: Ctx) -> lock_pb2.RefreshResponse:
        lease = validation.session_id(request.session_id)
        s = await self.core.refresh(tenant_of(context), lease, principal=principal_of(context))
        ttl_pb, expires = convert.session(s)
        return lock_pb2.RefreshResponse(ttl=ttl_pb, expires_at=expires, revoked=convert.revoked(s.revoked))

    @rpc()
    async def CloseSession(self, request: lock_pb2.CloseSessionRequest, context: Ctx) -> lock_pb2.CloseSessionResponse:
        lease = validation.session_id(request.session_id)
        closed = await self.core.close_session(tenant_of(context), lease, principal_of(context))
        return lock_pb2.CloseSessionResponse(closed=closed)

    @rpc()
    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Ctx) -> lock_pb2.AcquireResponse:
        g = await self.core.acquire(tenant_of(context), validation.acquire(request, self.limits, principal_of(context)))
        return lock_pb2.AcquireResponse(
            grant=convert.grant(g), waited=convert.dur(g.waited), queue_position=g.queue_position
        )

    @rpc()
    async def AcquireMany(self, request: lock_pb2.AcquireManyRequest, context: Ctx) -> lock_pb2.AcquireManyResponse:
        p = validation.acquire_many(request, self.limits, principal_of(context))
        grants = await self.core.acquire_many(tenant_of(context), p)
        waited = sum(g.waited for g in grants)  # one lock after the other
        return lock_pb2.AcquireManyResponse(grants=[convert.grant(g) for g in grants], waited=convert.dur(waited))

    @rpc()
    async def Release(self, request: lock_pb2.ReleaseRequest, context: Ctx) -> lock_pb2.ReleaseResponse:
        name, token, lease = validation.release(request, self.limits)
        released, holds_left = await self.core.release_claim(
            tenant_of(context), name, token, lease, request.request_id, principal=principal_of(context)
        )
        return lock_pb2.ReleaseResponse(released=released, holds_left=holds_left)

    @rpc()
    async def Describe(self, request: lock_pb2.DescribeRequest, context: Ctx) -> lock_pb2.DescribeResponse:
        state = await self.core.describe(tenant_of(context), validation.describe(request, self.limits))
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
                    fencing_token=w.create_revision,
                    request_id=w.request_id,
                    mode=convert.mode(w.value.shared),
                )
                for i, w in enumerate(state.waiters, start=1)
            ],
            # The first holder's session expiry is read; the others' would cost a read each.
            holders=[
                convert.holder(h, state.holder_expires_at if i == 0 else None) for i, h in enumerate(state.holders)
            ],
            limit=state.limit,
        )
        if state.holder is not None:
            resp.holder.CopyFrom(convert.holder(state.holder, state.holder_expires_at))
        if state.delay_until:
            resp.delay_until.CopyFrom(convert.ts(state.delay_until))
        return resp

    @rpc()
    async def List(self, request: lock_pb2.ListRequest, context: Ctx) -> lock_pb2.ListResponse:
        prefix, size, after = validation.list_locks(request, self.limits)
        page = await self.core.list(tenant_of(context), prefix, size, after)
        token = base64.urlsafe_b64encode(page.next_page_token.encode()).decode() if page.next_page_token else ""
        return lock_pb2.ListResponse(
            next_page_token=token,
            locks=[
                lock_pb2.HeldLock(name=h.name, holder=convert.holder(h.holder), waiters=h.waiters) for h in page.locks
            ],
        )

    @rpc()
    async def CheckFence(self, request: lock_pb2.CheckFenceRequest, context: Ctx) -> lock_pb2.CheckFenceResponse:
        name, token = validation.check_fence(request, self.limits)
        fence = await self.core.check_fence(tenant_of(context), name, token)
        status = lock_pb2.FENCE_STATUS_CURRENT if fence.current else lock_pb2.FENCE_STATUS_STALE
        return lock_pb2.CheckFenceResponse(status=status, current_fencing_token=fence.holder_token)

    async def Watch(self, request: lock_pb2.WatchRequest, context: Ctx) -> AsyncIterator[lock_pb2.WatchResponse]:
        """Lock events of one lock or name prefix of the caller's tenant: see watch.py."""
        context = scoped(context, _WATCH)
        tenant, opened = tenant_of(context), False
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation("request", f"is not a valid request message: {request.error}")])
            name, prefix, start = validation.watch(request, self.limits)
            backend = self.core.backend
            if not isinstance(backend, EtcdLockBackend):  # the memory backend keeps no event history
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch needs the etcd backend")
            if self.draining:
                raise ShuttingDown("the broker is shutting down; watch again on another replica", retry_after=0.5)
            self._open_stream(tenant)  # a Watch holds what a KeepAlive stream holds: the same max_streams
            opened = True
            ks = self.core.keyspace(tenant)
            async for response in watch(backend, ks, key_range(ks, name, prefix), start, self.core.closing):
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _fail(context, exc, "Watch")
        finally:
            if opened:
                self._close_stream(tenant)

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
        context = scoped(context, _KEEPALIVE)
        tenant, principal = tenant_of(context), principal_of(context)
        owned: set[int] = set()  # sessions of this tenant (and this principal) already seen on this stream
        opened = False
        try:
            if self.draining:
                raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
            self._open_stream(tenant)
            opened = True
            async for req in self._until_draining(request_iterator):
                _deadline(context)
                validation.keepalive(req)
                lease = parse_session_id(req.session_id)
                try:
                    if isinstance(lease, FieldViolation):
                        raise SessionNotFound(lease.description)
                    s = await self.core.refresh(tenant, lease, owner_known=lease in owned, principal=principal)
                    owned.add(lease)
                except (SessionNotFound, NotOwner) as e:
                    # One gone (or never valid, or another principal's) session must not end the
                    # stream the others share; a session that is not the caller's is not refreshed.
                    if isinstance(lease, int):
                        owned.discard(lease)
                    gone = lock_pb2.KeepAliveResponse(session_id=req.session_id, expired=True)
                    if isinstance(e, SessionRevoked):
                        gone.revoked.add(reason=e.reason, message=e.metadata.get("admin_reason", ""))
                    yield gone
                    continue
                ttl_pb, expires = convert.session(s)
                yield lock_pb2.KeepAliveResponse(
                    session_id=req.session_id, ttl=ttl_pb, expires_at=expires, revoked=convert.revoked(s.revoked)
                )
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _fail(context, exc, "KeepAlive")
        finally:
            if opened:
                self._close_stream(tenant)

    def _close_stream(self, tenant: str) -> None:
        self._streams[tenant] -= 1
        if not self._streams[tenant]:
            del self._streams[tenant]

    def _open_stream(self, tenant: str) -> None:
        """Count a KeepAlive stream against the tenant's max_streams on this replica, or refuse it.

        Each open stream holds grpc buffers and a task; the rate limit bounds how fast streams are
        opened, this bounds how many stay open."""
        limit = self.quotas(tenant).max_streams
        if limit and self._streams[tenant] >= limit:
            raise QuotaExceeded(
                tenant,
                "max_streams",
                limit,
                f"tenant {tenant!r} already has {limit} KeepAlive or Session streams open on this replica; "
                "one stream carries any number of sessions",
                QUOTA_RETRY_AFTER,
            )
        self._streams[tenant] += 1

    async def Session(
        self, request_iterator: AsyncIterator[lock_pb2.SessionRequest], context: Ctx
    ) -> AsyncIterator[lock_pb2.SessionResponse]:
        """Sessions and lock operations as messages on one stream: see session_stream.py."""
        context = scoped(context, _SESSION)
        tenant = tenant_of(context)
        responses = self.sessions.serve(request_iterator, context)
        opened = False
        try:
            if self.draining:
                raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
            # A Session stream holds what a KeepAlive stream holds, and more: the same max_streams.
            self._open_stream(tenant)
            opened = True
            async for response in responses:
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _fail(context, exc, "Session")
        finally:
            await responses.aclose()
            if opened:
                self._close_stream(tenant)


# NO_RETRY, Idempotency and RetryPolicy are edge_retry.py's, re-exported: admin_service, election_service,
# app, tests and bench/micro.py import them from here.
__all__ = [
    "NO_RETRY",
    "SERVICE",
    "Ctx",
    "Idempotency",
    "LockService",
    "Malformed",
    "RetryPolicy",
    "add_to_server",
    "principal_of",
    "rpc",
    "tenant_of",
]
