"""A blocking facade over the asyncio client, for code without an event loop.

    with SyncClient("127.0.0.1:50051") as client:
        with client.lock("orders/42", ttl=10, wait=5) as held:
            write(data, fencing_token=held.fencing_token)

The asyncio Client runs on a private event loop in one daemon thread; each method submits a
coroutine there and blocks on its result. Keepalives therefore continue while the calling
thread is busy inside a `with` block. Lost-lock callbacks run on that loop thread: keep them
short and do not call SyncClient methods from them (that would wait on the loop it blocks).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from lockbroker.client._lock import HeldLock, LockContext
from lockbroker.client._many import LockSpec, ManyLockContext
from lockbroker.client._retry import Backoff
from lockbroker.client._session import SessionKeeper
from lockbroker.client._watch import LockEvent
from lockbroker.client.aio import Client, Transport
from lockbroker.client.election import CampaignContext, Election, Leader, LeaderChange, Leadership
from lockbroker.client.errors import LockLost
from lockbroker.client.types import FenceCheck, Grant, LockState, LockSummary, Session

_T = TypeVar("_T")


class SyncSession:
    """A session kept alive by the background loop; see SessionKeeper."""

    def __init__(self, keeper: SessionKeeper) -> None:
        self._keeper = keeper
        # threading.Event, not asyncio.Event: this is waited on from ordinary threads.
        self.lost = threading.Event()
        keeper.add_lost_callback(lambda _k: self.lost.set())

    @property
    def session(self) -> Session:
        return self._keeper.session

    @property
    def session_id(self) -> str:
        return self._keeper.session_id

    @property
    def expires_at(self) -> float:
        """time.monotonic() instant of the session's last confirmed expiry."""
        return self._keeper.expires_at

    @property
    def lost_reason(self) -> str | None:
        return self._keeper.lost_reason

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.expires_at


class SyncHeldLock:
    """A lock held inside `with client.lock(...) as held:`; see HeldLock."""

    def __init__(self, held: HeldLock, on_lost: Callable[[SyncHeldLock], object] | None) -> None:
        self._held = held
        self.lost = threading.Event()
        self._on_lost = on_lost
        held.add_lost_callback(self._lost)

    def _lost(self, _held: HeldLock) -> None:
        self.lost.set()
        if self._on_lost is not None:
            self._on_lost(self)

    @property
    def grant(self) -> Grant:
        return self._held.grant

    @property
    def name(self) -> str:
        return self._held.name

    @property
    def fencing_token(self) -> int:
        return self._held.fencing_token

    @property
    def session_id(self) -> str:
        return self._held.session_id

    @property
    def deadline(self) -> float:
        """time.monotonic() instant after which this process must not believe it holds the lock."""
        return self._held.deadline

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def lost_reason(self) -> str | None:
        return self._held.lost_reason

    @property
    def lost_cause(self) -> str | None:
        """ "REVOKED" when an admin took the lock away, "SESSION_LOST" when the session ended."""
        return self._held.lost_cause

    def check(self) -> None:
        """Raise LockLost unless the lock can still be assumed held."""
        # Reads only: the asyncio side belongs to the loop thread and is not touched from here.
        if self.lost.is_set() or time.monotonic() >= self.deadline:
            why = self._held.lost_reason or "the session's last confirmed expiry has passed"
            raise LockLost(
                f"lock {self.name!r} (fencing token {self.fencing_token}) was lost: {why}",
                name=self.name,
                fencing_token=self.fencing_token,
                cause=self._held.lost_cause,
            )


class SyncLeadership(SyncHeldLock):
    """Leadership inside `with client.election(name).campaign(value) as leadership:`; see Leadership."""

    def __init__(
        self, client: SyncClient, leadership: Leadership, on_lost: Callable[[SyncHeldLock], object] | None
    ) -> None:
        super().__init__(leadership, on_lost)
        self._client = client
        self._leadership = leadership

    @property
    def value(self) -> bytes:
        return self._leadership.value

    def proclaim(self, value: bytes, *, timeout: float | None = None) -> int:
        """Set the value observers see; NotLeader if this leadership is gone. The etcd revision."""
        return self._client._call(self._leadership.proclaim(value, timeout=timeout))

    def resign(self, *, timeout: float | None = None) -> bool:
        return self._client._call(self._leadership.resign(timeout=timeout))


class SyncElection:
    """One election: `client.election(name)`; the same methods as Election, blocking."""

    def __init__(self, client: SyncClient, election: Election) -> None:
        self._client = client
        self._election = election

    @property
    def name(self) -> str:
        return self._election.name

    def leader(self, *, timeout: float | None = None) -> Leader | None:
        return self._client._call(self._election.leader(timeout=timeout))

    def observe(self, after_revision: int = 0) -> Iterator[LeaderChange]:
        """Every leader change (see Election.observe); stop by leaving the loop."""
        changes = self._election.observe(after_revision)

        async def step() -> LeaderChange:
            return await anext(changes)

        try:
            while True:
                yield self._client._call(step())
        finally:
            if not self._client._closed:
                self._client._call(changes.aclose())

    @contextmanager
    def campaign(
        self,
        value: bytes = b"",
        *,
        session: SyncSession | None = None,
        ttl: float | None = 10,
        wait: float | None = None,
        owner: str = "",
        on_lost: Callable[[SyncHeldLock], object] | None = None,
        timeout: float | None = None,
    ) -> Iterator[SyncLeadership]:
        """`with election.campaign(value) as leadership:`; same contract as Election.campaign()."""

        async def enter() -> tuple[CampaignContext, SyncLeadership]:
            ctx = self._election.campaign(
                value,
                session=session._keeper if session is not None else None,
                ttl=ttl,
                wait=wait,
                owner=owner,
                timeout=timeout,
            )
            leadership = await ctx.__aenter__()
            return ctx, SyncLeadership(self._client, leadership, on_lost)

        ctx, leadership = self._client._call(enter())
        try:
            yield leadership
        except BaseException as e:
            self._client._call(ctx.__aexit__(type(e), e, e.__traceback__))
            raise
        self._client._call(ctx.__aexit__(None, None, None))


class SyncClient:
    """Blocking client of lockbroker.v1.LockService, with the same methods as `Client`."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        default_timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] | None = None,
        backoff: Backoff | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="lockbroker-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> Client:
            # grpc.aio channels belong to the loop they are created on.
            return Client(
                target,
                credentials=credentials,
                api_key=api_key,
                default_timeout=default_timeout,
                options=options,
                backoff=backoff,
                transport=transport,
            )

        try:
            self._client = self._call(make())
        except BaseException:
            self._stop_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "SyncClient methods cannot be called from its own loop thread (e.g. from an on_lost callback)"
            )
        if self._closed:
            coro.close()
            raise RuntimeError("the SyncClient is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            # KeyboardInterrupt in the caller: stop the call rather than leave it running unseen.
            fut.cancel()
            raise

    @property
    def aio(self) -> Client:
        """The asyncio client underneath (its methods must run on `loop`)."""
        return self._client

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._closed = True
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- RPCs -------------------------------------------------------------------------------

    def create_session(
        self, ttl: float | None = None, owner: str = "", request_id: str | None = None, *, timeout: float | None = None
    ) -> Session:
        return self._call(self._client.create_session(ttl, owner, request_id, timeout=timeout))

    def refresh(self, session_id: str, *, timeout: float | None = None) -> Session:
        return self._call(self._client.refresh(session_id, timeout=timeout))

    def close_session(self, session_id: str, *, timeout: float | None = None) -> bool:
        return self._call(self._client.close_session(session_id, timeout=timeout))

    def acquire(
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
        shared: bool = False,
        limit: int = 0,
    ) -> Grant:
        return self._call(
            self._client.acquire(
                name,
                session_id=session_id,
                ttl=ttl,
                wait=wait,
                owner=owner,
                request_id=request_id,
                timeout=timeout,
                new_claim=new_claim,
                reentrant_owner=reentrant_owner,
                shared=shared,
                limit=limit,
            )
        )

    def release(
        self,
        name: str,
        fencing_token: int,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        return self._call(
            self._client.release(name, fencing_token, session_id=session_id, request_id=request_id, timeout=timeout)
        )

    def describe(self, name: str, *, timeout: float | None = None) -> LockState:
        return self._call(self._client.describe(name, timeout=timeout))

    def check_fence(self, name: str, fencing_token: int, *, timeout: float | None = None) -> FenceCheck:
        """Is `fencing_token` the current grant of `name`? (see Client.check_fence)"""
        return self._call(self._client.check_fence(name, fencing_token, timeout=timeout))

    def list_pages(
        self, prefix: str = "", page_size: int = 100, *, timeout: float | None = None
    ) -> Iterator[tuple[LockSummary, ...]]:
        pages = self._client.list_pages(prefix, page_size, timeout=timeout)

        async def next_page() -> tuple[LockSummary, ...] | None:
            try:
                return await anext(pages)
            except StopAsyncIteration:
                return None

        try:
            while (page := self._call(next_page())) is not None:
                yield page
        finally:
            if not self._closed:
                self._call(pages.aclose())

    def list(self, prefix: str = "", page_size: int = 100, *, timeout: float | None = None) -> Iterator[LockSummary]:
        for page in self.list_pages(prefix, page_size, timeout=timeout):
            yield from page

    def election(self, name: str) -> SyncElection:
        """Leader election `name` (see Client.election)."""
        return SyncElection(self, self._client.election(name))

    def watch(self, name: str, prefix: bool = False, start_revision: int | None = None) -> Iterator[LockEvent]:
        """The events of a lock (or name prefix), blocking for each: see Client.watch."""
        events = self._client.watch(name, prefix, start_revision)

        async def next_event() -> LockEvent | None:
            try:
                return await anext(events)
            except StopAsyncIteration:
                return None

        try:
            while (event := self._call(next_event())) is not None:
                yield event
        finally:
            if not self._closed:
                self._call(events.aclose())

    # -- sessions and locks -----------------------------------------------------------------

    @contextmanager
    def session(
        self, ttl: float | None = 10, owner: str = "", *, session_id: str | None = None
    ) -> Iterator[SyncSession]:
        """`with client.session(ttl) as s:` a session kept alive until the block ends.

        With `session_id`, keep that existing session alive instead (see Client.session)."""

        async def start() -> SyncSession:
            keeper = self._client.session(ttl, owner, session_id=session_id)
            await keeper.start()
            return SyncSession(keeper)

        s = self._call(start())
        try:
            yield s
        finally:
            self._call(s._keeper.__aexit__(None, None, None))

    @contextmanager
    def lock(
        self,
        name: str,
        *,
        ttl: float | None = 10,
        wait: float = 5.0,
        owner: str = "",
        session: SyncSession | None = None,
        on_lost: Callable[[SyncHeldLock], object] | None = None,
        timeout: float | None = None,
        reentrant: bool = False,
        shared: bool = False,
        limit: int = 0,
    ) -> Iterator[SyncHeldLock]:
        """`with client.lock(name) as held:`; same contract as Client.lock().

        Threads sharing one `session` may all lock the same name (each gets its own claim, FIFO).
        `reentrant=True` (needs `session`) is keyed by the calling thread: nested blocks of one
        thread share one grant, released when the outermost block ends."""
        # Taken here, in the caller's thread: the coroutine below runs on the client's loop thread.
        owner_id: bool | str = f"{os.getpid()}:thread-{threading.get_ident()}" if reentrant else False

        async def enter() -> tuple[LockContext, SyncHeldLock]:
            ctx = self._client.lock(
                name,
                ttl=ttl,
                wait=wait,
                owner=owner,
                session=session._keeper if session is not None else None,
                timeout=timeout,
                reentrant=owner_id,
                shared=shared,
                limit=limit,
            )
            held = await ctx.__aenter__()
            # Registered on the loop thread, which owns the asyncio side of HeldLock.
            return ctx, SyncHeldLock(held, on_lost)

        ctx, held = self._call(enter())
        try:
            yield held
        except BaseException as e:
            self._call(ctx.__aexit__(type(e), e, e.__traceback__))
            raise
        self._call(ctx.__aexit__(None, None, None))

    def acquire_many(
        self,
        locks: Sequence[LockSpec],
        *,
        session_id: str,
        wait: float = 0.0,
        owner: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> builtins.list[Grant]:
        """Several locks for one session, all or none; same contract as Client.acquire_many()."""
        return self._call(
            self._client.acquire_many(
                locks, session_id=session_id, wait=wait, owner=owner, request_id=request_id, timeout=timeout
            )
        )

    @contextmanager
    def lock_many(
        self,
        locks: Sequence[LockSpec],
        *,
        ttl: float | None = 10,
        wait: float = 5.0,
        owner: str = "",
        session: SyncSession | None = None,
        timeout: float | None = None,
    ) -> Iterator[tuple[Grant, ...]]:
        """`with client.lock_many(["a", ("b", True)]) as grants:`; same contract as Client.lock_many()."""

        async def enter() -> tuple[ManyLockContext, tuple[Grant, ...]]:
            keeper = session._keeper if session is not None else None
            ctx = self._client.lock_many(locks, ttl=ttl, wait=wait, owner=owner, session=keeper, timeout=timeout)
            return ctx, await ctx.__aenter__()

        ctx, grants = self._call(enter())
        try:
            yield grants
        finally:
            self._call(ctx.__aexit__(None, None, None))


__all__ = ["SyncClient", "SyncElection", "SyncHeldLock", "SyncLeadership", "SyncSession"]
