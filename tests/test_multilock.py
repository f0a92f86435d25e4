"""AcquireMany (issue 17 item 4) through the Python client, on both client transports (an
`acquire_many` message on the Session stream, and the unary RPC), over a real broker and etcd: all
or none, no deadlock between callers naming the same locks in opposite orders, nothing left behind."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import pytest

from lockbroker.client import Client, SyncClient, WaitExpired
from lockbroker.client.aio import TRANSPORT_ENV
from lockbroker.client.types import Grant
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe

LOCKS = "/t/default/l/"


@pytest.fixture(params=["stream", "unary"], autouse=True)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # Every Client made in a test reads it, the SyncClient's too.
    value: str = request.param
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


async def test_opposite_orders_never_deadlock_nor_overlap(broker: Any, transport: str) -> None:
    """2 clients take {a,b} and {b,a} in a loop for 10 s: every round ends, holds never overlap,
    tokens grow per lock in grant order."""
    holding: dict[str, int | None] = {"a": None, "b": None}
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    rounds = [0, 0]
    end = time.monotonic() + 10

    async def worker(i: int, order: list[str]) -> None:
        async with Client(target_of(broker), default_timeout=5.0) as c, c.session(ttl=30) as s:
            assert c.transport == transport
            for _ in range(100_000):  # bounded; the clock ends it long before
                if time.monotonic() >= end:
                    return
                # A wait well inside the test: a deadlock would show as a WaitExpired here.
                async with c.lock_many(order, session=s, wait=8) as grants:
                    assert [g.name for g in grants] == order
                    for g in grants:
                        assert holding[g.name] is None, f"{g.name} granted to {i} while {holding[g.name]} held it"
                        holding[g.name] = i
                        tokens[g.name].append(g.fencing_token)
                    await asyncio.sleep(0.002)
                    for g in grants:
                        holding[g.name] = None
                rounds[i] += 1
                # Out of step with the other client, so both often start a round at once (and an
                # unordered AcquireMany would take one lock each, then wait for the other's).
                await asyncio.sleep(random.uniform(0, 0.005))

    await asyncio.wait_for(asyncio.gather(worker(0, ["a", "b"]), worker(1, ["b", "a"])), 30)
    assert rounds[0] > 0 and rounds[1] > 0, rounds
    for name, seen in tokens.items():
        assert all(x < y for x, y in itertools.pairwise(seen)), f"tokens of {name} not increasing"


async def test_not_granted_within_the_wait_leaves_nothing(broker: Any, probe: EtcdProbe) -> None:
    async with Client(target_of(broker), default_timeout=5.0) as c, c.session(ttl=30) as s1, c.session(ttl=30) as s2:
        held = await c.acquire("m/b", session_id=s2.session_id)
        before = await probe.keys(LOCKS)
        with pytest.raises(WaitExpired):
            await c.acquire_many(["m/a", "m/b", "m/c"], session_id=s1.session_id, wait=0.3)
        # "m/a" was granted (name order) and then given back; "m/c" was never queued.
        assert await probe.keys(LOCKS) == before
        assert not (await c.describe("m/a")).held
        # Cancelled while waiting: same.
        task = asyncio.create_task(c.acquire_many(["m/a", "m/b"], session_id=s1.session_id, wait=30))
        for _ in range(200):
            if (await c.describe("m/b")).waiters:
                break
            await asyncio.sleep(0.02)
        assert (await c.describe("m/a")).held
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(200):  # the broker removes the waiter after its resume window at most
            if await probe.keys(LOCKS) == before:
                break
            await asyncio.sleep(0.05)
        assert await probe.keys(LOCKS) == before
        assert await c.release("m/b", held.fencing_token, session_id=s2.session_id)


async def test_grants_are_released_one_by_one_and_modes_apply(broker: Any) -> None:
    async with Client(target_of(broker), default_timeout=5.0) as c, c.session(ttl=30) as s, c.session(ttl=30) as r:
        grants: list[Grant] = await c.acquire_many(["x/2", ("x/1", True)], session_id=s.session_id)
        assert [(g.name, g.shared) for g in grants] == [("x/2", False), ("x/1", True)]
        # The shared one admits another reader; the exclusive one does not.
        assert (await c.acquire("x/1", session_id=r.session_id, shared=True)).shared
        assert await c.release("x/2", grants[0].fencing_token, session_id=s.session_id)
        assert (await c.describe("x/1")).held
        assert not (await c.describe("x/2")).held
        # A retry with the same request id returns the same grants.
        again = await c.acquire_many(["y/1", "y/2"], session_id=s.session_id, request_id="many-1")
        same = await c.acquire_many(["y/1", "y/2"], session_id=s.session_id, request_id="many-1")
        assert [g.fencing_token for g in same] == [g.fencing_token for g in again]


async def test_sync_client_lock_many(broker: Any) -> None:
    await asyncio.to_thread(_sync_lock_many, broker)  # the broker serves on this test's loop


def _sync_lock_many(broker: Any) -> None:
    with SyncClient(target_of(broker), default_timeout=5.0) as c, c.session(ttl=30) as s:
        with c.lock_many(["s/b", ("s/a", True)], session=s) as grants:
            assert [(g.name, g.shared) for g in grants] == [("s/b", False), ("s/a", True)]
            assert c.describe("s/b").held
        assert not c.describe("s/b").held and not c.describe("s/a").held
        grants2 = c.acquire_many(["s/c"], session_id=s.session_id)
        assert c.release("s/c", grants2[0].fencing_token, session_id=s.session_id)
