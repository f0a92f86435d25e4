"""Sessions kept alive in the background (`async with client.session(ttl) as s:`).

A SessionKeeper refreshes its session over the Client's shared KeepAlive stream every ttl/3 and
says when the session is lost. What it needs from the Client beyond the public API (the stream,
the backoff, the clean-up bound, the create call that reports its send time, and the set of
running keepers that Client.close() stops) comes in one object, `ClientSupport`.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from lockbroker.client._keepalive import KeepAliveMux
from lockbroker.client._retry import Backoff
from lockbroker.client.errors import LockBrokerError, SessionNotFound, SessionRevoked
from lockbroker.client.types import Session, seconds
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from lockbroker.client._stream import StreamKeepAlive
    from lockbroker.client.aio import Client

log = logging.getLogger("lockbroker.client")

_T = TypeVar("_T")

SessionLostCallback = Callable[["SessionKeeper"], object]
# (reason, the admin's message) when an admin revokes one grant of the session.
RevokedCallback = Callable[[str, str], object]
# The loss causes a keeper and a HeldLock report (`lost_cause`): the ErrorReason "REVOKED" when an
# admin acted, else this.
SESSION_LOST: str = ErrorReason.SESSION_LOST
# create_session(ttl, owner, request_id, timeout) -> (session, local send time of the first attempt)
CreateSession = Callable[[float | None, str, "str | None", float | None], Awaitable[tuple[Session, float]]]


@dataclass(eq=False)
class ClientSupport:
    """What a Client lends its session keepers and lock contexts beyond its public API.

    Made once by the Client and read once by each keeper or lock context, so the coupling is this
    one object, not private fields of the Client read from other classes.
    """

    keepalive: KeepAliveMux | StreamKeepAlive
    backoff: Backoff
    # Bound on each clean-up call (release, close) made on the way out of a block.
    cleanup_timeout: float
    create_session: CreateSession
    # Keepers refreshing right now: Client.close() stops them before closing the stream.
    keepers: set[SessionKeeper] = field(default_factory=set)


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
        self._support = client._support
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
        self.lost_cause: str | None = None
        # (name, fencing token) -> what to tell when an admin revokes that grant.
        self._revocation_watchers: dict[tuple[str, int], RevokedCallback] = {}
        # Names this keeper's lock() contexts are acquiring or holding; see LockContext._abandon.
        self._names: Counter[str] = Counter()  # LockContexts per name on this session

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

    def watch_revocation(self, name: str, fencing_token: int, cb: RevokedCallback) -> None:
        """Call `cb(reason, message)` once if the broker reports this grant revoked by an admin."""
        self._revocation_watchers[(name, fencing_token)] = cb

    def unwatch_revocation(self, name: str, fencing_token: int) -> None:
        self._revocation_watchers.pop((name, fencing_token), None)

    def _revoked(self, revoked: Iterable[lock_pb2.RevokedGrant]) -> None:
        for r in revoked:
            cb = self._revocation_watchers.pop((r.name, r.fencing_token), None)
            if cb is not None:
                log.warning("lock %r (fencing token %d) revoked: %s", r.name, r.fencing_token, r.message)
                try:
                    cb(r.reason, r.message)
                except Exception:
                    log.exception("revocation callback %r failed", cb)

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
            self._session, sent = await self._support.create_session(
                self._requested_ttl, self._owner, self._request_id, None
            )
        self.expires_at = sent + self._session.ttl
        self._task = asyncio.create_task(self._keep(sent), name=f"lockbroker-session-{self.session_id}")
        self._support.keepers.add(self)
        return self

    async def close(self) -> bool:
        """Stop refreshing and close the session (releasing every lock it holds).

        True if this call closed a live session. Safe to call more than once.
        """
        if self._closed or self._session is None:
            return False
        self._closed = True
        await self._stop()
        return await self._client.close_session(self.session_id, timeout=self._support.cleanup_timeout)

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
            await _shielded(self.close(), self._support.cleanup_timeout)
        except (LockBrokerError, TimeoutError) as e:
            # The lease lapses by itself within one TTL now that nobody refreshes it.
            log.warning("closing session %s failed: %s", self._session and self._session.session_id, e)

    async def _stop(self) -> None:
        self._support.keepers.discard(self)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    def _mark_lost(self, why: str, cause: str = SESSION_LOST) -> None:
        if self.lost.is_set() or self._closed:
            return
        self.lost_reason = why
        self.lost_cause = cause
        self.lost.set()
        log.warning("session %s lost: %s", self.session_id, why)
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _call_safely(cb, self)

    async def _keep(self, created_at: float) -> None:
        interval = self.ttl / 3
        next_send = created_at + interval
        failures = 0
        backoff = self._support.backoff
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
                    self._support.keepalive.refresh(self.session_id), timeout=min(left, max(interval, 0.5))
                )
            except TimeoutError:
                self._support.keepalive.reset()
                failures += 1
                next_send = time.monotonic()
                continue
            except SessionRevoked as e:
                self._mark_lost(f"an admin revoked the session: {e.metadata.get('admin_reason', '')}", e.reason)
                return
            except SessionNotFound as e:
                self._mark_lost(f"the broker no longer knows the session: {e.message}")
                return
            except LockBrokerError as e:
                failures += 1
                log.debug("keepalive of session %s failed (%d): %s", self.session_id, failures, e)
                next_send = time.monotonic() + min(backoff.delay(failures - 1), interval / 2)
                continue
            if resp.expired:
                whole = next((r for r in resp.revoked if not r.name), None)
                if whole is not None:
                    self._mark_lost(f"an admin revoked the session: {whole.message}", whole.reason)
                else:
                    self._mark_lost("the broker reports the session expired or was closed")
                return
            if resp.revoked and self._revocation_watchers:
                self._revoked(resp.revoked)
            failures = 0
            ttl = seconds(resp.ttl)
            self.expires_at = max(self.expires_at, sent + ttl)
            interval = ttl / 3
            next_send = sent + interval
