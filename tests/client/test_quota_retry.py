"""The client retries a quota refusal only when the broker says waiting helps (RetryInfo)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.client import Client, QuotaExceeded
from lockbroker.server.app import Broker
from lockbroker.server.core.quota import UNLIMITED
from lockbroker.server.embedded import EmbeddedEtcd
from tests.conftest import broker_config


@pytest.fixture
async def limited(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Any]:
    q = dataclasses.replace(UNLIMITED, acquire_rate=2.0, acquire_burst=1, max_ttl=30)
    b = Broker(dataclasses.replace(broker_config(etcd.endpoint, key_root), quota=q))
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


async def test_rate_limited_acquire_is_retried_after_the_hint(limited: Any) -> None:
    async with Client(f"127.0.0.1:{limited.port}", default_timeout=5.0) as client, client.session(ttl=10) as s:
        first = await client.acquire("rl/1", session_id=s.session_id)
        started = time.monotonic()
        second = await client.acquire("rl/2", session_id=s.session_id)  # the bucket is empty: refused once
        assert time.monotonic() - started >= 0.2  # it waited for the token the broker named
        assert second.fencing_token > first.fencing_token


async def test_a_refusal_without_retry_info_is_not_retried(limited: Any) -> None:
    async with Client(f"127.0.0.1:{limited.port}", default_timeout=5.0) as client:
        with pytest.raises(QuotaExceeded) as ei:
            await client.acquire("rl/long", ttl=60)
        assert ei.value.retry_after is None
        assert any("max_ttl" in d for _, d in ei.value.violations)
