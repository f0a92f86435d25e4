"""Fixtures of the fault suite: one 3-member etcd cluster and two broker replicas per module.

Every scenario heals what it broke; `harness` also repairs and wipes whatever a failed scenario
left behind, so the next one starts from a healthy, empty cluster with a fresh history.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fault.cluster import ci
from tests.fault.harness import Harness


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault: a fault-injection scenario on a 3-member etcd cluster")


def use_netns() -> bool | None:
    """None: members in network namespaces if this machine allows it (it must under CI=true).
    LOCKBROKER_FAULT_NETNS=0 asks for the loopback fallback, to try it on a root machine."""
    if os.environ.get("LOCKBROKER_FAULT_NETNS") == "0" and not ci():
        return False
    return None


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fault-rig"), ttl=3, use_netns=use_netns())
    await h.start()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def harness(rig: Harness, tmp_path: Path) -> AsyncIterator[Harness]:
    await rig.repair()
    rig.begin(tmp_path)
    try:
        yield rig
    finally:
        for c in rig.clients:
            await c.shutdown()
        rig.history.close()
