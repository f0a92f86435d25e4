"""Property test of shared/exclusive claims and semaphore permits (issue 17, "Done when"), on the
memory backend and a real etcd (LOCKBROKER_TEST_BACKEND, see conftest.py).

Hypothesis draws a crowd of readers and writers on one lock, or of permit takers on one
semaphore, each with its own session, a start delay, a hold time and an end: release, its
session ending (the lease revoked, as expiry does), or its call cancelled (while it waits or
holds). Checked as the grants happen, and at the end:

- never a writer with another holder, never a reader with a writer, never more than N permits;
- fencing tokens are unique, and ordered around every writer: an entry queued before a writer is
  granted before it (or never), one queued after is granted after it (FIFO across modes, and a
  writer's token is greater than every token granted before it);
- once every session has ended, nothing is left in the store under the test's root.

An actor removes itself from the observed holders before it releases or ends its session, so
"held" here is never shorter than held in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lockbroker.server.core.errors import NotAcquired
from tests.core.conftest import Env

_names = itertools.count()


@dataclass(frozen=True)
class Actor:
    kind: str  # "r" reader, "w" writer, "p" permit
    start: float  # seconds after the example begins
    hold: float
    end: str  # "release", "expire", "cancel"
    cancel_after: float  # for "cancel": seconds after its start


def actors(kinds: list[str]) -> st.SearchStrategy[list[Actor]]:
    one = st.builds(
        Actor,
        kind=st.sampled_from(kinds),
        start=st.sampled_from([0.0, 0.005, 0.02]),
        hold=st.sampled_from([0.0, 0.01, 0.03]),
        end=st.sampled_from(["release", "release", "expire", "cancel"]),
        cancel_after=st.sampled_from([0.0, 0.01, 0.04]),
    )
    return st.lists(one, min_size=2, max_size=6)


@dataclass
class Grant:
    who: int
    kind: str
    token: int
    seq: int  # order of observation


class World:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.holding: dict[int, str] = {}
        self.grants: list[Grant] = []

    def granted(self, who: int, kind: str, token: int) -> None:
        others = set(self.holding.values())
        if kind == "w":
            assert not self.holding, f"writer {who} granted while {self.holding} hold"
        elif kind == "r":
            assert "w" not in others, f"reader {who} granted while a writer holds ({self.holding})"
        else:
            assert len(self.holding) < self.limit, f"permit {who} granted beyond {self.limit}: {self.holding}"
        self.holding[who] = kind
        self.grants.append(Grant(who, kind, token, len(self.grants)))

    def check_order(self) -> None:
        tokens = [g.token for g in self.grants]
        assert len(set(tokens)) == len(tokens), f"a token was granted twice: {tokens}"
        for w in (g for g in self.grants if g.kind == "w"):
            for x in self.grants:
                if x is not w:
                    assert (x.token < w.token) == (x.seq < w.seq), f"out of order around writer: {w} / {x}"


async def run(env: Env, crowd: list[Actor], limit: int) -> World:
    name = f"prop/{next(_names)}"
    world = World(limit)
    leases = [await env.session(ttl=30) for _ in crowd]

    async def actor(i: int, a: Actor) -> None:
        await asyncio.sleep(a.start)
        token = 0
        try:
            g = await env.acquire(name, leases[i], wait=5.0, shared=a.kind == "r", limit=limit if a.kind == "p" else 0)
            token = g.fencing_token
            world.granted(i, a.kind, token)
            await asyncio.sleep(a.hold)
        except NotAcquired:
            return
        finally:
            world.holding.pop(i, None)
            if a.end == "expire":
                await env._revoke(leases[i])
            elif token:
                with contextlib.suppress(Exception):  # a cancelled holder still gives the lock back
                    await env.release(name, token, leases[i])

    tasks = [asyncio.create_task(actor(i, a)) for i, a in enumerate(crowd)]
    for i, a in enumerate(crowd):
        if a.end == "cancel":
            asyncio.get_running_loop().call_later(a.start + a.cancel_after, tasks[i].cancel)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    assert not unexpected, unexpected
    world.check_order()
    for lease in leases:
        with contextlib.suppress(Exception):  # those that "expired" are gone already
            await env._revoke(lease)
    await env.core.drain_cleanups(2.0)
    assert await env.lock_keys(name) == [], "entries left after every session ended"
    return world


PROFILE = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its crowd as drawn
)


@PROFILE
@given(crowd=actors(["r", "w"]))
async def test_readers_and_writers(env: Env, crowd: list[Actor]) -> None:
    await run(env, crowd, 0)


@PROFILE
@given(crowd=actors(["p"]), limit=st.integers(1, 3))
async def test_semaphore_permits(env: Env, crowd: list[Actor], limit: int) -> None:
    await run(env, crowd, limit)
