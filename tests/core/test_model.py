"""Random sequences of lock operations on every backend, checked against a model of the README's
promises: a free lock is granted, a held one is refused with its holder named, tokens increase per
lock, a release is exact, an ended session frees its locks, a dead session takes nothing."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockbroker.server.core.errors import AlreadyQueued, LockHeld, NotOwner, SessionNotFound
from tests.core.conftest import TENANT, Env

SESSIONS, LOCKS = 3, 2

ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "stale-release", "end"]),
        st.integers(0, SESSIONS - 1),
        st.integers(0, LOCKS - 1),
    ),
    max_size=14,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=ops)
async def test_random_operations_follow_the_model(env: Env, steps: list[tuple[str, int, int]]) -> None:
    tag = uuid.uuid4().hex[:8]  # examples share the env: each gets its own lock names
    names = [f"model/{tag}/{i}" for i in range(LOCKS)]
    sessions = [await env.session(ttl=30) for _ in range(SESSIONS)]
    alive = [True] * SESSIONS
    holder: list[int | None] = [None] * LOCKS
    tokens: list[int] = [0] * LOCKS  # the last token granted on each lock
    granted: list[list[int]] = [[] for _ in range(LOCKS)]  # every token granted on each lock
    try:
        for n, (op, s, lk) in enumerate(steps):
            name, lease = names[lk], sessions[s]
            if op == "acquire":
                if not alive[s]:
                    with pytest.raises(SessionNotFound):
                        await env.acquire(name, lease, request_id=f"r{n}")
                elif holder[lk] == s:
                    with pytest.raises(AlreadyQueued):
                        await env.acquire(name, lease, request_id=f"r{n}")
                elif holder[lk] is not None:
                    with pytest.raises(LockHeld) as ei:
                        await env.acquire(name, lease, request_id=f"r{n}")
                    assert ei.value.info.holder is not None
                    assert ei.value.info.holder.lease == sessions[holder[lk]]  # type: ignore[index]
                    assert ei.value.info.holder.create_revision == tokens[lk]
                else:
                    g = await env.acquire(name, lease, request_id=f"r{n}")
                    assert g.fencing_token > tokens[lk], "fencing tokens must increase per lock"
                    assert g.queue_position == 0
                    tokens[lk], holder[lk] = g.fencing_token, s
                    granted[lk].append(g.fencing_token)
            elif op == "release":
                if tokens[lk] and holder[lk] is not None and holder[lk] != s:
                    # Another session's current grant: refused, never released (issue 15 ownership).
                    with pytest.raises(NotOwner):
                        await env.release(name, tokens[lk], lease)
                else:
                    released = await env.release(name, tokens[lk], lease) if tokens[lk] else False
                    assert released == (holder[lk] == s and alive[s])
                    if released:
                        holder[lk] = None
            elif op == "stale-release":
                # An older grant's token never releases anything, even named with the session that
                # holds the lock now (whose entry has the same key when it is the same session).
                h = holder[lk]
                for old in granted[lk][:-1]:
                    assert await env.release(name, old, sessions[h] if h is not None else lease) is False
                    assert await env.release(name, old) is False
            else:
                assert await env.core.close_session(TENANT, lease) == alive[s]
                alive[s] = False
                holder = [None if h == s else h for h in holder]
            for i, nm in enumerate(names):
                d = await env.describe(nm)
                want = holder[i]
                assert (d.holder.lease if d.holder is not None else None) == (
                    sessions[want] if want is not None else None
                ), f"after step {n} {op}: {nm}"
                assert d.waiters == []
    finally:
        for lease in sessions:
            await env.core.close_session(TENANT, lease)
