"""Semaphores through the Python client, on both client transports, over a real broker and etcd
(issue 17 item 2): at most N permits, FIFO, a mismatched limit refused, Describe lists permits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.client import Client, LimitMismatch, LockHeld
from lockbroker.client.aio import TRANSPORT_ENV
from tests.client.conftest import target_of
from tests.test_cli_client import cli  # a subprocess per call: the CLI as users run it


@pytest.fixture(params=["stream", "unary"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    value: str = request.param
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


async def test_at_most_n_permits_and_a_mismatched_limit_is_refused(broker: Any, transport: str) -> None:
    inside = most = 0

    async def worker(c: Client) -> None:
        nonlocal inside, most
        async with c.lock("pool", limit=2, wait=20) as held:
            assert held.grant.limit == 2
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.05)
            inside -= 1

    async with Client(target_of(broker), default_timeout=5.0) as c:
        assert c.transport == transport
        await asyncio.wait_for(asyncio.gather(*(worker(c) for _ in range(6))), 30)
        assert most == 2
        async with c.lock("pool", limit=2) as a, c.lock("pool", limit=2):
            state = await c.describe("pool")
            assert state.limit == 2 and len(state.holders) == 2 and state.holders[0].fencing_token == a.fencing_token
            with pytest.raises(LockHeld):
                await c.acquire("pool", ttl=10, limit=2)
            with pytest.raises(LimitMismatch) as ei:
                await c.acquire("pool", ttl=10, limit=3, wait=1)
            assert ei.value.limit == 2


async def test_cli_acquire_takes_permits_and_shared_locks(broker: Any) -> None:
    target = target_of(broker)
    for _ in range(2):
        r = await cli(target, "acquire", "cli/sem", "--permits", "2", "--ttl", "120", "-o", "json")
        assert r.code == 0, r
    r = await cli(target, "acquire", "cli/sem", "--permits", "2", "--ttl", "120", "-o", "json")
    assert r.code == 1, r  # not acquired: both permits are held
    for _ in range(2):
        r = await cli(target, "acquire", "cli/read", "--shared", "--ttl", "120", "-o", "json")
        assert r.code == 0, r
    async with Client(target, default_timeout=5.0) as c:
        assert len((await c.describe("cli/sem")).holders) == 2
        state = await c.describe("cli/read")
        assert len(state.holders) == 2 and all(h.shared for h in state.holders)
        for name in ("cli/sem", "cli/read"):
            for h in (await c.describe(name)).holders:
                await c.close_session(h.session_id)
