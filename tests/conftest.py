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

# -- parallel runs (pytest-xdist, `--dist loadgroup`; scripts/test.sh) -------------------------------
#
# Every test file is safe to run beside any other: each worker starts its own etcd (session fixture,
# free ports, its own basetemp), every test has its own key root, and what tests write goes to
# tmp_path. A group below keeps a file's tests on one worker, one after another, where running
# them apart would cost more than it gains: a module-scoped fixture that starts a cluster or broker
# processes would start once per worker instead of once. The fault suite is one group also because
# its scenarios check timing-sensitive invariants (TTLs, elections) and share one rig.
XDIST_GROUPS: dict[str, str] = {
    "tests/fault/": "fault",  # the rig: 3 etcd members in network namespaces and 2 broker processes
    "tests/test_stream_faults.py": "stream_faults",  # a 3-member cluster per module
    "tests/test_overload.py": "overload",  # a broker process per module, loaded on purpose
}


# Tests that need the machine to themselves: scripts/test.sh runs them (`-m serial`) after the
# parallel run (`-m "not serial"`), alone. The bench smoke test runs a quick benchmark: brokers,
# load agents and etcd in a dozen processes that keep both cores busy; beside 4 workers it ran
# past its 280 s limit where alone it takes about 2 minutes.
SERIAL: tuple[str, ...] = ("tests/test_bench_smoke.py",)


def xdist_group_of(nodeid: str) -> str | None:
    for prefix, group in XDIST_GROUPS.items():
        if nodeid.startswith(prefix):
            return group
    return None


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist registers it too; registered here so --strict-markers holds without the plugin.
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")
    config.addinivalue_line("markers", "serial: needs the machine to itself (scripts/test.sh runs it alone)")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the mark into the node id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = xdist_group_of(item.nodeid)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)


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
