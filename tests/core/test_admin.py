"""Fences, ownership and the admin plane on every backend (issue 15).

CheckFence answers from one read; a forced release removes exactly the holder and tells its
session on the next refresh; a revoked session's refresh says REVOKED; a grant or session is
acted on only by its own session and principal.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.server.core.acquire import AcquireParams
from lockbroker.server.core.errors import NotOwner, SessionNotFound, SessionRevoked
from lockbroker.server.core.names import session_id_of
from lockbroker.v1.reasons import ErrorReason
from tests.core.conftest import TENANT, Env

ALICE = "api-key:alice"
BOB = "api-key:bob"


async def test_check_fence_is_current_only_for_the_holder(env: Env) -> None:
    a, b = await env.session(), await env.session()
    first = await env.acquire("fence/x", a)
    fence = await env.core.check_fence(TENANT, "fence/x", first.fencing_token)
    assert (fence.current, fence.holder_token) == (True, first.fencing_token)
    assert await env.release("fence/x", first.fencing_token, a)
    free = await env.core.check_fence(TENANT, "fence/x", first.fencing_token)
    assert (free.current, free.holder_token) == (False, 0)
    second = await env.acquire("fence/x", b)
    stale = await env.core.check_fence(TENANT, "fence/x", first.fencing_token)
    assert (stale.current, stale.holder_token) == (False, second.fencing_token)
    # A token from the future is no more current than one from the past.
    assert not (await env.core.check_fence(TENANT, "fence/x", second.fencing_token + 1000)).current


async def test_release_only_by_the_session_that_holds_the_grant(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("own/x", a)
    with pytest.raises(NotOwner) as ei:
        await env.release("own/x", g.fencing_token, b)
    assert ei.value.metadata == {"lock": "own/x"}
    assert (await env.describe("own/x")).holder is not None, "a refused release changed nothing"
    assert await env.release("own/x", g.fencing_token, a)


async def test_release_and_session_calls_compare_the_principal(env: Env) -> None:
    s = await env.core.create_session(TENANT, 10, "alice's", "", ALICE)
    lease = env.adopt(int(s.session_id, 16))
    g = await env.core.acquire(TENANT, AcquireParams("own/p", lease, 10, 0.0, "", "", principal=ALICE))
    # A session-less Release is allowed only to the principal whose session holds the grant.
    with pytest.raises(NotOwner):
        await env.core.release(TENANT, "own/p", g.fencing_token, None, BOB)
    with pytest.raises(NotOwner):
        await env.core.release(TENANT, "own/p", g.fencing_token, lease, BOB)
    with pytest.raises(NotOwner):
        await env.core.refresh(TENANT, lease, principal=BOB)
    with pytest.raises(NotOwner):
        await env.core.close_session(TENANT, lease, BOB)
    # The owners cache is per replica: a fresh core (another replica) reads the record.
    env.core.owners.forget(TENANT, lease)
    with pytest.raises(NotOwner):
        await env.core.refresh(TENANT, lease, principal=BOB)
    assert (await env.core.refresh(TENANT, lease, principal=ALICE)).ttl > 0
    assert await env.core.release(TENANT, "own/p", g.fencing_token, None, ALICE)
    assert await env.core.close_session(TENANT, lease, ALICE)


async def test_an_implicit_session_records_its_principal(env: Env) -> None:
    g = await env.core.acquire(TENANT, AcquireParams("own/i", None, 10, 0.0, "", "rid-i", principal=ALICE))
    lease = env.adopt(int(g.session_id, 16))
    env.core.owners.forget(TENANT, lease)
    with pytest.raises(NotOwner):
        await env.core.release(TENANT, "own/i", g.fencing_token, None, BOB)
    assert await env.core.release(TENANT, "own/i", g.fencing_token, None, ALICE)


async def test_force_release_removes_the_holder_and_tells_its_session(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("force/x", a)
    assert (await env.core.refresh(TENANT, a)).revoked == ()
    [gone] = await env.core.force_release(TENANT, "force/x", "wedged, INC-1", "api-key:ops")
    assert gone.create_revision == g.fencing_token and gone.lease == a
    [r] = (await env.core.refresh(TENANT, a)).revoked
    assert (r.name, r.fencing_token, r.reason, r.message, r.admin) == (
        "force/x",
        g.fencing_token,
        ErrorReason.REVOKED,
        "wedged, INC-1",
        "api-key:ops",
    )
    # The session lives on; the grant is gone and the next one is fenced above it.
    assert not await env.release("force/x", g.fencing_token, a)
    nxt = await env.acquire("force/x", b)
    assert nxt.fencing_token > g.fencing_token
    assert not (await env.core.check_fence(TENANT, "force/x", g.fencing_token)).current
    assert await env.core.force_release(TENANT, "force/free", "nothing there", "api-key:ops") == []


async def test_force_release_hands_the_lock_to_the_next_waiter(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("force/q", a)
    waiting = asyncio.create_task(env.acquire("force/q", b, wait=10))
    await env.wait_waiters("force/q", 1)
    await env.core.force_release(TENANT, "force/q", "next please", "api-key:ops")
    got = await asyncio.wait_for(waiting, 10)
    assert got.session_id == session_id_of(b) and got.fencing_token > g.fencing_token


@pytest.mark.parametrize("kind", ["shared", "semaphore"])
async def test_force_release_removes_every_holder_of_a_shared_lock_or_semaphore(env: Env, kind: str) -> None:
    """Readers of a shared lock and permits of a semaphore all hold: ForceRelease takes every one
    (each session told REVOKED), not only the oldest; the waiters behind them then get their turn."""
    name = f"force/{kind}"
    claim: dict[str, Any] = {"shared": True} if kind == "shared" else {"limit": 3}
    leases = [await env.session() for _ in range(3)]
    grants = [await env.acquire(name, lease, **claim) for lease in leases]
    # A writer behind the readers; a fourth permit behind the three.
    waiting = asyncio.create_task(
        env.acquire(name, await env.session(), wait=10, **({} if kind == "shared" else claim))
    )
    await env.wait_waiters(name, 1)
    gone = await env.core.force_release(TENANT, name, "all out", "api-key:ops")
    assert [(e.create_revision, e.lease) for e in gone] == [
        (g.fencing_token, lease) for g, lease in zip(grants, leases, strict=True)
    ]
    for g, lease in zip(grants, leases, strict=True):
        [r] = (await env.core.refresh(TENANT, lease)).revoked
        assert (r.name, r.fencing_token, r.reason, r.message) == (name, g.fencing_token, ErrorReason.REVOKED, "all out")
        assert not (await env.core.check_fence(TENANT, name, g.fencing_token)).current
    nxt = await asyncio.wait_for(waiting, 10)
    assert nxt.fencing_token > max(g.fencing_token for g in grants)
    d = await env.describe(name)
    assert [h.create_revision for h in d.holders] == [nxt.fencing_token] and d.waiters == []


async def test_revoked_session_refresh_says_revoked(env: Env) -> None:
    a, b = await env.session(), await env.session()
    g = await env.acquire("revoke/x", a)
    assert await env.core.revoke_session(TENANT, a, "runaway job", "api-key:ops")
    with pytest.raises(SessionRevoked) as ei:
        await env.core.refresh(TENANT, a)
    assert ei.value.reason == ErrorReason.REVOKED
    assert ei.value.metadata["admin_reason"] == "runaway job"
    assert (await env.describe("revoke/x")).holder is None
    assert (await env.acquire("revoke/x", b)).fencing_token > g.fencing_token
    assert not await env.core.revoke_session(TENANT, a, "again", "api-key:ops")
    # A session that merely ended is still plain NOT_FOUND.
    await env.core.close_session(TENANT, b)
    with pytest.raises(SessionNotFound) as plain:
        await env.core.refresh(TENANT, b)
    assert not isinstance(plain.value, SessionRevoked)


async def test_list_sessions_shows_held_and_waited_locks(env: Env) -> None:
    a = await env.session(owner="worker-a")
    b = await env.session(owner="worker-b")
    g = await env.acquire("ls/x", a)
    await env.acquire("ls/y", b)
    waiting = asyncio.create_task(env.acquire("ls/x", b, wait=10))
    try:
        await env.wait_waiters("ls/x", 1)
        page, token = await env.core.list_sessions(TENANT, 100, None)
        assert token == ""
        by_id = {s.lease: s for s in page}
        assert set(by_id) == {a, b}
        assert by_id[a].owner == "worker-a" and by_id[a].held == [("ls/x", g.fencing_token)]
        assert by_id[a].waiting == [] and by_id[a].ttl == 10 and by_id[a].expires_at is not None
        assert [n for n, _ in by_id[b].held] == ["ls/y"] and by_id[b].waiting == ["ls/x"]
        # Paging: one per page, in session id order, covering both.
        first, tok = await env.core.list_sessions(TENANT, 1, None)
        second, end = await env.core.list_sessions(TENANT, 1, tok)
        assert tok and end == "" and [s.lease for s in first + second] == sorted([a, b], key=session_id_of)
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_a_session_of_another_tenant_stays_unknown_with_its_owner_cached(env: Env) -> None:
    s = await env.core.create_session("globex", 10, "", "", ALICE)  # cached for (globex, lease)
    lease = env.adopt(int(s.session_id, 16))
    with pytest.raises(SessionNotFound):
        await env.core.refresh(TENANT, lease, principal=ALICE)
    assert not await env.core.close_session(TENANT, lease, ALICE)
    assert (await env.core.refresh("globex", lease, principal=ALICE)).ttl > 0
