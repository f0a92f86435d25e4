"""The Session stream: sessions and their lock operations as messages on one bidirectional stream.

A message on an open stream costs the broker about a third of a unary call
(measured on the project machine: ~160 us against ~525 us of server CPU), so a client that
acquires and releases many times goes several times further on one stream. The semantics are
the unary RPCs', by construction rather than by copy: each message is served by the service's
own unary handler (`LockService.Acquire`...: its validation, retry, draining and the one error
mapping in `status`), inside the unary layers of every `per_message` interceptor of the chain
(`Chain.wrap_message`: audit record, lock span attributes, acquire rate, lock metrics), with a
`CallState` of its own that carries the stream's principal (identity ran once, for the stream).
A layer or handler that aborts ends only its message: `MessageContext.abort` turns the status it
would have sent (the google.rpc.Status in the trailers the layer built) into the answer.

Requests run concurrently, one task each, and answers go out as they are ready, matched by the
client's id; so a waiting acquire never holds up a release on the same stream. When the stream
ends every task still running is cancelled, which is exactly a cancelled unary call to the core
(its queue entry is removed), while the sessions themselves live on until their TTL: a client
resumes them on a new stream (`OpenSession.resume`), as Chubby and etcd clients keep a session
across a reconnect within its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace

from lockbroker.interceptors.base import CallInfo, CallState, Context, scoped, state_of
from lockbroker.server import status
from lockbroker.server.core.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    LockBrokerError,
    QuotaExceeded,
    ShuttingDown,
)
from lockbroker.server.message_context import MessageAborted, MessageContext, StreamFacts, _answer_status, error_status
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from lockbroker.server.service import LockService

log = logging.getLogger("lockbroker.server")

SERVICE = "lockbroker.v1.LockService"
SESSION_INFO = CallInfo(f"/{SERVICE}/Session", SERVICE, "Session", True, True)
# Requests of one stream in flight at once: each is a task and, for an acquire, an etcd watch.
MAX_IN_FLIGHT = 1024
# A message's deadline when its stream has none, on top of an acquire's wait_timeout: what the
# Python client gives a unary call by default (Client.default_timeout).
MESSAGE_TIMEOUT = 30.0
_GONE = frozenset({ErrorReason.SESSION_NOT_FOUND, ErrorReason.SESSION_LOST})
# Batches (lock.proto, `rpc Session`): the call metadata a client asks for batched answers with,
# and the initial metadata that says this broker takes batched requests.
BATCH_METADATA = ("lockbroker-batch", "1")
# Requests in one batched request, and answers in one batched answer. An answer batch also stops
# near BATCH_BYTES, well under grpc's default 4 MiB message limit of the client's side.
MAX_BATCH = 1024
BATCH_BYTES = 1 << 20

Behavior = Callable[[Any, Context], Awaitable[Any]]
_NO_SPAN = contextlib.nullcontext()


@dataclass(frozen=True, slots=True)
class _Kind:
    info: CallInfo
    answer: str  # the SessionResponse field of the answer


def _kind(message: str, unary: str, answer: str) -> _Kind:
    # name: the unary method's, so per-method layers (lock metrics) treat the message like it;
    # method: its own, so the audit record and the span say it came over the stream.
    return _Kind(CallInfo(f"/{SERVICE}/Session/{message}", SERVICE, unary, False, False), answer)


OPEN = _kind("Open", "CreateSession", "open")
ACQUIRE = _kind("Acquire", "Acquire", "acquire")
ACQUIRE_MANY = _kind("AcquireMany", "AcquireMany", "acquire_many")
RELEASE = _kind("Release", "Release", "release")
KEEPALIVE = _kind("KeepAlive", "Refresh", "keepalive")
CLOSE = _kind("Close", "CloseSession", "close")


def _dur(value: Any) -> float:
    return float(value.seconds + value.nanos / 1e9)


class SessionStreams:
    """Serves Session streams for `service`; see the module docstring."""

    def __init__(
        self, service: LockService, max_in_flight: int = MAX_IN_FLIGHT, message_timeout: float = MESSAGE_TIMEOUT
    ) -> None:
        self.service = service
        self.max_in_flight = max_in_flight
        self.message_timeout = message_timeout
        # Set (by the Broker) when tracing is on: each message gets a server span of its own.
        self.tracer: trace.Tracer | None = None
        # The context of a message's timer and done callback: they touch no context variable,
        # and a copy of the reader's context each (asyncio's default) would live as long as the
        # message. One per broker, not per process: a context is entered by one thread at a time.
        self.bare = contextvars.Context()

    async def _resume(self, request: lock_pb2.RefreshRequest, context: Context) -> lock_pb2.CreateSessionResponse:
        r = await self.service.Refresh(request, context)
        return lock_pb2.CreateSessionResponse(session_id=request.session_id, ttl=r.ttl, expires_at=r.expires_at)

    def route(self, req: lock_pb2.SessionRequest) -> tuple[_Kind, Behavior, Any]:
        """What serves `req`: raises InvalidArgument (with BadRequest) for a bad envelope."""
        s = self.service
        which = req.WhichOneof("kind")
        if which == "acquire":
            return ACQUIRE, s.Acquire, req.acquire
        if which == "acquire_many":
            return ACQUIRE_MANY, s.AcquireMany, req.acquire_many
        if which == "release":
            return RELEASE, s.Release, req.release
        if which == "keepalive":
            return KEEPALIVE, s.Refresh, req.keepalive
        if which == "close":
            return CLOSE, s.CloseSession, req.close
        if which == "open":
            how = req.open.WhichOneof("kind")
            if how == "create":
                return OPEN, s.CreateSession, req.open.create
            if how == "resume":
                return OPEN, self._resume, lock_pb2.RefreshRequest(session_id=req.open.resume)
            raise InvalidArgument([FieldViolation("open", "must set one of create or resume")])
        raise InvalidArgument(
            [FieldViolation("kind", "must set one of open, acquire, acquire_many, release, keepalive or close")]
        )

    def deadline(self, kind: _Kind, req: lock_pb2.SessionRequest, request: Any, context: Context) -> float:
        """When a message's work must be answered: its own `timeout` (a unary call's deadline),
        else the default budget; never past the stream's deadline."""
        timeout = req.timeout  # unset reads as zero: the default, as the proto says
        if timeout.seconds or timeout.nanos:
            budget = _dur(timeout)
        else:
            budget = self.message_timeout
            if (kind is ACQUIRE or kind is ACQUIRE_MANY) and request.HasField("wait_timeout"):
                budget += max(0.0, _dur(request.wait_timeout))
        left = context.time_remaining()
        if left is not None:
            budget = min(budget, left)
        return time.monotonic() + budget

    async def serve(
        self, requests: AsyncIterator[lock_pb2.SessionRequest], context: Context
    ) -> AsyncGenerator[lock_pb2.SessionResponse, None]:
        """The stream's answers and events; raises (for the edge to map) what ends the stream."""
        stream = _Stream(self, scoped(context, SESSION_INFO))
        batches = BATCH_METADATA in (context.invocation_metadata() or ())
        if batches:
            # Before any answer, so the client knows it may send batches from its next write on.
            await context.send_initial_metadata((BATCH_METADATA,))
        reader = asyncio.create_task(stream.read(requests))
        reader.add_done_callback(_retrieve)
        stream.reader = reader
        out = stream.out
        held: _Out | _Nothing = _NOTHING  # taken from the queue, not yet sent
        try:
            while True:
                if held is _NOTHING:
                    item = await out.get()
                else:
                    item, held = cast(_Out, held), _NOTHING
                if batches and not out.empty() and isinstance(item, lock_pb2.SessionResponse):
                    # What was answered while the last write was in flight goes out as one
                    # message: the message costs both sides far more than its answers do.
                    item, held = _answers(item, out)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Client gone, stream cancelled or failed: cancel what still runs (a waiting acquire's
            # entry is removed as for a cancelled unary Acquire) and wait for that clean-up.
            running = [reader, *stream.tasks.values()]
            for t in running:
                t.cancel()
            # Wait for them even if this handler is cancelled again meanwhile: their clean-up
            # (removing a waiter's queue entry) must not be cut short, nor outlive the call.
            pending = {t for t in running if not t.done()}
            for _ in range(1000):
                if not pending:
                    break
                try:
                    _, pending = await asyncio.wait(pending)
                except asyncio.CancelledError:
                    continue


class _Running:
    """A message in flight: its task and deadline timer. The timer calls it (`_Stream._expire`);
    `settle` is the task's done callback. One small object per message, where a bound method, an
    argument tuple and a partial each lived as long as the message (a waiting acquire, hours)."""

    __slots__ = ("rid", "stream", "task", "timer")

    def __init__(self, stream: _Stream, rid: int, task: asyncio.Task[None]) -> None:
        self.stream = stream
        self.rid = rid
        self.task = task
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        self.stream._expire(self.rid, self.task)

    def settle(self, _task: asyncio.Future[None]) -> None:
        self.stream._settle(self.rid, self.timer, self.task)


class _Stream:
    """One Session stream's requests in flight, answer queue and sessions."""

    def __init__(self, streams: SessionStreams, context: Context) -> None:
        self.streams = streams
        self.context = context
        self.state = state_of(context)
        self.out: asyncio.Queue[lock_pb2.SessionResponse | BaseException | None] = asyncio.Queue()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.sessions: set[str] = set()  # used on this stream: the ones events are about
        self.span = trace.get_current_span().get_span_context()
        self.facts = StreamFacts(context)
        self.cancelled: set[int] = set()  # ids the client cancelled, still running
        self.expired: set[int] = set()  # ids whose deadline passed, still running
        self.reader: asyncio.Task[None] | None = None

    def _expire(self, rid: int, task: asyncio.Task[None]) -> None:
        if not task.done() and self.tasks.get(rid) is task:
            self.expired.add(rid)
            task.cancel()

    def _settle(self, rid: int, timer: asyncio.TimerHandle | None, task: asyncio.Task[None]) -> None:
        if timer is not None:
            timer.cancel()
        if self.tasks.get(rid) is task:
            del self.tasks[rid]
            # A cancel or deadline that came too late to stop it: forget it, so a later request
            # with the same id is not taken for cancelled.
            self.cancelled.discard(rid)
            self.expired.discard(rid)
        if self.reader is not None and self.reader.done() and not self.tasks:
            self.out.put_nowait(None)

    def _admit(self, req: lock_pb2.SessionRequest) -> tuple[_Kind, Behavior, Any]:
        rid = req.id
        if rid == 0:
            raise InvalidArgument([FieldViolation("id", "must be a non-zero correlation id")])
        if rid in self.tasks:
            raise InvalidArgument([FieldViolation("id", f"{rid} is already in flight on this stream")])
        if req.HasField("timeout") and (req.timeout.seconds < 0 or req.timeout.nanos < 0):
            raise InvalidArgument([FieldViolation("timeout", "must not be negative")])
        route = self.streams.route(req)
        limit = self.streams.max_in_flight
        if len(self.tasks) >= limit:
            raise QuotaExceeded(
                self.state.tenant,
                "stream_in_flight",
                limit,
                f"more than {limit} requests in flight on one Session stream; wait for answers or open another stream",
                retry_after=0.1,
            )
        return route

    def _drain(self, _closing: asyncio.Future[None]) -> None:
        # The broker began to drain: end the stream with SHUTTING_DOWN (serve's clean-up cancels
        # what still runs), so the client moves to another replica while its sessions live.
        self.out.put_nowait(ShuttingDown("the broker is shutting down; reconnect to another replica", retry_after=0.5))

    async def read(self, requests: AsyncIterator[lock_pb2.SessionRequest]) -> None:
        # A plain read loop, with draining as a callback: the service's `_until_draining` costs a
        # task and a wait per message, as much as a third of a message's whole cost here.
        closing = self.streams.service.core.closing
        closing.add_done_callback(self._drain)
        loop = asyncio.get_running_loop()
        try:
            async for req in requests:
                if req.WhichOneof("kind") != "batch":
                    self._take(req, loop, None)
                    continue
                batch = req.batch.requests
                if len(batch) > MAX_BATCH:
                    # Each request is refused under its own id (the batch's own is usually 0,
                    # which is no answer's): none runs, and every caller hears why.
                    too_many = f"holds {len(batch)} requests, more than {MAX_BATCH}"
                    refused = error_status(InvalidArgument([FieldViolation("batch", too_many)]))
                    for rid in {*(m.id for m in batch), req.id} - {0}:
                        self.out.put_nowait(lock_pb2.SessionResponse(id=rid, error=refused))
                    continue
                fresh: set[int] = set()  # this batch's requests: a cancel of one waits its first step
                for member in batch:
                    if member.WhichOneof("kind") == "batch":
                        bad = InvalidArgument([FieldViolation("batch", "a batch must not hold a batch")])
                        self.out.put_nowait(lock_pb2.SessionResponse(id=member.id, error=error_status(bad)))
                    else:
                        self._take(member, loop, fresh)
        except DecodeError as e:
            # grpc deserializes stream messages as we read them, so a malformed one surfaces here.
            bad = InvalidArgument([FieldViolation("request", f"is not a valid request message: {e}")])
            self.out.put_nowait(bad)
            return
        except BaseException as exc:
            self.out.put_nowait(exc)
            raise
        finally:
            closing.remove_done_callback(self._drain)
        if not self.tasks:
            self.out.put_nowait(None)

    def _take(self, req: lock_pb2.SessionRequest, loop: asyncio.AbstractEventLoop, fresh: set[int] | None) -> None:
        """Start serving one request (or cancel the one it names). `fresh`: the ids started from
        the batch this request came in (None: it came alone)."""
        if req.WhichOneof("kind") == "cancel":
            task = self.tasks.get(req.cancel)
            if task is not None and not task.done():
                self.cancelled.add(req.cancel)
                if fresh is not None and req.cancel in fresh:
                    # Its request came in this batch and has not run yet: a task cancelled before
                    # its first step ends without running `_one`, so without an answer.
                    loop.call_soon(task.cancel)
                else:
                    task.cancel()
            return
        try:
            kind, behavior, request = self._admit(req)
        except LockBrokerError as exc:
            # A bad envelope is answered and the stream goes on; it is no lock operation,
            # so no audit record (a bad operation inside a good envelope gets one).
            self.out.put_nowait(lock_pb2.SessionResponse(id=req.id, error=error_status(exc)))
            return
        rid = req.id
        deadline = self.streams.deadline(kind, req, request, self.context)
        task = asyncio.create_task(self._one(rid, kind, behavior, request, deadline))
        self.tasks[rid] = task
        if fresh is not None:
            fresh.add(rid)
        # The message's deadline, as grpc enforces a unary call's: past it the work is
        # cancelled (a waiting acquire leaves the queue) and answered DEADLINE_EXCEEDED.
        # The layers below answer before it when they can (waits and etcd calls end
        # ANSWER_MARGIN earlier); this only catches what did not.
        running = _Running(self, rid, task)
        bare = self.streams.bare
        running.timer = loop.call_at(deadline, running, context=bare)
        task.add_done_callback(running.settle, context=bare)

    async def _one(self, rid: int, kind: _Kind, behavior: Behavior, request: Any, deadline: float) -> None:
        """Serve one request as a call of its own and queue its answer (and any event)."""
        info = kind.info
        mctx = MessageContext(self.facts, CallState(info, principal=self.state.principal), deadline)
        wrap = self.state.messages
        run = wrap(behavior, info) if wrap is not None else behavior
        tracer = self.streams.tracer
        if tracer is not None:
            # One server span per message: a root of its own (sampled per message), linked to the
            # stream's span, so a stream that lives for hours is not one endless trace.
            span = tracer.start_span(
                info.method.lstrip("/"),
                context=otel_context.Context(),
                kind=trace.SpanKind.SERVER,
                links=[trace.Link(self.span)] if self.span.is_valid else None,
                attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": f"Session/{info.name}"},
            )
            current: contextlib.AbstractContextManager[Any] = trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            )
        else:
            # Tracing off: no span to make current (attaching and detaching an invalid one cost a
            # context switch of OTel's per message for nothing; the stream's own span is not recording).
            span, current = trace.INVALID_SPAN, _NO_SPAN
        with current:
            try:
                response = await run(request, cast(Context, mctx))
                answer = lock_pb2.SessionResponse(id=rid, **{kind.answer: response})
            except MessageAborted as a:
                answer = lock_pb2.SessionResponse(id=rid, error=a.answer)
            except asyncio.CancelledError:
                if rid in self.cancelled:
                    self.cancelled.discard(rid)
                    self.expired.discard(rid)
                    ended = lock_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled by the client")
                elif rid in self.expired:
                    self.expired.discard(rid)
                    ended = error_status(DeadlineExceeded("Deadline Exceeded"))
                else:
                    raise  # the stream is ending
                answer = lock_pb2.SessionResponse(id=rid, error=ended)
            except Exception:
                # A layer failed outside the edge's mapping: a bug; the stream and its other
                # requests go on.
                incident = uuid.uuid4().hex[:12]
                log.exception("unhandled error in %s (incident %s)", info.method, incident)
                answer = lock_pb2.SessionResponse(id=rid, error=_answer_status(*status.internal(incident)))
            code = answer.error.code if answer.HasField("error") else 0
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code)
                if code:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, answer.error.message))
        self.out.put_nowait(answer)
        self._track(request, answer, mctx.state)

    def _track(self, request: Any, answer: lock_pb2.SessionResponse, state: CallState) -> None:
        """Remember the sessions this stream uses; tell the stream once when one of them is gone."""
        sessions = self.sessions
        if answer.HasField("open"):
            sessions.add(answer.open.session_id)
        elif answer.HasField("acquire"):
            sessions.add(answer.acquire.grant.session_id)
        elif answer.HasField("acquire_many"):
            sessions.add(request.session_id)
        elif answer.HasField("close"):
            sessions.discard(request.session_id)
        elif state.reason in _GONE:
            sid = getattr(request, "session_id", "")
            if sid in sessions:
                sessions.discard(sid)
                event = lock_pb2.SessionEvent(session_id=sid, kind=lock_pb2.SessionEvent.KIND_EXPIRED)
                self.out.put_nowait(lock_pb2.SessionResponse(id=0, event=event))


class _Nothing:
    """Nothing held back (None is the stream's end)."""


_NOTHING = _Nothing()
_Out = lock_pb2.SessionResponse | BaseException | None


def _answers(
    first: lock_pb2.SessionResponse, out: asyncio.Queue[_Out]
) -> tuple[lock_pb2.SessionResponse, _Out | _Nothing]:
    """`first` and the answers queued behind it as one message (a batch when there are several),
    and the item taken that did not go in: the stream's end or failure (None or an exception, for
    after this message), or an answer past the batch's bounds; `_NOTHING` when the queue ran dry."""
    answers = [first]
    size = first.ByteSize()
    held: _Out | _Nothing = _NOTHING
    while not out.empty():
        item = out.get_nowait()
        if not isinstance(item, lock_pb2.SessionResponse):
            held = item
            break
        size += item.ByteSize()
        if len(answers) >= MAX_BATCH or size > BATCH_BYTES:
            held = item
            break
        answers.append(item)
    if len(answers) == 1:
        return first, held
    return lock_pb2.SessionResponse(batch=lock_pb2.SessionResponses(responses=answers)), held


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["BATCH_METADATA", "MAX_BATCH", "MAX_IN_FLIGHT", "MessageAborted", "MessageContext", "SessionStreams"]
