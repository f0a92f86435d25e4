"""Random sequences of lock operations on every backend, checked against a model of the README's
promises: a free lock is granted, a held one is refused with its holder named, tokens increase per
lock, a release is exact, an ended session frees its locks, a dead session takes nothing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockbroker.server.core.errors import AlreadyQueued, LockHeld, NotOwner, SessionNotFound
from lockbroker.server.core.locks import AcquireParams
from lockbroker.server.core.names import new_claim_id, reentrant_claim_id
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


# -- the model with claims and reentrancy (issue 19) -------------------------------------------------

OWNERS = 2

claim_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "claim", "reenter", "release", "release-anon", "stale-release", "end"]),
        st.integers(0, SESSIONS - 1),
        st.integers(0, LOCKS - 1),
        st.integers(0, OWNERS - 1),
    ),
    max_size=16,
)


@dataclass
class Held:
    session: int
    kind: str  # "plain", "claim" or "reentrant"
    owner: int  # the reentrant owner (reentrant claims only)
    token: int
    holds: int = 1


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=claim_ops)
async def test_random_claims_and_reentry_follow_the_model(env: Env, steps: list[tuple[str, int, int, int]]) -> None:
    """Try-locks of every kind: a plain claim, a new claim, and a reentrant owner's claim. A held
    lock refuses every other claim (its own session's too) except its reentrant owner re-entering,
    which counts a hold on the same token; a release takes one hold off, the last frees the lock."""
    tag = uuid.uuid4().hex[:8]
    names = [f"claims-model/{tag}/{i}" for i in range(LOCKS)]
    sessions = [await env.session(ttl=30) for _ in range(SESSIONS)]
    alive = [True] * SESSIONS
    held: list[Held | None] = [None] * LOCKS
    last: list[int] = [0] * LOCKS
    granted: list[list[int]] = [[] for _ in range(LOCKS)]
    try:
        for n, (op, s, lk, o) in enumerate(steps):
            name, lease, h = names[lk], sessions[s], held[lk]
            if op in ("acquire", "claim", "reenter"):
                claim = {"acquire": "", "claim": new_claim_id(f"r{n}"), "reenter": reentrant_claim_id(f"o{o}")}[op]
                p = AcquireParams(name, lease, 0, 0.0, "", f"r{n}", claim, f"o{o}" if op == "reenter" else "")
                if not alive[s]:
                    with pytest.raises(SessionNotFound):
                        await env.core.acquire(TENANT, p)
                elif op == "reenter" and h is not None and (h.session, h.kind, h.owner) == (s, "reentrant", o):
                    g = await env.core.acquire(TENANT, p)
                    h.holds += 1
                    assert (g.fencing_token, g.hold_count) == (h.token, h.holds)
                elif op == "acquire" and h is not None and (h.session, h.kind) == (s, "plain"):
                    with pytest.raises(AlreadyQueued):
                        await env.core.acquire(TENANT, p)
                elif h is not None:
                    with pytest.raises(LockHeld) as ei:
                        await env.core.acquire(TENANT, p)
                    assert ei.value.info.holder is not None
                    assert ei.value.info.holder.create_revision == h.token
                else:
                    g = await env.core.acquire(TENANT, p)
                    assert g.fencing_token > last[lk], "fencing tokens must increase per lock"
                    kind = {"acquire": "plain", "claim": "claim", "reenter": "reentrant"}[op]
                    held[lk] = Held(s, kind, o, g.fencing_token)
                    last[lk] = g.fencing_token
                    granted[lk].append(g.fencing_token)
            elif op in ("release", "release-anon"):
                by = lease if op == "release" else None
                ours = h is not None and h.token == last[lk] and (op == "release-anon" or h.session == s)
                if op == "release" and h is not None and h.token == last[lk] and h.session != s:
                    # Another session's current grant: refused, never released (issue 15 ownership).
                    with pytest.raises(NotOwner):
                        await env.core.release_claim(TENANT, name, last[lk], by)
                    got = (False, 0)
                else:
                    got = await env.core.release_claim(TENANT, name, last[lk], by) if last[lk] else (False, 0)
                if not ours or h is None:
                    assert got == (False, 0)
                else:
                    h.holds -= 1
                    assert got == (True, h.holds)
                    if h.holds == 0:
                        held[lk] = None
            elif op == "stale-release":
                for old in granted[lk][:-1]:
                    assert await env.core.release_claim(TENANT, name, old, lease) == (False, 0)
                    assert await env.core.release_claim(TENANT, name, old, None) == (False, 0)
            else:
                assert await env.core.close_session(TENANT, lease) == alive[s]
                alive[s] = False
                held = [None if x is not None and x.session == s else x for x in held]
            for i, nm in enumerate(names):
                d = await env.describe(nm)
                want = held[i]
                got_holder = (d.holder.create_revision, d.holder.value.hold_count) if d.holder is not None else None
                assert got_holder == ((want.token, want.holds) if want is not None else None), f"step {n} {op}"
                assert d.waiters == []
    finally:
        for lease in sessions:
            await env.core.close_session(TENANT, lease)
