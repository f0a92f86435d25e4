"""Shared/exclusive claims and semaphore permits on every backend (core/modes.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from lockbroker.server.core.errors import LimitMismatch, LockHeld, WaitExpired
from lockbroker.server.core.model import Grant
from tests.core.conftest import TENANT, Env, eventually


async def done_soon(task: asyncio.Task[Grant], timeout: float = 5.0) -> Grant:
    return await asyncio.wait_for(asyncio.shield(task), timeout)


async def still_waiting(task: asyncio.Task[Any]) -> bool:
    await asyncio.sleep(0.1)
    return not task.done()


async def test_readers_share_and_describe_shows_them(env: Env) -> None:
    name = "rw/share"
    grants = [await env.acquire(name, await env.session(), shared=True, owner=f"r{i}") for i in range(3)]
    assert all(g.shared and g.limit == 0 for g in grants)
    assert [g.fencing_token for g in grants] == sorted({g.fencing_token for g in grants})
    d = await env.describe(name)
    assert [h.create_revision for h in d.holders] == [g.fencing_token for g in grants]
    assert all(h.value.shared for h in d.holders)
    assert d.holder is not None and d.holder.create_revision == grants[0].fencing_token
    assert d.waiters == []


async def test_writer_waits_for_readers_and_blocks_readers_behind_it(env: Env) -> None:
    name = "rw/fifo"
    r1 = await env.acquire(name, await env.session(), shared=True)
    r2 = await env.acquire(name, await env.session(), shared=True)
    writer = asyncio.create_task(env.acquire(name, await env.session(), wait=30, owner="w"))
    await env.wait_waiters(name, 1)
    late_reader = asyncio.create_task(env.acquire(name, await env.session(), wait=30, shared=True, owner="r3"))
    d = await env.wait_waiters(name, 2)
    assert [h.create_revision for h in d.holders] == [r1.fencing_token, r2.fencing_token]
    assert [w.owner for w in d.waiters] == ["w", "r3"]
    assert [w.value.shared for w in d.waiters] == [False, True]

    assert await env.release(name, r1.fencing_token)
    assert await still_waiting(writer), "a writer was granted while a reader still held the lock"
    assert await env.release(name, r2.fencing_token)
    w = await done_soon(writer)
    # A writer's token is greater than every reader token granted before it.
    assert w.fencing_token > max(r1.fencing_token, r2.fencing_token)
    assert not w.shared
    assert await still_waiting(late_reader), "a reader queued behind a writer was granted with it"
    assert await env.release(name, w.fencing_token)
    r3 = await done_soon(late_reader)
    assert r3.shared and r3.fencing_token > w.fencing_token


async def test_run_of_readers_behind_a_writer_is_granted_together(env: Env) -> None:
    name = "rw/handoff"
    w = await env.acquire(name, await env.session())
    readers = [asyncio.create_task(env.acquire(name, await env.session(), wait=30, shared=True)) for _ in range(3)]
    await env.wait_waiters(name, 3)
    writer2 = asyncio.create_task(env.acquire(name, await env.session(), wait=30))
    await env.wait_waiters(name, 4)
    assert await env.release(name, w.fencing_token)
    grants = [await done_soon(t) for t in readers]
    assert all(g.fencing_token > w.fencing_token for g in grants)
    assert await still_waiting(writer2)
    d = await env.describe(name)
    assert len(d.holders) == 3 and len(d.waiters) == 1
    for g in grants:
        assert await env.release(name, g.fencing_token)
    assert (await done_soon(writer2)).fencing_token > max(g.fencing_token for g in grants)


async def test_shared_try_lock_behind_a_writer_is_refused_and_leaves_nothing(env: Env) -> None:
    name = "rw/try"
    await env.acquire(name, await env.session())
    before = await env.lock_keys(name)
    with pytest.raises(LockHeld):
        await env.acquire(name, await env.session(), shared=True)
    assert await env.lock_keys(name) == before
    # And behind a waiting writer, even with only readers holding: no writer starvation.
    name2 = "rw/try2"
    await env.acquire(name2, await env.session(), shared=True)
    writer = asyncio.create_task(env.acquire(name2, await env.session(), wait=30))
    await env.wait_waiters(name2, 1)
    keys = await env.lock_keys(name2)
    with pytest.raises(LockHeld):
        await env.acquire(name2, await env.session(), shared=True)
    assert await env.lock_keys(name2) == keys
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer


async def test_shared_wait_expires_and_cancel_leave_nothing(env: Env) -> None:
    name = "rw/expire"
    await env.acquire(name, await env.session())
    before = await env.lock_keys(name)
    with pytest.raises(WaitExpired):
        await env.acquire(name, await env.session(), wait=0.2, shared=True)
    assert await env.lock_keys(name) == before
    task = asyncio.create_task(env.acquire(name, await env.session(), wait=30, limit=0, shared=True))
    await env.wait_waiters(name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    async def only_holder() -> bool:
        return await env.lock_keys(name) == before

    await eventually(only_holder, 3.0, "the cancelled reader's key is removed")


async def test_reader_session_expiry_lets_the_writer_in(env: Env) -> None:
    name = "rw/expiry"
    reader = await env.session(ttl=3)
    await env.acquire(name, reader, shared=True)
    writer = asyncio.create_task(env.acquire(name, await env.session(ttl=30), wait=30))
    await env.wait_waiters(name, 1)
    await env.age(5)
    assert not (await done_soon(writer, 10)).shared


async def test_semaphore_grants_at_most_limit_in_fifo_order(env: Env) -> None:
    name = "sem/basic"
    a = await env.acquire(name, await env.session(), limit=2)
    b = await env.acquire(name, await env.session(), limit=2)
    assert (a.limit, b.limit) == (2, 2)
    with pytest.raises(LockHeld):
        await env.acquire(name, await env.session(), limit=2)
    c = asyncio.create_task(env.acquire(name, await env.session(), wait=30, limit=2, owner="c"))
    await env.wait_waiters(name, 1)
    d_ = asyncio.create_task(env.acquire(name, await env.session(), wait=30, limit=2, owner="d"))
    d = await env.wait_waiters(name, 2)
    assert d.limit == 2
    assert [h.create_revision for h in d.holders] == [a.fencing_token, b.fencing_token]
    assert [w.owner for w in d.waiters] == ["c", "d"]
    assert await env.release(name, b.fencing_token)
    granted_c = await done_soon(c)
    assert await still_waiting(d_)
    assert await env.release(name, a.fencing_token)
    granted_d = await done_soon(d_)
    assert granted_c.fencing_token < granted_d.fencing_token


async def test_semaphore_limit_mismatch_is_refused_and_leaves_nothing(env: Env) -> None:
    name = "sem/mismatch"
    await env.acquire(name, await env.session(), limit=3)
    before = await env.lock_keys(name)
    for kwargs in ({"limit": 4}, {"limit": 0}, {"shared": True}):
        with pytest.raises(LimitMismatch) as ei:
            await env.acquire(name, await env.session(), wait=1, **kwargs)
        assert ei.value.metadata["limit"] == "3"
        assert await env.lock_keys(name) == before
    # A lock is not a semaphore either.
    await env.acquire("sem/lock", await env.session())
    with pytest.raises(LimitMismatch) as ei:
        await env.acquire("sem/lock", await env.session(), wait=1, limit=2)
    assert ei.value.metadata == {"lock": "sem/lock", "limit": "0", "requested": "2"}


async def test_semaphore_limit_is_set_again_once_unused(env: Env) -> None:
    name = "sem/reset"
    lease = await env.session()
    g = await env.acquire(name, lease, limit=2)
    assert await env.release(name, g.fencing_token)
    assert (await env.acquire(name, lease, limit=5)).limit == 5


async def test_a_cut_off_reader_keeping_its_place_never_holds(env: Env) -> None:
    """A shared waiter whose call was cancelled keeps its place for a retry (core.resume), as a
    waiter only: once it would hold (every claim ahead shared) it is removed, not left holding."""
    env.core._acquirer.resume_window = 30.0
    name = "rw/resume"
    x = await env.acquire(name, await env.session())
    r0 = asyncio.create_task(env.acquire(name, await env.session(), wait=30, shared=True))
    await env.wait_waiters(name, 1)
    cut = asyncio.create_task(env.acquire(name, await env.session(), wait=30, shared=True, request_id="cut-1"))
    await env.wait_waiters(name, 2)
    cut.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cut
    assert len((await env.describe(name)).waiters) == 2  # kept for a retry
    assert await env.release(name, x.fencing_token)
    reader = await done_soon(r0)

    async def only_the_reader() -> bool:
        d = await env.describe(name)
        return [h.create_revision for h in d.holders] == [reader.fencing_token] and not d.waiters

    await eventually(only_the_reader, 5.0, "the cut-off reader's entry is removed when it would hold")


async def test_list_and_list_sessions_count_every_holder(env: Env) -> None:
    a, b, w = await env.session(), await env.session(), await env.session()
    ga = await env.acquire("rw/listed", a, shared=True)
    gb = await env.acquire("rw/listed", b, shared=True)
    writer = asyncio.create_task(env.acquire("rw/listed", w, wait=30))
    await env.wait_waiters("rw/listed", 1)
    page = await env.core.list(TENANT, "rw/listed", 10, None)
    assert [(h.name, h.holder.create_revision, h.waiters) for h in page.locks] == [("rw/listed", ga.fencing_token, 1)]
    sessions, _ = await env.core.list_sessions(TENANT, 100, None)
    by_lease = {s.lease: s for s in sessions}
    assert by_lease[a].held == [("rw/listed", ga.fencing_token)]
    assert by_lease[b].held == [("rw/listed", gb.fencing_token)]
    assert by_lease[w].held == [] and by_lease[w].waiting == ["rw/listed"]
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
