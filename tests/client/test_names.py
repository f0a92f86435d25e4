"""The clients and the CLI take any name the broker takes (issue 19), and refuse locally only what
protobuf cannot carry (a str with lone surrogates), as InvalidArgument naming the field."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from lockbroker.client import Client, InvalidArgument, SyncClient
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS

NAME = "commandes/été 2026 #1 — 锁 🔒"


async def test_the_async_client_round_trips_any_name(client: Client, probe: EtcdProbe) -> None:
    async with client.session(ttl=10) as s, client.lock(NAME, session=s, wait=1) as held:
        assert held.name == NAME
        state = await client.describe(NAME)
        assert state.holder is not None and state.holder.fencing_token == held.fencing_token
        assert [lk.name async for lk in client.list("commandes/été")] == [NAME]
    assert await probe.keys(LOCKS) == []


def _sync_round_trip(broker: Any) -> list[str]:
    with SyncClient(target_of(broker), default_timeout=5) as c, c.lock(NAME, wait=1) as held:
        assert c.describe(NAME).holder is not None
        assert held.name == NAME
        return [lk.name for lk in c.list("commandes/")]


async def test_the_sync_client_round_trips_any_name(broker: Any, probe: EtcdProbe) -> None:
    assert await asyncio.to_thread(_sync_round_trip, broker) == [NAME]
    assert await probe.keys(LOCKS) == []


async def test_a_name_utf8_cannot_carry_is_refused_before_sending(client: Client, probe: EtcdProbe) -> None:
    bad = os.fsdecode(b"orders/\xff")  # what a non-UTF-8 file name or argument becomes
    calls = [
        client.acquire(bad, ttl=10),
        client.release(bad, 7),
        client.describe(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument) as ei:
            await call
        assert ei.value.reason == "INVALID_ARGUMENT"
        assert ei.value.field_violations == [("name", "is not valid UTF-8: it has a lone surrogate U+DCFF at index 7")]
    with pytest.raises(InvalidArgument) as ei:
        _ = [lk async for lk in client.list(bad)]
    assert [f for f, _ in ei.value.field_violations] == ["prefix"]
    with pytest.raises(InvalidArgument) as ei:
        await client.acquire("ok", ttl=10, owner=bad)
    assert [f for f, _ in ei.value.field_violations] == ["owner"]
    assert await probe.keys() == []
