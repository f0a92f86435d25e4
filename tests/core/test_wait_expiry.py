"""A blocked Acquire whose wait runs out is told "not acquired" only when that is known to be true
(issue 18, item 1), on every backend.

"Wait expired" promises that no entry of the caller is left in the queue to become the holder
later. So before answering, the core reads the queue again (a watch cut off by a partition may have
missed the turn: then the lock is granted), and removes the entry; if etcd does not confirm the
removal, the answer is UNAVAILABLE with an unknown outcome (retry with the same request id), and
the removal goes on in the background.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.server.core import turn
from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.errors import Unavailable, WaitExpired
from tests.core.conftest import Env, eventually, sid


def fail_calls(env: Env, method: str, count: int) -> None:
    """The next `count` calls of the backend's `method` fail Unavailable and change nothing: etcd
    unreachable from this broker. On memory, its own fault hook; on etcd, the adapter's method."""
    if env.memory:
        env.backend.fail(method, applied=False, count=count)
        return
    real = getattr(env.backend, method)
    left = count

    async def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal left
        left -= 1
        if left <= 0:
            setattr(env.backend, method, real)
        raise Unavailable(f"injected: etcd unreachable in {method}", retry_after=0.1, outcome_unknown=True)

    setattr(env.backend, method, failing)


async def test_an_unconfirmed_removal_is_not_answered_wait_expired(env: Env) -> None:
    name = "expiry/unreachable"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    # etcd becomes unreachable just as the wait runs out: the re-read fails, and so does the
    # removal, for longer than the caller waits for it (the clean-up's first 5 attempts span
    # about 3 s, the time a caller waits for its clean-up).
    fail_calls(env, "position", 1)
    fail_calls(env, "delete_entry", 5)
    with pytest.raises(Unavailable) as ei:
        await env.acquire(name, w, wait=0.5, request_id="expiry-1")
    assert ei.value.outcome_unknown
    assert "request_id" in str(ei.value)
    # The removal went on in the background and, once etcd answers, the entry is gone: it never
    # becomes a holder that nobody knows of.
    await env.core.drain_cleanups(15.0)
    assert (await env.describe(name)).waiters == []
    assert await env.release(name, held.fencing_token)
    assert (await env.describe(name)).holder is None
    assert await env.lock_keys(name) == []


async def test_a_confirmed_removal_is_answered_wait_expired(env: Env) -> None:
    name = "expiry/confirmed"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    fail_calls(env, "position", 1)  # the re-read fails, the removal does not
    with pytest.raises(WaitExpired):
        await env.acquire(name, w, wait=0.3, request_id="expiry-2")
    assert (await env.describe(name)).waiters == []
    assert await env.release(name, held.fencing_token)


async def test_a_turn_the_watch_missed_is_granted_when_the_wait_runs_out(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "expiry/missed"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    never = asyncio.Event()

    async def stalled(*args: Any) -> None:  # a watch stream cut off: no event ever arrives
        await never.wait()

    monkeypatch.setattr(env.backend, "wait_deleted", stalled)
    waiting = asyncio.ensure_future(env.acquire(name, w, wait=1.0, request_id="expiry-3"))
    await env.wait_waiters(name, 1)
    assert await env.release(name, held.fencing_token)
    got = await waiting
    assert got.session_id == sid(w)
    state = await env.describe(name)
    assert state.holder is not None and state.holder.create_revision == got.fencing_token


async def test_a_wait_outlives_a_short_outage_and_keeps_its_place(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd away for a moment mid-wait (a leader election: the watch breaks, the re-read fails):
    the wait goes on and the waiter keeps its entry and fencing token. It used to fail the call,
    delete the entry, and race the client's retry with the same request id into SESSION_LOST
    (tests/fault/test_faults.py::test_killed_client_frees_its_lock[leader-killed])."""
    name = "expiry/outage"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    real = env.backend.wait_deleted
    broken: list[bool] = []

    async def breaks_once(*args: Any) -> Any:
        if not broken:
            broken.append(True)
            raise WatchInterrupted("injected: the watch stream was lost")
        return await real(*args)

    monkeypatch.setattr(env.backend, "wait_deleted", breaks_once)
    fail_calls(env, "position", 1)  # and the re-read after it fails
    waiting = asyncio.ensure_future(env.acquire(name, w, wait=10, request_id="expiry-4"))
    try:
        token = (await env.wait_waiters(name, 1)).waiters[0].create_revision

        async def rewatched() -> bool:
            return waiting.done() or (bool(broken) and env.watches() == 1)

        await eventually(rewatched, 5.0, "the waiter watches again after the outage")
        assert not waiting.done(), f"the wait ended with the outage: {waiting.exception()!r}"
        assert await env.release(name, held.fencing_token)
        got = await asyncio.wait_for(waiting, 5)
    finally:
        waiting.cancel()
    assert got.session_id == sid(w) and got.fencing_token == token
    state = await env.describe(name)
    assert state.holder is not None and state.holder.create_revision == token


async def test_an_outage_longer_than_an_election_ends_the_wait_unavailable(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Riding out an outage is bounded (turn.OUTAGE_RIDE_OUT): past it the waiter is answered
    UNAVAILABLE well before its wait ends, and its entry is removed once etcd answers again."""
    monkeypatch.setattr(turn, "OUTAGE_RIDE_OUT", 0.3)
    name = "expiry/long-outage"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()

    async def broken(*args: Any) -> Any:
        raise WatchInterrupted("injected: the watch stream was lost")

    monkeypatch.setattr(env.backend, "wait_deleted", broken)
    waiting = asyncio.ensure_future(env.acquire(name, w, wait=30, request_id="expiry-long"))
    try:
        await env.wait_waiters(name, 1)
        fail_calls(env, "position", 1000)  # every re-read fails: etcd is gone
        with pytest.raises(Unavailable):
            await asyncio.wait_for(waiting, 10)
    finally:
        waiting.cancel()
        fail_calls(env, "position", 0)
    monkeypatch.setattr(env.backend, "wait_deleted", type(env.backend).wait_deleted.__get__(env.backend))

    async def removed() -> bool:
        return not (await env.describe(name)).waiters

    await eventually(removed, 10.0, "the cut-off waiter's entry removed once etcd answers")
    assert await env.release(name, held.fencing_token)


async def test_the_first_waiter_finds_its_turn_when_the_watch_misses_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deletion of the holder that never reaches this replica's watch costs the first waiter
    HEAD_RECHECK, not the rest of its wait (tests/fault: a waiter granted at the end of its wait)."""
    monkeypatch.setattr(turn, "HEAD_RECHECK", 0.2)
    name = "expiry/missed-event"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()

    async def deaf(*args: Any) -> Any:
        await asyncio.sleep(3600)  # a watch that hears nothing

    monkeypatch.setattr(env.backend, "wait_deleted", deaf)
    waiting = asyncio.ensure_future(env.acquire(name, w, wait=30, request_id="expiry-missed"))
    try:
        token = (await env.wait_waiters(name, 1)).waiters[0].create_revision
        assert await env.release(name, held.fencing_token)
        got = await asyncio.wait_for(waiting, 10)  # not the 30 s wait
    finally:
        waiting.cancel()
    assert got.session_id == sid(w) and got.fencing_token == token
