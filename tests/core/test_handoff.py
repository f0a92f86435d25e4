"""Direct handoff on every backend: a release through this backend tells the next waiter here that it
holds the lock, with no read of the queue after the release (LockBackend.wait_deleted with `mine`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from lockbroker.server.core.model import Position
from tests.core.conftest import Env, eventually


def count_reads(env: Env) -> list[int]:
    """Count the backend's position reads (the read a waiter makes after a watch wakes it)."""
    calls = [0]
    real: Callable[..., Awaitable[Position]] = env.backend.position

    async def position(*args: Any, **kwargs: Any) -> Position:
        calls[0] += 1
        return await real(*args, **kwargs)

    env.backend.position = position
    return calls


def handoffs(env: Env) -> int:
    return int(env.backend.handoffs if env.memory else env.backend.watches.handoffs)


async def test_a_release_hands_the_lock_to_the_next_waiter_without_a_read(env: Env) -> None:
    a, b, c = await env.session(), await env.session(), await env.session()
    held = await env.acquire("h", a)
    reads = count_reads(env)
    tb = asyncio.ensure_future(env.acquire("h", b, wait=10))
    await eventually(lambda: _ready(env, 1), 5, "b waiting")
    tc = asyncio.ensure_future(env.acquire("h", c, wait=10))
    await eventually(lambda: _ready(env, 2), 5, "b and c waiting")
    reads[0] = 0

    assert await env.release("h", held.fencing_token, a)
    gb = await asyncio.wait_for(tb, 5)
    assert gb.session_id == f"{b:016x}" and gb.fencing_token > held.fencing_token
    assert not tc.done(), "c was granted while b holds the lock"
    assert await env.release("h", gb.fencing_token, b)
    gc = await asyncio.wait_for(tc, 5)
    assert gc.fencing_token > gb.fencing_token, "FIFO: c after b"
    assert reads[0] == 0, "a waiter read the queue after a release here"
    assert handoffs(env) == 2
    assert await env.release("h", gc.fencing_token, c)
    assert await env.lock_keys("h") == []


async def test_a_handoff_skips_a_waiter_whose_session_ended(env: Env) -> None:
    """The release reads the head of the queue after the deletion: a waiter whose entry is gone
    (its session ended) is not the head, and the next one is handed the lock."""
    a, b, c = await env.session(), await env.session(ttl=60), await env.session()
    held = await env.acquire("s", a)
    tb = asyncio.ensure_future(env.acquire("s", b, wait=10))
    await eventually(lambda: _ready(env, 1), 5, "b waiting")
    tc = asyncio.ensure_future(env.acquire("s", c, wait=10))
    await eventually(lambda: _ready(env, 2), 5, "b and c waiting")
    await env._revoke(b)  # b's entry goes with its lease
    await asyncio.gather(tb, return_exceptions=True)
    assert await env.release("s", held.fencing_token, a)
    gc = await asyncio.wait_for(tc, 5)
    assert gc.session_id == f"{c:016x}" and gc.fencing_token > held.fencing_token
    assert await env.release("s", gc.fencing_token, c)


async def _ready(env: Env, n: int) -> bool:
    return env.watches() == n
