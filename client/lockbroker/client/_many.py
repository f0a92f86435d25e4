"""Several locks at once: `async with client.lock_many(["a", "b"]) as grants:` (AcquireMany).

The broker grants all of them or none and queues in name order, so two callers naming the same
locks in different orders never deadlock. Each lock has its own grant (fencing token); the block
gets them in the order given, and on exit they are released (and a session made for the block
is closed).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from lockbroker.client._checks import check_utf8
from lockbroker.client._retry import call_with_retry
from lockbroker.client._session import SessionKeeper, _shielded
from lockbroker.client.errors import LockBrokerError
from lockbroker.client.types import Grant, duration, grant_of
from lockbroker.v1 import lock_pb2

if TYPE_CHECKING:
    from lockbroker.client.aio import Client

# A lock name, or (name, shared).
LockSpec = str | tuple[str, bool]


def claims_of(locks: Sequence[LockSpec]) -> list[lock_pb2.LockClaim]:
    out = []
    for spec in locks:
        name, shared = (spec, False) if isinstance(spec, str) else spec
        check_utf8(name=name)
        mode = lock_pb2.LOCK_MODE_SHARED if shared else lock_pb2.LOCK_MODE_UNSPECIFIED
        out.append(lock_pb2.LockClaim(name=name, mode=mode))
    return out


async def acquire_many(
    client: Client,
    locks: Sequence[LockSpec],
    *,
    session_id: str,
    wait: float = 0.0,
    owner: str = "",
    request_id: str | None = None,
    timeout: float | None = None,
) -> list[Grant]:
    """Take every lock of `locks` for the session, or none (see Client.acquire_many)."""
    claims = claims_of(locks)
    check_utf8(owner=owner)
    rid = request_id or str(uuid.uuid4())
    total = wait + client.default_timeout if timeout is None else timeout
    started = time.monotonic()

    async def attempt(left: float) -> lock_pb2.AcquireManyResponse:
        req = lock_pb2.AcquireManyRequest(locks=claims, session_id=session_id, owner=owner, request_id=rid)
        if wait > 0:
            # A retry finds the claims already made; it should not restart the wait.
            req.wait_timeout.CopyFrom(duration(max(wait - (time.monotonic() - started), 0.001)))
        # An `acquire_many` message on the Client's Session stream (the default transport), else
        # the unary AcquireMany: the same answer and errors either way, so the same retry.
        return await client._via(
            "acquire_many", req, lambda t: client._stub.AcquireMany(req, timeout=t, metadata=client._metadata), left
        )

    resp = await call_with_retry(attempt, deadline=started + total, backoff=client._backoff)
    return [grant_of(lock_pb2.AcquireResponse(grant=g)) for g in resp.grants]


class ManyLockContext:
    """What `client.lock_many(...)` returns: acquires on enter, releases every grant on exit."""

    def __init__(
        self,
        client: Client,
        locks: Sequence[LockSpec],
        *,
        ttl: float | None,
        wait: float,
        owner: str,
        session: SessionKeeper | None,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._locks = list(locks)
        self._ttl = ttl
        self._wait = wait
        self._owner = owner
        self._session = session
        self._timeout = timeout
        self._own: SessionKeeper | None = None
        self.grants: tuple[Grant, ...] = ()

    async def __aenter__(self) -> tuple[Grant, ...]:
        keeper = self._session
        if keeper is None:
            keeper = self._own = await SessionKeeper(self._client, self._ttl, self._owner).start()
        try:
            self.grants = tuple(
                await acquire_many(
                    self._client,
                    self._locks,
                    session_id=keeper.session_id,
                    wait=self._wait,
                    owner=self._owner,
                    timeout=self._timeout,
                )
            )
        except BaseException:
            if self._own is not None:
                await _shielded(self._own.close(), self._client._support.cleanup_timeout)
            raise
        return self.grants

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await _shielded(self._release(), self._client._support.cleanup_timeout * 2)

    async def _release(self) -> None:
        if self._own is not None:
            await self._own.close()  # closing the session releases every lock it holds
            return
        assert self._session is not None
        for g in self.grants:
            with contextlib.suppress(LockBrokerError):
                await self._client.release(g.name, g.fencing_token, session_id=self._session.session_id)
