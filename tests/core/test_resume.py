"""A waiter whose call is cancelled keeps its place for a retry with its request id (issue 19
item 3; core/resume.py), on every backend."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.core.conftest import Env, eventually


async def test_a_cancelled_waiter_is_adopted_by_its_retry_and_keeps_its_token(env: Env) -> None:
    env.core._acquirer.resume_window = 30.0
    name = "resume/adopt"
    h, a, b = await env.session(ttl=30), await env.session(ttl=30), await env.session(ttl=30)
    held = await env.acquire(name, h)
    first = asyncio.ensure_future(env.acquire(name, a, wait=30, request_id="a-1"))
    token = (await env.wait_waiters(name, 1)).waiters[0].create_revision
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    behind = asyncio.ensure_future(env.acquire(name, b, wait=30, request_id="b-1"))
    retry = asyncio.ensure_future(env.acquire(name, a, wait=30, request_id="a-1"))
    try:
        state = await env.wait_waiters(name, 2)
        assert [w.lease for w in state.waiters] == [a, b]
        assert await env.release(name, held.fencing_token, h)
        got = await asyncio.wait_for(retry, 10)
        assert got.fencing_token == token
        assert not behind.done()
        assert await env.release(name, token, a)
        assert (await asyncio.wait_for(behind, 10)).session_id == f"{b:016x}"
    finally:
        behind.cancel()
        retry.cancel()
        await asyncio.gather(behind, retry, return_exceptions=True)


async def test_an_abandoned_waiter_never_holds_and_is_gone_after_the_window(env: Env) -> None:
    env.core._acquirer.resume_window = 30.0
    name = "resume/gone"
    h, a, b = await env.session(ttl=30), await env.session(ttl=30), await env.session(ttl=30)
    held = await env.acquire(name, h)
    first = asyncio.ensure_future(env.acquire(name, a, wait=30, request_id="a-1"))
    await env.wait_waiters(name, 1)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    behind = asyncio.ensure_future(env.acquire(name, b, wait=30, request_id="b-1"))
    try:
        await env.wait_waiters(name, 2)
        assert await env.release(name, held.fencing_token, h)
        # The abandoned entry reached the head unadopted: removed at once, long before the window.
        got = await asyncio.wait_for(behind, 10)
        assert got.session_id == f"{b:016x}"
    finally:
        behind.cancel()
    state = await env.describe(name)
    assert state.waiters == []

    # Without a retry, the window's end removes a waiter that is still queued.
    env.core._acquirer.resume_window = 0.2
    again = asyncio.ensure_future(env.acquire(name, a, wait=30, request_id="a-2"))
    await env.wait_waiters(name, 1)
    again.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await again

    async def no_waiters() -> bool:
        return (await env.describe(name)).waiters == []

    await eventually(no_waiters, 5.0, "the abandoned waiter is removed after the window")
    assert len(await env.lock_keys(name)) == 1


async def test_without_a_request_id_a_cancelled_waiter_goes_at_once(env: Env) -> None:
    env.core._acquirer.resume_window = 30.0
    name = "resume/anonymous"
    h, a = await env.session(ttl=30), await env.session(ttl=30)
    await env.acquire(name, h)
    task = asyncio.ensure_future(env.acquire(name, a, wait=30))
    await env.wait_waiters(name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # No retry could find it: it is not kept for one.
    assert len(await env.lock_keys(name)) == 1


async def test_a_retry_that_loses_the_entry_it_adopts_queues_anew(env: Env) -> None:
    """The retry reads its request's entry, and the cancelled call's clean-up removes that entry
    before the retry's adoption lands (the entry came to the head unadopted): the retry must queue
    anew, not answer SESSION_LOST for a session that is alive (tests/client/test_stream.py saw it)."""
    if env.memory:
        pytest.skip("the memory model reads and adopts the entry in one step: no room for the race")
    env.core._acquirer.resume_window = 30.0
    name = "resume/race"
    h, a = await env.session(ttl=30), await env.session(ttl=30)
    held = await env.acquire(name, h)
    first = asyncio.ensure_future(env.acquire(name, a, wait=30, request_id="a-1"))
    token = (await env.wait_waiters(name, 1)).waiters[0].create_revision
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    real = env.backend._adopt
    raced: list[int] = []

    async def late(prefix: bytes, existing: Any) -> Any:
        # Between the retry's read of the entry and its adoption: the holder leaves, the unadopted
        # entry is at the head, and its clean-up (core.resume) removes it.
        env.backend._adopt = real
        raced.append(existing.create_revision)
        assert await env.release(name, held.fencing_token, h)

        async def emptied() -> bool:
            return await env.lock_keys(name) == []

        await eventually(emptied, 5.0, "the unadopted entry is removed at the head")
        return await real(prefix, existing)

    env.backend._adopt = late
    try:
        got = await asyncio.wait_for(env.acquire(name, a, wait=30, request_id="a-1"), 10)
    finally:
        env.backend._adopt = real
    assert raced == [token], "the premise: the retry found the cancelled call's entry"
    assert got.session_id == f"{a:016x}" and got.request_id == "a-1"
    assert got.fencing_token > token  # a new place: the old one was gone
    state = await env.describe(name)
    assert state.holder is not None and state.holder.create_revision == got.fencing_token
    assert state.waiters == []
