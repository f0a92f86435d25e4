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
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from lockbroker.v1 import lock_pb2

# Bounds of one batched message: the broker refuses a batch of more than 1,024 requests
# (session_stream.MAX_BATCH), and grpc a message over its receive limit, which the broker sets
# to 1 MiB (lock.proto, `rpc Session`). A quarter of that leaves room for the framing and for a
# broker configured lower, and costs nothing: a batch that large holds hundreds of requests.
MAX_BATCH = 1024
BATCH_BYTES = 256 * 1024
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
        # Each request with its deadline (monotonic; 0: none), to restamp its `timeout` when written.
        self._queue: list[tuple[lock_pb2.SessionRequest, float]] = []
        self._wake: asyncio.Future[None] | None = None
        self._closing = False
        self.batches = False
        self.messages = 0  # messages written: tests and the bench count them
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    @property
    def stopped(self) -> bool:
        return self._task.done()

    def send(self, request: lock_pb2.SessionRequest, deadline: float = 0.0) -> None:
        """Queue `request`; it is written after every request queued before it.

        `deadline` (monotonic): when the caller stops waiting. The broker counts a request's
        `timeout` from when it reads it, so a request that waited here goes with what is left of
        it: the broker's answer (its reason: UNAVAILABLE, DEADLINE_EXCEEDED) still comes before
        the caller's own timer."""
        if self._task.done() or self._closing:
            raise StreamBroken("the Session stream's writer has stopped")
        self._queue.append((request, deadline))
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
        """Stop at once (the stream is being cancelled): nothing more is written, or taken."""
        self._closing = True
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
            sent = 0  # requests of `queue` written
            try:
                for message, count in self._messages(queue):
                    await call.write(message)
                    self.messages += 1
                    sent += count
            except Exception as exc:
                # A write fails when the stream ended, or cannot go on: end it (a stream that
                # looked alive would take requests nobody writes), and the owner says why to
                # each request not written.
                failed = [r for r, _ in queue[sent:] + self._queue]
                self._queue = []
                self._closing = True
                call.cancel()
                await self._failed(failed, exc)
                return

    def _messages(
        self, queue: list[tuple[lock_pb2.SessionRequest, float]]
    ) -> Iterator[tuple[lock_pb2.SessionRequest, int]]:
        """The messages that carry `queue`, each with how many of its requests it carries."""
        if len(queue) == 1 or not self.batches:
            for request, deadline in queue:
                yield _stamped(request, deadline), 1
            return
        batch: list[lock_pb2.SessionRequest] = []
        size = 0
        for queued, deadline in queue:
            request = _stamped(queued, deadline)
            n = request.ByteSize() + 8  # and its field's tag and length
            if batch and (len(batch) >= MAX_BATCH or size + n > BATCH_BYTES):
                yield _batch(batch), len(batch)
                batch, size = [], 0
            batch.append(request)
            size += n
        yield _batch(batch), len(batch)


# A request that waited less than this to be written keeps its timeout as it was (the broker's
# answer margin is larger); a rewrite costs a little on every request of a busy stream.
RESTAMP_AFTER = 0.002


def _stamped(request: lock_pb2.SessionRequest, deadline: float) -> lock_pb2.SessionRequest:
    """`request` with `timeout` cut to what is left until `deadline`, if it waited long enough
    for that to matter (never zero: zero means the default, far longer)."""
    if deadline and request.HasField("timeout"):
        left = deadline - time.monotonic()
        t = request.timeout
        if t.seconds + t.nanos / 1e9 - left > RESTAMP_AFTER:
            t.FromNanoseconds(max(1, int(left * 1e9)))
    return request


def _batch(requests: list[lock_pb2.SessionRequest]) -> lock_pb2.SessionRequest:
    if len(requests) == 1:
        return requests[0]
    return lock_pb2.SessionRequest(batch=lock_pb2.SessionRequests(requests=requests))


def granted(metadata: Any) -> bool:
    """Whether the broker's initial metadata grants batches."""
    return any(tuple(item) == BATCH_METADATA for item in metadata or ())


__all__ = ["BATCH_METADATA", "StreamBroken", "StreamWriter", "granted"]
