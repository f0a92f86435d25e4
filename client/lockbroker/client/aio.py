"""The asyncio client: one method per RPC, plus sessions kept alive and locks as context managers.

    async with Client("127.0.0.1:50051") as client:
        async with client.lock("orders/42", ttl=10, wait=5) as held:
            await storage.write(data, fencing_token=held.fencing_token)

Every call has a deadline (the `timeout` argument, else `default_timeout`). Calls are retried
on UNAVAILABLE with full-jitter exponential backoff inside that deadline; this is safe because
every RPC is idempotent once Acquire and CreateSession carry a request_id, which this client
always sends.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from lockbroker.client._retry import Backoff, call_with_retry
from lockbroker.client.errors import (
    DeadlineExceeded,
    LockBrokerError,
    LockLost,
    NotAcquired,
    SessionNotFound,
    Unavailable,
    from_rpc_error,
)
from lockbroker.client.types import (
    Grant,
    LockState,
    LockSummary,
    Session,
    duration,
    grant_of,
    lock_state_of,
    seconds,
    summary_of,
    timestamp,
)
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

log = logging.getLogger("lockbroker.client")

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)
_T = TypeVar("_T")

# Matches the broker's keepalive policy: long Acquire waits and idle KeepAlive streams must
# notice a dead connection (a NAT or LB dropping it silently) well within a session TTL.
# Reconnecting: grpc's own backoff grows to 120 s, so a broker restarted after a minute's outage
# could stay unreachable to this client for two more minutes, and every session would lapse
# meanwhile. Sessions live for seconds: try again at least every 2 s.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

# The KeepAlive stream has a deadline like every call; it is replaced well before it runs out
# so that a refresh is never lost to the deadline.
KEEPALIVE_STREAM_LIFETIME = 600.0
_STREAM_ROTATE_AT = 0.75

LostCallback = Callable[["HeldLock"], object]
SessionLostCallback = Callable[["SessionKeeper"], object]


async def _shielded(aw: Awaitable[_T], timeout: float) -> _T:
    """Run `aw` to completion even if the caller is cancelled meanwhile, but never past `timeout`.

    Clean-up (release, close) must not be abandoned half-way by a cancellation: that is exactly
    when a lock would otherwise be left held until its TTL. The caller's cancellation is
    re-raised once the work is done.
    """
    task = asyncio.ensure_future(asyncio.wait_for(aw, timeout))
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


# Strong references to running async callbacks: the loop itself only keeps weak ones.
_detached: set[asyncio.Future[Any]] = set()


def _detached_done(task: asyncio.Future[Any]) -> None:
    _detached.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("lost-lock callback failed", exc_info=task.exception())


def _call_safely(cb: Callable[[Any], object], arg: object) -> None:
    # A failing callback must not stop the others, nor the keepalive loop that calls them.
    try:
        result = cb(arg)
        if asyncio.iscoroutine(result):
            # Async callbacks run detached so a slow one cannot delay telling the next one.
            task = asyncio.ensure_future(result)
            _detached.add(task)
            task.add_done_callback(_detached_done)
    except Exception:
        log.exception("lost-lock callback %r failed", cb)


# -- KeepAlive multiplexing ------------------------------------------------------------------


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


class _KeepAliveMux:
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


# -- sessions ----------------------------------------------------------------------------------


class SessionKeeper:
    """A session kept alive in the background; `async with client.session(ttl) as s:`.

    `expires_at` is a time.monotonic() instant: the local send time of the last confirmed
    refresh plus the TTL the broker confirmed. Measuring from the send (not the answer) makes
    it an upper bound on the lease's real expiry no matter how long the answer took.
    `lost` is set when the broker says the session is gone, or when no refresh was confirmed
    before `expires_at`.
    """

    def __init__(
        self,
        client: Client,
        ttl: float | None = 10,
        owner: str = "",
        request_id: str | None = None,
        *,
        session_id: str | None = None,
    ) -> None:
        self._client = client
        self._requested_ttl = ttl
        # Set: start() keeps this existing session alive instead of creating one.
        self._existing_id = session_id
        self._owner = owner
        self._request_id = request_id
        self._session: Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: builtins.list[SessionLostCallback] = []
        self._closed = False
        self.expires_at = 0.0
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        # Names this keeper's lock() contexts are acquiring or holding; see LockContext._abandon.
        self._names: set[str] = set()

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("the session has not been started; use `async with client.session()`")
        return self._session

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def ttl(self) -> float:
        return self.session.ttl

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and not self._closed and time.monotonic() < self.expires_at

    def add_lost_callback(self, cb: SessionLostCallback) -> None:
        if self.lost.is_set():
            _call_safely(cb, self)
        else:
            self._callbacks.append(cb)

    def remove_lost_callback(self, cb: SessionLostCallback) -> None:
        if cb in self._callbacks:
            self._callbacks.remove(cb)

    async def start(self) -> Self:
        """Create the session (or, given `session_id`, confirm that it is alive) and keep it alive.

        An existing session is confirmed with one Refresh: SessionNotFound if it is already gone.
        """
        if self._session is not None:
            raise RuntimeError("the session was already started")
        if self._existing_id is not None:
            # Measured before the call, so the local expiry errs early, never late.
            sent = time.monotonic()
            self._session = await self._client.refresh(self._existing_id)
        else:
            self._session, sent = await self._client._create_session(
                self._requested_ttl, self._owner, self._request_id, None
            )
        self.expires_at = sent + self._session.ttl
        self._task = asyncio.create_task(self._keep(sent), name=f"lockbroker-session-{self.session_id}")
        self._client._keepers.add(self)
        return self

    async def close(self) -> bool:
        """Stop refreshing and close the session (releasing every lock it holds).

        True if this call closed a live session. Safe to call more than once.
        """
        if self._closed or self._session is None:
            return False
        self._closed = True
        await self._stop()
        return await self._client.close_session(self.session_id, timeout=self._client._cleanup_timeout)

    async def detach(self) -> None:
        """Stop refreshing but leave the session open: it lapses after its TTL unless someone
        else keeps it alive (e.g. `lockbroker session keepalive` handing over to a script)."""
        if self._closed or self._session is None:
            return
        self._closed = True
        await self._stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await _shielded(self.close(), self._client._cleanup_timeout)
        except (LockBrokerError, TimeoutError) as e:
            # The lease lapses by itself within one TTL now that nobody refreshes it.
            log.warning("closing session %s failed: %s", self._session and self._session.session_id, e)

    async def _stop(self) -> None:
        self._client._keepers.discard(self)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    def _mark_lost(self, why: str) -> None:
        if self.lost.is_set() or self._closed:
            return
        self.lost_reason = why
        self.lost.set()
        log.warning("session %s lost: %s", self.session_id, why)
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _call_safely(cb, self)

    async def _keep(self, created_at: float) -> None:
        interval = self.ttl / 3
        next_send = created_at + interval
        failures = 0
        backoff = self._client._backoff
        while True:
            now = time.monotonic()
            if now >= self.expires_at:
                self._mark_lost("no keepalive was confirmed before the session's local expiry")
                return
            await asyncio.sleep(max(0.0, min(next_send, self.expires_at) - now))
            sent = time.monotonic()
            left = self.expires_at - sent
            if left <= 0:
                continue
            try:
                # Bounded by the expiry, so a hung stream turns into "lost" exactly on time.
                resp = await asyncio.wait_for(
                    self._client._keepalive.refresh(self.session_id), timeout=min(left, max(interval, 0.5))
                )
            except TimeoutError:
                self._client._keepalive.reset()
                failures += 1
                next_send = time.monotonic()
                continue
            except SessionNotFound as e:
                self._mark_lost(f"the broker no longer knows the session: {e.message}")
                return
            except LockBrokerError as e:
                failures += 1
                log.debug("keepalive of session %s failed (%d): %s", self.session_id, failures, e)
                next_send = time.monotonic() + min(backoff.delay(failures - 1), interval / 2)
                continue
            if resp.expired:
                self._mark_lost("the broker reports the session expired or was closed")
                return
            failures = 0
            ttl = seconds(resp.ttl)
            self.expires_at = max(self.expires_at, sent + ttl)
            interval = ttl / 3
            next_send = sent + interval


# -- locks -------------------------------------------------------------------------------------


class HeldLock:
    """A lock held inside `async with client.lock(...) as held:`.

    Being inside the block does not prove the lock is still held: a session can lapse while
    the process is paused. Call `check()` before each step that relies on the lock, pass
    `fencing_token` to whatever the lock protects, and watch `lost` for early warning.

    `lost` tracks the session: it fires when the session lapses or is revoked. A grant deleted
    while its session lives on (someone releasing with this fencing token) is not detected.
    """

    def __init__(self, grant: Grant, session: SessionKeeper) -> None:
        self.grant = grant
        self.session = session
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._callbacks: builtins.list[LostCallback] = []

    @property
    def name(self) -> str:
        return self.grant.name

    @property
    def fencing_token(self) -> int:
        return self.grant.fencing_token

    @property
    def session_id(self) -> str:
        return self.grant.session_id

    @property
    def deadline(self) -> float:
        """time.monotonic() instant after which this process must not believe it holds the lock."""
        return self.session.expires_at

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        """Raise LockLost unless the lock can still be assumed held."""
        if not self.lost.is_set() and time.monotonic() >= self.deadline:
            self._mark_lost("the session's last confirmed expiry has passed")
        if self.lost.is_set():
            raise LockLost(
                f"lock {self.name!r} (fencing token {self.fencing_token}) was lost: {self.lost_reason}",
                name=self.name,
                fencing_token=self.fencing_token,
            )

    def add_lost_callback(self, cb: LostCallback) -> None:
        if self.lost.is_set():
            _call_safely(cb, self)
        else:
            self._callbacks.append(cb)

    def _on_session_lost(self, session: SessionKeeper) -> None:
        self._mark_lost(session.lost_reason or "the session was lost")

    def _mark_lost(self, why: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = why
        self.lost.set()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _call_safely(cb, self)

    def __repr__(self) -> str:
        return (
            f"HeldLock(name={self.name!r}, fencing_token={self.fencing_token}, "
            f"session_id={self.session_id!r}, lost={self.lost.is_set()})"
        )


class LockContext:
    """What `Client.lock()` returns: acquire on enter, release (and close its own session) on exit."""

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        ttl: float | None,
        wait: float,
        owner: str,
        session: SessionKeeper | None,
        on_lost: LostCallback | None,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._name = name
        self._ttl = ttl
        self._wait = wait
        self._owner = owner
        self._session = session
        self._on_lost = on_lost
        self._timeout = timeout
        self._own_session: SessionKeeper | None = None
        self._keeper: SessionKeeper | None = None
        self.held: HeldLock | None = None

    async def __aenter__(self) -> HeldLock:
        if self._keeper is not None:
            raise RuntimeError("a LockContext can be entered only once")
        keeper = self._session
        if keeper is None:
            keeper = self._own_session = SessionKeeper(self._client, self._ttl, self._owner)
            await keeper.start()
        if self._name in keeper._names:
            raise RuntimeError(
                f"lock {self._name!r} is already being acquired or held on this session; locks are not reentrant"
            )
        self._keeper = keeper
        keeper._names.add(self._name)
        try:
            grant = await self._client.acquire(
                self._name, session_id=keeper.session_id, wait=self._wait, owner=self._owner, timeout=self._timeout
            )
        except BaseException as exc:
            await self._abandon(exc)
            raise
        held = self.held = HeldLock(grant, keeper)
        if self._on_lost is not None:
            held.add_lost_callback(self._on_lost)
        keeper.add_lost_callback(held._on_session_lost)
        return held

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            failure = await _shielded(self._cleanup(), self._client._cleanup_timeout * 2)
        except TimeoutError:
            log.warning("releasing %r timed out; it is held until its session ends", self._name)
            return
        if failure is not None and exc is None:
            raise failure

    async def _abandon(self, exc: BaseException) -> None:
        """Undo whatever a failed or cancelled Acquire may have left behind."""
        keeper = self._keeper
        assert keeper is not None
        try:
            if self._own_session is not None:
                with_session = self._own_session
                await _shielded(with_session.__aexit__(None, None, None), self._client._cleanup_timeout)
                return
            if isinstance(exc, NotAcquired):
                return  # a definite "no": the broker queued nothing
            if isinstance(exc, (asyncio.CancelledError, DeadlineExceeded, Unavailable)):
                # The grant may have been made with its answer lost. This context is the only
                # local user of (session, name) and a session cannot hold one lock twice, so a
                # holder with our session id is our grant.
                await _shielded(self._release_if_ours(keeper), self._client._cleanup_timeout)
        except (LockBrokerError, TimeoutError) as e:
            log.warning("could not clean up after a failed acquire of %r: %s", self._name, e)
        finally:
            keeper._names.discard(self._name)

    async def _release_if_ours(self, keeper: SessionKeeper) -> None:
        state = await self._client.describe(self._name, timeout=self._client._cleanup_timeout)
        if state.holder is not None and state.holder.session_id == keeper.session_id:
            await self._client.release(
                self._name,
                state.holder.fencing_token,
                session_id=keeper.session_id,
                timeout=self._client._cleanup_timeout,
            )

    async def _cleanup(self) -> LockBrokerError | None:
        held, keeper = self.held, self._keeper
        if keeper is not None:
            keeper._names.discard(self._name)
            if held is not None:
                keeper.remove_lost_callback(held._on_session_lost)
        if self._own_session is not None:
            # Revoking the session's lease deletes the grant in the same step: one RPC, not two.
            await self._own_session.__aexit__(None, None, None)
            return None
        if held is None:
            return None
        try:
            await self._client.release(
                held.name, held.fencing_token, session_id=held.session_id, timeout=self._client._cleanup_timeout
            )
        except LockBrokerError as e:
            log.warning("releasing %r (fencing token %d) failed: %s", held.name, held.fencing_token, e)
            # On a shared session the grant outlives this block for as long as the session does.
            return e
        return None


# -- the client --------------------------------------------------------------------------------


class Client:
    """Asyncio client of lockbroker.v1.LockService."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        default_timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        merged = dict(DEFAULT_OPTIONS)
        merged.update(dict(options or ()))
        opts = builtins.list(merged.items())
        channel = (
            aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else aio.insecure_channel(target, options=opts)
        )
        self._setup(channel, owns_channel=True, api_key=api_key, default_timeout=default_timeout, backoff=backoff)

    @classmethod
    def from_channel(
        cls,
        channel: aio.Channel,
        *,
        api_key: str | None = None,
        default_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> Client:
        """Wrap a channel you manage; closing the client leaves the channel open."""
        self = cls.__new__(cls)
        self._setup(channel, owns_channel=False, api_key=api_key, default_timeout=default_timeout, backoff=backoff)
        return self

    def _setup(
        self,
        channel: aio.Channel,
        *,
        owns_channel: bool,
        api_key: str | None,
        default_timeout: float,
        backoff: Backoff | None,
    ) -> None:
        if default_timeout <= 0:
            raise ValueError("default_timeout must be positive: every call needs a deadline")
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub: lock_pb2_grpc.LockServiceAsyncStub = lock_pb2_grpc.LockServiceStub(channel)
        self._metadata: tuple[tuple[str, str], ...] = (("x-api-key", api_key),) if api_key else ()
        self.default_timeout = default_timeout
        self._cleanup_timeout = min(default_timeout, 5.0)
        self._backoff = backoff or Backoff()
        self._keepalive = _KeepAliveMux(self._stub, self._metadata, KEEPALIVE_STREAM_LIFETIME)
        self._keepers: set[SessionKeeper] = set()
        self._closed = False

    @property
    def channel(self) -> aio.Channel:
        return self._channel

    async def close(self) -> None:
        """Stop keepalives and close the channel (if the client made it). Sessions are not closed:
        leave their `async with` blocks first, or they lapse after their TTL."""
        if self._closed:
            return
        self._closed = True
        for keeper in builtins.list(self._keepers):
            await keeper._stop()
        await self._keepalive.close()
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.default_timeout if timeout is None else timeout)

    async def _unary(
        self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, timeout: float | None
    ) -> _Resp:
        async def attempt(left: float) -> _Resp:
            return await method(request, timeout=left, metadata=self._metadata)

        return await call_with_retry(attempt, deadline=self._deadline(timeout), backoff=self._backoff)

    # -- sessions ---------------------------------------------------------------------------

    async def _create_session(
        self, ttl: float | None, owner: str, request_id: str | None, timeout: float | None
    ) -> tuple[Session, float]:
        # Always idempotent: a retry after a lost answer must find the same lease, not leak one.
        req = lock_pb2.CreateSessionRequest(owner=owner, request_id=request_id or str(uuid.uuid4()))
        if ttl is not None:
            req.ttl.CopyFrom(duration(ttl))
        # The lease may have been granted by the first attempt (a retry finds it): counting its
        # expiry from the first send keeps our estimate at or below etcd's, never above.
        sent = time.monotonic()

        async def attempt(left: float) -> lock_pb2.CreateSessionResponse:
            return await self._stub.CreateSession(req, timeout=left, metadata=self._metadata)

        resp = await call_with_retry(attempt, deadline=self._deadline(timeout), backoff=self._backoff)
        session = Session(
            resp.session_id, seconds(resp.ttl), timestamp(resp.expires_at) if resp.HasField("expires_at") else None
        )
        return session, sent

    async def create_session(
        self, ttl: float | None = None, owner: str = "", request_id: str | None = None, *, timeout: float | None = None
    ) -> Session:
        """Create a session (ttl in whole seconds; None: the broker's default). Nothing keeps it
        alive: call refresh() or use `client.session()` instead."""
        session, _ = await self._create_session(ttl, owner, request_id, timeout)
        return session

    async def refresh(self, session_id: str, *, timeout: float | None = None) -> Session:
        resp = await self._unary(self._stub.Refresh, lock_pb2.RefreshRequest(session_id=session_id), timeout)
        return Session(
            session_id, seconds(resp.ttl), timestamp(resp.expires_at) if resp.HasField("expires_at") else None
        )

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> bool:
        resp = await self._unary(self._stub.CloseSession, lock_pb2.CloseSessionRequest(session_id=session_id), timeout)
        return resp.closed

    def session(self, ttl: float | None = 10, owner: str = "", *, session_id: str | None = None) -> SessionKeeper:
        """`async with client.session(ttl) as s:` a session refreshed every ttl/3 until the block ends.

        With `session_id`, keep that existing session alive instead of creating one (`ttl` and
        `owner` are then the session's own). The block still closes it on exit; call `detach()`
        first to leave it open.
        """
        return SessionKeeper(self, ttl, owner, session_id=session_id)

    # -- locks ------------------------------------------------------------------------------

    async def acquire(
        self,
        name: str,
        *,
        session_id: str | None = None,
        ttl: float | None = None,
        wait: float = 0.0,
        owner: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Grant:
        """Take a lock: try once (wait=0) or queue up to `wait` seconds.

        Without session_id the broker creates a session of `ttl` for this one lock; keep it alive
        or it lapses. `timeout` bounds the whole call including retries (default: wait +
        default_timeout). Raises LockHeld / WaitExpired (both NotAcquired) when not granted.
        """
        rid = request_id or str(uuid.uuid4())
        total = wait + self.default_timeout if timeout is None else timeout
        started = time.monotonic()

        async def attempt(left: float) -> lock_pb2.AcquireResponse:
            req = lock_pb2.AcquireRequest(name=name, session_id=session_id or "", owner=owner, request_id=rid)
            if ttl is not None:
                req.ttl.CopyFrom(duration(ttl))
            if wait > 0:
                # A retry resumes the same place in the queue; it should not restart the wait.
                req.wait_timeout.CopyFrom(duration(max(wait - (time.monotonic() - started), 0.001)))
            return await self._stub.Acquire(req, timeout=left, metadata=self._metadata)

        resp = await call_with_retry(attempt, deadline=started + total, backoff=self._backoff)
        return grant_of(resp)

    async def release(
        self,
        name: str,
        fencing_token: int,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Release exactly the grant with this token. False if it was already gone.

        A retry after a lost answer also reports False: the first attempt released it.
        """
        req = lock_pb2.ReleaseRequest(
            name=name, fencing_token=fencing_token, session_id=session_id or "", request_id=request_id or ""
        )
        resp = await self._unary(self._stub.Release, req, timeout)
        return resp.released

    async def describe(self, name: str, *, timeout: float | None = None) -> LockState:
        return lock_state_of(await self._unary(self._stub.Describe, lock_pb2.DescribeRequest(name=name), timeout))

    def lock(
        self,
        name: str,
        *,
        ttl: float | None = 10,
        wait: float = 5.0,
        owner: str = "",
        session: SessionKeeper | None = None,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
    ) -> LockContext:
        """`async with client.lock(name) as held:` hold `name` for the block.

        Without `session` a session of `ttl` seconds is created for this lock, kept alive, and
        closed on exit; with one, `ttl` is ignored and the session stays open. Raises a
        NotAcquired subclass (the block does not run) if the lock is not granted within `wait`.
        """
        return LockContext(
            self,
            name,
            ttl=None if session is not None else ttl,
            wait=wait,
            owner=owner,
            session=session,
            on_lost=on_lost,
            timeout=timeout,
        )

    async def list_pages(
        self, prefix: str = "", page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncGenerator[tuple[LockSummary, ...], None]:
        """Held locks by name, one page per List call; `timeout` applies to each page."""
        token = ""
        while True:
            req = lock_pb2.ListRequest(prefix=prefix, page_size=page_size, page_token=token)
            resp = await self._unary(self._stub.List, req, timeout)
            yield tuple(summary_of(h) for h in resp.locks)
            token = resp.next_page_token
            if not token:
                return

    async def list(
        self, prefix: str = "", page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncGenerator[LockSummary, None]:
        """Held locks whose name starts with `prefix`, ordered by name, across all pages."""
        async for page in self.list_pages(prefix, page_size, timeout=timeout):
            for item in page:
                yield item


__all__ = ["DEFAULT_OPTIONS", "Client", "HeldLock", "LockContext", "SessionKeeper"]
