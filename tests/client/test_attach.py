"""Keeping an existing session alive (`client.session(session_id=...)`) and detaching from it.

This is what `lockbroker session keepalive ID` is built on: one process creates a session,
another keeps it alive, and stopping the keeper must not close it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lockbroker.client import Client, SessionNotFound, SyncClient
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS, lease_of


async def test_attach_refreshes_an_existing_session_and_closes_it_on_exit(client: Client, probe: EtcdProbe) -> None:
    s = await client.create_session(ttl=2, owner="made-elsewhere")
    async with client.session(session_id=s.session_id) as keeper:
        assert keeper.session_id == s.session_id and keeper.ttl == 2
        assert keeper.expires_at > time.monotonic()
        g = await client.acquire("attach/a", session_id=s.session_id)
        # Past its TTL: without the keeper's refreshes the session and its lock would be gone.
        await asyncio.sleep(3.5)
        assert keeper.alive and not keeper.lost.is_set()
        state = await client.describe("attach/a")
        assert state.holder is not None and state.holder.fencing_token == g.fencing_token
    # Leaving the block closes it, as for a session the keeper created itself.
    assert await client.close_session(s.session_id) is False
    assert await probe.keys(LOCKS) == []


async def test_detach_stops_refreshing_and_leaves_the_session_open(client: Client, probe: EtcdProbe) -> None:
    s = await client.create_session(ttl=10)
    keeper = client.session(session_id=s.session_id)
    await keeper.start()
    await keeper.detach()
    assert not keeper.alive
    assert await keeper.close() is False  # detached: closing sends nothing
    await keeper.__aexit__(None, None, None)
    assert (await client.refresh(s.session_id)).ttl == 10  # still open
    assert await client.close_session(s.session_id) is True


async def test_attach_to_a_gone_session_fails_and_losing_it_is_noticed(client: Client, probe: EtcdProbe) -> None:
    s = await client.create_session(ttl=10)
    assert await client.close_session(s.session_id) is True
    with pytest.raises(SessionNotFound):
        await client.session(session_id=s.session_id).start()

    s2 = await client.create_session(ttl=3)
    async with client.session(session_id=s2.session_id) as keeper:
        await probe.revoke(lease_of(s2.session_id))
        await asyncio.wait_for(keeper.lost.wait(), 10)
        assert keeper.lost_reason


async def test_sync_client_attaches_too(broker: Any) -> None:
    def body() -> None:
        with SyncClient(target_of(broker), default_timeout=5.0) as c:
            s = c.create_session(ttl=5)
            with c.session(session_id=s.session_id) as kept:
                assert kept.session_id == s.session_id and kept.alive
            assert c.close_session(s.session_id) is False

    # In a worker thread: the broker lives on this loop, which must keep running meanwhile.
    await asyncio.to_thread(body)
