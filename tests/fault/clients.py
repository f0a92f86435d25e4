"""Clients that record every call they make into a History, and a resource that checks fencing tokens.

A `LockClient` uses the Python client (`lockbroker.client.Client`) with its own retries turned off,
so that each RPC attempt is one recorded operation, and does the retrying itself: an indeterminate
Acquire is sent again with the same request id, on the other replica. It keeps its session alive
with recorded Refresh calls, so the history knows every confirmation of the session's expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lockbroker.client import (
    Backoff,
    Client,
    Grant,
    LockBrokerError,
    NotAcquired,
    Session,
    SessionLost,
    SessionNotFound,
)
from tests.fault.history import History, Pending, is_definite

T = TypeVar("T")

# Each RPC is a single attempt; LockClient decides about retries and records each one.
NO_RETRY = Backoff(max_attempts=1)
# Replicas are killed and restarted here: reconnect within a second, not after gRPC's default
# backoff (which grows to two minutes), or a restarted replica looks dead long after it is back.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
# How long an indeterminate Release (or CloseSession) is retried before the client gives up.
GIVE_UP_AFTER = 15.0


class FencedResource:
    """A store that refuses a write whose fencing token is below the highest it accepted for that lock.

    The state is a JSON file guarded by flock, so client processes share one resource. This is the
    check the README asks every protected resource to make.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def write(self, lock: str, token: int) -> tuple[bool, int]:
        """(accepted, the highest token accepted before this write)."""
        with self.path.open("r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            state: dict[str, int] = json.loads(text) if text.strip() else {}
            highest = int(state.get(lock, 0))
            if token < highest:
                return False, highest
            state[lock] = token
            f.seek(0)
            f.truncate()
            f.write(json.dumps(state))
            # No fsync: the processes sharing the file read it through the page cache, and an
            # fsync here would block the event loop behind etcd's own fsyncs.
            f.flush()
            return True, highest

    def highest(self, lock: str) -> int:
        text = self.path.read_text(encoding="utf-8")
        return int((json.loads(text) if text.strip() else {}).get(lock, 0))


class Gone(Exception):
    """The session ended; the caller should start a new one."""


class LockClient:
    """One recorded client with a session on one replica at a time, failing over to the other."""

    def __init__(
        self,
        cid: str,
        history: History,
        targets: Sequence[str],
        *,
        ttl: int = 3,
        call_timeout: float = 3.0,
        resource: FencedResource | None = None,
        rng: random.Random | None = None,
        first: int = 0,
    ) -> None:
        self.cid = cid
        self.history = history
        self.targets = list(targets)
        # The client's default transport (the Session stream): the checker's invariant 8 (during
        # a quorum loss every call ends with the broker's own status by its deadline) holds because
        # each message carries its deadline (SessionRequest.timeout), as a unary call's does.
        self.clients = [
            Client(t, default_timeout=call_timeout, backoff=NO_RETRY, options=CHANNEL_OPTIONS) for t in targets
        ]
        self.ttl = ttl
        self.call_timeout = call_timeout
        self.resource = resource
        self.rng = rng or random.Random()
        self.current = first % len(self.clients)
        self.session: str | None = None
        self.expiry = 0.0
        self._keeper: asyncio.Task[None] | None = None
        self.held: dict[str, int] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def failover(self, away_from: int) -> None:
        # The refresh task and the main task share the choice: only the first to see a replica
        # fail moves away from it.
        if self.current == away_from:
            self.current = (away_from + 1) % len(self.clients)

    async def _once(
        self, op: str, call: Callable[[Client], Awaitable[T]], deadline: float, **fields: object
    ) -> tuple[T, Pending]:
        """One attempt, recorded; on an indeterminate failure the next attempt goes to the other replica."""
        used = self.current
        p = self.history.invoke(self.cid, op, replica=f"r{used}", deadline=deadline, **fields)
        try:
            result = await call(self.clients[used])
        except LockBrokerError as e:
            p.error(e)
            if not is_definite(op, e):
                self.failover(used)
            raise
        except asyncio.CancelledError:
            p.info(code="CANCELLED", reason="", message="cancelled by the client")
            raise
        return result, p

    @property
    def alive(self) -> bool:
        return self.session is not None and time.monotonic() < self.expiry

    # -- sessions ----------------------------------------------------------------------------

    async def open_session(self, attempts: int = 6) -> str:
        rid = uuid.uuid4().hex
        started = time.monotonic()
        retried = False
        for n in range(attempts):
            try:
                s, p = await self._once(
                    "create_session",
                    lambda c: c.create_session(self.ttl, owner=self.cid, request_id=rid, timeout=self.call_timeout),
                    self.call_timeout,
                    ttl=self.ttl,
                    request_id=rid,
                )
            except LockBrokerError as e:
                if is_definite("create_session", e) or n == attempts - 1:
                    raise
                retried = True
                await asyncio.sleep(0.2)
                continue
            # A retry finds the lease the first attempt made: it was granted after the first send,
            # not after this one, so only the first send bounds its expiry from below.
            sent = started if retried else p.invoked_at
            self.session, self.expiry = s.session_id, sent + s.ttl
            p.ok(session=s.session_id, ttl=s.ttl, expiry=self.expiry)
            self._keeper = asyncio.create_task(self._keep(s.session_id), name=f"keep-{self.cid}")
            return s.session_id
        raise AssertionError("unreachable")

    async def _keep(self, session: str) -> None:
        """Refresh every TTL/3 (sooner after a failure) until the session is gone or replaced."""
        interval = self.ttl / 3
        next_at = time.monotonic() + interval
        while self.session == session:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self.session != session:
                return
            left = self.expiry - time.monotonic()
            if left <= 0:
                self._lose(session)
                return
            try:
                budget = min(self.call_timeout, max(left, 0.2))

                async def refresh(c: Client, budget: float = budget) -> Session:
                    return await c.refresh(session, timeout=budget)

                s, p = await self._once("refresh", refresh, budget, session=session)
            except SessionNotFound:
                self._lose(session)
                return
            except LockBrokerError:
                next_at = time.monotonic() + 0.1
                continue
            if time.monotonic() >= self.expiry:
                # Confirmed too late: the client already had to count the session as lost (as the
                # Python client's SessionKeeper does), and a lost session is not taken back.
                p.ok(session=session, ttl=s.ttl, expiry=self.expiry)
                self._lose(session)
                return
            if self.session == session:
                self.expiry = max(self.expiry, p.invoked_at + s.ttl)
            p.ok(session=session, ttl=s.ttl, expiry=self.expiry)
            next_at = p.invoked_at + interval

    async def refresh_once(self, session: str) -> bool:
        """One recorded Refresh of `session`, whatever this client believes about it: True if confirmed."""

        async def refresh(c: Client) -> Session:
            return await c.refresh(session, timeout=self.call_timeout)

        try:
            s, p = await self._once("refresh", refresh, self.call_timeout, session=session)
        except LockBrokerError:
            return False
        if self.session == session:
            self.expiry = max(self.expiry, p.invoked_at + s.ttl)
        p.ok(session=session, ttl=s.ttl, expiry=max(self.expiry, p.invoked_at + s.ttl))
        return True

    def _lose(self, session: str) -> None:
        if self.session == session:
            self.session = None

    async def close_session(self) -> None:
        session, self.session = self.session, None
        await self._stop_keeper()
        if session is None:
            return
        give_up = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < give_up:
            try:
                closed, p = await self._once(
                    "close_session",
                    lambda c: c.close_session(session, timeout=self.call_timeout),
                    self.call_timeout,
                    session=session,
                )
            except LockBrokerError as e:
                if is_definite("close_session", e):
                    return
                await asyncio.sleep(0.2)
                continue
            p.ok(session=session, closed=closed)
            return

    async def _stop_keeper(self) -> None:
        task, self._keeper = self._keeper, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- locks -------------------------------------------------------------------------------

    async def acquire(self, lock: str, wait: float, *, attempts: int = 6, deadline: float | None = None) -> int | None:
        """The fencing token, or None if not granted (definitely, or given up as unknown).

        `deadline`: the call's timeout instead of wait + call_timeout; below `wait` it makes the
        broker end the wait with DEADLINE_EXCEEDED (its queue entry removed).
        """
        session = self.session
        if session is None:
            raise Gone
        rid = uuid.uuid4().hex
        started = time.monotonic()
        for n in range(attempts):
            left = max(0.0, wait - (time.monotonic() - started))
            timeout = left + self.call_timeout if deadline is None else deadline

            async def attempt(c: Client, left: float = left, timeout: float = timeout) -> Grant:
                return await c.acquire(
                    lock, session_id=session, wait=left, owner=self.cid, request_id=rid, timeout=timeout
                )

            try:
                grant, p = await self._once(
                    "acquire",
                    attempt,
                    timeout,
                    lock=lock,
                    session=session,
                    request_id=rid,
                    wait=round(left, 3),
                )
            except NotAcquired:
                return None
            except (SessionNotFound, SessionLost):
                self._lose(session)
                raise Gone from None
            except LockBrokerError as e:
                if is_definite("acquire", e):
                    return None
                if n == attempts - 1 or self.session != session:
                    break
                await asyncio.sleep(0.1)
                continue
            p.ok(
                lock=lock,
                session=session,
                request_id=rid,
                token=grant.fencing_token,
                expiry=self.expiry,
                queue_position=grant.queue_position,
            )
            self.held[lock] = grant.fencing_token
            return grant.fencing_token
        # Unknown whether an entry was queued; only ending the session surely removes it.
        await self.close_session()
        raise Gone

    async def acquire_cancelled(self, lock: str, wait: float, after: float) -> int | None:
        """An Acquire the caller gives up on (cancels) after `after` seconds.

        The broker removes the queue entry of a cancelled Acquire. Only a grant made just before
        the cancellation can remain; like the Python client's lock(), this client then finds its
        session as holder and releases that grant.
        """
        session = self.session
        if session is None:
            raise Gone
        rid = uuid.uuid4().hex

        async def attempt(c: Client) -> Grant:
            return await c.acquire(
                lock, session_id=session, wait=wait, owner=self.cid, request_id=rid, timeout=wait + self.call_timeout
            )

        call = asyncio.ensure_future(
            self._once(
                "acquire", attempt, wait + self.call_timeout, lock=lock, session=session, request_id=rid, wait=wait
            )
        )
        done, _ = await asyncio.wait({call}, timeout=after)
        if not done:
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, LockBrokerError):
                await call
            await self._undo_lost_grant(lock, session)
            return None
        try:
            grant, p = call.result()
        except (SessionNotFound, SessionLost):
            self._lose(session)
            raise Gone from None
        except LockBrokerError as e:
            if is_definite("acquire", e):
                return None
            # Unknown whether an entry was queued: the broker may have died right after queueing it,
            # and then nobody removes it but this client. Giving up on the request (no retry with its
            # request id) leaves only ending the session, as acquire() does (the soak caught a kill -9
            # of the broker landing there: the entry stayed, and became a holder nobody knew of).
            await self.close_session()
            raise Gone from None
        p.ok(lock=lock, session=session, request_id=rid, token=grant.fencing_token, expiry=self.expiry)
        self.held[lock] = grant.fencing_token
        return grant.fencing_token

    async def release(self, lock: str, token: int) -> bool | None:
        """Release `token`, retrying an unknown outcome for up to GIVE_UP_AFTER seconds; past that,
        close the session instead (which releases everything it holds)."""
        self.held.pop(lock, None)
        session = self.session
        give_up = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < give_up:
            try:
                released, p = await self._once(
                    "release",
                    lambda c: c.release(lock, token, session_id=session, timeout=self.call_timeout),
                    self.call_timeout,
                    lock=lock,
                    token=token,
                    session=session,
                )
            except LockBrokerError as e:
                if is_definite("release", e):
                    return None
                await asyncio.sleep(0.2)
                continue
            p.ok(lock=lock, token=token, released=released)
            return released
        await self.close_session()
        return None

    async def _undo_lost_grant(self, lock: str, session: str) -> None:
        """After cancelling an Acquire: release the grant it may have made with its answer lost.

        Only an answer tells: a Describe that fails (etcd away, a partition) says nothing about
        the holder, so it is asked again; past GIVE_UP_AFTER the session is closed instead, which
        releases everything it holds. (Taking a failed Describe for "not ours" left a grant
        held by a live session for good: a stray entry at the end of a partition scenario.)"""
        give_up = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < give_up and self.session == session:
            try:
                state = await self._holder(lock)
            except LockBrokerError:
                await asyncio.sleep(0.2)
                continue
            if state is not None and state[1] == session:
                await self.release(lock, state[0])
            return
        if self.session == session:
            await self.close_session()

    async def describe(self, lock: str) -> tuple[int, str] | None:
        """(fencing token, session) of the holder, if any; None also if the call failed."""
        try:
            return await self._holder(lock)
        except LockBrokerError:
            return None

    async def _holder(self, lock: str) -> tuple[int, str] | None:
        """(fencing token, session) of the holder, if any; LockBrokerError if the call failed."""
        state, p = await self._once(
            "describe", lambda c: c.describe(lock, timeout=self.call_timeout), self.call_timeout, lock=lock
        )
        if state.holder is None:
            p.ok(lock=lock)
            return None
        p.ok(lock=lock, holder_token=state.holder.fencing_token, holder_session=state.holder.session_id)
        return state.holder.fencing_token, state.holder.session_id

    def write(self, lock: str, token: int) -> bool:
        """Write to the fenced resource with `token`; recorded as op "write"."""
        assert self.resource is not None
        p = self.history.invoke(self.cid, "write", lock=lock, token=token)
        accepted, highest = self.resource.write(lock, token)
        if accepted:
            p.ok(highest=highest)
        else:
            p.fail(code="FAILED_PRECONDITION", reason="STALE_TOKEN", highest=highest)
        return accepted

    # -- a workload ----------------------------------------------------------------------------

    async def run(
        self,
        locks: Sequence[str],
        stop: asyncio.Event,
        *,
        max_ops: int = 200,
        waits: Sequence[float] = (0.0, 1.0, 3.0),
        hold: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        """Take random locks until `stop` is set or `max_ops` acquires were made; then release all.

        The session is left open (see close()), so the harness can look at etcd in between.
        """
        for _ in range(max_ops):
            if stop.is_set():
                break
            try:
                if not self.alive:
                    if self.session is not None:
                        self._lose(self.session)
                    await self._stop_keeper()
                    await self.open_session()
                lock = self.rng.choice(locks)
                if self.rng.random() < 0.15:
                    await self.describe(lock)
                style = self.rng.random()
                wait = self.rng.choice(waits)
                if style < 0.1 and wait > 0:
                    # Invariant 7: given up on by the caller, the wait must leave nothing queued.
                    token = await self.acquire_cancelled(lock, wait, self.rng.uniform(0.05, wait))
                elif style < 0.2 and wait > 0:
                    token = await self.acquire(lock, wait, attempts=1, deadline=self.rng.uniform(0.2, wait))
                else:
                    token = await self.acquire(lock, wait)
                if token is None:
                    continue
                until = time.monotonic() + self.rng.uniform(*hold)
                while time.monotonic() < until and not stop.is_set():
                    # A careful holder: it writes only while its own expiry is ahead.
                    if self.resource is not None and self.alive:
                        self.write(lock, token)
                    await asyncio.sleep(0.05)
                await self.release(lock, token)
            except Gone:
                await asyncio.sleep(0.05)
            except LockBrokerError:
                await asyncio.sleep(0.1)
        for lock, token in list(self.held.items()):
            await self.release(lock, token)

    async def close(self) -> None:
        """Close the session (recorded), then the channels."""
        await self.close_session()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop refreshing and close the channels; the session, if any, lapses by itself."""
        self.session = None
        await self._stop_keeper()
        for c in self.clients:
            await c.close()


__all__ = ["NO_RETRY", "FencedResource", "Gone", "LockClient"]
