"""Client fixtures: a Client and a SyncClient pointed at the real broker of tests/conftest.py.

Every test here runs twice, once per client transport (issue 14: "every existing semantic test
passes on the stream path and the unary path"): `transport` sets LOCKBROKER_CLIENT_TRANSPORT,
which every Client made in the test reads, including the SyncClient's. The tests that go through
tests/client/proxy.py see the stream transport fall back to unary (the proxy has no Session RPC).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.client import Client
from lockbroker.client.aio import TRANSPORT_ENV


def target_of(broker: Any) -> str:
    return f"127.0.0.1:{broker.port}"


@pytest.fixture(params=["stream", "unary"], autouse=True)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    value: str = request.param
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


@pytest.fixture
async def client(broker: Any, transport: str) -> AsyncIterator[Client]:
    # Short default deadline: a hung call should fail the test quickly, not at the 120 s timeout.
    async with Client(target_of(broker), default_timeout=5.0) as c:
        assert c.transport == transport
        yield c
