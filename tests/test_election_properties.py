"""Random interleavings of campaigns, resignations, session ends and cancelled campaigns over a real
etcd and broker (issue 17, "Done when"): one leader at a time, leaders in campaign order (FIFO),
fencing tokens strictly increasing per election, and nothing left in etcd once sessions close.

The oracle is a list of candidates in the order they campaigned: the first leads. Each example uses
an election of its own on the module's broker (hypothesis runs many examples per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from grpc import aio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lockbroker.v1 import election_pb2, election_pb2_grpc, lock_pb2
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker, eventually

CANDIDATES = 4
ops = st.lists(
    st.one_of(
        st.tuples(st.just("campaign"), st.integers(0, CANDIDATES - 1)),
        st.tuples(st.just("resign"), st.just(0)),
        st.tuples(st.just("close"), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, CANDIDATES - 1)),
    ),
    min_size=1,
    max_size=8,
)


class World:
    def __init__(self, elect: Any, stub: Any, track: Tracker, probe: EtcdProbe) -> None:
        self.elect, self.stub, self.track, self.probe = elect, stub, track, probe
        self.name = "prop/" + uuid.uuid4().hex[:8]
        self.sessions: list[str] = []
        self.queue: list[int] = []  # the oracle: candidates in campaign order, the leader first
        self.calls: dict[int, Any] = {}
        self.tokens: list[int] = []  # fencing tokens of the leaders seen, in order

    async def keys(self) -> list[bytes]:
        return [k for k in await self.probe.keys() if f"/e/{self.name}#".encode() in k]

    async def settle(self) -> None:
        """Wait until etcd holds exactly the oracle's candidates, then check who leads."""

        async def same() -> bool:
            return len(await self.keys()) == len(self.queue)

        await eventually(same, 10, f"{len(self.queue)} candidates of {self.name}")
        if not self.queue:
            return
        leader = self.queue[0]
        won = await asyncio.wait_for(self.calls[leader], 10)
        assert won.grant.session_id == self.sessions[leader]
        if not self.tokens or self.tokens[-1] != won.grant.fencing_token:
            assert not self.tokens or won.grant.fencing_token > self.tokens[-1], (self.tokens, won)
            self.tokens.append(won.grant.fencing_token)
        current = await self.elect.Leader(election_pb2.LeaderRequest(name=self.name))
        assert current.leader.session_id == self.sessions[leader]  # one leader: the oldest candidate
        for waiting in self.queue[1:]:
            assert not self.calls[waiting].done(), f"candidate {waiting} leads while {leader} does"

    async def step(self, op: str, i: int) -> None:
        if op == "campaign" and i not in self.queue:
            req = election_pb2.CampaignRequest(name=self.name, session_id=self.sessions[i], value=b"%d" % i)
            self.calls[i] = self.elect.Campaign(req)
            self.queue.append(i)
            await eventually(self._queued(len(self.queue)), 10, "the campaign to queue")
        elif op == "resign" and self.queue:
            leader = self.queue.pop(0)
            won = await self.calls.pop(leader)
            resign = election_pb2.ResignRequest(
                name=self.name, session_id=self.sessions[leader], fencing_token=won.grant.fencing_token
            )
            assert (await self.elect.Resign(resign)).resigned
        elif op == "close" and self.queue:
            leader = self.queue.pop(0)
            self.calls.pop(leader)
            await self.stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=self.sessions[leader]))
            self.sessions[leader] = await self.track.session()  # the candidate comes back with a new session
        elif op == "cancel" and len(self.queue) > 1:
            waiting = self.queue.pop(1 + i % (len(self.queue) - 1))
            call = self.calls.pop(waiting)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
                await call
        await self.settle()

    def _queued(self, n: int) -> Any:
        async def check() -> bool:
            return len(await self.keys()) >= n

        return check

    async def close(self) -> None:
        for call in self.calls.values():
            call.cancel()
        for session in self.sessions:
            await self.stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=session))

        async def gone() -> bool:
            return not [k for k in await self.probe.keys() if b"/e/" in k or b"/q/v/" in k]

        await eventually(gone, 10, "no election key left")


@pytest.fixture
def elect(channel: aio.Channel) -> Any:
    return election_pb2_grpc.ElectionServiceStub(channel)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
# Every kind of step at least once, whatever hypothesis draws: a cancelled waiter between two others.
@example(steps=[("campaign", 0), ("campaign", 1), ("campaign", 2), ("cancel", 0), ("resign", 0), ("close", 0)])
async def test_random_interleavings_keep_one_fifo_leader(
    elect: Any, stub: Any, track: Tracker, probe: EtcdProbe, steps: list[tuple[str, int]]
) -> None:
    world = World(elect, stub, track, probe)
    world.sessions = [await track.session() for _ in range(CANDIDATES)]
    try:
        for op, i in steps:
            await world.step(op, i)
    finally:
        await world.close()
