"""The client's Session streams: every session operation of one Client as messages on a few streams.

A small pool of streams per Client, multiplexing all its sessions, rather than one per session: a
message on an open stream costs about a third of a unary call on each side, and opening a stream
costs about a unary call. With a stream per session, `client.lock(name, ttl=...)` (a session of
its own) would pay a stream's opening on every lock; on the Client's stream it is three messages
(open, acquire, close). Long-lived sessions cost the same either way.

Each request carries an id; answers come back in any order and are matched by it, so a waiting
acquire never holds up a release. A failed answer arrives as the google.rpc.Status the unary call
would have ended with, and is raised as that call's `aio.AioRpcError` (the Status in its
grpc-status-details-bin trailer), so `call_with_retry` and `from_rpc_error` treat both
transports alike: same exceptions, same retry with the same request_id on UNAVAILABLE. When a
stream breaks, every request in flight on it fails UNAVAILABLE and its retry goes on another
stream; the sessions live on in the broker (until their TTL) and need nothing but their ids there.

The broker refuses a request beyond a bound in flight on one stream (lock.proto, `rpc Session`:
1,024 by default; QUOTA_EXCEEDED, limit "stream_in_flight"), which the unary transport does not
have: 2,000 tasks each waiting in `client.lock(...)` all queue there. So that the transport stays
invisible, a request goes on the first stream with room (under STREAM_IN_FLIGHT); when all are
full another is opened, up to MAX_STREAMS, and past that the request goes as its unary call. A
broker with a lower cap refuses a request having run nothing: that stream's cap is lowered to the
broker's and the request is sent elsewhere, never raised. A stream opened for overflow is
half-closed once nothing is in flight on it. Sessions are not bound to a stream in the broker
(any stream of the tenant can carry any of its sessions), and the broker's "session expired"
event comes on whichever stream carried the request that found the session gone: every stream
reports to the same `on_expired`.

A broker without the Session RPC answers UNIMPLEMENTED: `StreamUnsupported` tells the Client
to use the unary RPCs from then on. An older broker's stream that does not know a kind of message
(acquire_many came later than the rest) reads it as a request of no kind and refuses it
INVALID_ARGUMENT on field "kind" without running anything: that kind then goes as unary calls
for as long as that stream lives.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc import aio

from lockbroker.client._keepalive import KeepAliveMux
from lockbroker.client._writer import BATCH_METADATA, StreamBroken, StreamWriter, granted
from lockbroker.client.errors import SessionRevoked, from_rpc_error
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.client")

DETAILS_KEY = "grpc-status-details-bin"
# The status grpc.aio gives a call whose message write failed in grpc's core (the stream ended).
CORE_WRITE_FAILED = "Internal error from Core"
# How long session operations go as unary calls after a stream ended that way before answering.
UNSUPPORTED_RETRY = 30.0


# Requests the client puts in flight on one stream. The broker refuses one beyond its cap
# (session_stream.MAX_IN_FLIGHT, 1,024 by default; lock.proto, `rpc Session`), counted from when
# it reads a request until its answer is queued. Ours runs from before the write until the answer
# is read, and past a cancel until the broker's CANCELLED answer comes, so it is not below the
# broker's; the margin covers what it does miss (a request whose write was cancelled midway) and
# keeps the refusal out of the ordinary course. A refusal is handled all the same (`_limit`).
STREAM_IN_FLIGHT = 1_000
# Streams one Client keeps open at once, the first included: eight carry 8,000 requests. Past
# that a request goes as its unary call, which the broker queues without a per-call bound. Each
# stream counts against the tenant's max_streams on the broker replica (docs/quotas.md).
MAX_STREAMS = 8
# The broker's name for its bound on one stream (QuotaFailure quota_id, ErrorInfo metadata "limit").
IN_FLIGHT_LIMIT = "stream_in_flight"


class GoUnary(Exception):
    """Send this request as its unary call instead (the Session stream cannot carry it)."""


class StreamUnsupported(GoUnary):
    """The broker does not implement the Session RPC (an older broker): use unary calls."""


class StreamFull(GoUnary):
    """Every stream is full and the pool is at its bound (or the broker refused another stream)."""


def _error(code: grpc.StatusCode, message: str, status: bytes | None = None) -> aio.AioRpcError:
    trailing = aio.Metadata((DETAILS_KEY, status)) if status else aio.Metadata()
    return aio.AioRpcError(code, aio.Metadata(), trailing, message)


# How long after a request's timeout the client stops waiting for the broker's answer: the
# broker's answer (sent by the timeout, counted from when it read the request) gets this long to
# arrive, so the caller learns the broker's reason (UNAVAILABLE during a quorum loss) rather than
# a bare DEADLINE_EXCEEDED from a timer racing it.
DEADLINE_GRACE = 0.2


class _Expired(Exception):
    """Our timer on a request fired before its answer came."""


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def _duration(seconds: float) -> Duration:
    nanos = max(0, int(seconds * 1e9))
    return Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


def _unknown_kind(status: lock_pb2.Status) -> bool:
    """Whether the broker refused a request for setting no kind: one it does not know (an older
    broker drops an unknown oneof field when it parses the message), and so did not run."""
    if status.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
        return False
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(bad):  # False (and bad untouched) when the type does not match
            return any(v.field == "kind" for v in bad.field_violations)
    return False


def _limit(status: lock_pb2.Status) -> int | None:
    """The broker's in-flight cap when it refused a request for its stream's bound (having run
    nothing); 0 when the refusal does not say the value; None for any other answer."""
    if status.code != grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
        return None
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Unpack(info) and info.metadata.get("limit") == IN_FLIGHT_LIMIT:
            value = info.metadata.get("value", "")
            return int(value) if value.isdigit() else 0
    return None


_GONE = frozenset({ErrorReason.SESSION_NOT_FOUND, ErrorReason.SESSION_LOST})


def _session_gone(status: lock_pb2.Status) -> bool:
    """Whether an answer says the request's session is gone (expired or closed; an admin's
    revocation says REVOKED, which the keeper's refresh reports as such)."""
    if status.code != grpc.StatusCode.NOT_FOUND.value[0]:
        return False
    info = error_details_pb2.ErrorInfo()
    return any(detail.Unpack(info) and info.reason in _GONE for detail in status.details)


class _Call:
    """One open Session stream and the requests waiting for its answers."""

    __slots__ = ("abandoned", "answered", "call", "cap", "pending", "reader", "retired", "unknown", "writer")

    def __init__(self, call: Any, cap: int) -> None:
        self.call = call
        self.pending: dict[int, asyncio.Future[lock_pb2.SessionResponse]] = {}
        # Ids we stopped waiting for (cancelled, or past our timer) whose answer has not come:
        # the broker runs them until our cancel lands, so they still count against its cap.
        self.abandoned: set[int] = set()
        self.cap = cap  # requests at most in flight: STREAM_IN_FLIGHT, or the broker's lower cap
        self.reader: asyncio.Task[None] | None = None
        self.answered = False  # any message read: the broker serves the Session RPC
        self.unknown: set[str] = set()  # kinds of request this stream's broker does not know
        self.retired = False  # takes no new request: half-closed, reset or closed
        self.writer: StreamWriter | None = None  # every write, in order (batched when granted)

    @property
    def in_flight(self) -> int:
        return len(self.pending) + len(self.abandoned)


class SessionStream:
    """All of one Client's session operations over a pool of Session streams, opened as needed."""

    def __init__(
        self,
        stub: lock_pb2_grpc.LockServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        on_expired: Callable[[str], None] | None = None,
        *,
        max_streams: int = MAX_STREAMS,
        in_flight: int = STREAM_IN_FLIGHT,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._on_expired = on_expired
        self._max_streams = max_streams
        self._in_flight = in_flight
        self._ids = itertools.count(1)
        self._calls: list[_Call] = []  # open (or ending), oldest first: a request takes the first with room
        self._closed = False
        self._unsupported = False  # the broker answered UNIMPLEMENTED: unary calls from now on
        self._unsupported_until = 0.0  # monotonic; unary calls until then (see _read)
        self._no_more_until = 0.0  # monotonic; the broker refused a stream: open no other until then

    @property
    def unsupported(self) -> bool:
        """Whether session operations go as unary calls (the broker has no Session RPC)."""
        return self._unsupported or time.monotonic() < self._unsupported_until

    @property
    def streams(self) -> tuple[_Call, ...]:
        """The streams that take requests now, in the order they are tried."""
        return tuple(c for c in self._calls if not c.retired)

    async def request(self, kind: str, message: Any, timeout: float) -> lock_pb2.SessionResponse:
        """Send one request (`kind` is the SessionRequest field) and return its answer.

        Raises the unary call's `aio.AioRpcError` for an error answer, a broken stream
        (UNAVAILABLE) or `timeout` (DEADLINE_EXCEEDED, after asking the broker to cancel it);
        `GoUnary` when the request should go as its unary call: the broker has no Session RPC or
        its stream does not know `kind` (`StreamUnsupported`), or no stream has room (`StreamFull`).
        """
        deadline = time.monotonic() + timeout
        # Each refusal for the in-flight bound fills the stream it came from: bounded by the pool.
        for _ in range(self._max_streams + 1):
            call = self._choose(kind)
            resp = await self._ask(call, kind, message, max(0.0, deadline - time.monotonic()))
            if resp is not None:
                return resp
        raise StreamFull

    def _choose(self, kind: str) -> _Call:
        if self._closed:
            raise _error(grpc.StatusCode.CANCELLED, "the client is closed")
        if self.unsupported:
            raise StreamUnsupported
        for call in self._calls:
            if not call.retired and call.in_flight < call.cap:
                if kind in call.unknown:
                    raise StreamUnsupported
                return call
        if len(self._calls) >= self._max_streams or time.monotonic() < self._no_more_until:
            raise StreamFull
        # No deadline on the stream itself: each message has its own (the broker's per-message
        # deadline, our `timeout`), and grpc's keepalive pings notice a dead connection.
        call = _Call(self._stub.Session(metadata=(*self._metadata, BATCH_METADATA)), self._in_flight)
        call.writer = StreamWriter(call.call, functools.partial(self._write_failed, call))
        call.reader = asyncio.create_task(self._read(call), name="lockbroker-session-stream")
        self._calls.append(call)
        return call

    async def _ask(self, call: _Call, kind: str, message: Any, timeout: float) -> lock_pb2.SessionResponse | None:
        """One request on `call`: its answer, or None when the broker refused it for the stream's
        in-flight bound (it ran nothing; the stream's cap is lowered to the broker's)."""
        rid = next(self._ids)
        req = lock_pb2.SessionRequest(id=rid, timeout=_duration(timeout), **{kind: message})
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[lock_pb2.SessionResponse] = loop.create_future()
        call.pending[rid] = fut  # counted from now: requests waiting to write fill the stream too
        assert call.writer is not None
        try:
            # Written by the stream's writer, after what was sent before, with what is left of
            # `timeout` then.
            call.writer.send(req, time.monotonic() + timeout)
        except StreamBroken as exc:
            # The writer stops when a write fails, which it does when the stream already ended:
            # the reader, which fails every pending request with the stream's status
            # (UNIMPLEMENTED...), knows why.
            if not fut.done():
                await asyncio.wait({fut}, timeout=1.0)
            call.pending.pop(rid, None)
            self._settled(call)
            if fut.done() and fut.exception() is not None:
                fut.result()
            raise _error(grpc.StatusCode.UNAVAILABLE, f"session stream failed: {exc}") from exc
        # The broker answers by `timeout` (the request carries it): UNAVAILABLE when etcd did not
        # answer in time, DEADLINE_EXCEEDED otherwise, as for a unary call. Our own timer, a little
        # later, only covers a broker or connection that went silent.
        timer = loop.call_later(timeout + DEADLINE_GRACE, _expire, fut)
        try:
            resp = await fut
        except (_Expired, asyncio.CancelledError) as exc:
            # As a unary call's deadline or cancellation would: the broker stops the work (a
            # waiting acquire leaves the queue) and answers it CANCELLED, which nobody reads. The
            # cancel goes on the stream the request went on: ids are that stream's.
            if call.pending.pop(rid, None) is not None:
                call.abandoned.add(rid)
                await self._cancel(call, rid)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            timer.cancel()
        if resp.HasField("error"):
            e = resp.error
            if _unknown_kind(e):
                call.unknown.add(kind)
                raise StreamUnsupported
            limit = _limit(e)
            if limit is not None:
                # A broker with a lower cap than ours: its refusal is no answer to the caller.
                call.cap = min(call.cap, limit or max(1, call.in_flight))
                log.debug("a Session stream took %d requests in flight: the next goes elsewhere", call.cap)
                return None
            if self._on_expired is not None and _session_gone(e):
                # What the broker's event says, but only on a stream where the session was used
                # before: with several streams, the request that finds it gone may go on another.
                sid = getattr(message, "session_id", "")
                if sid:
                    self._on_expired(sid)
            raise _error(_code(e.code), e.message, e.SerializeToString())
        return resp

    async def _cancel(self, call: _Call, rid: int) -> None:
        if call.retired or call.writer is None:  # reset or closed: the stream and its requests are gone
            return
        try:
            # After the request itself, however far its write got: the writer keeps the order.
            call.writer.send(lock_pb2.SessionRequest(cancel=rid))
        except StreamBroken as exc:  # the stream is gone: so is the request
            log.debug("could not cancel request %d: %s", rid, exc)

    async def _write_failed(self, call: _Call, requests: list[lock_pb2.SessionRequest], exc: BaseException) -> None:
        """The writer's report of a failed write: `requests` never reached the broker whole. The
        write fails when the stream already ended, and the reader, which fails every pending
        request with the stream's status (UNIMPLEMENTED...), knows why; what it has not answered
        within a second fails UNAVAILABLE."""
        futs = [f for r in requests if (f := call.pending.get(r.id)) is not None and not f.done()]
        if futs:
            await asyncio.wait(futs, timeout=1.0)
        failure = _error(grpc.StatusCode.UNAVAILABLE, f"session stream failed: {exc}")
        for r in requests:
            fut = call.pending.pop(r.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(failure)
        self._settled(call)

    def _settled(self, call: _Call) -> None:
        """After an answer: half-close a stream opened for overflow once nothing is in flight on
        it. The first stream that takes requests stays open: the next request needs one."""
        if call.in_flight or call.retired or call is next((c for c in self._calls if not c.retired), None):
            return
        call.retired = True
        # The broker ends the stream once it has answered everything; the reader reads to the end
        # (an event may follow the last answer) and lets the stream go. The writer half-closes
        # after what is queued, so no task of its own is needed for that.
        if call.writer is not None and not call.writer.stopped:
            call.writer.close()  # after what is queued
        else:
            call.call.cancel()

    def reset(self) -> None:
        """Drop every stream (their requests fail UNAVAILABLE and are retried on a new one)."""
        calls, self._calls = self._calls, []
        for call in calls:
            call.retired = True
            call.call.cancel()

    async def close(self) -> None:
        self._closed = True
        calls, self._calls = self._calls, []
        for call in calls:
            call.retired = True
            call.call.cancel()
        readers = [c.reader for c in calls if c.reader is not None]
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(c.writer.wait() for c in calls if c.writer is not None))

    def _answered(self, call: _Call, resp: lock_pb2.SessionResponse) -> None:
        if resp.id == 0:
            if resp.HasField("event") and self._on_expired is not None:
                self._on_expired(resp.event.session_id)
            return
        fut = call.pending.pop(resp.id, None)
        if fut is None:
            call.abandoned.discard(resp.id)
        elif not fut.done():
            fut.set_result(resp)
        self._settled(call)

    async def _read(self, call: _Call) -> None:
        failure: BaseException = _error(grpc.StatusCode.UNAVAILABLE, "session stream ended")
        try:
            # Sent before any answer by a broker that takes batches (with the first answer, or
            # the stream's end, by one that does not).
            if granted(await call.call.initial_metadata()) and call.writer is not None:
                call.writer.batches = True
                call.answered = True  # the broker serves the Session RPC: a later failure is no refusal of it
            async for resp in call.call:
                call.answered = True
                if resp.WhichOneof("kind") == "batch":
                    for one in resp.batch.responses:
                        self._answered(call, one)
                else:
                    self._answered(call, resp)
        except aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported = True
                failure = StreamUnsupported()
            elif code == grpc.StatusCode.CANCELLED and not self._closed:
                # reset() cancelled it: its requests are retried on a new stream
                failure = _error(grpc.StatusCode.UNAVAILABLE, "session stream reset")
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not call.answered:
                # The broker refused the stream itself (the tenant's max_streams on this replica):
                # its requests go as unary calls, which that quota does not count, and no other
                # stream is opened for a while.
                self._no_more_until = time.monotonic() + UNSUPPORTED_RETRY
                failure = StreamFull()
            elif code == grpc.StatusCode.INTERNAL and exc.details() == CORE_WRITE_FAILED:
                # Not the broker's answer: our write raced the stream's end and grpc.aio put this
                # over the broker's status (grpc/grpc#36066), about half the time when the broker
                # has no Session RPC (UNIMPLEMENTED). A stream that never answered (nor did any
                # other of ours) is taken for that, for a while: the requests go as unary calls
                # (always correct), and the stream is tried again later. One that answered before
                # just broke: retried.
                if call.answered or any(c.answered for c in self._calls):
                    failure = _error(grpc.StatusCode.UNAVAILABLE, "session stream broke during a write")
                else:
                    self._unsupported_until = time.monotonic() + UNSUPPORTED_RETRY
                    failure = StreamUnsupported()
            else:
                failure = exc
        except asyncio.CancelledError:
            failure = _error(grpc.StatusCode.UNAVAILABLE, "session stream cancelled")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            call.retired = True
            if call.writer is not None:
                call.writer.cancel()  # the stream is over: nothing more to write
            if call in self._calls:
                self._calls.remove(call)
            pending = list(call.pending.values())
            call.pending.clear()
            call.abandoned.clear()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(failure)
                    fut.exception()  # retrieved here too: an abandoned future must not log


class StreamKeepAlive:
    """Session keepalives as `keepalive` messages on the Client's Session streams; the shared
    KeepAlive stream (`KeepAliveMux`) when the broker has no Session RPC or no stream has room.
    Same interface."""

    # The keeper bounds each refresh itself (asyncio.wait_for); this only keeps a forgotten one finite.
    _LIMIT = 3600.0

    def __init__(self, stream: SessionStream, fallback: KeepAliveMux) -> None:
        self._stream = stream
        self._fallback = fallback

    async def refresh(self, session_id: str) -> lock_pb2.KeepAliveResponse:
        if not self._stream.unsupported:
            try:
                resp = await self._stream.request(
                    "keepalive", lock_pb2.RefreshRequest(session_id=session_id), self._LIMIT
                )
            except GoUnary:
                pass
            except aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                # A session an admin revoked is NOT_FOUND too, but its keeper must say REVOKED: raise
                # it as the unary Refresh does. Any other NOT_FOUND is the KeepAlive stream's "expired".
                if exc.code() == grpc.StatusCode.NOT_FOUND and not isinstance(err, SessionRevoked):
                    return lock_pb2.KeepAliveResponse(session_id=session_id, expired=True)
                raise err from exc
            else:
                r = resp.keepalive
                return lock_pb2.KeepAliveResponse(
                    session_id=session_id, ttl=r.ttl, expires_at=r.expires_at, revoked=r.revoked
                )
        return await self._fallback.refresh(session_id)

    def reset(self) -> None:
        # The unanswered refresh may have gone either way (the streams were full): drop both.
        if not self._stream.unsupported:
            self._stream.reset()
        self._fallback.reset()

    async def close(self) -> None:
        await self._fallback.close()


__all__ = [
    "MAX_STREAMS",
    "STREAM_IN_FLIGHT",
    "GoUnary",
    "SessionStream",
    "StreamFull",
    "StreamKeepAlive",
    "StreamUnsupported",
]
