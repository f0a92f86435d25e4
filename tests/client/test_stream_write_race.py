"""The Session stream when grpc.aio reports a failed write as INTERNAL "Internal error from Core"
over the broker's own status (grpc/grpc#36066): never raised to the caller as INTERNAL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.client import _stream
from lockbroker.client._stream import CORE_WRITE_FAILED, SessionStream, StreamUnsupported
from lockbroker.v1 import lock_pb2


def _core_error() -> aio.AioRpcError:
    return aio.AioRpcError(grpc.StatusCode.INTERNAL, aio.Metadata(), aio.Metadata(), CORE_WRITE_FAILED)


class _Call:
    """A Session call that answers `answers` requests, then ends as grpc.aio ends a stream whose
    write failed in its core."""

    def __init__(self, answers: int) -> None:
        self.answers = answers
        self.inbox: asyncio.Queue[lock_pb2.SessionRequest] = asyncio.Queue()

    async def write(self, req: lock_pb2.SessionRequest) -> None:
        await self.inbox.put(req)

    def cancel(self) -> bool:
        return True

    async def initial_metadata(self) -> aio.Metadata:
        return aio.Metadata()

    def __aiter__(self) -> AsyncIterator[lock_pb2.SessionResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[lock_pb2.SessionResponse]:
        while True:
            req = await self.inbox.get()
            if self.answers <= 0:
                raise _core_error()
            self.answers -= 1
            yield lock_pb2.SessionResponse(id=req.id, keepalive=lock_pb2.RefreshResponse())


class _Stub:
    def __init__(self, answers: int) -> None:
        self.calls: list[_Call] = []
        self.answers = answers

    def Session(self, metadata: Any = None) -> _Call:
        call = _Call(self.answers)
        self.calls.append(call)
        return call


def _refresh() -> lock_pb2.RefreshRequest:
    return lock_pb2.RefreshRequest(session_id="00000000000000ab")


async def test_a_stream_that_never_answered_is_taken_for_a_broker_without_it_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = SessionStream(_Stub(answers=0), ())  # type: ignore[arg-type]
    with pytest.raises(StreamUnsupported):
        await stream.request("keepalive", _refresh(), 5.0)
    assert stream.unsupported  # session operations go as unary calls now
    with pytest.raises(StreamUnsupported):
        await stream.request("keepalive", _refresh(), 5.0)
    # ... but not for good: later the stream is tried again.
    monkeypatch.setattr(_stream, "UNSUPPORTED_RETRY", 0.0)
    stream._unsupported_until = 0.0
    assert not stream.unsupported
    await stream.close()


async def test_a_stream_that_answered_before_is_retried_as_broken() -> None:
    stub = _Stub(answers=1)
    stream = SessionStream(stub, ())  # type: ignore[arg-type]
    await stream.request("keepalive", _refresh(), 5.0)
    with pytest.raises(aio.AioRpcError) as ei:
        await stream.request("keepalive", _refresh(), 5.0)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # retried with the same request id
    assert not stream.unsupported
    await stream.close()
