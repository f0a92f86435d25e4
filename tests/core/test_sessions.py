"""Sessions on every backend: TTL expiry frees locks, refresh never revives, lost and closed sessions.

TTLs run out through `env.age`: a ManualClock on memory (no sleeping), real time on etcd.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from lockbroker.server.core.errors import SessionLost, SessionNotFound
from tests.core.conftest import TENANT, Env, eventually, sid


async def test_locks_free_themselves_when_the_session_lapses(env: Env) -> None:
    ttl = 2
    s = await env.session(ttl=ttl)
    held = await env.acquire("lapse/a", s)
    await env.acquire("lapse/b", s)
    w = await env.session(ttl=20)
    t0 = time.monotonic()
    # A waiter is granted when the holder's lease runs out, well within TTL + 3 s.
    waiting = asyncio.create_task(env.acquire("lapse/a", w, wait=ttl + 3))
    await env.wait_waiters("lapse/a", 1)
    await env.age(ttl + 0.5)
    got = await waiting
    assert time.monotonic() - t0 <= ttl + 3
    assert got.session_id == sid(w)
    assert got.fencing_token > held.fencing_token
    assert got.queue_position == 1

    async def b_free() -> bool:
        return await env.lock_keys("lapse/b") == []

    await eventually(b_free, 3.0, "lapse/b is freed")
    assert env.root + f"/t/{TENANT}/s/{sid(s)}".encode() not in await env.keys(f"/t/{TENANT}/s/")
    with pytest.raises(SessionNotFound):
        await env.core.refresh(TENANT, s)


async def test_refresh_extends_and_never_revives(env: Env) -> None:
    s = await env.session(ttl=2)
    await env.age(1)
    info = await env.core.refresh(TENANT, s)
    assert info.ttl == 2
    await env.age(1.2)  # past the first TTL, within the refreshed one
    assert await env.backend.lease_ttl(s) >= 0
    await env.age(2)  # 1.2 s past the refreshed TTL: room for etcd's expiry check

    async def gone() -> bool:
        return bool(await env.backend.lease_ttl(s) == -1)

    await eventually(gone, 3.0, "the session's lease ends")
    with pytest.raises(SessionNotFound):
        await env.core.refresh(TENANT, s)
    with pytest.raises(SessionNotFound):
        await env.core.refresh(TENANT, s, owner_known=True)  # the lease itself is gone: TTL 0, no revival
    assert await env.backend.lease_ttl(s) == -1
    assert await env.keys(f"/t/{TENANT}/s/") == []
    # Nor can the dead session take a lock.
    before = await env.snapshot()
    with pytest.raises(SessionNotFound):
        await env.acquire("sess/dead", s)
    with pytest.raises(SessionNotFound):
        await env.acquire("sess/dead", s, wait=2)
    await env.assert_untouched(before)


async def test_create_session_retry_returns_the_same_session(env: Env) -> None:
    a = await env.core.create_session(TENANT, 10, "o", "sess-rid")
    env.adopt(int(a.session_id, 16))
    leases = await env.leases()
    b = await env.core.create_session(TENANT, 10, "o", "sess-rid")
    assert b.session_id == a.session_id
    assert await env.leases() == leases


async def test_waiter_whose_session_ends_is_told_session_lost(env: Env) -> None:
    name = "lost/revoked"
    holder = await env.session(ttl=30)
    await env.acquire(name, holder)
    holder_keys = await env.lock_keys(name)
    for end in ("revoke", "close"):
        w = await env.session(ttl=30)
        waiting = asyncio.create_task(env.acquire(name, w, wait=4))
        try:
            await env.wait_waiters(name, 1)
            if end == "revoke":
                await env.backend.revoke_lease(w)
            else:
                assert await env.core.close_session(TENANT, w)
            with pytest.raises(SessionLost):
                await waiting
        finally:
            waiting.cancel()
        assert await env.lock_keys(name) == holder_keys


async def test_close_session_releases_all_its_locks_and_is_idempotent(env: Env) -> None:
    names = ["close/a", "close/b", "close/c"]
    s = await env.session()
    for n in names:
        await env.acquire(n, s)
    keep = await env.session()
    kept = await env.acquire("close/other", keep)
    assert len(await env.lock_keys()) == 4
    assert await env.core.close_session(TENANT, s) is True
    for n in names:
        assert (await env.describe(n)).holder is None
    holder = (await env.describe("close/other")).holder
    assert holder is not None
    assert holder.create_revision == kept.fencing_token
    assert await env.backend.lease_ttl(s) == -1
    assert await env.core.close_session(TENANT, s) is False
    assert await env.core.close_session(TENANT, 0xAB) is False
    other = await env.session()
    for n in names:
        assert (await env.acquire(n, other)).queue_position == 0
