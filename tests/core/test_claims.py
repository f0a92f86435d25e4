"""Several claims per session, and reentrant claims (issue 19 items 1 and 2), on every backend.

A session's claims on one lock are separate queue entries: FIFO with everyone else, each with its
own fencing token and request id, released by token. A reentrant owner's claim counts holds in
the store, keeps one token, and is released when the count returns to zero.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from lockbroker.server.core.errors import AlreadyQueued, LockHeld, NotOwner
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.model import Grant
from lockbroker.server.core.names import new_claim_id, reentrant_claim_id
from tests.core.conftest import TENANT, Env, sid


async def claim(env: Env, name: str, lease: int, request_id: str, *, wait: float = 0.0) -> Grant:
    """An Acquire with new_claim, as the service's validation turns it into parameters."""
    p = AcquireParams(name, lease, 0, wait, f"owner-{request_id}", request_id, new_claim_id(request_id))
    return await env.core.acquire(TENANT, p)


async def reenter(env: Env, name: str, lease: int, owner: str, request_id: str, *, wait: float = 0.0) -> Grant:
    p = AcquireParams(name, lease, 0, wait, "", request_id, reentrant_claim_id(owner), owner)
    return await env.core.acquire(TENANT, p)


async def release(env: Env, name: str, token: int, lease: int | None) -> tuple[bool, int]:
    return await env.core.release_claim(TENANT, name, token, lease)


async def test_claims_of_one_session_are_separate_fifo_entries(env: Env) -> None:
    name = "claims/fifo"
    s, other = await env.session(ttl=30), await env.session(ttl=30)
    first = await env.acquire(name, s, request_id="plain")
    tasks = [asyncio.ensure_future(env.acquire(name, other, wait=30, request_id="other"))]
    await env.wait_waiters(name, 1)
    tasks.append(asyncio.ensure_future(claim(env, name, s, "c1", wait=30)))
    await env.wait_waiters(name, 2)
    tasks.append(asyncio.ensure_future(claim(env, name, s, "c2", wait=30)))
    state = await env.wait_waiters(name, 3)
    assert state.holder is not None and state.holder.create_revision == first.fencing_token
    # Describe shows each claim: the other session's waiter, then this session's two claims.
    assert [(w.lease, w.request_id) for w in state.waiters] == [(other, "other"), (s, "c1"), (s, "c2")]
    waiter_tokens = [w.create_revision for w in state.waiters]
    assert len(set(waiter_tokens)) == 3 and first.fencing_token < min(waiter_tokens)

    order: list[Grant] = []
    try:
        held = first
        for task in tasks:
            assert await release(env, name, held.fencing_token, int(held.session_id, 16)) == (True, 0)
            held = await task
            order.append(held)
    finally:
        for task in tasks:
            task.cancel()
    assert [g.request_id for g in order] == ["other", "c1", "c2"]
    assert [g.fencing_token for g in order] == waiter_tokens
    assert order[1].session_id == order[2].session_id == sid(s)
    assert await release(env, name, order[2].fencing_token, s) == (True, 0)
    assert await env.lock_keys() == []


async def test_without_new_claim_a_second_acquire_of_the_session_is_still_already_queued(env: Env) -> None:
    s = await env.session()
    await env.acquire("claims/plain", s, request_id="one")
    with pytest.raises(AlreadyQueued):
        await env.acquire("claims/plain", s, request_id="two")
    # With new_claim the same session queues a second claim; tried once, it finds the lock held
    # (by its own plain claim): a claim is no re-entry.
    with pytest.raises(LockHeld):
        await claim(env, "claims/plain", s, "three")
    assert len(await env.lock_keys("claims/plain")) == 1


async def test_a_new_claim_retried_with_its_request_id_keeps_its_entry(env: Env) -> None:
    name = "claims/retry"
    s = await env.session(ttl=30)
    held = await env.acquire(name, s, request_id="plain")
    task = asyncio.ensure_future(claim(env, name, s, "again", wait=30))
    state = await env.wait_waiters(name, 1)
    token = state.waiters[0].create_revision
    retry = asyncio.ensure_future(claim(env, name, s, "again", wait=30))
    try:
        await asyncio.sleep(0.05)
        assert len(await env.lock_keys(name)) == 2  # the retry adopted the claim: no third entry
        assert await env.release(name, held.fencing_token, s)
        got = await retry
        assert got.fencing_token == token and got.request_id == "again"
    finally:
        task.cancel()
        retry.cancel()
        await asyncio.gather(task, retry, return_exceptions=True)
    assert await release(env, name, token, s) == (True, 0)


async def test_release_names_the_claim_by_token(env: Env) -> None:
    name = "claims/release"
    s, other = await env.session(ttl=30), await env.session(ttl=30)
    plain = await env.acquire(name, s, request_id="plain")
    task = asyncio.ensure_future(claim(env, name, s, "second", wait=30))
    state = await env.wait_waiters(name, 1)
    second = state.waiters[0].create_revision
    # Another session cannot release this session's claim: refused as not its own (issue 15).
    with pytest.raises(NotOwner):
        await release(env, name, second, other)
    # Releasing the waiting claim by its token takes it out of the queue; the plain claim stays.
    assert await release(env, name, second, s) == (True, 0)
    with pytest.raises(Exception):  # noqa: B017 - the waiting call learns its entry is gone
        await asyncio.wait_for(task, 5)
    state = await env.describe(name)
    assert state.holder is not None and state.holder.create_revision == plain.fencing_token
    assert state.waiters == []
    assert await release(env, name, second, s) == (False, 0)
    assert await release(env, name, plain.fencing_token, None) == (True, 0)
    assert await env.lock_keys() == []


async def test_reentrant_nesting_keeps_one_token_and_releases_at_zero(env: Env) -> None:
    name = "claims/reentrant"
    s, other = await env.session(ttl=30), await env.session(ttl=30)
    grants = [await reenter(env, name, s, "thread-1", f"r{i}") for i in range(3)]
    assert len({g.fencing_token for g in grants}) == 1
    assert [g.hold_count for g in grants] == [1, 2, 3]
    assert {g.request_id for g in grants} == {"r0"}  # the grant's request id is the first Acquire's
    # A retry of a counted Acquire is not counted again.
    assert (await reenter(env, name, s, "thread-1", "r2")).hold_count == 3
    state = await env.describe(name)
    assert state.holder is not None and state.holder.value.hold_count == 3
    token = grants[0].fencing_token

    waiter = asyncio.ensure_future(env.acquire(name, other, wait=30, request_id="next"))
    try:
        await env.wait_waiters(name, 1)
        assert await release(env, name, token, s) == (True, 2)
        assert await release(env, name, token, None) == (True, 1)
        assert not waiter.done()
        assert (await env.describe(name)).holder is not None
        assert await release(env, name, token, s) == (True, 0)
        got = await asyncio.wait_for(waiter, 5)
    finally:
        waiter.cancel()
    assert got.fencing_token > token
    assert await release(env, name, token, s) == (False, 0)
    assert await env.release(name, got.fencing_token, other)
    assert await env.lock_keys() == []


async def test_reentrant_holds_are_kept_in_the_store(env: Env) -> None:
    name = "claims/restart"
    s = await env.session(ttl=30)
    g = await reenter(env, name, s, "task-7", "a")
    await reenter(env, name, s, "task-7", "b")
    # Another broker (or this one restarted) over the same store sees the count.
    other_core = LockCore(env.backend, env.root.decode())
    assert (await other_core.describe(TENANT, name)).holder.value.hold_count == 2  # type: ignore[union-attr]
    assert await other_core.release_claim(TENANT, name, g.fencing_token, s) == (True, 1)
    assert await other_core.release_claim(TENANT, name, g.fencing_token, s) == (True, 0)
    assert await env.lock_keys() == []


async def test_reentrant_owners_of_one_session_are_separate_claims(env: Env) -> None:
    name = "claims/owners"
    s = await env.session(ttl=30)
    t1 = await reenter(env, name, s, "thread-1", "a")
    t2 = asyncio.ensure_future(reenter(env, name, s, "thread-2", "b", wait=30))
    try:
        await env.wait_waiters(name, 1)
        # thread-2 waits; it cannot re-enter a claim that is not granted yet.
        with pytest.raises(AlreadyQueued):
            await reenter(env, name, s, "thread-2", "c")
        assert await release(env, name, t1.fencing_token, s) == (True, 0)
        got = await asyncio.wait_for(t2, 5)
    finally:
        t2.cancel()
    assert got.fencing_token > t1.fencing_token and got.hold_count == 1
    assert await release(env, name, got.fencing_token, s) == (True, 0)


async def test_claim_tokens_strictly_increase_in_grant_order(env: Env) -> None:
    name = "claims/many"
    s = await env.session(ttl=30)
    pending = {asyncio.ensure_future(claim(env, name, s, f"k{i}", wait=30)) for i in range(8)}
    granted: list[Grant] = []
    try:
        for _ in range(8):
            done, pending = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "two claims of one session held the lock at once"
            g = done.pop().result()
            granted.append(g)
            assert await release(env, name, g.fencing_token, s) == (True, 0)
    finally:
        for t in pending:
            t.cancel()
    tokens = [g.fencing_token for g in granted]
    assert all(a < b for a, b in itertools.pairwise(tokens))
    assert len({g.request_id for g in granted}) == 8
    assert await env.lock_keys() == []


async def test_a_retried_release_takes_one_hold_off(env: Env) -> None:
    name = "claims/release-retry"
    s = await env.session(ttl=30)
    g = await reenter(env, name, s, "t", "a")
    await reenter(env, name, s, "t", "b")
    await reenter(env, name, s, "t", "c")
    rel = env.core.release_claim
    assert await rel(TENANT, name, g.fencing_token, s, "rel-1") == (True, 2)
    assert await rel(TENANT, name, g.fencing_token, s, "rel-1") == (True, 2)  # a retry: answered again
    assert await rel(TENANT, name, g.fencing_token, None, "rel-2") == (True, 1)
    assert await rel(TENANT, name, g.fencing_token, s, "rel-3") == (True, 0)
    assert await rel(TENANT, name, g.fencing_token, s, "rel-3") == (False, 0)  # gone, as for any lock
    assert await env.lock_keys() == []


def count_calls(env: Env, *methods: str) -> list[str]:
    """The names of the backend's `methods` as the core calls them, in order, from now on."""
    calls: list[str] = []
    for method in methods:
        real = getattr(env.backend, method)

        def counted(*args: Any, _real: Any = real, _method: str = method, **kwargs: Any) -> Any:
            calls.append(_method)
            return _real(*args, **kwargs)

        setattr(env.backend, method, counted)
    return calls


BACKEND_CALLS = ("delete_entry", "find_entry", "position", "update_entry", "queue")


async def test_a_new_claim_granted_here_is_released_in_one_delete(env: Env) -> None:
    """Release of a new_claim claim is the one delete Txn a plain claim's is: the replica that
    granted it knows its key (core.claims.ClaimKeys), so there is no failed delete of the plain
    claim and no read to find it by token."""
    name = "claims/one-call"
    s = await env.session(ttl=30)
    first = await claim(env, name, s, "one-a")
    second = asyncio.ensure_future(claim(env, name, s, "one-b", wait=30))
    await env.wait_waiters(name, 1)
    calls = count_calls(env, *BACKEND_CALLS)
    assert await release(env, name, first.fencing_token, s) == (True, 0)
    assert calls == ["delete_entry"]
    granted = await asyncio.wait_for(second, 5)
    calls.clear()
    assert await release(env, name, granted.fencing_token, s) == (True, 0)
    assert calls == ["delete_entry"]
    # Released: the token is forgotten, and a second Release finds nothing (by the read path).
    assert await release(env, name, granted.fencing_token, s) == (False, 0)
    assert await env.lock_keys() == []


async def test_a_claim_token_named_with_the_wrong_lock_releases_nothing(env: Env) -> None:
    s = await env.session(ttl=30)
    got = await claim(env, "claims/right", s, "wrong-a")
    assert await release(env, "claims/wrong", got.fencing_token, s) == (False, 0)
    assert len(await env.lock_keys("claims/right")) == 1
    # Still known under its own lock: released there in one delete.
    calls = count_calls(env, *BACKEND_CALLS)
    assert await release(env, "claims/right", got.fencing_token, s) == (True, 0)
    assert calls == ["delete_entry"]
    assert await env.lock_keys() == []


async def test_a_new_claim_granted_elsewhere_is_found_by_its_token(env: Env) -> None:
    """Another replica (another LockCore over the same store) never saw the grant: it finds the
    claim by token, as before, and the replica that granted it then finds it gone."""
    name = "claims/elsewhere"
    s = await env.session(ttl=30)
    got = await claim(env, name, s, "else-a")
    other = LockCore(env.backend, env.root.decode())
    assert await other.release_claim(TENANT, name, got.fencing_token, s) == (True, 0)
    assert await env.lock_keys() == []
    assert await release(env, name, got.fencing_token, s) == (False, 0)
