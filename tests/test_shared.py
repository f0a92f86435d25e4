"""Shared (read) locks through the Python client, on both client transports (the Session stream
and unary calls), over a real broker and etcd (issue 17 item 1)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.client import Client, LockHeld
from lockbroker.client.aio import TRANSPORT_ENV
from tests.client.conftest import target_of


@pytest.fixture(params=["stream", "unary"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    value: str = request.param
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


async def test_readers_share_a_writer_waits_and_describe_shows_modes(broker: Any, transport: str) -> None:
    async with Client(target_of(broker), default_timeout=5.0) as c:
        assert c.transport == transport
        async with c.lock("doc", shared=True, wait=1) as r1, c.lock("doc", shared=True, wait=1) as r2:
            assert r1.grant.shared and r2.grant.shared
            state = await c.describe("doc")
            assert [h.fencing_token for h in state.holders] == [r1.fencing_token, r2.fencing_token]
            assert all(h.shared for h in state.holders)
            with pytest.raises(LockHeld):
                await c.acquire("doc", ttl=10)  # a writer's try-lock
            writer = asyncio.create_task(c.acquire("doc", ttl=10, wait=10, owner="w"))
            for _ in range(200):
                if (await c.describe("doc")).waiters:
                    break
                await asyncio.sleep(0.02)
            state = await c.describe("doc")
            assert [(w.owner, w.shared) for w in state.waiters] == [("w", False)]
            assert not writer.done()
        w = await asyncio.wait_for(writer, 5)
        assert not w.shared and w.fencing_token > r2.fencing_token
        assert (await c.check_fence("doc", w.fencing_token)).current
        assert await c.release("doc", w.fencing_token, session_id=w.session_id)


async def test_a_reader_token_is_current_for_check_fence(broker: Any, transport: str) -> None:
    async with Client(target_of(broker), default_timeout=5.0) as c:
        async with c.lock("f", shared=True) as r1, c.lock("f", shared=True) as r2:
            assert (await c.check_fence("f", r1.fencing_token)).current
            assert (await c.check_fence("f", r2.fencing_token)).current
        assert not (await c.check_fence("f", r2.fencing_token)).current
