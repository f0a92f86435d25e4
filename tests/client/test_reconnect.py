"""The client reconnects to a broker that comes back, within its own reconnect backoff.

grpc's default backoff grows to 120 s: after a long enough outage, a client would not even try
the restarted broker for minutes, and every session it keeps would lapse meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from lockbroker.client import Client
from lockbroker.client.errors import LockBrokerError
from lockbroker.server.app import Broker
from lockbroker.server.embedded import EmbeddedEtcd, free_port
from tests.conftest import broker_config

OUTAGE = 20.0  # long enough for grpc's default backoff to reach ~10 s between attempts
MAX_BACKOFF = 2.0  # the client's DEFAULT_OPTIONS


def _broker(etcd: EmbeddedEtcd, key_root: str, port: int) -> Broker:
    config = broker_config(etcd.endpoint, key_root)
    return Broker(dataclasses.replace(config, server=dataclasses.replace(config.server, listen=f"127.0.0.1:{port}")))


async def _answers(client: Client) -> bool:
    try:
        await client.describe("reconnect/probe", timeout=0.5)
    except LockBrokerError:
        return False
    return True


async def test_client_reaches_a_restarted_broker_within_its_max_backoff(etcd: EmbeddedEtcd, key_root: str) -> None:
    port = free_port()
    broker = _broker(etcd, key_root, port)
    await broker.start()
    async with Client(f"127.0.0.1:{port}", default_timeout=2.0) as client:
        try:
            assert await _answers(client)
            await broker.stop(grace=0.5)
            # Keep calling through the outage, as a session keeper would: every failed connect
            # attempt makes grpc wait longer before the next.
            until = time.monotonic() + OUTAGE
            while time.monotonic() < until:
                assert not await _answers(client)
                await asyncio.sleep(0.5)
            broker = _broker(etcd, key_root, port)
            await broker.start()
            back = time.monotonic()
            while not await _answers(client):
                waited = time.monotonic() - back
                assert waited < 2 * MAX_BACKOFF, f"no answer {waited:.1f}s after the broker came back"
                await asyncio.sleep(0.1)
        finally:
            await broker.stop(grace=0.5)
