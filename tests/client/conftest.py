"""Client fixtures: a Client and a SyncClient pointed at the real broker of tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockbroker.client import Client


def target_of(broker: Any) -> str:
    return f"127.0.0.1:{broker.port}"


@pytest.fixture
async def client(broker: Any) -> AsyncIterator[Client]:
    # Short default deadline: a hung call should fail the test quickly, not at the 120 s timeout.
    async with Client(target_of(broker), default_timeout=5.0) as c:
        yield c
