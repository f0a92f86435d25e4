"""What only the stream transport has: a Client's Session stream, its fallback and its retry.

The client's semantic tests run on both transports (conftest.py's `transport`); these pin that
the stream is really used, that a broker without it is served by unary calls, and that a stream
broken mid-wait is survived by the retry with the same request_id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from lockbroker.client import Client
from lockbroker.client.aio import TRANSPORT_ENV
from lockbroker.v1 import lock_pb2
from tests.client.conftest import target_of
from tests.client.proxy import RunningProxy


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Overrides conftest's: these tests are about the stream transport only.
    monkeypatch.setenv(TRANSPORT_ENV, "stream")
    yield "stream"


def spy(client: Client) -> list[str]:
    """The kinds of requests the client sends on its Session stream, in order."""
    stream = client._stream
    assert stream is not None
    kinds: list[str] = []
    original = stream.request

    async def request(kind: str, message: Any, timeout: float) -> lock_pb2.SessionResponse:
        kinds.append(kind)
        return await original(kind, message, timeout)

    stream.request = request  # type: ignore[method-assign]
    return kinds


def no_unary(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CreateSession", "Acquire", "AcquireMany", "Release", "Refresh", "CloseSession"):

        def refuse(*args: Any, name: str = name, **kwargs: Any) -> Any:
            raise AssertionError(f"unary {name} called on the stream transport")

        monkeypatch.setattr(client._stub, name, refuse)


async def test_session_and_its_locks_go_over_one_stream(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = spy(client)
    no_unary(client, monkeypatch)
    async with client.session(ttl=10) as s:
        async with client.lock("stream/a", session=s) as held:
            assert held.fencing_token > 0
        async with client.lock("stream/b", session=s):
            pass
    async with client.lock("stream/own", ttl=5):  # a session of its own: open, acquire, close
        pass
    assert kinds == ["open", "acquire", "release", "acquire", "release", "close", "open", "acquire", "close"]
    assert client._stream is not None and len(client._stream.streams) == 1  # one stream, still open


async def test_a_broker_without_the_stream_is_served_by_unary_calls(broker: Any) -> None:
    async with RunningProxy(broker.port) as proxy, Client(f"127.0.0.1:{proxy.port}", default_timeout=5) as c:
        assert c.transport == "stream"
        async with c.session(ttl=10) as s, c.lock("fallback", session=s) as held:
            assert held.fencing_token > 0
            grants = await c.acquire_many(["fallback/many"], session_id=s.session_id)
            assert grants[0].fencing_token > 0
        assert c._stream is not None and c._stream.unsupported
        assert [a.name for a in proxy.servicer.acquires] == ["fallback"]


async def test_unknown_transport_is_refused(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRANSPORT_ENV, "carrier-pigeon")
    with pytest.raises(ValueError, match="transport"):
        Client(target_of(broker))
    async with Client(target_of(broker), transport="unary") as c:  # the argument wins
        assert c.transport == "unary" and c._stream is None


async def test_a_broken_stream_is_retried_with_the_same_request_id(client: Client) -> None:
    kinds = spy(client)
    async with client.session(ttl=10) as a, client.session(ttl=10) as b:
        first = await client.acquire("broken", session_id=a.session_id)
        waiting = asyncio.create_task(
            client.acquire("broken", session_id=b.session_id, wait=10, request_id="wait-b", timeout=15)
        )
        for _ in range(100):
            if (await client.describe("broken")).waiters:
                break
            await asyncio.sleep(0.05)
        assert client._stream is not None
        (old,) = client._stream.streams
        client._stream.reset()  # the stream breaks under the waiting acquire
        assert await client.release("broken", first.fencing_token, session_id=a.session_id)
        grant = await asyncio.wait_for(waiting, 15)
        assert grant.session_id == b.session_id and grant.request_id == "wait-b"
        assert old not in client._stream.streams and client._stream.streams  # a new stream carried the retry
        state = await client.describe("broken")
        assert state.holder is not None and state.holder.fencing_token == grant.fencing_token
        assert state.waiters == ()
    assert kinds.count("acquire") == 3  # first, the waiting one, and its retry


async def test_many_locks_go_over_the_stream(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = spy(client)
    no_unary(client, monkeypatch)
    async with client.session(ttl=10) as s:
        async with client.lock_many(["many/b", ("many/a", True)], session=s) as grants:
            assert [(g.name, g.shared) for g in grants] == [("many/b", False), ("many/a", True)]
        more = await client.acquire_many(["many/c"], session_id=s.session_id, wait=1)
        assert more[0].fencing_token > 0 and more[0].session_id == s.session_id
    assert kinds == ["open", "acquire_many", "release", "release", "acquire_many", "close"]


async def test_a_broker_whose_stream_lacks_acquire_many_is_served_by_the_unary_call(
    broker: Any, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older broker: its stream has no acquire_many, so it parses one as a request of no kind.
    sessions = broker.service.sessions
    route = sessions.route
    seen: list[str] = []

    def old_route(req: lock_pb2.SessionRequest) -> Any:
        if req.HasField("acquire_many"):
            seen.append("acquire_many")
            old = lock_pb2.SessionRequest()
            old.CopyFrom(req)
            old.ClearField("acquire_many")
            req = old
        return route(req)

    monkeypatch.setattr(sessions, "route", old_route)
    unary: list[lock_pb2.AcquireManyRequest] = []
    real = client._stub.AcquireMany

    def counted(request: lock_pb2.AcquireManyRequest, **kwargs: Any) -> Any:
        unary.append(request)
        return real(request, **kwargs)

    monkeypatch.setattr(client._stub, "AcquireMany", counted)
    kinds = spy(client)
    async with client.session(ttl=10) as s:
        first = await client.acquire_many(["old/b", "old/a"], session_id=s.session_id)
        assert [g.name for g in first] == ["old/b", "old/a"]
        second = await client.acquire_many(["old/c"], session_id=s.session_id)
        assert second[0].fencing_token > 0
        # The stream still carries everything else.
        assert (await client.acquire("old/d", session_id=s.session_id)).fencing_token > 0
    assert seen == ["acquire_many"]  # refused once on this stream, then not sent on it again
    assert [[c.name for c in r.locks] for r in unary] == [["old/b", "old/a"], ["old/c"]]
    assert kinds == ["open", "acquire_many", "acquire_many", "acquire", "close"]
    assert client._stream is not None and not client._stream.unsupported


async def test_a_broken_stream_under_acquire_many_is_retried_with_the_same_request_id(client: Client) -> None:
    kinds = spy(client)
    async with client.session(ttl=10) as a, client.session(ttl=10) as b:
        first = await client.acquire("broken/2", session_id=a.session_id)
        waiting = asyncio.create_task(
            client.acquire_many(
                ["broken/1", "broken/2"], session_id=b.session_id, wait=10, request_id="many-b", timeout=15
            )
        )
        for _ in range(100):
            if (await client.describe("broken/2")).waiters:
                break
            await asyncio.sleep(0.05)
        assert client._stream is not None
        (old,) = client._stream.streams
        client._stream.reset()  # the stream breaks under the waiting acquire_many
        assert await client.release("broken/2", first.fencing_token, session_id=a.session_id)
        grants = await asyncio.wait_for(waiting, 15)
        assert [g.name for g in grants] == ["broken/1", "broken/2"]
        assert all(g.session_id == b.session_id for g in grants)
        assert old not in client._stream.streams and client._stream.streams  # a new stream carried the retry
        for g in grants:
            state = await client.describe(g.name)
            assert state.holder is not None and state.holder.fencing_token == g.fencing_token
            assert state.waiters == ()
    assert kinds.count("acquire_many") == 2  # the waiting one and its retry
