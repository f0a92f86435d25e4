"""One session per process, many threads or tasks on one lock (issue 19), over a real etcd and broker.

Threads (SyncClient) and asyncio tasks (Client) sharing one session each get their own claim:
FIFO, strictly increasing fencing tokens, never two inside at once. Reentrant locks are keyed by
the thread or task, keep one token, and free the lock when the outermost block ends.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest

from lockbroker.client import Client, SyncClient
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS

THREADS = 8


def _contend(broker: Any) -> tuple[list[int], list[int], int]:
    """8 threads of one SyncClient session take one lock; (grant order tokens, queue tokens, max inside)."""
    granted: list[int] = []
    inside = 0
    most = 0
    guard = threading.Lock()
    with SyncClient(target_of(broker), default_timeout=10) as c, c.session(ttl=30) as s:
        first = c.lock("shared/one", session=s, wait=30)
        holder = first.__enter__()
        ready = threading.Barrier(THREADS + 1)

        def worker() -> None:
            nonlocal inside, most
            ready.wait()
            with c.lock("shared/one", session=s, wait=30) as held:
                with guard:
                    inside += 1
                    most = max(most, inside)
                    granted.append(held.fencing_token)
                    assert held.session_id == s.session_id
                with guard:
                    inside -= 1

        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for t in threads:
            t.start()
        ready.wait()
        # Every thread is queued behind the first claim, each as its own waiter of this session.
        for _ in range(200):
            state = c.describe("shared/one")
            if len(state.waiters) == THREADS:
                break
            threading.Event().wait(0.05)
        assert len(state.waiters) == THREADS
        assert {w.session_id for w in state.waiters} == {s.session_id}
        queued = [w.fencing_token for w in state.waiters]
        assert len({w.request_id for w in state.waiters}) == THREADS
        first.__exit__(None, None, None)
        for t in threads:
            t.join(60)
        assert holder.fencing_token < min(queued)
    return granted, queued, most


async def test_eight_threads_of_one_session_take_turns_in_fifo_order(broker: Any, probe: EtcdProbe) -> None:
    granted, queued, most = await asyncio.to_thread(_contend, broker)
    assert len(granted) == THREADS
    assert most == 1, "two threads were inside the lock at once"
    assert all(a < b for a, b in itertools.pairwise(granted)), granted
    assert granted == queued  # granted in the order they queued: FIFO
    assert await probe.keys(LOCKS) == []


def _nest(broker: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with SyncClient(target_of(broker), default_timeout=10) as c, c.session(ttl=30) as s:
        with c.lock("nest/a", session=s, reentrant=True) as outer:
            with c.lock("nest/a", session=s, reentrant=True) as middle:
                with c.lock("nest/a", session=s, reentrant=True) as inner:
                    seen["tokens"] = {outer.fencing_token, middle.fencing_token, inner.fencing_token}
                    seen["counts"] = [outer.grant.hold_count, middle.grant.hold_count, inner.grant.hold_count]
                    holder = c.describe("nest/a").holder
                    seen["described"] = holder.hold_count if holder is not None else 0
                    # Another thread of the same session is another owner: it waits.
                    other: list[int] = []

                    def other_thread() -> None:
                        with c.lock("nest/a", session=s, reentrant=True, wait=30) as h:
                            other.append(h.fencing_token)

                    t = threading.Thread(target=other_thread)
                    t.start()
                    for _ in range(200):
                        if len(c.describe("nest/a").waiters) == 1:
                            break
                        threading.Event().wait(0.05)
                    seen["waiters"] = len(c.describe("nest/a").waiters)
                holder = c.describe("nest/a").holder
                seen["after_inner"] = holder.hold_count if holder is not None else 0
                seen["other_before_outer_exit"] = list(other)
            seen["held_after_middle"] = c.describe("nest/a").holder is not None
        t.join(30)
        seen["other"] = other
        seen["free_at_end"] = c.describe("nest/a").holder is None
    return seen


async def test_reentrant_nesting_three_deep_keeps_one_token_and_releases_at_zero(broker: Any, probe: EtcdProbe) -> None:
    seen = await asyncio.to_thread(_nest, broker)
    assert len(seen["tokens"]) == 1
    assert seen["counts"] == [1, 2, 3]
    assert seen["described"] == 3
    assert seen["waiters"] == 1
    assert seen["after_inner"] == 2
    assert seen["other_before_outer_exit"] == []
    assert seen["held_after_middle"] is True
    assert len(seen["other"]) == 1 and seen["other"][0] > min(seen["tokens"])
    assert seen["free_at_end"] is True
    assert await probe.keys(LOCKS) == []


async def test_asyncio_tasks_sharing_a_session_take_turns_and_reenter_per_task(
    client: Client, probe: EtcdProbe
) -> None:
    granted: list[int] = []
    inside = 0

    async def task(i: int) -> None:
        nonlocal inside
        async with client.lock("tasks/one", session=s, wait=30, reentrant=True) as held:
            inside += 1
            assert inside == 1
            # The same task re-enters: same grant, no deadlock.
            async with client.lock("tasks/one", session=s, wait=1, reentrant=True) as again:
                assert again.fencing_token == held.fencing_token
                assert again.grant.hold_count == 2
            granted.append(held.fencing_token)
            await asyncio.sleep(0.01)
            inside -= 1

    async with client.session(ttl=30) as s:
        await asyncio.gather(*(task(i) for i in range(5)))
    assert len(granted) == 5 and all(a < b for a, b in itertools.pairwise(granted))
    assert await probe.keys(LOCKS) == []


async def test_reentrant_needs_a_session(client: Client) -> None:
    with pytest.raises(ValueError, match="needs a session"):
        client.lock("x", reentrant=True)
