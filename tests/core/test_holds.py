"""Maximum hold time on every backend: the sweep revokes a grant held past its limit, once.

The sweep is driven by hand with a `now` in the future (no sleeping); tests/test_holds.py runs the
real sweeper in a real broker, across a restart.
"""

from __future__ import annotations

import time

import pytest

from lockbroker.server.core.acquire import AcquireParams
from lockbroker.server.core.errors import QuotaExceeded
from lockbroker.server.core.quota import UNLIMITED, TenantQuota
from lockbroker.v1.reasons import ErrorReason
from tests.core.conftest import TENANT, Env


@pytest.fixture
def quota() -> TenantQuota:
    return TenantQuota(**{**UNLIMITED.__dict__, "max_hold": 30.0})


async def test_a_grant_held_past_its_limit_is_revoked_and_its_session_told(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.core.acquire(TENANT, AcquireParams("hold/x", a, 10, 0.0, "", "", max_hold=2.0))
    sweeper = env.core.holds
    assert await sweeper.sweep(now=time.time()) == 0, "not due yet"
    assert (await env.describe("hold/x")).holder is not None
    assert await sweeper.sweep(now=time.time() + 3) == 1
    assert (await env.describe("hold/x")).holder is None
    [r] = (await env.core.refresh(TENANT, a)).revoked
    assert (r.name, r.fencing_token, r.reason) == ("hold/x", g.fencing_token, ErrorReason.MAX_HOLD_EXCEEDED)
    assert await sweeper.sweep(now=time.time() + 3) == 0, "the index key went with the revocation"
    assert await env.keys("/h/") == []
    nxt = await env.acquire("hold/x", b)  # under the tenant's max_hold (30 s): a new index key
    assert nxt.fencing_token > g.fencing_token
    assert [k.rsplit(b"/", 1)[1] for k in await env.keys("/h/")] == [str(nxt.fencing_token).encode()]


async def test_a_grant_released_in_time_is_left_alone(env: Env) -> None:
    a = await env.session()
    g = await env.core.acquire(TENANT, AcquireParams("hold/y", a, 10, 0.0, "", "", max_hold=2.0))
    assert len(await env.keys("/h/")) == 1
    assert await env.release("hold/y", g.fencing_token, a)
    again = await env.acquire("hold/y", a)  # a later grant without a limit of its own (tenant's 30 s)
    assert await env.core.holds.sweep(now=time.time() + 3) == 0
    assert (await env.describe("hold/y")).holder is not None and (await env.keys("/h/")) != []
    assert (await env.core.refresh(TENANT, a)).revoked == ()
    assert await env.core.holds.sweep(now=time.time() + 31) == 1, "the tenant's max_hold applies by default"
    assert (await env.describe("hold/y")).holder is None and again.fencing_token > g.fencing_token


async def test_a_limit_above_the_tenants_is_refused_before_anything_is_queued(env: Env) -> None:
    a = await env.session()
    before = await env.snapshot()
    with pytest.raises(QuotaExceeded) as ei:
        await env.core.acquire(TENANT, AcquireParams("hold/z", a, 10, 0.0, "", "", max_hold=60.0))
    assert ei.value.limit == "max_hold"
    await env.assert_untouched(before)
