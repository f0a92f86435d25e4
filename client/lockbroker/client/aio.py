"""The asyncio client: one method per RPC, plus sessions kept alive and locks as context managers.

    async with Client("127.0.0.1:50051") as client:
        async with client.lock("orders/42", ttl=10, wait=5) as held:
            await storage.write(data, fencing_token=held.fencing_token)

Every call has a deadline (the `timeout` argument, else `default_timeout`). Calls are retried
on UNAVAILABLE with full-jitter exponential backoff inside that deadline; this is safe because
every RPC is idempotent once Acquire and CreateSession carry a request_id, which this client
always sends.

Transport: by default everything done within a session (create, refresh, close, acquire,
release) goes as messages over one Session stream per Client (`_stream.py`: about a third of a
unary call's cost per operation); Describe and List stay unary. `transport="unary"` (or the
environment variable LOCKBROKER_CLIENT_TRANSPORT=unary) uses one unary RPC per operation, and a
broker without the Session RPC is detected (UNIMPLEMENTED) and served by unary RPCs. Both
transports raise the same exceptions and retry the same way. That plumbing (the channel, deadlines,
retries, the transport) is `Connection`'s, in _connection.py, the base of `Client`.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from lockbroker.client import _many
from lockbroker.client._checks import check_utf8

# InsecureApiKeyWarning stays importable from here, outside __all__: docs/security.md tells users to
# filter it as lockbroker.client.aio.InsecureApiKeyWarning.
from lockbroker.client._clear import InsecureApiKeyWarning  # noqa: F401
from lockbroker.client._connection import DEFAULT_OPTIONS, TRANSPORT_ENV, Connection, Transport
from lockbroker.client._lock import HeldLock, LockContext, LostCallback
from lockbroker.client._many import LockSpec, ManyLockContext
from lockbroker.client._retry import call_with_retry
from lockbroker.client._session import SessionKeeper
from lockbroker.client._watch import LockEvent, watch_events
from lockbroker.client.election import Election
from lockbroker.client.types import (
    FenceCheck,
    Grant,
    LockState,
    LockSummary,
    Session,
    duration,
    fence_of,
    grant_of,
    lock_state_of,
    seconds,
    summary_of,
    timestamp,
)
from lockbroker.v1 import lock_pb2


class Client(Connection):
    """Asyncio client of lockbroker.v1.LockService.

    Construction, closing and how each call reaches the broker (deadline, retry, transport) are
    `Connection`'s, in _connection.py; the methods here are the API."""

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self, ttl: float | None = None, owner: str = "", request_id: str | None = None, *, timeout: float | None = None
    ) -> Session:
        """Create a session (ttl in whole seconds; None: the broker's default). Nothing keeps it
        alive: call refresh() or use `client.session()` instead."""
        session, _ = await self._create_session(ttl, owner, request_id, timeout)
        return session

    async def refresh(self, session_id: str, *, timeout: float | None = None) -> Session:
        resp = await self._session_call(
            "keepalive", self._stub.Refresh, lock_pb2.RefreshRequest(session_id=session_id), timeout
        )
        return Session(
            session_id, seconds(resp.ttl), timestamp(resp.expires_at) if resp.HasField("expires_at") else None
        )

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> bool:
        resp = await self._session_call(
            "close", self._stub.CloseSession, lock_pb2.CloseSessionRequest(session_id=session_id), timeout
        )
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
        new_claim: bool = False,
        reentrant_owner: str | None = None,
        max_hold: float | None = None,
        lock_delay: float | None = None,
        shared: bool = False,
        limit: int = 0,
    ) -> Grant:
        """Take a lock: try once (wait=0) or queue up to `wait` seconds.

        Without session_id the broker creates a session of `ttl` for this one lock; keep it alive
        or it lapses. `timeout` bounds the whole call including retries (default: wait +
        default_timeout). `max_hold` (whole seconds, at least 2): the broker revokes the grant
        once held this long (default: the tenant's max_hold, if any). `lock_delay`: if this grant
        is lost (not released), the lock is not granted again for this long (default: the
        tenant's lock_delay; above its max_lock_delay: InvalidArgument). Raises LockHeld /
        WaitExpired (both NotAcquired) when not granted.

        With a session: `new_claim` queues another, independent claim of the session (its own
        fencing token; release it by that token); `reentrant_owner` makes a reentrant acquire for
        that owner identity (a second acquire while it holds the lock counts a hold on the same
        grant; release once per acquire). See docs/locks.md.

        `shared=True` takes a shared (read) claim: held together with other shared claims, after
        every exclusive claim queued ahead of it. `limit=N` takes a permit of the counting
        semaphore `name` with N permits (every user must name the same N: LimitMismatch).
        """
        check_utf8(name=name, owner=owner, reentrant_owner=reentrant_owner or "")
        rid = request_id or str(uuid.uuid4())
        total = wait + self.default_timeout if timeout is None else timeout
        started = time.monotonic()

        async def attempt(left: float) -> lock_pb2.AcquireResponse:
            req = lock_pb2.AcquireRequest(
                name=name,
                session_id=session_id or "",
                owner=owner,
                request_id=rid,
                new_claim=new_claim,
                reentrant=reentrant_owner is not None,
                reentrant_owner=reentrant_owner or "",
                mode=lock_pb2.LOCK_MODE_SHARED if shared else lock_pb2.LOCK_MODE_UNSPECIFIED,
                limit=limit,
            )
            if ttl is not None:
                req.ttl.CopyFrom(duration(ttl))
            if max_hold is not None:
                req.max_hold.CopyFrom(duration(max_hold))
            if lock_delay is not None:
                req.lock_delay.CopyFrom(duration(lock_delay))
            if wait > 0:
                # A retry resumes the same place in the queue; it should not restart the wait.
                req.wait_timeout.CopyFrom(duration(max(wait - (time.monotonic() - started), 0.001)))
            return await self._via(
                "acquire", req, lambda t: self._stub.Acquire(req, timeout=t, metadata=self._metadata), left
            )

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
        check_utf8(name=name)
        # One request id for every attempt: a retry of a release of a reentrant grant held more
        # than once then takes no second hold off.
        req = lock_pb2.ReleaseRequest(
            name=name,
            fencing_token=fencing_token,
            session_id=session_id or "",
            request_id=request_id or str(uuid.uuid4()),
        )
        resp = await self._session_call("release", self._stub.Release, req, timeout)
        return resp.released

    async def check_fence(self, name: str, fencing_token: int, *, timeout: float | None = None) -> FenceCheck:
        """Is `fencing_token` the current grant of `name`? For a resource the lock protects: accept
        a write only while its token is current (CheckFence; one etcd read on the broker)."""
        req = lock_pb2.CheckFenceRequest(name=name, fencing_token=fencing_token)
        return fence_of(await self._unary(self._stub.CheckFence, req, timeout))

    async def describe(self, name: str, *, timeout: float | None = None) -> LockState:
        check_utf8(name=name)
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
        reentrant: bool | str = False,
        max_hold: float | None = None,
        lock_delay: float | None = None,
        shared: bool = False,
        limit: int = 0,
    ) -> LockContext:
        """`async with client.lock(name) as held:` hold `name` for the block.

        Without `session` a session of `ttl` seconds is created for this lock, kept alive, and
        closed on exit; with one, `ttl` is ignored and the session stays open. Raises a
        NotAcquired subclass (the block does not run) if the lock is not granted within `wait`.

        Tasks sharing one `session` may all lock the same name: each gets its own claim, granted
        in FIFO order with its own fencing token. `reentrant=True` (needs `session`) makes the
        lock reentrant for the current asyncio task: a nested `client.lock(name, session=s,
        reentrant=True)` in the same task gets the same grant, and the lock is released when the
        outermost block ends. A string instead of True names the owner identity explicitly.
        With `max_hold`, the broker revokes the grant once held that long: `held.lost` fires with
        `lost_cause == "MAX_HOLD_EXCEEDED"`. `lock_delay`: see `acquire`.

        `shared=True`: a shared (read) lock, held together with other shared holders; exclusive
        (the default) is the write lock. `limit=N`: a permit of the counting semaphore `name`
        (at most N holders at once, FIFO).
        """
        owner_id: str | None = None
        if reentrant:
            if session is None:
                raise ValueError("reentrant=True needs a session: reentrancy is per session and owner")
            owner_id = reentrant if isinstance(reentrant, str) else _current_task_identity()
        return LockContext(
            self,
            name,
            ttl=None if session is not None else ttl,
            wait=wait,
            owner=owner,
            session=session,
            on_lost=on_lost,
            timeout=timeout,
            reentrant_owner=owner_id,
            max_hold=max_hold,
            lock_delay=lock_delay,
            shared=shared,
            limit=limit,
        )

    async def acquire_many(
        self,
        locks: Sequence[LockSpec],
        *,
        session_id: str,
        wait: float = 0.0,
        owner: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> builtins.list[Grant]:
        """Take several locks for one session, all or none (AcquireMany): each of `locks` is a
        name (exclusive) or (name, shared). The grants come in the order given; release them one
        by one or together. No deadlock with other callers naming the same locks in any order."""
        return await _many.acquire_many(
            self, locks, session_id=session_id, wait=wait, owner=owner, request_id=request_id, timeout=timeout
        )

    def lock_many(
        self,
        locks: Sequence[LockSpec],
        *,
        ttl: float | None = 10,
        wait: float = 5.0,
        owner: str = "",
        session: SessionKeeper | None = None,
        timeout: float | None = None,
    ) -> ManyLockContext:
        """`async with client.lock_many(["a", ("b", True)]) as grants:` hold every lock for the
        block (all granted or none, see acquire_many); released on exit. Without `session`, a
        session of `ttl` is made for the block and closed after it."""
        return ManyLockContext(
            self,
            locks,
            ttl=None if session is not None else ttl,
            wait=wait,
            owner=owner,
            session=session,
            timeout=timeout,
        )

    def election(self, name: str) -> Election:
        """Leader election `name` of the caller's tenant (ElectionService): `campaign()`, `observe()`,
        `leader()`; see lockbroker.client.election."""
        return Election(self, name)

    async def list_pages(
        self, prefix: str = "", page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncGenerator[tuple[LockSummary, ...], None]:
        """Held locks by name, one page per List call; `timeout` applies to each page."""
        check_utf8(prefix=prefix)
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

    def watch(
        self, name: str, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncGenerator[LockEvent, None]:
        """The events of lock `name` (with `prefix`, of every lock whose name starts with it):
        `async for event in client.watch("orders/42")`. Without `start_revision` the first events
        are a snapshot (event.snapshot: the holder as GRANTED, waiters as WAITER_QUEUED). A dropped
        stream is resumed from the last revision received, so nothing is missed or repeated."""
        check_utf8(name=name)
        return watch_events(
            self._stub, self._metadata, name, prefix=prefix, start_revision=start_revision, backoff=self._backoff
        )


def _current_task_identity() -> str:
    """Who re-enters a reentrant lock from asyncio code: this process, thread and task. A task's
    id is not reused while the task lives, and a task holding a lock is alive."""
    task = asyncio.current_task()
    return f"{os.getpid()}:{threading.get_ident()}:task-{id(task) if task is not None else 0:x}"


__all__ = ["DEFAULT_OPTIONS", "TRANSPORT_ENV", "Client", "HeldLock", "LockContext", "SessionKeeper", "Transport"]
