"""Semaphore waiters are woken one at a time, not as a herd (core/modes.py wait_turn, issue 17).

A permit waiter at index i of a semaphore of limit N needs i - N + 1 of the entries ahead of it
to go. It counts their deletions from the watch (LockBackend.wait_deleted's `need`) and reads the
queue only when the count says it may hold, so a release costs about one read, not one read per
waiting permit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from lockbroker.server.core.model import Grant
from tests.core.conftest import TENANT, Env, eventually

WAITERS = 16
LIMIT = 2
# Reads (queue_at + position) per handoff: the woken waiter's confirming read, with room for a
# watch set-up race. A herd costs one read per waiting permit (~WAITERS / 2 on average here).
READS_PER_HANDOFF = 2


def count_reads(env: Env) -> list[str]:
    """Record every queue read the backend answers from now on (patched on the instance)."""
    reads: list[str] = []
    for method in ("queue_at", "position"):
        real: Callable[..., Awaitable[Any]] = getattr(env.backend, method)

        def counted(*args: Any, _real: Callable[..., Awaitable[Any]] = real, _m: str = method) -> Awaitable[Any]:
            reads.append(_m)
            return _real(*args)

        setattr(env.backend, method, counted)
    return reads


async def test_a_release_wakes_one_permit_waiter_not_every_one(env: Env) -> None:
    name = "sem/herd"
    holding = [await env.acquire(name, await env.session(), limit=LIMIT) for _ in range(LIMIT)]
    waiters: list[asyncio.Task[Grant]] = []
    for i in range(WAITERS):  # one at a time, so the queue order is the list order
        waiters.append(asyncio.create_task(env.acquire(name, await env.session(), wait=60, limit=LIMIT, owner=f"w{i}")))
        await env.wait_waiters(name, i + 1)

    async def all_watching() -> bool:
        return env.watches() == WAITERS

    await eventually(all_watching, 5.0, "every permit waiter watching")
    reads = count_reads(env)
    for i, task in enumerate(waiters):
        oldest = holding.pop(0)
        assert await env.release(name, oldest.fencing_token)
        grant = await asyncio.wait_for(asyncio.shield(task), 10.0)
        assert grant.owner == f"w{i}" and grant.limit == LIMIT
        assert grant.fencing_token > oldest.fencing_token
        holding.append(grant)
        # FIFO: no later waiter was granted with it, and never more than LIMIT hold.
        assert not any(t.done() for t in waiters[i + 1 :]), f"a waiter behind w{i} was granted with it"
        d = await env.describe(name)
        assert [h.create_revision for h in d.holders] == [g.fencing_token for g in holding]
        assert len(d.holders) <= LIMIT
    assert len(reads) <= READS_PER_HANDOFF * WAITERS, f"{len(reads)} reads for {WAITERS} handoffs: a herd"


async def test_wait_deleted_counts_deletions_up_to_need(env: Env) -> None:
    """The backend seam itself: `need` distinct deletions end the wait, whether a release here or
    a session's end deleted them; one is not enough; the waiter's own entry ending ends it at
    once; deletions since the caller's read count."""
    name = "sem/count"
    leases = [await env.session() for _ in range(4)]
    grants = [await env.acquire(name, lease, limit=4) for lease in leases]
    prefix = _prefix(env, name)
    revision, queue = await env.backend.queue_at(prefix)
    ahead, mine = queue[:3], queue[3]
    keys = (*(e.key for e in ahead), mine.key)
    wait = asyncio.create_task(env.backend.wait_deleted(prefix, keys, revision, mine, 2))
    await asyncio.sleep(0.2)
    assert await env.release(name, grants[0].fencing_token)
    await asyncio.sleep(0.3)
    assert not wait.done(), "one deletion ended a wait that needs two"
    # The second by the session ending (a watch event; the first was this replica's own release).
    await env._revoke(leases[1])
    assert await asyncio.wait_for(wait, 5.0) is None
    # Both deletions happened after `revision`: a new wait from it needs no event.
    assert await asyncio.wait_for(env.backend.wait_deleted(prefix, keys, revision, mine, 2), 5.0) is None
    # The waiter's own entry going ends a wait at once, whatever the count.
    revision, _ = await env.backend.queue_at(prefix)
    wait = asyncio.create_task(env.backend.wait_deleted(prefix, keys, revision, mine, 3))
    await asyncio.sleep(0.2)
    assert await env.release(name, grants[3].fencing_token)
    assert await asyncio.wait_for(wait, 5.0) is None


def _prefix(env: Env, name: str) -> bytes:
    return env.root + f"/t/{TENANT}/l/{name}#".encode()
