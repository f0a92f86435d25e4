"""The KeepAlive stream that all sessions of one Client share, as the API intends.

Each refresh is one message on one long-lived bidirectional stream instead of a unary Refresh
per session; the broker answers each session's messages in order, which is how answers are
matched to requests. The stream is rotated before its deadline runs out.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
from grpc import aio

from lockbroker.client.errors import LockBrokerError, Unavailable, from_rpc_error
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

# The KeepAlive stream has a deadline like every call; it is replaced well before it runs out
# so that a refresh is never lost to the deadline.
KEEPALIVE_STREAM_LIFETIME = 600.0
_STREAM_ROTATE_AT = 0.75


class _Stream:
    __slots__ = ("call", "opened_at", "pending", "reader", "retired")

    def __init__(self, call: aio.StreamStreamCall[lock_pb2.KeepAliveRequest, lock_pb2.KeepAliveResponse]) -> None:
        self.call = call
        self.opened_at = time.monotonic()
        # One FIFO per session: the broker answers each stream's messages in order, and a
        # session never has two refreshes outstanding unless one was abandoned by its caller.
        self.pending: dict[str, collections.deque[asyncio.Future[lock_pb2.KeepAliveResponse]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.retired = False


class KeepAliveMux:
    """All sessions of one Client share one KeepAlive stream, as the API intends."""

    def __init__(
        self, stub: lock_pb2_grpc.LockServiceAsyncStub, metadata: tuple[tuple[str, str], ...], lifetime: float
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._lifetime = lifetime
        self._current: _Stream | None = None
        self._streams: set[_Stream] = set()
        # grpc.aio allows one write at a time per call; the lock also keeps a session's queue
        # of futures in the same order as its messages on the wire.
        self._write_lock = asyncio.Lock()
        self._closed = False

    async def refresh(self, session_id: str) -> lock_pb2.KeepAliveResponse:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[lock_pb2.KeepAliveResponse] = loop.create_future()
        async with self._write_lock:
            stream = await self._stream()
            queue = stream.pending.setdefault(session_id, collections.deque())
            queue.append(fut)
            try:
                await stream.call.write(lock_pb2.KeepAliveRequest(session_id=session_id))
            except asyncio.CancelledError:
                # Whether the message left is unknown, so this stream's answers can no longer be
                # matched to requests: start afresh.
                self._discard(stream)
                raise
            except Exception as exc:
                self._discard(stream)
                if fut in queue:
                    queue.remove(fut)
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"keepalive stream failed: {exc}") from exc
        # Leaving an abandoned future queued (not removing it) keeps later answers matched.
        return await fut

    def reset(self) -> None:
        """Drop the current stream (e.g. a refresh on it went unanswered for too long)."""
        if self._current is not None:
            self._discard(self._current)

    async def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.call.cancel()
        readers = [s.reader for s in self._streams if s.reader is not None]
        if readers:
            await asyncio.gather(*readers, return_exceptions=True)

    async def _stream(self) -> _Stream:
        if self._closed:
            raise Unavailable(grpc.StatusCode.CANCELLED, "the client is closed")
        cur = self._current
        if cur is not None and time.monotonic() - cur.opened_at > self._lifetime * _STREAM_ROTATE_AT:
            # Half-close: the broker answers what it has already received, then ends the stream.
            cur.retired = True
            self._current = None
            try:
                await cur.call.done_writing()
            except Exception:
                cur.call.cancel()
            cur = None
        if cur is None:
            call = self._stub.KeepAlive(timeout=self._lifetime, metadata=self._metadata)
            cur = self._current = _Stream(call)
            self._streams.add(cur)
            cur.reader = asyncio.create_task(self._read(cur), name="lockbroker-keepalive-reader")
        return cur

    def _discard(self, stream: _Stream) -> None:
        stream.retired = True
        if self._current is stream:
            self._current = None
        stream.call.cancel()

    async def _read(self, stream: _Stream) -> None:
        err: LockBrokerError = Unavailable(grpc.StatusCode.UNAVAILABLE, "keepalive stream ended")
        try:
            async for resp in stream.call:
                queue = stream.pending.get(resp.session_id)
                fut = queue.popleft() if queue else None
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except aio.AioRpcError as exc:
            err = from_rpc_error(exc)
        except asyncio.CancelledError:
            err = Unavailable(grpc.StatusCode.CANCELLED, "keepalive stream cancelled")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            if self._current is stream:
                self._current = None
            self._streams.discard(stream)
            for queue in stream.pending.values():
                for fut in queue:
                    if not fut.done():
                        fut.set_exception(err)
            stream.pending.clear()
