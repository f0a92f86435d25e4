"""The asyncio client against a real broker and a real etcd."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lockbroker.client import (
    Client,
    HeldLock,
    LockHeld,
    LockLost,
    NotAcquired,
    SessionNotFound,
    WaitExpired,
)
from tests.client.proxy import RunningProxy
from tests.etcdutil import EtcdProbe


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 3.0) -> None:
    until = time.monotonic() + within
    while not await check():
        assert time.monotonic() < until, "condition not met in time"
        await asyncio.sleep(0.05)


async def nothing_left(probe: EtcdProbe) -> bool:
    return await probe.keys() == []


async def test_acquire_release_round_trip(client: Client, probe: EtcdProbe) -> None:
    s = await client.create_session(ttl=10, owner="rt")
    assert len(s.session_id) == 16 and s.ttl == 10
    g = await client.acquire("orders/42", session_id=s.session_id, owner="rt")
    assert g.fencing_token > 0 and g.session_id == s.session_id and g.owner == "rt" and g.request_id

    state = await client.describe("orders/42")
    assert state.holder is not None and state.holder.fencing_token == g.fencing_token
    assert state.holder.expires_at is not None and state.waiters == ()
    assert [(x.name, x.holder.fencing_token) async for x in client.list("orders/")] == [("orders/42", g.fencing_token)]

    refreshed = await client.refresh(s.session_id)
    assert refreshed.ttl == 10
    assert await client.release("orders/42", g.fencing_token, session_id=s.session_id) is True
    assert await client.release("orders/42", g.fencing_token) is False  # already gone: never someone else's
    assert (await client.describe("orders/42")).holder is None
    assert await client.close_session(s.session_id) is True
    assert await client.close_session(s.session_id) is False
    with pytest.raises(SessionNotFound):
        await client.refresh(s.session_id)
    assert await probe.keys() == []


async def test_list_pages(client: Client) -> None:
    s = await client.create_session(ttl=10)
    for i in range(5):
        await client.acquire(f"jobs/{i}", session_id=s.session_id)
    pages = [[x.name for x in page] async for page in client.list_pages("jobs/", page_size=2)]
    assert pages == [["jobs/0", "jobs/1"], ["jobs/2", "jobs/3"], ["jobs/4"]]
    await client.close_session(s.session_id)


async def test_lock_held_never_runs_the_block(client: Client, probe: EtcdProbe) -> None:
    ran = False
    async with client.lock("orders/1", owner="alice") as held:
        assert isinstance(held, HeldLock) and held.fencing_token > 0
        held.check()
        with pytest.raises(LockHeld) as ei:
            async with client.lock("orders/1", wait=0, owner="bob"):
                ran = True
        assert not ran
        err = ei.value
        assert err.holder is not None
        assert err.holder.owner == "alice"
        assert err.holder.fencing_token == held.fencing_token
        assert err.holder.session_id == held.session_id
        assert err.holder.expires_at is not None
        assert err.reason == "LOCK_HELD" and err.name == "orders/1"

        with pytest.raises(WaitExpired) as we:
            async with client.lock("orders/1", wait=0.3, owner="carol"):
                ran = True
        assert not ran
        assert isinstance(we.value, NotAcquired) and we.value.waited >= 0.25
        assert we.value.holder is not None and we.value.holder.owner == "alice"
    # Neither failed attempt left a session or a queue entry behind.
    await eventually(lambda: nothing_left(probe))


async def test_waiter_gets_the_lock_when_released(client: Client, probe: EtcdProbe) -> None:
    first = client.lock("q", owner="first")
    held = await first.__aenter__()
    waiter = asyncio.create_task(client.lock("q", wait=5, owner="second").__aenter__())
    await eventually(lambda: _waiting(client, "q", 1))
    await first.__aexit__(None, None, None)
    second = await asyncio.wait_for(waiter, 5)
    assert second.fencing_token > held.fencing_token and second.grant.owner == "second"
    assert second.grant.queue_position == 1
    await second.session.close()
    await eventually(lambda: nothing_left(probe))


async def _waiting(client: Client, name: str, n: int) -> bool:
    return len((await client.describe(name)).waiters) == n


async def test_exception_inside_block_releases(client: Client, probe: EtcdProbe) -> None:
    with pytest.raises(ValueError, match="boom"):
        async with client.lock("orders/2"):
            assert await probe.keys("/t/default/l/") != []
            raise ValueError("boom")
    assert await probe.keys() == []


async def test_cancellation_inside_block_releases(client: Client, probe: EtcdProbe) -> None:
    inside = asyncio.Event()

    async def worker() -> None:
        async with client.lock("orders/3"):
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(worker())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The release ran before the cancellation propagated, not in the background afterwards.
    assert await probe.keys() == []


async def test_cancellation_while_waiting_leaves_nothing(client: Client, probe: EtcdProbe) -> None:
    async with client.session(ttl=5) as s, client.lock("orders/4", session=s):
        waiter = asyncio.create_task(client.lock("orders/4", wait=10).__aenter__())
        await eventually(lambda: _waiting(client, "orders/4", 1))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await eventually(lambda: _waiting(client, "orders/4", 0))
    await eventually(lambda: nothing_left(probe))


async def test_lost_fires_when_lease_revoked_behind_its_back(client: Client, probe: EtcdProbe) -> None:
    called: list[HeldLock] = []
    async with client.lock("orders/5", ttl=3, on_lost=called.append) as held:
        await probe.revoke(int(held.session_id, 16))
        started = time.monotonic()
        await asyncio.wait_for(held.lost.wait(), 3)
        assert time.monotonic() - started < 2.5  # next keepalive, at most ttl/3 later
        assert called == [held]
        assert held.session.lost.is_set()
        with pytest.raises(LockLost) as ei:
            held.check()
        assert ei.value.fencing_token == held.fencing_token
    assert await probe.keys() == []


async def test_keepalive_keeps_a_ttl2_lock_for_6s(client: Client, probe: EtcdProbe) -> None:
    async with client.lock("orders/6", ttl=2) as held:
        first_deadline = held.deadline
        assert 1.5 < held.remaining <= 2.0
        for _ in range(12):
            await asyncio.sleep(0.5)
            held.check()
        assert not held.lost.is_set()
        assert held.deadline > first_deadline + 5  # refreshed all along
        state = await client.describe("orders/6")
        assert state.holder is not None and state.holder.fencing_token == held.fencing_token
        assert await probe.lease_ttl(int(held.session_id, 16)) > 0
    assert await probe.keys() == []


async def test_two_locks_on_one_session(client: Client, probe: EtcdProbe) -> None:
    async with client.session(ttl=5, owner="multi") as s:
        async with client.lock("a", session=s) as a, client.lock("b", session=s) as b:
            assert a.session_id == b.session_id == s.session_id
            assert b.fencing_token > a.fencing_token
            assert a.deadline == b.deadline == s.expires_at
            names = [x.name async for x in client.list()]
            assert names == ["a", "b"]
        # Both released; the session itself lives on until its block ends.
        assert await probe.keys("/t/default/l/") == []
        assert len(await probe.keys("/t/default/s/")) == 1
        assert s.alive
    assert await probe.keys() == []


async def test_losing_a_shared_session_flags_every_lock(client: Client, probe: EtcdProbe) -> None:
    async with client.session(ttl=3) as s, client.lock("x", session=s) as x, client.lock("y", session=s) as y:
        await probe.revoke(int(s.session_id, 16))
        await asyncio.wait_for(asyncio.gather(x.lost.wait(), y.lost.wait()), 3)
        assert s.lost.is_set() and not s.alive
    assert await probe.keys() == []


async def test_lost_at_local_expiry_when_no_keepalive_is_confirmed(broker: Any, probe: EtcdProbe) -> None:
    async with RunningProxy(broker.port) as proxy, Client(f"127.0.0.1:{proxy.port}", default_timeout=5) as c:
        proxy.servicer.blackhole_keepalive = True  # requests arrive; answers never come back
        async with c.lock("silent", ttl=2) as held:
            deadline = held.deadline
            await asyncio.wait_for(held.lost.wait(), 3)
            # Declared lost at the last confirmed expiry, never later.
            assert deadline <= time.monotonic() < deadline + 0.5
            assert "local expiry" in (held.lost_reason or "")
            with pytest.raises(LockLost):
                held.check()
    await eventually(lambda: nothing_left(probe))
