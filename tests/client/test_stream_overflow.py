"""The broker's cap on requests in flight on one Session stream is never the application's problem.

The broker refuses a request beyond MAX_IN_FLIGHT (1,024) in flight on one stream (lock.proto,
`rpc Session`). The client keeps each stream below it and carries the overflow on more streams,
then as unary calls; a refusal from a broker with a lower cap is retried elsewhere, not raised.
These run against a real broker and etcd; test_stream_pool.py scripts the choices one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lockbroker.client import Client, SessionKeeper
from lockbroker.client.aio import TRANSPORT_ENV
from lockbroker.v1 import lock_pb2
from tests.client.conftest import target_of
from tests.etcdutil import EtcdProbe

# More blocking acquires than one stream may carry (the broker's MAX_IN_FLIGHT is 1,024).
WAITERS = 1_100


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Overrides conftest's: the cap is the stream transport's; the unary one never had it.
    monkeypatch.setenv(TRANSPORT_ENV, "stream")
    yield "stream"


async def _waiting(client: Client, prefix: str) -> int:
    return sum([summary.waiters async for summary in client.list(prefix, page_size=500)])


async def _queue_behind_holder(broker: Any, client: Client, names: list[str], probe: EtcdProbe) -> None:
    """Hold every name from another client's session, queue one blocking `client.lock` per name
    on one session of `client`, and check that all queue, none raises, and all are granted once
    the holder lets go; then that nothing is left in etcd."""
    other = Client(target_of(broker), transport="unary", default_timeout=10)
    async with other, other.session(ttl=30) as holder:
        for start in range(0, len(names), 100):  # a few at a time: the holder's calls are not the test
            chunk = names[start : start + 100]
            await asyncio.gather(*(other.acquire(n, session_id=holder.session_id) for n in chunk))
        async with client.session(ttl=30) as s:
            tokens: dict[str, int] = {}

            async def lock(name: str, session: SessionKeeper) -> None:
                async with client.lock(name, session=session, wait=60, timeout=90) as held:
                    tokens[name] = held.fencing_token

            tasks = [asyncio.create_task(lock(n, s)) for n in names]
            try:
                until = time.monotonic() + 60
                while await _waiting(client, names[0].rsplit("/", 1)[0] + "/") < len(names):
                    failed = [t for t in tasks if t.done()]
                    if failed:
                        await failed[0]  # raises what refused it (QuotaExceeded without the fix)
                        pytest.fail("a blocking acquire ended before the holder released its lock")
                    assert time.monotonic() < until, "the acquires did not all queue in time"
                    await asyncio.sleep(0.2)
                assert not any(t.done() for t in tasks)
                await other.close_session(holder.session_id)  # every lock passes to its waiter
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert sorted(tokens) == sorted(names) and all(t > 0 for t in tokens.values())
    until = time.monotonic() + 10
    while await probe.keys():
        assert time.monotonic() < until, "keys left in etcd"
        await asyncio.sleep(0.1)


async def test_more_blocking_acquires_than_a_stream_carries_all_queue(
    broker: Any, client: Client, probe: EtcdProbe
) -> None:
    names = [f"overflow/{i:04d}" for i in range(WAITERS)]
    await _queue_behind_holder(broker, client, names, probe)


async def test_a_broker_with_a_lower_cap_is_served_all_the_same(broker: Any, client: Client, probe: EtcdProbe) -> None:
    # A broker whose streams take two requests at a time: each refusal is sent elsewhere.
    broker.service.sessions.max_in_flight = 2
    names = [f"overflow/low/{i}" for i in range(6)]
    await _queue_behind_holder(broker, client, names, probe)


async def test_past_the_pools_bound_requests_go_as_unary_calls(
    broker: Any, client: Client, probe: EtcdProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pool of one stream of three: the waiters beyond it are unary Acquire calls, which queue too.
    pool = client._stream
    assert pool is not None and not pool.streams
    monkeypatch.setattr(pool, "_max_streams", 1)
    monkeypatch.setattr(pool, "_in_flight", 3)
    unary: list[str] = []
    real = client._stub.Acquire

    def counted(request: lock_pb2.AcquireRequest, **kwargs: Any) -> Any:
        unary.append(request.name)
        return real(request, **kwargs)

    monkeypatch.setattr(client._stub, "Acquire", counted)
    names = [f"overflow/unary/{i}" for i in range(8)]
    await _queue_behind_holder(broker, client, names, probe)
    assert len(unary) >= len(names) - 3 and len(set(unary)) == len(unary)
