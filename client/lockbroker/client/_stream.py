"""The client's Session stream: every session operation of one Client as messages on one stream.

One stream per Client, multiplexing all its sessions, rather than one per session: a message on
an open stream costs about a third of a unary call on each side, and opening a stream costs about
a unary call. With a stream per session, `client.lock(name, ttl=...)` (a session of its own)
would pay a stream's opening on every lock; on the Client's stream it is three messages (open,
acquire, close). Long-lived sessions cost the same either way.

Each request carries an id; answers come back in any order and are matched by it, so a waiting
acquire never holds up a release. A failed answer arrives as the google.rpc.Status the unary call
would have ended with, and is raised as that call's `aio.AioRpcError` (the Status in its
grpc-status-details-bin trailer), so `call_with_retry` and `from_rpc_error` treat both
transports alike: same exceptions, same retry with the same request_id on UNAVAILABLE. When the
stream breaks, every request in flight fails UNAVAILABLE and its retry opens a new stream; the
sessions live on in the broker (until their TTL) and need nothing but their ids there.

A broker without the Session RPC answers UNIMPLEMENTED: `StreamUnsupported` tells the Client
to use the unary RPCs from then on. An older broker's stream that does not know a kind of message
(acquire_many came later than the rest) reads it as a request of no kind and refuses it
INVALID_ARGUMENT on field "kind" without running anything: that kind then goes as unary calls
for as long as that stream lives.
"""

from __future__ import annotations

import asyncio
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
from lockbroker.client.errors import SessionRevoked, from_rpc_error
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

log = logging.getLogger("lockbroker.client")

DETAILS_KEY = "grpc-status-details-bin"
# The status grpc.aio gives a call whose message write failed in grpc's core (the stream ended).
CORE_WRITE_FAILED = "Internal error from Core"
# How long session operations go as unary calls after a stream ended that way before answering.
UNSUPPORTED_RETRY = 30.0


class StreamUnsupported(Exception):
    """The broker does not implement the Session RPC (an older broker): use unary calls."""


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


class _Call:
    """One open Session stream and the requests waiting for its answers."""

    __slots__ = ("answered", "call", "pending", "reader", "unknown")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.pending: dict[int, asyncio.Future[lock_pb2.SessionResponse]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.answered = False  # any message read: the broker serves the Session RPC
        self.unknown: set[str] = set()  # kinds of request this stream's broker does not know


class SessionStream:
    """All of one Client's session operations over one Session stream, reopened as needed."""

    def __init__(
        self,
        stub: lock_pb2_grpc.LockServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        on_expired: Callable[[str], None] | None = None,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._on_expired = on_expired
        self._ids = itertools.count(1)
        self._current: _Call | None = None
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call
        self._closed = False
        self._unsupported = False  # the broker answered UNIMPLEMENTED: unary calls from now on
        self._unsupported_until = 0.0  # monotonic; unary calls until then (see _read)

    @property
    def unsupported(self) -> bool:
        """Whether session operations go as unary calls (the broker has no Session RPC)."""
        return self._unsupported or time.monotonic() < self._unsupported_until

    async def request(self, kind: str, message: Any, timeout: float) -> lock_pb2.SessionResponse:
        """Send one request (`kind` is the SessionRequest field) and return its answer.

        Raises the unary call's `aio.AioRpcError` for an error answer, a broken stream
        (UNAVAILABLE) or `timeout` (DEADLINE_EXCEEDED, after asking the broker to cancel it);
        `StreamUnsupported` when the broker has no Session RPC, or its stream does not know `kind`.
        """
        if self.unsupported:
            raise StreamUnsupported
        rid = next(self._ids)
        req = lock_pb2.SessionRequest(id=rid, timeout=_duration(timeout), **{kind: message})
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[lock_pb2.SessionResponse] = loop.create_future()
        async with self._write_lock:
            call = self._open()
            if kind in call.unknown:
                raise StreamUnsupported
            call.pending[rid] = fut
            try:
                await call.call.write(req)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    call.pending.pop(rid, None)
                    raise
                if not fut.done():
                    # The write fails when the stream already ended: the reader, which fails every
                    # pending request with the stream's status (UNIMPLEMENTED...), knows why.
                    await asyncio.wait({fut}, timeout=1.0)
                call.pending.pop(rid, None)
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
            # waiting acquire leaves the queue) and answers it CANCELLED, which nobody reads.
            call.pending.pop(rid, None)
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
            raise _error(_code(e.code), e.message, e.SerializeToString())
        return resp

    async def _cancel(self, call: _Call, rid: int) -> None:
        if call is not self._current:
            return
        try:
            async with self._write_lock:
                await call.call.write(lock_pb2.SessionRequest(cancel=rid))
        except Exception as exc:  # the stream is gone: so is the request
            log.debug("could not cancel request %d: %s", rid, exc)

    def _open(self) -> _Call:
        if self._closed:
            raise _error(grpc.StatusCode.CANCELLED, "the client is closed")
        cur = self._current
        if cur is None:
            # No deadline on the stream itself: each message has its own (the broker's per-message
            # deadline, our `timeout`), and grpc's keepalive pings notice a dead connection.
            cur = self._current = _Call(self._stub.Session(metadata=self._metadata))
            cur.reader = asyncio.create_task(self._read(cur), name="lockbroker-session-stream")
        return cur

    def reset(self) -> None:
        """Drop the current stream (its requests fail UNAVAILABLE and are retried on a new one)."""
        cur, self._current = self._current, None
        if cur is not None:
            cur.call.cancel()

    async def close(self) -> None:
        self._closed = True
        cur, self._current = self._current, None
        if cur is not None:
            cur.call.cancel()
            if cur.reader is not None:
                await asyncio.gather(cur.reader, return_exceptions=True)

    async def _read(self, call: _Call) -> None:
        failure: BaseException = _error(grpc.StatusCode.UNAVAILABLE, "session stream ended")
        try:
            async for resp in call.call:
                call.answered = True
                if resp.id == 0:
                    if resp.HasField("event") and self._on_expired is not None:
                        self._on_expired(resp.event.session_id)
                    continue
                fut = call.pending.pop(resp.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported = True
                failure = StreamUnsupported()
            elif exc.code() == grpc.StatusCode.CANCELLED and not self._closed:
                # reset() cancelled it: its requests are retried on a new stream
                failure = _error(grpc.StatusCode.UNAVAILABLE, "session stream reset")
            elif exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CORE_WRITE_FAILED:
                # Not the broker's answer: our write raced the stream's end and grpc.aio put this
                # over the broker's status (grpc/grpc#36066), about half the time when the broker
                # has no Session RPC (UNIMPLEMENTED). A stream that never answered is taken for
                # that, for a while: the requests go as unary calls (always correct), and the
                # stream is tried again later. One that answered before just broke: retried.
                if call.answered:
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
            if self._current is call:
                self._current = None
            pending = list(call.pending.values())
            call.pending.clear()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(failure)
                    fut.exception()  # retrieved here too: an abandoned future must not log


class StreamKeepAlive:
    """Session keepalives as `keepalive` messages on the Client's Session stream; the shared
    KeepAlive stream (`KeepAliveMux`) when the broker has no Session RPC. Same interface."""

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
            except StreamUnsupported:
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
        if self._stream.unsupported:
            self._fallback.reset()
        else:
            self._stream.reset()

    async def close(self) -> None:
        await self._fallback.close()


__all__ = ["SessionStream", "StreamKeepAlive", "StreamUnsupported"]
