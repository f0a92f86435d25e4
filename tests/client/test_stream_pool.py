"""The client's pool of Session streams, one choice at a time, against a scripted broker.

A request takes the first stream with room; a full stream makes the pool open another; a pool at
its bound sends the request as its unary call (`StreamFull`); a broker whose cap is lower than
ours refuses the request (QUOTA_EXCEEDED, limit "stream_in_flight") and it goes elsewhere. Each
stream's cancels go on that stream, and an overflow stream is half-closed once idle.
test_stream_overflow.py has the same against a real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc import aio

from lockbroker.client._stream import STREAM_IN_FLIGHT, GoUnary, SessionStream, StreamFull, StreamKeepAlive
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import ErrorReason

_End = None | BaseException


@pytest.fixture
def transport() -> str:
    # Overrides conftest's: no Client here, so nothing for the transport to change.
    return "stream"


def _status(code: grpc.StatusCode, reason: str, metadata: dict[str, str]) -> lock_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="lockbroker.v1", metadata=metadata))
    return lock_pb2.Status(code=code.value[0], message=reason, details=[detail])


class _Call:
    """One scripted Session stream: holds requests until answered, refuses those over `cap`
    in flight as the broker does (having run nothing)."""

    def __init__(self, cap: int | None, refuse: grpc.StatusCode | None) -> None:
        self.cap = cap
        self.held: dict[int, lock_pb2.SessionRequest] = {}
        self.cancels: list[int] = []
        self.refused: list[int] = []
        self.half_closed = False
        self.out: asyncio.Queue[lock_pb2.SessionResponse | _End] = asyncio.Queue()
        if refuse is not None:  # the broker refuses the stream itself
            self.out.put_nowait(aio.AioRpcError(refuse, aio.Metadata(), aio.Metadata(), "max_streams"))

    async def write(self, req: lock_pb2.SessionRequest) -> None:
        assert not self.half_closed, "a write after done_writing"
        if req.WhichOneof("kind") == "cancel":
            self.cancels.append(req.cancel)
            if self.held.pop(req.cancel, None) is not None:
                ended = lock_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled by the client")
                self.out.put_nowait(lock_pb2.SessionResponse(id=req.cancel, error=ended))
            return
        if self.cap is not None and len(self.held) >= self.cap:
            self.refused.append(req.id)
            limit = {"tenant": "default", "limit": "stream_in_flight", "value": str(self.cap)}
            refusal = _status(grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.QUOTA_EXCEEDED, limit)
            self.out.put_nowait(lock_pb2.SessionResponse(id=req.id, error=refusal))
            return
        self.held[req.id] = req

    async def initial_metadata(self) -> aio.Metadata:
        return aio.Metadata()  # a broker that does not take batches

    async def done_writing(self) -> None:
        self.half_closed = True
        if not self.held:
            self.out.put_nowait(None)

    def cancel(self) -> bool:
        self.out.put_nowait(aio.AioRpcError(grpc.StatusCode.CANCELLED, aio.Metadata(), aio.Metadata(), "cancelled"))
        return True

    def answer(self, error: lock_pb2.Status | None = None) -> None:
        for rid in list(self.held):
            del self.held[rid]
            if error is not None:
                self.out.put_nowait(lock_pb2.SessionResponse(id=rid, error=error))
            else:
                self.out.put_nowait(lock_pb2.SessionResponse(id=rid, keepalive=lock_pb2.RefreshResponse()))
        if self.half_closed:
            self.out.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[lock_pb2.SessionResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[lock_pb2.SessionResponse]:
        while True:
            item = await self.out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _Stub:
    """A broker whose streams each take `cap` requests at once (None: no cap); `refuse` ends
    the stream opened as number `refuse_from` (from 0) and every later one with that status."""

    def __init__(self, cap: int | None = None, refuse: grpc.StatusCode | None = None, refuse_from: int = 0) -> None:
        self.cap = cap
        self.refuse = refuse
        self.refuse_from = refuse_from
        self.calls: list[_Call] = []

    def Session(self, metadata: Any = None) -> _Call:
        refuse = self.refuse if len(self.calls) >= self.refuse_from else None
        call = _Call(self.cap, refuse)
        self.calls.append(call)
        return call


def _refresh(sid: str = "00000000000000ab") -> lock_pb2.RefreshRequest:
    return lock_pb2.RefreshRequest(session_id=sid)


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        try:
            if check():
                return
        except IndexError:  # that stream is not open yet
            pass
        await asyncio.sleep(0.01)
    pytest.fail(f"not reached: {what}")


def _ask(pool: SessionStream, sid: str = "00000000000000ab") -> asyncio.Task[lock_pb2.SessionResponse]:
    return asyncio.create_task(pool.request("keepalive", _refresh(sid), 5.0))


async def test_a_full_stream_opens_another_and_a_full_pool_goes_unary() -> None:
    stub = _Stub()
    pool = SessionStream(stub, (), max_streams=2, in_flight=2)  # type: ignore[arg-type]
    try:
        tasks = [_ask(pool) for _ in range(4)]
        await _until(lambda: sum(len(c.held) for c in stub.calls) == 4, "four requests held")
        assert [len(c.held) for c in stub.calls] == [2, 2]  # the first stream filled, then a second
        with pytest.raises(StreamFull):  # both full, and no third: the caller sends it unary
            await pool.request("keepalive", _refresh(), 5.0)
        assert issubclass(StreamFull, GoUnary) and len(stub.calls) == 2
        stub.calls[0].answer()
        await asyncio.gather(*tasks[:2])
        # Room on the first again: the next request goes there, not on a new stream.
        more = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the next request on the first stream")
        assert len(stub.calls) == 2
        stub.calls[0].answer()
        stub.calls[1].answer()
        await asyncio.gather(*tasks[2:], more)
        # The overflow stream, idle, is half-closed and let go; the first stays open.
        await _until(lambda: len(pool._calls) == 1, "the idle overflow stream let go")
        assert stub.calls[1].half_closed and not stub.calls[0].half_closed
        assert pool.streams == (pool._calls[0],)
    finally:
        await pool.close()


async def test_a_refusal_for_the_streams_bound_is_sent_elsewhere() -> None:
    # A broker whose cap (1) is below ours: the refused request goes on another stream, then unary.
    stub = _Stub(cap=1)
    pool = SessionStream(stub, (), max_streams=2)  # type: ignore[arg-type]
    try:
        first = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the first request held")
        second = _ask(pool)
        await _until(lambda: len(stub.calls) == 2 and len(stub.calls[1].held) == 1, "the second on a new stream")
        assert len(stub.calls[0].refused) == 1 and not second.done()
        assert [c.cap for c in pool.streams] == [1, STREAM_IN_FLIGHT]  # the refusing stream's cap is the broker's
        with pytest.raises(StreamFull):
            await pool.request("keepalive", _refresh(), 5.0)
        # The third went on the second stream (its cap not learned yet), was refused there too,
        # and with no third stream allowed, goes unary.
        assert len(stub.calls[1].refused) == 1 and [c.cap for c in pool.streams] == [1, 1]
        stub.calls[0].answer()
        stub.calls[1].answer()
        for done in await asyncio.gather(first, second):
            assert done.HasField("keepalive")
    finally:
        await pool.close()


async def test_a_refusal_on_the_last_stream_goes_unary() -> None:
    stub = _Stub(cap=1)
    pool = SessionStream(stub, (), max_streams=1)  # type: ignore[arg-type]
    try:
        first = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the first request held")
        with pytest.raises(StreamFull):  # refused, and no other stream may open: unary, not raised
            await pool.request("keepalive", _refresh(), 5.0)
        assert len(stub.calls[0].refused) == 1
        stub.calls[0].answer()
        assert (await first).HasField("keepalive")
    finally:
        await pool.close()


async def test_a_cancel_goes_on_the_stream_its_request_went_on() -> None:
    stub = _Stub()
    pool = SessionStream(stub, (), max_streams=2, in_flight=1)  # type: ignore[arg-type]
    try:
        first, second = _ask(pool), _ask(pool)
        await _until(lambda: len(stub.calls) == 2 and len(stub.calls[1].held) == 1, "one request per stream")
        (rid,) = stub.calls[1].held
        second.cancel()
        await _until(lambda: stub.calls[1].cancels == [rid], "the cancel on the second stream")
        assert stub.calls[0].cancels == []
        stub.calls[0].answer()
        assert (await first).HasField("keepalive")
    finally:
        await pool.close()


async def test_a_cancelled_request_counts_until_the_broker_answers_it() -> None:
    # The broker runs a cancelled request until the cancel lands: it still fills the stream.
    stub = _Stub()
    pool = SessionStream(stub, (), max_streams=2, in_flight=1)  # type: ignore[arg-type]
    try:
        first = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the first request held")
        call = pool.streams[0]
        # Stop the scripted broker from answering the cancel: the request is the broker's still.
        write = stub.calls[0].write

        async def late(req: lock_pb2.SessionRequest) -> None:
            if req.WhichOneof("kind") == "cancel":
                stub.calls[0].cancels.append(req.cancel)
                return
            await write(req)

        stub.calls[0].write = late  # type: ignore[method-assign]
        first.cancel()
        await _until(lambda: len(stub.calls[0].cancels) == 1, "the cancel sent")
        assert call.in_flight == 1 and not call.pending
        second = _ask(pool)
        await _until(lambda: len(stub.calls) == 2 and len(stub.calls[1].held) == 1, "the next on a new stream")
        stub.calls[0].answer()  # the broker's late answer frees the first stream
        await _until(lambda: call.in_flight == 0, "the first stream empty again")
        stub.calls[1].answer()
        assert (await second).HasField("keepalive")
    finally:
        await pool.close()


async def test_a_refused_stream_sends_its_requests_unary() -> None:
    # The broker refuses a second stream (the tenant's max_streams): its request goes unary, and
    # the pool opens no other stream for a while.
    stub = _Stub(refuse=grpc.StatusCode.RESOURCE_EXHAUSTED, refuse_from=1)
    pool = SessionStream(stub, (), max_streams=4, in_flight=1)  # type: ignore[arg-type]
    try:
        first = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the first request held")
        with pytest.raises(StreamFull):
            await pool.request("keepalive", _refresh(), 5.0)
        with pytest.raises(StreamFull):
            await pool.request("keepalive", _refresh(), 5.0)
        assert len(stub.calls) == 2
        stub.calls[0].answer()
        assert (await first).HasField("keepalive")
    finally:
        await pool.close()


async def test_session_gone_on_any_stream_reaches_the_sessions() -> None:
    gone: list[str] = []
    stub = _Stub()
    pool = SessionStream(stub, (), gone.append, max_streams=2, in_flight=1)  # type: ignore[arg-type]
    try:
        first = _ask(pool, "00000000000000aa")
        second = _ask(pool, "00000000000000bb")
        await _until(lambda: len(stub.calls) == 2 and len(stub.calls[1].held) == 1, "one request per stream")
        # The broker's event on the second stream, and an answer that finds the session gone on
        # the first (where the broker, not knowing the session there, sends no event).
        event = lock_pb2.SessionEvent(session_id="00000000000000cc", kind=lock_pb2.SessionEvent.KIND_EXPIRED)
        stub.calls[1].out.put_nowait(lock_pb2.SessionResponse(id=0, event=event))
        stub.calls[0].answer(_status(grpc.StatusCode.NOT_FOUND, ErrorReason.SESSION_NOT_FOUND, {}))
        with pytest.raises(aio.AioRpcError) as e:
            await first
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        await _until(lambda: len(gone) == 2, "both sessions reported")
        assert sorted(gone) == ["00000000000000aa", "00000000000000cc"]
        stub.calls[1].answer()
        await second
    finally:
        await pool.close()


async def test_close_closes_every_stream() -> None:
    stub = _Stub()
    pool = SessionStream(stub, (), max_streams=3, in_flight=1)  # type: ignore[arg-type]
    tasks = [_ask(pool) for _ in range(3)]
    await _until(lambda: sum(len(c.held) for c in stub.calls) == 3, "three streams busy")
    await pool.close()
    assert pool._calls == [] and all(t.done() for t in tasks)
    for t in tasks:
        assert isinstance(t.exception(), aio.AioRpcError)


class _Fallback:
    def __init__(self) -> None:
        self.refreshed: list[str] = []

    async def refresh(self, session_id: str) -> lock_pb2.KeepAliveResponse:
        self.refreshed.append(session_id)
        return lock_pb2.KeepAliveResponse(session_id=session_id)

    def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_keepalive_with_every_stream_full_goes_on_the_keepalive_stream() -> None:
    stub = _Stub()
    pool = SessionStream(stub, (), max_streams=1, in_flight=1)  # type: ignore[arg-type]
    fallback = _Fallback()
    keepalive = StreamKeepAlive(pool, fallback)  # type: ignore[arg-type]
    try:
        first = _ask(pool)
        await _until(lambda: len(stub.calls[0].held) == 1, "the only stream full")
        refresh: Awaitable[lock_pb2.KeepAliveResponse] = keepalive.refresh("00000000000000dd")
        assert (await refresh).session_id == "00000000000000dd"
        assert fallback.refreshed == ["00000000000000dd"]
        stub.calls[0].answer()
        await first
    finally:
        await pool.close()
