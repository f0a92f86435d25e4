"""Leader election (lockbroker.v1.ElectionService) for the asyncio client.

    async with client.session(ttl=10) as s:
        async with client.election("scheduler").campaign(b"host-a:8080", session=s) as leadership:
            while not leadership.lost.is_set():
                await leadership.proclaim(b"host-a:8080 (busy)")
                ...

    async for leader in client.election("scheduler").observe():
        print(leader.value if leader.leader else "nobody leads")

A leadership is a grant, so it is what `client.lock()` gives: the same `lost` event, `check()`
and fencing token (the leader key's create revision, strictly increasing from one leader to the
next). Leadership ends when the block ends (Resign), or when the session ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from grpc import aio

from lockbroker.client._checks import check_utf8
from lockbroker.client._lock import HeldLock, LostCallback
from lockbroker.client._retry import call_with_retry
from lockbroker.client._session import SessionKeeper, _shielded
from lockbroker.client.errors import (
    DeadlineExceeded,
    LockBrokerError,
    NoLeader,
    Unavailable,
    WaitExpired,
    from_rpc_error,
)
from lockbroker.client.types import Grant, duration, grant_of
from lockbroker.v1 import election_pb2, election_pb2_grpc, lock_pb2

if TYPE_CHECKING:
    from lockbroker.client.aio import Client

log = logging.getLogger("lockbroker.client")

# Campaign without `wait`: each call waits as long as the broker allows (its max_wait), then the
# client campaigns again; this bounds one call, not the campaign.
_ROUND = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Leader:
    """Who leads an election and what it proclaims."""

    name: str
    session_id: str
    fencing_token: int
    value: bytes
    owner: str


@dataclass(frozen=True, slots=True)
class LeaderChange:
    """One state of an election seen by `observe()`: its leader (None: nobody leads) and the
    revision to resume after."""

    leader: Leader | None
    revision: int


def _leader(info: election_pb2.LeaderInfo) -> Leader:
    return Leader(info.name, info.session_id, info.fencing_token, info.value, info.owner)


class Leadership(HeldLock):
    """Leadership of an election inside `async with election.campaign(...) as leadership:`.

    As `HeldLock`: `lost` fires when the session ends, `check()` raises LockLost once leadership
    cannot be assumed, and `fencing_token` goes to whatever the leader writes to."""

    def __init__(self, grant: Grant, session: SessionKeeper, election: Election, value: bytes) -> None:
        super().__init__(grant, session)
        self.election = election
        self.value = value

    async def proclaim(self, value: bytes, *, timeout: float | None = None) -> int:
        """Set the value observers see; NotLeader if this leadership is gone. The etcd revision."""
        revision = await self.election.proclaim(self.session_id, self.fencing_token, value, timeout=timeout)
        self.value = value
        return revision

    async def resign(self, *, timeout: float | None = None) -> bool:
        """Give up leadership now (the block's end does it otherwise)."""
        return await self.election.resign(self.session_id, self.fencing_token, timeout=timeout)


class Election:
    """One election of the caller's tenant: `client.election(name)`."""

    def __init__(self, client: Client, name: str) -> None:
        check_utf8(name=name)
        self.client = client
        self.name = name
        self._stub: election_pb2_grpc.ElectionServiceAsyncStub = election_pb2_grpc.ElectionServiceStub(client.channel)

    async def campaign_once(
        self,
        value: bytes = b"",
        *,
        session_id: str,
        wait: float | None = None,
        owner: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Grant:
        """One Campaign RPC: the leadership, or WaitExpired / LockHeld (wait=0) if not won in time.
        `wait` None: as long as the broker allows. Retries reuse one request id (same place in line)."""
        check_utf8(owner=owner)
        rid = request_id or str(uuid.uuid4())
        started = time.monotonic()
        total = (_ROUND if wait is None else wait) + self.client.default_timeout if timeout is None else timeout
        md = self.client._metadata

        async def attempt(left: float) -> election_pb2.CampaignResponse:
            req = election_pb2.CampaignRequest(
                name=self.name, session_id=session_id, value=value, owner=owner, request_id=rid
            )
            if wait is not None:
                req.wait_timeout.CopyFrom(duration(max(wait - (time.monotonic() - started), 0.0)))
            return await self._stub.Campaign(req, timeout=left, metadata=md)

        resp = await call_with_retry(attempt, deadline=started + total, backoff=self.client._backoff)
        # A leadership is a lock grant (lock_pb2.Grant): read by the one function that reads grants.
        return grant_of(lock_pb2.AcquireResponse(grant=resp.grant, waited=resp.waited))

    async def proclaim(self, session_id: str, fencing_token: int, value: bytes, *, timeout: float | None = None) -> int:
        req = election_pb2.ProclaimRequest(
            name=self.name, session_id=session_id, fencing_token=fencing_token, value=value
        )
        return (await self.client._unary(self._stub.Proclaim, req, timeout)).revision

    async def resign(self, session_id: str, fencing_token: int, *, timeout: float | None = None) -> bool:
        req = election_pb2.ResignRequest(name=self.name, session_id=session_id, fencing_token=fencing_token)
        return (await self.client._unary(self._stub.Resign, req, timeout)).resigned

    async def leader(self, *, timeout: float | None = None) -> Leader | None:
        """The current leader, or None if nobody leads."""
        try:
            resp = await self.client._unary(self._stub.Leader, election_pb2.LeaderRequest(name=self.name), timeout)
        except NoLeader:
            return None
        return _leader(resp.leader)

    async def observe(self, after_revision: int = 0) -> AsyncGenerator[LeaderChange, None]:
        """Every leader change, for as long as the caller iterates: first the current state (unless
        resuming after `after_revision`), then each new leader or value, or None when nobody leads.

        A broken stream (broker restart, another replica) is resumed after the last revision seen,
        so no change is missed or repeated."""
        after = after_revision
        failures = 0
        md = self.client._metadata
        while True:
            call = self._stub.Observe(election_pb2.ObserveRequest(name=self.name, after_revision=after), metadata=md)
            try:
                async for msg in call:
                    failures = 0
                    after = msg.revision
                    yield LeaderChange(_leader(msg.leader) if msg.HasField("leader") else None, msg.revision)
            except aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not isinstance(err, Unavailable):
                    raise err from exc
                failures += 1
                pause = self.client._backoff.delay(failures - 1, err.retry_after)
                log.info("observe %r: resuming after revision %d in %.2fs (%s)", self.name, after, pause, err)
                await asyncio.sleep(pause)
            finally:
                call.cancel()

    def campaign(
        self,
        value: bytes = b"",
        *,
        session: SessionKeeper | None = None,
        ttl: float | None = 10,
        wait: float | None = None,
        owner: str = "",
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
    ) -> CampaignContext:
        """`async with election.campaign(value) as leadership:` lead for the block.

        Blocks until this candidate leads (FIFO among candidates); `wait` seconds at most (raises
        WaitExpired), or without `wait` until it leads. Without `session`, a session of `ttl` is
        made, kept alive and closed on exit. On exit the leadership is resigned."""
        return CampaignContext(
            self, value, session=session, ttl=ttl, wait=wait, owner=owner, on_lost=on_lost, timeout=timeout
        )


class CampaignContext:
    """What `Election.campaign()` returns: campaign on enter, resign (or close its session) on exit."""

    def __init__(
        self,
        election: Election,
        value: bytes,
        *,
        session: SessionKeeper | None,
        ttl: float | None,
        wait: float | None,
        owner: str,
        on_lost: LostCallback | None,
        timeout: float | None,
    ) -> None:
        self._election = election
        self._value = value
        self._session = session
        self._ttl = ttl
        self._wait = wait
        self._owner = owner
        self._on_lost = on_lost
        self._timeout = timeout
        self._own_session: SessionKeeper | None = None
        self._cleanup_timeout = election.client._support.cleanup_timeout
        self.leadership: Leadership | None = None

    async def __aenter__(self) -> Leadership:
        keeper = self._session
        if keeper is None:
            keeper = self._own_session = SessionKeeper(self._election.client, self._ttl, self._owner)
            await keeper.start()
        try:
            grant = await self._win(keeper)
        except BaseException as exc:
            await self._abandon(keeper, exc)
            raise
        leadership = self.leadership = Leadership(grant, keeper, self._election, self._value)
        if self._on_lost is not None:
            leadership.add_lost_callback(self._on_lost)
        keeper.add_lost_callback(leadership._on_session_lost)
        return leadership

    async def _win(self, keeper: SessionKeeper) -> Grant:
        while True:
            try:
                return await self._election.campaign_once(
                    self._value, session_id=keeper.session_id, wait=self._wait, owner=self._owner, timeout=self._timeout
                )
            except WaitExpired:
                if self._wait is not None:
                    raise
                # Only the broker's max_wait ended this round: campaign again, for as long as it takes.

    async def _abandon(self, keeper: SessionKeeper, exc: BaseException) -> None:
        """Undo what a failed or cancelled Campaign may have left: the leadership won with its answer
        lost (our session leads), or the session made for this campaign."""
        try:
            if self._own_session is not None:
                await _shielded(self._own_session.__aexit__(None, None, None), self._cleanup_timeout)
            elif isinstance(exc, (asyncio.CancelledError, DeadlineExceeded, Unavailable)):
                await _shielded(self._resign_if_ours(keeper), self._cleanup_timeout)
        except (LockBrokerError, TimeoutError) as e:
            log.warning("could not clean up after a failed campaign for %r: %s", self._election.name, e)

    async def _resign_if_ours(self, keeper: SessionKeeper) -> None:
        leader = await self._election.leader(timeout=self._cleanup_timeout)
        if leader is not None and leader.session_id == keeper.session_id:
            await self._election.resign(leader.session_id, leader.fencing_token, timeout=self._cleanup_timeout)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leadership = self.leadership
        try:
            if leadership is not None:
                leadership.session.remove_lost_callback(leadership._on_session_lost)
            if self._own_session is not None:
                # Closing the session deletes the leader key with it: one RPC, not two.
                await _shielded(self._own_session.__aexit__(None, None, None), self._cleanup_timeout * 2)
            elif leadership is not None:
                await _shielded(leadership.resign(timeout=self._cleanup_timeout), self._cleanup_timeout * 2)
        except (LockBrokerError, TimeoutError) as e:
            log.warning("resigning %r failed: %s; leadership ends with the session", self._election.name, e)
            if exc is None and isinstance(e, LockBrokerError):
                raise


__all__ = ["CampaignContext", "Election", "Leader", "LeaderChange", "Leadership"]
