"""Retries on UNAVAILABLE: same request_id, one grant, bounded by the call's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.client import Backoff, Client, Unavailable
from lockbroker.client._retry import call_with_retry
from lockbroker.client.errors import LockBrokerError
from tests.client.proxy import RunningProxy
from tests.etcdutil import EtcdProbe

FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 50),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_lost_acquire_answers_are_retried_with_the_same_request_id(broker: Any, probe: EtcdProbe) -> None:
    async with (
        RunningProxy(broker.port) as proxy,
        Client(f"127.0.0.1:{proxy.port}", api_key="k-1", default_timeout=5) as c,
    ):
        s = await c.create_session(ttl=5)
        proxy.servicer.lose_acquire_answers = 2  # the broker grants; the answer is lost twice
        g = await c.acquire("retry/explicit", session_id=s.session_id, owner="r")

        # Session-less Acquire: the retry must find the session its first attempt created.
        leases_before = await probe.leases()
        proxy.servicer.lose_acquire_answers = 1
        g2 = await c.acquire("retry/implicit", ttl=5)
        assert len(await probe.leases() - leases_before) == 1

    reqs = proxy.servicer.acquires
    assert len(reqs) == 5
    assert len({r.request_id for r in reqs[:3]}) == 1 and reqs[0].request_id == g.request_id
    assert reqs[3].request_id == reqs[4].request_id == g2.request_id != g.request_id
    assert set(proxy.servicer.api_keys) == {"k-1"}
    # Exactly one grant per lock, and it is the one the client was handed.
    assert len(await probe.keys("/t/default/l/retry/explicit#")) == 1
    assert len(await probe.keys("/t/default/l/retry/implicit#")) == 1
    async with Client(f"127.0.0.1:{broker.port}", default_timeout=5) as direct:
        assert (h := (await direct.describe("retry/explicit")).holder) and h.fencing_token == g.fencing_token
        assert (h := (await direct.describe("retry/implicit")).holder) and h.fencing_token == g2.fencing_token
        assert await direct.release("retry/implicit", g2.fencing_token)
        await direct.close_session(s.session_id)
    assert await probe.keys() == []


async def test_dead_port_first_then_the_broker_appears(broker: Any, probe: EtcdProbe) -> None:
    port = free_port()
    async with Client(f"127.0.0.1:{port}", default_timeout=5, options=FAST_RECONNECT) as c:
        started = time.monotonic()
        attempt = asyncio.create_task(c.acquire("late", ttl=5, owner="patient"))
        await asyncio.sleep(0.4)
        assert not attempt.done()
        # The same port the client keeps dialling, so the channel finds it without being told.
        async with RunningProxy(broker.port, listen_port=port) as proxy:
            g = await asyncio.wait_for(attempt, 5)
            assert time.monotonic() - started >= 0.4
            assert len({r.request_id for r in proxy.servicer.acquires}) == 1
            assert await c.release("late", g.fencing_token)
    await asyncio.sleep(0.1)
    assert await probe.keys() == []


async def test_unavailable_gives_up_within_the_callers_deadline() -> None:
    async with Client(f"127.0.0.1:{free_port()}", default_timeout=0.7, options=FAST_RECONNECT) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable) as ei:
            await c.acquire("nowhere")
        assert time.monotonic() - started < 1.2
        assert ei.value.reason == ""  # the transport failed; the broker never spoke


async def test_backoff_uses_full_jitter_under_a_cap_and_honours_retry_info() -> None:
    b = Backoff(base=0.1, cap=0.4)
    assert all(0.0 <= b.delay(0) <= 0.1 for _ in range(200))
    assert all(0.0 <= b.delay(10) <= 0.4 for _ in range(200))
    assert max(b.delay(10) for _ in range(200)) > 0.2  # jittered across the whole range
    assert b.delay(0, hint=0.3) >= 0.3


async def test_retry_helper_stops_on_other_errors_and_at_max_attempts() -> None:
    calls: list[float] = []

    def failing(code: grpc.StatusCode) -> Callable[[float], Awaitable[None]]:
        async def attempt(left: float) -> None:
            calls.append(left)
            raise aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), "nope")

        return attempt

    with pytest.raises(LockBrokerError) as ei:
        await call_with_retry(
            failing(grpc.StatusCode.NOT_FOUND), deadline=time.monotonic() + 5, backoff=Backoff(base=0.001)
        )
    assert len(calls) == 1 and ei.value.code == grpc.StatusCode.NOT_FOUND
    calls.clear()
    with pytest.raises(Unavailable):
        await call_with_retry(
            failing(grpc.StatusCode.UNAVAILABLE),
            deadline=time.monotonic() + 5,
            backoff=Backoff(base=0.001, max_attempts=4),
        )
    assert len(calls) == 4 and calls == sorted(calls, reverse=True)  # each attempt gets what is left


async def test_a_shared_grant_whose_answer_was_lost_is_released_though_another_reader_holds_first(
    broker: Any, probe: EtcdProbe
) -> None:
    """The acquire is cancelled after the broker granted a shared claim behind an earlier reader
    whose answer never came: the clean-up must find the grant among all the holders, not only
    the first."""
    async with Client(f"127.0.0.1:{broker.port}", default_timeout=5) as direct:
        first = await direct.create_session(ttl=10)
        reader = await direct.acquire("retry/shared", session_id=first.session_id, shared=True)
        async with (
            RunningProxy(broker.port) as proxy,
            Client(f"127.0.0.1:{proxy.port}", default_timeout=10) as c,
            c.session(ttl=10) as s,
        ):
            proxy.servicer.lose_acquire_answers = 1_000  # granted every time; never told

            async def take() -> None:
                async with c.lock("retry/shared", session=s, shared=True):
                    pass

            taking = asyncio.create_task(take())
            try:

                async def granted_unseen() -> bool:
                    return len((await direct.describe("retry/shared")).holders) == 2

                deadline = time.monotonic() + 10
                while not await granted_unseen():
                    assert time.monotonic() < deadline and not taking.done(), "the broker granted the claim"
                    await asyncio.sleep(0.05)
            finally:
                taking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await taking  # its clean-up runs before the cancellation is raised
            state = await direct.describe("retry/shared")
            assert [h.session_id for h in state.holders] == [first.session_id]
            assert state.holders[0].fencing_token == reader.fencing_token
        assert await direct.release("retry/shared", reader.fencing_token, session_id=first.session_id)
        await direct.close_session(first.session_id)
    assert await probe.keys() == []
