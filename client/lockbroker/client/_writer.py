"""The one writer of a Session stream: requests in order, batched while a write is in flight.

grpc.aio takes one write at a time per call. Rather than each request taking a lock and writing
itself, requests go into this writer's queue and one task writes them, in the order given. What
queues while a write is in flight goes out as one message (`SessionRequest.batch`) once the
broker said it takes batches (its initial metadata, lock.proto `rpc Session`): most of a
message's cost, on both sides, is the message rather than what it carries, so a busy client
sends a few messages for many requests. A request alone is written as itself, at once.

The order matters beyond fairness: a cancel must never overtake the request it cancels, which
it could when each caller wrote for itself. A caller cancelled while its request waits here (or
is being written) does not cut a write short: the request goes out whole and its cancel after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from lockbroker.v1 import lock_pb2

# Bounds of one batched message: the broker refuses a batch of more than 1,024 requests
# (session_stream.MAX_BATCH), and grpc a message over 4 MiB (its default receive limit).
MAX_BATCH = 1024
BATCH_BYTES = 1 << 20
# The metadata that asks for batches, and the broker's initial metadata that grants them.
BATCH_METADATA = ("lockbroker-batch", "1")

Failed = Callable[[list[lock_pb2.SessionRequest], BaseException], Awaitable[None]]


class StreamBroken(Exception):
    """The stream's writer has stopped (a write failed, or the stream was closed)."""


class StreamWriter:
    """Writes `call`'s requests in order; `batches` is set once the broker granted them.

    `failed(requests, exc)` is awaited with every request that did not go out when a write
    fails (the one being written included); the writer stops then, and `send` raises
    `StreamBroken` from that on.
    """

    __slots__ = ("_call", "_closing", "_failed", "_queue", "_task", "_wake", "batches", "messages")

    def __init__(self, call: Any, failed: Failed, *, name: str = "lockbroker-session-writer") -> None:
        self._call = call
        self._failed = failed
        self._queue: list[lock_pb2.SessionRequest] = []
        self._wake: asyncio.Future[None] | None = None
        self._closing = False
        self.batches = False
        self.messages = 0  # messages written: tests and the bench count them
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    @property
    def stopped(self) -> bool:
        return self._task.done()

    def send(self, request: lock_pb2.SessionRequest) -> None:
        """Queue `request`; it is written after every request queued before it."""
        if self._task.done() or self._closing:
            raise StreamBroken("the Session stream's writer has stopped")
        self._queue.append(request)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def close(self) -> None:
        """Half-close the stream once everything queued is written."""
        self._closing = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def cancel(self) -> None:
        """Stop at once (the stream is being cancelled): nothing more is written."""
        self._task.cancel()

    async def wait(self) -> None:
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        call = self._call
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    try:
                        await call.done_writing()
                    except Exception:
                        call.cancel()
                    return
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
                continue
            queue, self._queue = self._queue, []
            try:
                for message in self._messages(queue):
                    await call.write(message)
                    self.messages += 1
            except Exception as exc:
                # The stream is gone with everything not yet sent: the owner says why to each.
                failed, self._queue = queue + self._queue, []
                self._closing = True
                await self._failed(failed, exc)
                return

    def _messages(self, queue: list[lock_pb2.SessionRequest]) -> Iterator[lock_pb2.SessionRequest]:
        if len(queue) == 1 or not self.batches:
            yield from queue
            return
        batch: list[lock_pb2.SessionRequest] = []
        size = 0
        for request in queue:
            n = request.ByteSize()
            if batch and (len(batch) >= MAX_BATCH or size + n > BATCH_BYTES):
                yield _batch(batch)
                batch, size = [], 0
            batch.append(request)
            size += n
        yield _batch(batch)


def _batch(requests: list[lock_pb2.SessionRequest]) -> lock_pb2.SessionRequest:
    if len(requests) == 1:
        return requests[0]
    return lock_pb2.SessionRequest(batch=lock_pb2.SessionRequests(requests=requests))


def granted(metadata: Any) -> bool:
    """Whether the broker's initial metadata grants batches."""
    return any(tuple(item) == BATCH_METADATA for item in metadata or ())


__all__ = ["BATCH_METADATA", "StreamBroken", "StreamWriter", "granted"]
