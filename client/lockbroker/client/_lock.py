"""Locks as context managers: `async with client.lock(name) as held:`.

LockContext acquires on enter and on exit releases (or closes the session it made for the
lock); on a failed or cancelled acquire it undoes whatever the broker may have granted.
HeldLock is what the block gets: the grant, and whether it can still be believed held.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from lockbroker.client._session import SESSION_LOST, SessionKeeper, _call_safely, _shielded
from lockbroker.client.errors import DeadlineExceeded, LockBrokerError, LockLost, NotAcquired, Unavailable
from lockbroker.client.types import Grant
from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from lockbroker.client.aio import Client

log = logging.getLogger("lockbroker.client")

LostCallback = Callable[["HeldLock"], object]


class HeldLock:
    """A lock held inside `async with client.lock(...) as held:`.

    Being inside the block does not prove the lock is still held: a session can lapse while
    the process is paused. Call `check()` before each step that relies on the lock, pass
    `fencing_token` to whatever the lock protects, and watch `lost` for early warning.

    `lost` fires when the session lapses or is revoked, and when the broker takes this grant away
    while the session lives on (reported on the session's next keepalive). `lost_cause` then says
    which: "REVOKED" (an admin's ForceRelease; `lost_reason` carries the admin's reason),
    "MAX_HOLD_EXCEEDED" (held longer than its maximum hold time), or "SESSION_LOST" (the session
    lapsed or was closed).
    """

    def __init__(self, grant: Grant, session: SessionKeeper) -> None:
        self.grant = grant
        self.session = session
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self.lost_cause: str | None = None
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
                cause=self.lost_cause,
            )

    def add_lost_callback(self, cb: LostCallback) -> None:
        if self.lost.is_set():
            _call_safely(cb, self)
        else:
            self._callbacks.append(cb)

    def _on_session_lost(self, session: SessionKeeper) -> None:
        self._mark_lost(session.lost_reason or "the session was lost", session.lost_cause or SESSION_LOST)

    def _on_revoked(self, reason: str, message: str) -> None:
        who = "an admin took the lock away" if reason == ErrorReason.REVOKED else f"the broker revoked it ({reason})"
        self._mark_lost(f"{who}: {message}", reason)

    def _mark_lost(self, why: str, cause: str = SESSION_LOST) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = why
        self.lost_cause = cause
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
        reentrant_owner: str | None = None,
        max_hold: float | None = None,
        lock_delay: float | None = None,
        shared: bool = False,
        limit: int = 0,
    ) -> None:
        self._client = client
        self._reentrant_owner = reentrant_owner
        # Ours, so that clean-up after an unknown outcome can tell our claim from the session's others.
        self._request_id = str(uuid.uuid4())
        self._cleanup_timeout = client._support.cleanup_timeout
        self._name = name
        self._ttl = ttl
        self._wait = wait
        self._owner = owner
        self._session = session
        self._on_lost = on_lost
        self._timeout = timeout
        self._max_hold = max_hold
        self._lock_delay = lock_delay
        self._shared = shared
        self._limit = limit
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
        self._keeper = keeper
        # Other tasks or threads of this session already hold or wait for the name: queue a claim
        # of our own (FIFO with them); the first one uses the session's plain claim. A reentrant
        # owner always has a claim of its own.
        new_claim = self._reentrant_owner is None and keeper._names[self._name] > 0
        if self._reentrant_owner is None:
            keeper._names[self._name] += 1
        try:
            grant = await self._client.acquire(
                self._name,
                session_id=keeper.session_id,
                wait=self._wait,
                owner=self._owner,
                timeout=self._timeout,
                request_id=self._request_id,
                new_claim=new_claim,
                reentrant_owner=self._reentrant_owner,
                max_hold=self._max_hold,
                lock_delay=self._lock_delay,
                shared=self._shared,
                limit=self._limit,
            )
        except BaseException as exc:
            await self._abandon(exc)
            raise
        held = self.held = HeldLock(grant, keeper)
        if self._on_lost is not None:
            held.add_lost_callback(self._on_lost)
        keeper.add_lost_callback(held._on_session_lost)
        keeper.watch_revocation(grant.name, grant.fencing_token, held._on_revoked)
        return held

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            failure = await _shielded(self._cleanup(), self._cleanup_timeout * 2)
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
                await _shielded(with_session.__aexit__(None, None, None), self._cleanup_timeout)
                return
            if isinstance(exc, NotAcquired):
                return  # a definite "no": the broker queued nothing
            if self._reentrant_owner is not None:
                # A hold may have been counted with its answer lost: it stays until the session
                # ends (a holder cannot tell its own hold from its nested ones).
                return
            if isinstance(exc, (asyncio.CancelledError, DeadlineExceeded, Unavailable)):
                # The grant may have been made with its answer lost: a holder made by our
                # request id is our grant (the session may hold other claims of this name).
                await _shielded(self._release_if_ours(keeper), self._cleanup_timeout)
        except (LockBrokerError, TimeoutError) as e:
            log.warning("could not clean up after a failed acquire of %r: %s", self._name, e)
        finally:
            self._forget(keeper)

    def _forget(self, keeper: SessionKeeper) -> None:
        if self._reentrant_owner is None and keeper._names[self._name] > 0:
            keeper._names[self._name] -= 1
            if not keeper._names[self._name]:
                del keeper._names[self._name]

    async def _release_if_ours(self, keeper: SessionKeeper) -> None:
        state = await self._client.describe(self._name, timeout=self._cleanup_timeout)
        # A shared lock or a semaphore has several holders, ours not necessarily the first; a
        # broker older than shared locks reports only `holder`.
        for holder in state.holders or ((state.holder,) if state.holder is not None else ()):
            # A broker older than claims does not report request ids; it has one claim per session.
            if holder.session_id == keeper.session_id and holder.request_id in ("", self._request_id):
                await self._client.release(
                    self._name,
                    holder.fencing_token,
                    session_id=keeper.session_id,
                    timeout=self._cleanup_timeout,
                )
                return

    async def _cleanup(self) -> LockBrokerError | None:
        held, keeper = self.held, self._keeper
        if keeper is not None:
            self._forget(keeper)
            if held is not None:
                keeper.remove_lost_callback(held._on_session_lost)
                keeper.unwatch_revocation(held.name, held.fencing_token)
        if self._own_session is not None:
            # Revoking the session's lease deletes the grant in the same step: one RPC, not two.
            await self._own_session.__aexit__(None, None, None)
            return None
        if held is None:
            return None
        try:
            await self._client.release(
                held.name, held.fencing_token, session_id=held.session_id, timeout=self._cleanup_timeout
            )
        except LockBrokerError as e:
            log.warning("releasing %r (fencing token %d) failed: %s", held.name, held.fencing_token, e)
            # On a shared session the grant outlives this block for as long as the session does.
            return e
        return None
