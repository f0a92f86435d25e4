"""The Python client's elections over a real broker: `client.election(name).campaign(...)` with its
loss signal, `leadership.proclaim`, `observe()`, and the blocking SyncClient equivalents."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.client import Client, LeaderChange, NotLeader, SyncClient, WaitExpired
from tests.etcdutil import EtcdProbe
from tests.lockutil import eventually, lease_of


@pytest.fixture
async def client(broker: Any) -> AsyncIterator[Client]:
    async with Client(f"127.0.0.1:{broker.port}", default_timeout=5.0) as c:
        yield c


async def election_keys(probe: EtcdProbe) -> list[bytes]:
    return [k for k in await probe.keys() if b"/q/v/" in k or (b"/e/" in k and b"/q/" not in k)]


async def test_campaign_blocks_until_the_leader_leaves(client: Client, probe: EtcdProbe) -> None:
    election = client.election("jobs")
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def candidate(who: str, hold: asyncio.Event | None) -> None:
        async with election.campaign(who.encode(), owner=who):
            order.append(who)
            assert (await election.leader()) is not None
            if hold is not None:
                first_in.set()
                await hold.wait()

    a = asyncio.create_task(candidate("a", release_first))
    await first_in.wait()
    b = asyncio.create_task(candidate("b", None))
    await asyncio.sleep(0.3)
    assert order == ["a"]  # b waits while a leads
    leader = await election.leader()
    assert leader is not None and (leader.value, leader.owner) == (b"a", "a")
    release_first.set()
    await asyncio.wait_for(asyncio.gather(a, b), 10)
    assert order == ["a", "b"]
    assert await election.leader() is None
    assert await election_keys(probe) == []


async def test_proclaim_observe_and_loss(client: Client, probe: EtcdProbe) -> None:
    election = client.election("svc")
    seen: list[LeaderChange] = []

    async def watch() -> None:
        async for change in election.observe():
            seen.append(change)

    watcher = asyncio.create_task(watch())
    try:
        async with client.session(ttl=10) as s, election.campaign(b"one", session=s) as leadership:
            await leadership.proclaim(b"two")
            assert leadership.value == b"two"

            async def two_states() -> bool:
                return [c.leader.value if c.leader else None for c in seen] == [None, b"one", b"two"]

            await eventually(two_states, 5, "observed None, one, two")
            assert all(c.leader.fencing_token == leadership.fencing_token for c in seen[1:] if c.leader)
            # The session ends underneath (as if it lapsed): the loss signal fires, and the
            # leadership can no longer proclaim.
            await probe.revoke(lease_of(s.session_id))
            await asyncio.wait_for(leadership.lost.wait(), 10)
            with pytest.raises(NotLeader):
                await leadership.proclaim(b"three")

        async def nobody() -> bool:
            return bool(seen) and seen[-1].leader is None

        await eventually(nobody, 5, "observed that nobody leads")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert await election_keys(probe) == []


async def test_wait_bounds_a_campaign(client: Client, probe: EtcdProbe) -> None:
    election = client.election("bounded")
    async with election.campaign(b"leader"):
        with pytest.raises(WaitExpired):
            async with election.campaign(b"late", wait=0.3):
                raise AssertionError("must not lead while another does")
        assert len([k for k in await election_keys(probe) if b"/e/" in k]) == 1
    assert await election_keys(probe) == []


async def test_sync_client_elections(broker: Any) -> None:
    # The blocking calls run in a worker thread: the broker lives on this test's loop.
    def body() -> None:
        with SyncClient(f"127.0.0.1:{broker.port}", default_timeout=5.0) as client:
            election = client.election("sync")
            assert election.leader() is None
            changes: list[LeaderChange] = []
            done, started = threading.Event(), threading.Event()

            def follow() -> None:
                with SyncClient(f"127.0.0.1:{broker.port}", default_timeout=5.0) as other:
                    for change in other.election("sync").observe():
                        changes.append(change)
                        started.set()
                        if len(changes) == 3:
                            break
                done.set()

            t = threading.Thread(target=follow, daemon=True)
            t.start()
            assert started.wait(10)  # the observer saw that nobody leads before the campaign
            with election.campaign(b"v1", owner="me") as leadership:
                assert leadership.value == b"v1"
                leadership.proclaim(b"v2")
                leader = election.leader()
                assert leader is not None and (leader.value, leader.owner) == (b"v2", "me")
                assert done.wait(10)
            t.join(5)
            assert [c.leader.value if c.leader else None for c in changes] == [None, b"v1", b"v2"]
            assert election.leader() is None

    await asyncio.to_thread(body)
