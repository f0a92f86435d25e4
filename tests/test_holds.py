"""Maximum hold time over a real etcd and real brokers: revoked within about a second of the limit,
the holder's client told MAX_HOLD_EXCEEDED, and the rule kept across a broker restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.client import Client
from lockbroker.server.admin_service import MAX_HOLD_METHOD
from lockbroker.server.app import Broker
from lockbroker.server.config import AuditConfig, Config
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from lockbroker.v1.reasons import ErrorReason
from tests.conftest import broker_config

# Generous: the sweep runs every 0.25 s, so a revocation lands well within this of the limit.
SLACK = 1.5


async def _freed_after(stub: Any, name: str, started: float, timeout: float) -> float:
    """Seconds from `started` until `name` has no holder (polled every 50 ms)."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        d = await stub.Describe(lock_pb2.DescribeRequest(name=name), timeout=5)
        if not d.HasField("holder"):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name!r} still held {timeout:g}s after the grant")


async def test_the_client_is_told_max_hold_exceeded(broker: Broker) -> None:
    target = f"127.0.0.1:{broker.port}"
    async with Client(target) as client, aio.insecure_channel(target) as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)
        async with client.lock("hold/client", ttl=3, wait=1, max_hold=2) as held:
            granted = time.monotonic()
            after = await _freed_after(stub, "hold/client", granted, 2 + SLACK + 1)
            assert 2 - 0.2 <= after <= 2 + SLACK, f"revoked {after:.2f}s after the grant, limit 2 s"
            await asyncio.wait_for(held.lost.wait(), timeout=3)  # within one keepalive (TTL/3 = 1 s)
            assert held.lost_cause == ErrorReason.MAX_HOLD_EXCEEDED
            assert not held.session.lost.is_set()
            fence = await client.check_fence("hold/client", held.fencing_token)
            assert not fence.current


def _with(cfg: Config, **sections: Any) -> Config:
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **sections})


async def test_the_rule_survives_a_broker_restart(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = _with(broker_config(etcd.endpoint, key_root), audit=AuditConfig(file=str(audit)))
    first = Broker(cfg)
    await first.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30)))
            req = lock_pb2.AcquireRequest(
                name="hold/restart", session_id=s.session_id, max_hold=duration_pb2.Duration(seconds=3)
            )
            g = (await stub.Acquire(req)).grant
            granted = time.monotonic()
    finally:
        await first.stop(grace=0.5)  # down before the limit: only the second broker can revoke it
    assert time.monotonic() - granted < 3
    second = Broker(cfg)
    await second.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{second.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            after = await _freed_after(stub, "hold/restart", granted, 3 + SLACK + 1)
            assert after <= 3 + SLACK, f"revoked {after:.2f}s after the grant, limit 3 s"
            refreshed = await stub.Refresh(lock_pb2.RefreshRequest(session_id=s.session_id))
            assert [(r.name, r.fencing_token, r.reason) for r in refreshed.revoked] == [
                ("hold/restart", g.fencing_token, ErrorReason.MAX_HOLD_EXCEEDED)
            ]
            await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=s.session_id))
    finally:
        await second.stop(grace=0.5)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    [rec] = [r for r in records if r["method"] == MAX_HOLD_METHOD]
    assert rec["lock"] == "hold/restart" and rec["fencingToken"] == str(g.fencing_token)
    assert rec["outcome"]["reason"] == ErrorReason.MAX_HOLD_EXCEEDED and rec["session"] == s.session_id
