"""Issue 18, item 7: a call that never sends its request message is timed out, audited and counted.

The client side is a grpc stream call on a unary method whose request iterator never yields: the
server sees the call's headers and then nothing, as from a raw HTTP/2 stream left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import Chain, chain
from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.server.auth.tenants import add_tenant, load
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.interceptors.test_audit import LOCK, Scripted, stub, until
from tests.interceptors.test_chain_base import NotWrapping

TIMEOUT = 0.5


@contextlib.asynccontextmanager
async def chained(tmp_path: Any) -> AsyncIterator[tuple[int, Chain, MemorySink, str]]:
    key = add_tenant(tmp_path / "tenants.toml", "acme")
    identity = IdentityInterceptor.from_registry(load(tmp_path / "tenants.toml"))
    assert identity is not None
    sink = MemorySink()
    log = AuditLog([sink])
    interceptors = chain([AuditInterceptor(log), identity], first_message_timeout=TIMEOUT)
    (the_chain,) = interceptors
    assert isinstance(the_chain, Chain)
    server = aio.server(interceptors=interceptors)
    lock_pb2_grpc.add_LockServiceServicer_to_server(Scripted(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, the_chain, sink, key
    finally:
        await server.stop(None)
        await log.close()


async def _silent(stop: asyncio.Event) -> AsyncIterator[bytes]:
    """Sends nothing until `stop`, then closes (the server has ended the call by then)."""
    await stop.wait()
    return
    yield b""


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def test_item7_a_call_that_never_sends_its_message_is_ended_audited_and_counted(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lockbroker.calls")
    async with chained(tmp_path) as (port, the_chain, sink, _), aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        silent: Any = ch.stream_unary(LOCK + "Acquire")
        stop = asyncio.Event()
        calls = [silent(_silent(stop)) for _ in range(3)]  # no deadline, no credentials
        try:
            # A guard, not a timing: before the fix the server waited for these forever.
            codes = []
            for call in calls:
                with pytest.raises(aio.AioRpcError) as err:
                    await asyncio.wait_for(call, 10)
                codes.append(err.value.code())
        finally:
            stop.set()
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.05)  # let the request iterators finish
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        assert the_chain.first_message is not None and the_chain.first_message.timeouts == 3
        await until(lambda: len(sink.lines) == 3)
    records = sink.records()
    assert {(r["method"], r["outcome"]["code"]) for r in records} == {(LOCK + "Acquire", "DEADLINE_EXCEEDED")}
    assert all(r["principal"] is None and r["tenant"] is None and r["lock"] is None for r in records)
    assert any("sent no request message" in r.getMessage() for r in caplog.records)


async def test_item7_a_call_closed_without_a_message_is_invalid(tmp_path: Any) -> None:
    async with chained(tmp_path) as (port, _, sink, _key), aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        empty: Any = ch.stream_unary(LOCK + "Acquire")
        with pytest.raises(aio.AioRpcError) as err:
            await asyncio.wait_for(empty(_nothing()), 10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await until(lambda: len(sink.lines) == 1)


async def test_item7_ordinary_unary_calls_are_served_through_the_reader(tmp_path: Any) -> None:
    async with chained(tmp_path) as (port, the_chain, sink, key), aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        request = lock_pb2.AcquireRequest(name="a", session_id="s-1", owner="ok", request_id="r-7")
        response = await stub(ch).Acquire(request, metadata=(("x-api-key", key),), timeout=10)
        assert response.grant.fencing_token == 42
        with pytest.raises(aio.AioRpcError) as err:
            await stub(ch).Acquire(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await until(lambda: len(sink.lines) == 2)
        assert the_chain.first_message is not None and the_chain.first_message.timeouts == 0
    ok, unauth = sink.records()
    assert (ok["tenant"], ok["lock"], ok["requestId"]) == ("acme", "a", "r-7")
    assert unauth["outcome"]["code"] == "UNAUTHENTICATED"


def test_item7_only_the_outermost_chain_reads_and_an_empty_setup_still_gets_one() -> None:
    audit = AuditInterceptor(AuditLog([MemorySink()]))
    plain = NotWrapping()
    folded = chain([plain, audit, plain, audit])
    assert [type(i) for i in folded] == [NotWrapping, Chain, NotWrapping, Chain]
    assert isinstance(folded[1], Chain) and folded[1].first_message is not None
    assert isinstance(folded[3], Chain) and folded[3].first_message is None  # gets the request as usual
    # No wrapping interceptor at all (no auth, audit, metrics, tracing or rate): still bounded.
    bare = chain([plain])
    assert [type(i) for i in bare] == [NotWrapping, Chain]
    assert isinstance(bare[1], Chain) and bare[1].first_message is not None
    assert chain([]) != [] and chain([], first_message_timeout=None) == []
