"""The blocking facade. Its bodies run in a worker thread: the broker fixture lives on the test loop,
which must keep running while the facade blocks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.client import LockHeld, LockLost, SyncClient, SyncHeldLock
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe


async def test_sync_lock(broker: Any, probe: EtcdProbe) -> None:
    loop = asyncio.get_running_loop()

    def revoke(session_id: str) -> None:
        asyncio.run_coroutine_threadsafe(probe.revoke(int(session_id, 16)), loop).result(5)

    def body() -> None:
        with SyncClient(target_of(broker), default_timeout=5) as c:
            with c.lock("sync/1", owner="sync") as held:
                held.check()
                state = c.describe("sync/1")
                assert state.holder is not None and state.holder.owner == "sync"
                with pytest.raises(LockHeld) as ei, c.lock("sync/1", wait=0):
                    pytest.fail("entered a lock that was not granted")
                assert ei.value.holder is not None and ei.value.holder.fencing_token == held.fencing_token
            assert c.describe("sync/1").holder is None

            with pytest.raises(KeyError), c.lock("sync/2"):
                raise KeyError("inside")
            assert c.describe("sync/2").holder is None

            with c.session(ttl=3) as s, c.lock("a", session=s) as a, c.lock("b", session=s) as b:
                assert a.session_id == b.session_id == s.session_id
                assert [x.name for x in c.list()] == ["a", "b"]

            seen: list[SyncHeldLock] = []
            with c.lock("sync/3", ttl=3, on_lost=seen.append) as held:
                revoke(held.session_id)
                assert held.lost.wait(3)
                assert seen == [held]
                with pytest.raises(LockLost):
                    held.check()

            s2 = c.create_session(ttl=5)
            g = c.acquire("sync/4", session_id=s2.session_id)
            assert c.release("sync/4", g.fencing_token)
            assert c.close_session(s2.session_id)

    await asyncio.to_thread(body)
    assert await probe.keys() == []
