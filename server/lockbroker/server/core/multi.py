"""AcquireMany: several locks (each shared or exclusive) for one session, all granted or none.

The locks are queued for one at a time in one global order, the order of their names, as the
classic resource-ordering rule says: two AcquireMany calls can then never wait for each other in
a cycle (whoever holds the smaller name of the two goes on), whatever order their callers listed
the names in, and a single-lock Acquire holds one lock, so it closes no cycle either. Each lock is
an ordinary claim (its own fencing token, released on its own or with the others); each is taken
by the single-lock path, with the whole call's wait, so modes, quotas and clean-up are the same.

All or none: a lock that is not granted within what is left of the wait (or a cancel, or any
error) releases the locks already granted in this call before the call answers, so it leaves
nothing behind. A retry with the same request_id finds each claim again (each gets a request id
derived from the call's).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from lockbroker.server.core.acquire import AcquireParams
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.model import Grant

# The most locks one AcquireMany may name: each is waited for in turn.
MAX_LOCKS = 16
_REQUEST_ID_MAX = 128


@dataclass(frozen=True, slots=True)
class ManyParams:
    locks: tuple[tuple[str, bool], ...]  # (name, shared), distinct names, in the caller's order
    lease_id: int
    wait: float
    owner: str
    request_id: str  # "" = not retryable
    principal: str = ""


def part_id(request_id: str, i: int) -> str:
    """The request id of the i-th lock's claim (valid where `request_id` is: [A-Za-z0-9._:-])."""
    if not request_id:
        return ""
    tail = f":{i}"
    if len(request_id) + len(tail) > _REQUEST_ID_MAX:
        request_id = hashlib.sha256(request_id.encode()).hexdigest()
    return request_id + tail


async def acquire_many(
    tenant: str,
    p: ManyParams,
    acquire: Callable[[str, AcquireParams], Awaitable[Grant]],
    release: Callable[[str, str, int, int, str], Awaitable[bool]],
    cleanups: Cleanups,
) -> list[Grant]:
    """The grants, in the order of `p.locks`; or the first lock's refusal, with nothing held."""
    started = time.monotonic()
    held: dict[int, Grant] = {}
    try:
        for i in sorted(range(len(p.locks)), key=lambda i: p.locks[i][0]):
            name, shared = p.locks[i]
            # A wait used up by the locks before still waits a moment (and answers WAIT_EXPIRED).
            left = max(p.wait - (time.monotonic() - started), 0.001) if p.wait > 0 else 0.0
            rid = part_id(p.request_id, i)
            params = AcquireParams(name, p.lease_id, 0, left, p.owner, rid, principal=p.principal, shared=shared)
            held[i] = await acquire(tenant, params)
    except BaseException:
        grants: Sequence[Grant] = list(held.values())

        async def undo() -> None:
            for g in grants:
                await release(tenant, g.name, g.fencing_token, p.lease_id, p.principal)

        if grants:
            await cleanups.run(undo)
        raise
    return [held[i] for i in range(len(p.locks))]
