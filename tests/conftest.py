"""Fixtures: a real etcd on free loopback ports, real brokers, real channels.

Nothing here is faked. Under CI=true a missing etcd binary fails the run (find_etcd_binary raises).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.config import Config, EtcdConfig, LockLimits, ServerConfig
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig, find_etcd_binary
from lockbroker.v1 import lock_pb2_grpc
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker


@pytest.fixture(scope="session", autouse=True)
def _etcd_binary() -> str:
    # Fails loudly (never skips) when etcd is missing: CI must install it.
    return find_etcd_binary()


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lockbroker")


@pytest.fixture(scope="session")
async def etcd(tmp_session: Path) -> AsyncIterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_session / "etcd-shared"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def key_root() -> str:
    # Each test gets its own key root on the shared etcd, so tests cannot see each other's keys.
    return f"/lbtest/{uuid.uuid4().hex[:10]}"


def broker_config(endpoint: str, key_root: str, **limits: Any) -> Config:
    return Config(
        server=ServerConfig(listen="127.0.0.1:0", grace_period=2.0, health_interval=0.2),
        etcd=EtcdConfig(endpoints=(endpoint,), key_root=key_root, request_timeout=2.0),
        limits=LockLimits(**limits) if limits else LockLimits(),
    )


@pytest.fixture
async def broker(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Any]:
    b = Broker(broker_config(etcd.endpoint, key_root))
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


@pytest.fixture
async def channel(broker: Any) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: aio.Channel) -> lock_pb2_grpc.LockServiceAsyncStub:
    return lock_pb2_grpc.LockServiceStub(channel)


@pytest.fixture
async def probe(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[EtcdProbe]:
    p = EtcdProbe(etcd.endpoint, key_root)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def track(stub: Any, probe: EtcdProbe) -> AsyncIterator[Tracker]:
    """Sessions a test creates through the stub, revoked at its end (test_quota has its own)."""
    t = Tracker(stub, probe)
    try:
        yield t
    finally:
        await t.cleanup()


@pytest.fixture(scope="session")
def ci() -> Iterator[bool]:
    yield os.environ.get("CI") == "true"


__all__ = ["broker_config", "grpc"]
