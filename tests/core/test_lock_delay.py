"""Lock-delay on every backend (core/delay.py): a lost holder's lock is not granted again until the
delay ends; a clean release hands it on at once; waiters keep their places.

Delays here are wall-clock (the delay key holds a unix time), so the tests sleep for real, briefly,
and assert order (not granted before the delay's end), never tight timings.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from lockbroker.server.core.acquire import AcquireParams
from lockbroker.server.core.errors import InvalidArgument, LockHeld
from lockbroker.server.core.quota import UNLIMITED, TenantQuota
from tests.core.conftest import TENANT, Env

DELAY = 1.0


@pytest.fixture
def quota() -> TenantQuota:
    return TenantQuota(**{**UNLIMITED.__dict__, "lock_delay": DELAY, "max_lock_delay": 5.0})


async def test_a_lost_holders_lock_is_held_back_for_the_delay(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("d/x", a)
    await env._revoke(a)  # the holder's session ends without a release
    env.sessions.discard(a)
    with pytest.raises(LockHeld) as ei:
        await env.acquire("d/x", b)
    until = float(ei.value.metadata["lock_delay_until"])
    assert until > time.time()
    assert (await env.describe("d/x")).delay_until == pytest.approx(until)
    assert (await env.describe("d/x")).holder is None, "the refused try-lock left nothing queued"
    await asyncio.sleep(max(0.0, until - time.time()) + 0.05)
    nxt = await env.acquire("d/x", b)
    assert nxt.fencing_token > g.fencing_token
    assert (await env.describe("d/x")).delay_until == 0.0


async def test_a_clean_release_hands_the_lock_on_at_once(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("d/y", a)
    assert await env.release("d/y", g.fencing_token, a)
    nxt = await env.acquire("d/y", b)  # a try-lock: refused if a delay were running
    assert nxt.fencing_token > g.fencing_token
    assert (await env.describe("d/y")).delay_until == 0.0
    assert await env.keys(f"/t/{TENANT}/d/d/y#p{g.fencing_token}") == []


async def test_a_waiter_keeps_its_place_and_is_granted_when_the_delay_ends(env: Env) -> None:
    a, b, c = await env.session(), await env.session(), await env.session()
    await env.acquire("d/w", a)
    first = asyncio.create_task(env.acquire("d/w", b, wait=10.0))
    await env.wait_waiters("d/w", 1)
    second = asyncio.create_task(env.acquire("d/w", c, wait=10.0))
    await env.wait_waiters("d/w", 2)
    lost_at = time.time()
    await env._revoke(a)
    env.sessions.discard(a)
    g = await asyncio.wait_for(first, 10)
    assert time.time() >= lost_at + DELAY - 0.05, "granted before the delay ended"
    assert not second.done(), "the second waiter stays queued behind the first"
    assert await env.release("d/w", g.fencing_token, b)
    await asyncio.wait_for(second, 5)  # a clean release: no further delay


async def test_a_force_release_starts_the_delay_at_once(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("d/f", a)
    before = time.time()
    assert await env.core.force_release(TENANT, "d/f", "stuck", "admin") is not None
    state = await env.describe("d/f")
    assert state.holder is None and before + DELAY - 0.05 <= state.delay_until <= time.time() + DELAY
    with pytest.raises(LockHeld):
        await env.acquire("d/f", b)
    await asyncio.sleep(max(0.0, state.delay_until - time.time()) + 0.05)
    assert (await env.acquire("d/f", b)).fencing_token > g.fencing_token


async def test_a_per_request_delay_above_the_tenants_maximum_is_refused(env: Env) -> None:
    a = await env.session()
    before = await env.snapshot()
    with pytest.raises(InvalidArgument) as ei:
        await env.core.acquire(TENANT, AcquireParams("d/z", a, 10, 0.0, "", "", lock_delay=6.0))
    assert ei.value.violations[0].field == "lock_delay"
    await env.assert_untouched(before)


async def test_a_requests_own_delay_replaces_the_tenants(env: Env) -> None:
    a, b = await env.session(), await env.session()
    await env.core.acquire(TENANT, AcquireParams("d/n", a, 10, 0.0, "", "", lock_delay=3.0))
    await env._revoke(a)
    env.sessions.discard(a)
    with pytest.raises(LockHeld) as ei:
        await env.acquire("d/n", b)
    assert float(ei.value.metadata["lock_delay_until"]) > time.time() + DELAY, "3 s, not the tenant's 1 s"
