"""The base of the broker's shared etcd streams: one bidirectional stream opened on demand, with
serialized writes, one reader task, and a watchdog that leaves a member that stops answering.

A frozen member (SIGSTOP, a stalled VM) ends nothing and answers nothing. So a watchdog drops a
stream that owes an answer for `stall_after` seconds having received nothing, and a stream whose
member the unary calls have left (they failed there) follows them; either way its next use opens
it where the unary calls go. Subclasses (lockbroker.server.etcd.streams) say what is owed and
what to send as a probe when the stream has been quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc
from grpc import aio

from lockbroker.server.core.errors import Unavailable
from lockbroker.server.etcd.client import EtcdClient

log = logging.getLogger("lockbroker.etcd")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Seconds a stream may owe an answer, having received nothing, before it counts as stuck. A
# healthy member answers in milliseconds and one without a leader ends the stream ("hasleader"),
# so this only outlasts a slow network (the fault suite's 200 ms etcd delay). A refresh held by a
# frozen member is answered within about stall_after + 1/4 of it: sessions refreshed every TTL/3
# (the client's default) need TTL/3 above that, as for TTL >= 4 s (tests/test_stream_faults.py).
STALL_AFTER = 1.0

# However late the event loop runs, a stream owing an answer this many stall_after is stuck.
STALL_CEILING = 2.0

# Oversleeps of the watchdog remembered (one at most per quarter of stall_after): enough to cover
# any silence that could still be judged.
LATENESS_KEPT = 64

# What callers see when a stream breaks; etcd's endpoint and grpc's details go to the log only.
STREAM_LOST = "etcd is unavailable; retry"


def _detail(e: Exception) -> str:
    """The code and etcd's own message, for the broker's log (no debug_error_string)."""
    if isinstance(e, aio.AioRpcError):
        return f"{e.code().name} {e.details() or ''}".strip()
    return type(e).__name__


class SharedStream(Generic[Req, Resp]):
    """One bidirectional stream, opened on demand, with serialized writes, one reader task and a
    watchdog that drops it when it stops answering (see the module docstring)."""

    kind = "etcd"

    def __init__(self, client: EtcdClient, *, stall_after: float = STALL_AFTER) -> None:
        self._client = client
        self._call: aio.StreamStreamCall[Req, Resp] | None = None
        self._endpoint = -1
        self._generation = 0  # the client's endpoint generation when the stream was opened
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self.stall_after = stall_after
        # When the oldest request still owed an answer was written (None: nothing owed), and when
        # the current stream last delivered anything; both on the loop's clock.
        self._owed_since: float | None = None
        self._heard = 0.0
        self._probes: set[asyncio.Task[bool]] = set()
        self.reopened = 0  # streams dropped as stuck, for tests and logs

    def _probe(self) -> Req | None:
        """A request whose answer shows the member is alive, when the stream has been quiet and
        someone relies on it; None: nothing to check (an idle stream may stay silent)."""
        return None

    def _owes(self) -> bool:
        """Whether answers are still due after the one just handled."""
        return False

    def _owed_from(self, heard: float) -> float | None:
        """After an answer read at `heard`: since when what is still due counts as owed (None:
        nothing is). By default from `heard`: any answer shows the member alive."""
        return heard if self._owes() else None

    def _open(self) -> aio.StreamStreamCall[Req, Resp]:
        raise NotImplementedError

    def _on_response(self, resp: Resp) -> None:
        raise NotImplementedError

    def _on_lost(self, error: Exception) -> None:
        raise NotImplementedError

    async def write(
        self,
        req: Req,
        *,
        wanted: Callable[[], bool] | None = None,
        sending: Callable[[], None] | None = None,
    ) -> bool:
        """Send `req` on the stream, opening it if need be.

        `wanted` is asked again once this call holds the stream (after waiting for other writes
        or for authentication): False sends nothing and returns False. `sending` runs just before
        the write, in the stream's write order and before any answer can be read."""
        async with self._write_lock:
            if self._closed:
                raise Unavailable("the broker is shutting down", retry_after=1.0)
            if self._call is not None and self._client.left_since(self._endpoint, self._generation):
                self._follow(self._call)  # before `wanted`: leaving fails what was pending
            if wanted is not None and not wanted():
                return False
            if self._call is None:
                if self._client.needs_token():
                    await self._client.authenticate()
                    if wanted is not None and not wanted():
                        return False
                self._endpoint, _ = self._client.current()
                self._generation = self._client.generation
                self._call = self._open()
                self._owed_since, self._heard = None, asyncio.get_running_loop().time()
                self._reader = asyncio.create_task(self._read(self._call))
                self._watchdog = asyncio.create_task(self._guard(self._call))
            call = self._call
            if sending is not None:
                sending()
            if self._owed_since is None:
                self._owed_since = asyncio.get_running_loop().time()
            try:
                await call.write(req)
            except (aio.AioRpcError, asyncio.InvalidStateError) as e:
                log.warning("etcd %s stream to %s lost on a write: %s", self.kind, self._target(), _detail(e))
                lost = Unavailable(STREAM_LOST, retry_after=1.0)
                # Everything pending on the stream gets the domain error, never the transport's.
                self._lose(call, lost)
                raise lost from None
            return True

    def _target(self) -> str:
        return self._client.target_of(self._endpoint)

    async def _read(self, call: aio.StreamStreamCall[Req, Resp]) -> None:
        error: Exception = Unavailable(STREAM_LOST, retry_after=1.0)
        try:
            while True:
                resp = await call.read()
                if resp is aio.EOF or self._call is not call:
                    # Not the current stream any more (lost, dropped as stuck, or left): what was
                    # pending on it has been failed, and the state it answered about is gone. An
                    # answer read anyway (it had arrived; this task ran late) would be taken as the
                    # new stream's: a "created" matched to the new stream's first pending create.
                    break
                self._on_response(resp)  # type: ignore[arg-type]
                if self._call is call:  # (the answer may have ended it: a refused token)
                    self._heard = asyncio.get_running_loop().time()
                    self._owed_since = self._owed_from(self._heard)
        except aio.AioRpcError as e:
            if self._client.is_stale_token(e):
                self._client.forget_token()
            if self._call is call:  # an old stream's end says nothing of the endpoint in use now
                self._client.report_stream_error(e, self._endpoint)
            if e.code() != grpc.StatusCode.CANCELLED or self._call is call:
                log.warning("etcd %s stream to %s lost: %s", self.kind, self._target(), _detail(e))
        except asyncio.CancelledError:
            error = Unavailable("the broker is shutting down", retry_after=1.0)
            raise
        finally:
            self._lose(call, error)

    async def _guard(self, call: aio.StreamStreamCall[Req, Resp]) -> None:
        """Drop `call` once it owes an answer for longer than stall_after with nothing received.
        Ends when the stream is lost or replaced (checked every quarter of the bound).

        Silence is counted on the time the event loop was free to read: what this check's own
        sleep overslept is not etcd's. An overloaded broker's loop can run seconds late, and an
        answer waiting in grpc's buffers is read only when the loop gets to it: counting that
        wait dropped healthy streams, and every drop re-created all their watches on a member
        that was only slow to be heard (at 100k queued acquires, a reopen every few seconds).
        A frozen member still counts in full, as long as the loop itself keeps time; and
        however late the loop runs, a stream that owes an answer for STALL_CEILING x stall_after
        is dropped (an overloaded broker then finds a frozen member within about 2 s, not 1)."""
        loop = asyncio.get_running_loop()
        tick = self.stall_after / 4
        lateness: deque[tuple[float, float]] = deque(maxlen=LATENESS_KEPT)  # (woke at, overslept)
        while self._call is call:
            asleep = loop.time()
            await asyncio.sleep(tick)
            if self._call is not call:
                return
            if self._client.left_since(self._endpoint, self._generation):
                self._follow(call)
                return
            now = loop.time()
            if (late := now - asleep - tick) > tick:
                lateness.append((now, late))
            owed = self._owed_since
            if owed is not None and now - owed > self.stall_after:
                # Only the part of an oversleep that fell after the answer became owed.
                busy = sum(min(late, woke - owed) for woke, late in lateness if woke > owed)
                if now - owed - busy > self.stall_after or now - owed > self.stall_after * STALL_CEILING:
                    self._stalled(call, now - owed)
                    return
            if self._owed_since is None and now - self._heard > self.stall_after / 2:
                probe = self._probe()
                if probe is not None:
                    # Owed from now; written by its own task so a write stuck on flow control
                    # cannot stop this check.
                    self._owed_since = now
                    task = loop.create_task(self.write(probe, wanted=lambda: self._call is call))
                    self._probes.add(task)
                    task.add_done_callback(_retrieve_probe(self._probes))

    def _stalled(self, call: aio.StreamStreamCall[Req, Resp], waited: float) -> None:
        stuck = self._target()
        # Off the stuck member: a no-op when the unary calls already moved away from it, and then
        # the stream reopens where they go now.
        self._client.failover(self._endpoint)
        log.warning(
            "etcd %s stream to %s answered nothing for %.1fs; reopening it on %s",
            self.kind,
            stuck,
            waited,
            self._client.endpoint,
        )
        self.reopened += 1
        self._lose(call, Unavailable(STREAM_LOST, retry_after=0.5))

    def _follow(self, call: aio.StreamStreamCall[Req, Resp]) -> None:
        """The unary calls left this stream's endpoint (it failed them): leave it too."""
        log.info("etcd %s stream leaves %s for %s, as the calls did", self.kind, self._target(), self._client.endpoint)
        self.reopened += 1
        self._lose(call, Unavailable(STREAM_LOST, retry_after=0.5))

    def _lose(self, call: aio.StreamStreamCall[Req, Resp], error: Exception) -> None:
        if self._call is call:
            self._call = None
            self._owed_since = None
            call.cancel()
            self._on_lost(error)

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._lose(self._call, Unavailable("the broker is shutting down", retry_after=1.0))
        tasks = [t for t in (self._reader, self._watchdog, *self._probes) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _retrieve_probe(tasks: set[asyncio.Task[bool]]) -> Callable[[asyncio.Task[bool]], None]:
    def done(task: asyncio.Task[bool]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a lost stream: already handled by whoever uses it next

    return done
