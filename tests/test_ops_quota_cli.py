"""A quota refusal is final for the client and the CLI unless it is a rate limit (issue 16, item 5).

Over a real broker with a tenant quota: at max_locks=1 a second lock is refused at once with the
QuotaFailure (CLI exit 75, no retry), while a RATE_LIMITED refusal is retried after its RetryInfo,
and `-v` shows one stderr line per retry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.client import Client, QuotaExceeded
from lockbroker.server.app import Broker
from lockbroker.server.core.quota import UNLIMITED, TenantQuota
from lockbroker.server.embedded import EmbeddedEtcd
from tests.conftest import broker_config
from tests.test_cli_client import cli, target_of


async def _started(etcd: EmbeddedEtcd, key_root: str, q: TenantQuota) -> Broker:
    b = Broker(dataclasses.replace(broker_config(etcd.endpoint, key_root), quota=q))
    await b.start()
    return b


@pytest.fixture
async def one_lock(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Broker]:
    b = await _started(etcd, key_root, dataclasses.replace(UNLIMITED, max_locks=1))
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


@pytest.fixture
async def rate_limited(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Broker]:
    b = await _started(etcd, key_root, dataclasses.replace(UNLIMITED, acquire_rate=0.1, acquire_burst=1))
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


async def test_max_locks_refusal_is_final_for_the_client(one_lock: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lockbroker.client.retry")
    async with Client(target_of(one_lock), default_timeout=20.0) as client, client.session(ttl=10) as s:
        await client.acquire("q/1", session_id=s.session_id)
        with pytest.raises(QuotaExceeded) as ei:
            await client.acquire("q/2", session_id=s.session_id)
    assert ei.value.reason == "QUOTA_EXCEEDED"
    assert any(subject and "max_locks" in subject + d for subject, d in ei.value.violations), ei.value.violations
    retries = [r for r in caplog.records if r.name == "lockbroker.client.retry"]
    assert retries == [], [r.getMessage() for r in retries]


async def test_cli_exits_75_at_once_without_retrying(one_lock: Broker) -> None:
    t = target_of(one_lock)
    first = await cli(t, "acquire", "q/cli1", "--ttl", "30", "-o", "json")
    assert first.code == 0, first
    second = await cli(t, "acquire", "q/cli2", "--ttl", "30", "--timeout", "30", "-v", "-o", "json")
    assert second.code == 75, second
    err: dict[str, Any] = second.json["error"]
    assert err["code"] == "RESOURCE_EXHAUSTED" and err["reason"] == "QUOTA_EXCEEDED", err
    assert "max_locks" in second.err, second
    assert "retry" not in second.err, second  # -v would show every retry


async def test_rate_limit_is_retried_and_v_shows_each_retry(rate_limited: Broker) -> None:
    t = target_of(rate_limited)
    # The bucket holds one token, refilled every 10 s: the second CLI is refused with RATE_LIMITED
    # + RetryInfo, then passes. (At 4 s, a CLI that took that long to start on a loaded CI
    # machine found the token back and had no retry to show.)
    first = await cli(t, "acquire", "rl/a", "--ttl", "30", "-o", "json")
    assert first.code == 0, first
    second = await cli(t, "acquire", "rl/b", "--ttl", "30", "--timeout", "20", "-v", "-o", "json")
    assert second.code == 0, second
    lines = [ln for ln in second.err.splitlines() if "retry" in ln]
    assert lines and all(ln.startswith("lockbroker: retry ") and "RATE_LIMITED" in ln for ln in lines), second.err
