"""Quota slots on every backend: a full pool refuses and changes nothing; releases and expiry free slots."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.errors import QuotaExceeded
from lockbroker.server.core.model import Entry, EntryValue
from lockbroker.server.core.quota import TenantQuota
from lockbroker.server.core.slots import SlotClaimer
from tests.core.conftest import TENANT, Env, eventually


@pytest.fixture
def quota() -> TenantQuota:
    return TenantQuota(
        max_sessions=3, max_locks=3, max_waiters_per_lock=1, max_waiters=0, acquire_rate=0, acquire_burst=0
    )


async def test_max_locks_refuses_and_release_frees_the_slot(env: Env) -> None:
    s = await env.session()
    a = await env.acquire("q/a", s)
    await env.acquire("q/b", s)
    await env.acquire("q/c", s)
    assert len(await env.keys(f"/t/{TENANT}/q/e/")) == 3
    before = await env.snapshot()
    with pytest.raises(QuotaExceeded) as ei:
        await env.acquire("q/d", s)
    assert (ei.value.limit, ei.value.value) == ("max_locks", 3)
    assert ei.value.retry_after is not None
    await env.assert_untouched(before)
    assert await env.release("q/a", a.fencing_token, s)
    assert len(await env.keys(f"/t/{TENANT}/q/e/")) == 2
    await env.acquire("q/d", s)


async def test_max_waiters_per_lock_counts_the_holder(env: Env) -> None:
    h, w, x = await env.session(), await env.session(), await env.session()
    await env.acquire("q/one", h)
    waiting = asyncio.create_task(env.acquire("q/one", w, wait=10))
    try:
        await env.wait_waiters("q/one", 1)
        before = await env.snapshot()
        with pytest.raises(QuotaExceeded) as ei:
            await env.acquire("q/one", x, wait=5)
        assert (ei.value.limit, ei.value.value) == ("max_waiters_per_lock", 1)
        await env.assert_untouched(before)
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_max_sessions_and_expiry_frees_slots(env: Env) -> None:
    sessions = [await env.session(ttl=2) for _ in range(3)]
    with pytest.raises(QuotaExceeded) as ei:
        await env.session()
    assert ei.value.limit == "max_sessions"
    assert len(await env.keys(f"/t/{TENANT}/q/s/")) == 3
    await env.age(3)
    for lease in sessions:
        env.sessions.discard(lease)

    async def freed() -> bool:
        return await env.keys(f"/t/{TENANT}/q/s/") == []

    await eventually(freed, 3.0, "the expired sessions' slots are freed with their leases")
    await env.session()


async def test_a_taken_hashed_slot_is_traded_for_a_free_one(env: Env) -> None:
    s = await env.session()
    ks = env.core.keyspace(TENANT)
    pool = ks.entry_pool(3)
    first = await env.acquire("slot/a", s)
    taken = pool.slot(ks.entry_key("slot/a", s))
    # A second lock whose entry hashes to the same slot: the write finds it taken and claims another.
    other = next(n for n in (f"slot/b{i}" for i in range(1000)) if pool.slot(ks.entry_key(n, s)) == taken)
    second = await env.acquire(other, s)
    slots = await env.keys(f"/t/{TENANT}/q/e/")
    assert len(slots) == 2
    assert taken in slots
    assert await env.release("slot/a", first.fencing_token, s)
    assert await env.release(other, second.fencing_token, s)
    assert await env.keys(f"/t/{TENANT}/q/e/") == []


@pytest.mark.parametrize(
    "slots",
    [(), (b"/t/x/q/l/7",), (b"/t/x/q/l/7", b"/t/x/q/w/lock\nwith-newline/0", b""), (b"k" * 70_000,)],
)
def test_remembered_slots_come_back_exactly_for_their_entry_only(slots: tuple[bytes, ...]) -> None:
    """SlotClaimer packs what it remembers (memory per held lock); what a release takes back must
    be the entry's slots byte for byte, and only for the entry's own create revision."""
    claimer = SlotClaimer(cast(LockBackend, None))  # remember/take never reach the backend
    entry = Entry(b"/t/x/l/a#00000000000000ab", 2**40 + 5, 0xAB, EntryValue("o", "r", 0.0, slots=slots))
    claimer.remember(entry)
    assert claimer.take(entry.key, entry.create_revision + 1) is None  # another claim's token
    assert claimer.take(b"/t/x/l/b#00000000000000ab", entry.create_revision) is None
    assert claimer.take(entry.key, entry.create_revision) == slots
    assert claimer.take(entry.key, entry.create_revision) is None  # forgotten once taken
