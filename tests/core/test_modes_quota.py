"""Quotas apply to shared claims and semaphore permits as to locks (issue 17 item 5): a permit or a
shared grant is a held lock for max_locks, a queued one a waiter; a refusal changes nothing."""

from __future__ import annotations

import pytest

from lockbroker.server.core.errors import QuotaExceeded, WaitExpired
from lockbroker.server.core.quota import TenantQuota
from tests.core.conftest import TENANT, Env


@pytest.fixture
def quota() -> TenantQuota:
    return TenantQuota(
        max_sessions=0, max_locks=3, max_waiters_per_lock=1, max_waiters=0, acquire_rate=0, acquire_burst=0
    )


async def test_permits_and_shared_claims_count_as_held_locks(env: Env) -> None:
    a, b, c = await env.session(), await env.session(), await env.session()
    first = await env.acquire("qm/sem", a, limit=2)
    await env.acquire("qm/sem", b, limit=2)
    await env.acquire("qm/read", c, shared=True)
    assert len(await env.keys(f"/t/{TENANT}/q/e/")) == 3
    d = await env.session()
    before = await env.snapshot()
    with pytest.raises(QuotaExceeded) as ei:
        await env.acquire("qm/read", d, shared=True)
    assert (ei.value.limit, ei.value.value) == ("max_locks", 3)
    with pytest.raises(QuotaExceeded) as ei:
        await env.acquire("qm/other", d, limit=2)
    assert (ei.value.limit, ei.value.value) == ("max_locks", 3)
    await env.assert_untouched(before)
    assert await env.release("qm/sem", first.fencing_token, a)
    assert (await env.acquire("qm/read", await env.session(), shared=True)).shared


async def test_a_semaphore_queue_holds_its_permits_plus_the_waiters(env: Env) -> None:
    # max_waiters_per_lock=1: a semaphore of 2 holds 2 permits and queues 1 more; a lock queues 1.
    s = [await env.session() for _ in range(4)]
    await env.acquire("qm/s2", s[0], limit=2)
    await env.acquire("qm/s2", s[1], limit=2)
    with pytest.raises(WaitExpired):  # the third waits: the per-lock pool has room for it
        await env.acquire("qm/s2", s[2], limit=2, wait=0.05)
