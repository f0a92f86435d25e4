"""The client's Session stream writer: requests in order, one write at a time, and what queued
during a write as one batched message once the broker granted batches."""

from __future__ import annotations

import asyncio
import time

import pytest
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from lockbroker.client import _writer
from lockbroker.client._stream import SessionStream
from lockbroker.client._writer import StreamBroken, StreamWriter
from lockbroker.v1 import lock_pb2, lock_pb2_grpc


@pytest.fixture
def transport() -> str:
    return "stream"  # no Client here


class _Call:
    """Records each message written; a write takes until `gate` opens (if set)."""

    def __init__(self) -> None:
        self.written: list[lock_pb2.SessionRequest] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.half_closed = False

    async def write(self, message: lock_pb2.SessionRequest) -> None:
        assert not self.half_closed
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.written.append(message)

    async def done_writing(self) -> None:
        self.half_closed = True

    def cancel(self) -> bool:
        return True


def _ids(message: lock_pb2.SessionRequest) -> list[int]:
    if message.WhichOneof("kind") == "batch":
        return [r.id for r in message.batch.requests]
    return [message.id]


def _req(rid: int) -> lock_pb2.SessionRequest:
    return lock_pb2.SessionRequest(id=rid, keepalive=lock_pb2.RefreshRequest(session_id="s"))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _nothing_failed(requests: list[lock_pb2.SessionRequest], exc: BaseException) -> None:
    raise AssertionError(f"no write should fail: {exc}")


async def test_without_the_grant_each_request_is_its_own_message_in_order() -> None:
    call = _Call()
    w = StreamWriter(call, _nothing_failed)
    for i in range(1, 6):
        w.send(_req(i))
    await _settle()
    assert [m.id for m in call.written] == [1, 2, 3, 4, 5]
    assert all(m.WhichOneof("kind") == "keepalive" for m in call.written)
    w.close()
    await w.wait()
    assert call.half_closed


async def test_with_the_grant_what_queues_during_a_write_goes_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_writer, "MAX_BATCH", 4)
    call = _Call()
    w = StreamWriter(call, _nothing_failed)
    w.batches = True
    call.gate = asyncio.Event()
    w.send(_req(1))  # written alone, as itself
    await _settle()
    for i in range(2, 12):  # queued while 1 is being written
        w.send(_req(i))
    w.send(lock_pb2.SessionRequest(cancel=5))  # a cancel keeps its place after what it cancels
    call.gate.set()
    await _settle()
    assert [_ids(m) for m in call.written] == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 0]]
    assert call.written[0].WhichOneof("kind") == "keepalive"
    assert call.written[-1].batch.requests[-1].cancel == 5
    assert w.messages == 4
    w.cancel()
    await w.wait()


async def test_a_failed_write_reports_everything_unsent_and_stops() -> None:
    call = _Call()
    reported: list[tuple[list[int], BaseException]] = []

    async def failed(requests: list[lock_pb2.SessionRequest], exc: BaseException) -> None:
        reported.append(([r.id for r in requests], exc))

    w = StreamWriter(call, failed)
    call.gate = asyncio.Event()
    w.send(_req(1))
    await _settle()
    w.send(_req(2))
    w.send(_req(3))
    call.fail = RuntimeError("stream gone")
    call.gate.set()
    await w.wait()
    assert [ids for ids, _ in reported] == [[1, 2, 3]]
    assert isinstance(reported[0][1], RuntimeError)
    with pytest.raises(StreamBroken):
        w.send(_req(4))


async def test_a_busy_client_sends_fewer_messages_than_requests(stub: lock_pb2_grpc.LockServiceAsyncStub) -> None:
    """Against a real broker: the grant arrives, then 300 concurrent requests share messages, and
    every one gets its own answer."""
    sid = (await stub.CreateSession(lock_pb2.CreateSessionRequest())).session_id
    stream = SessionStream(stub, ())
    try:
        await stream.request("keepalive", lock_pb2.RefreshRequest(session_id=sid), 10)
        (call,) = stream.streams
        assert call.writer is not None and call.writer.batches  # the broker granted batches
        before = call.writer.messages
        answers = await asyncio.gather(
            *(stream.request("keepalive", lock_pb2.RefreshRequest(session_id=sid), 10) for _ in range(300))
        )
        assert all(a.HasField("keepalive") and a.keepalive.ttl.seconds > 0 for a in answers)
        assert len({a.id for a in answers}) == 300
        assert call.writer.messages - before < 300
    finally:
        await stream.close()
        await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=sid))


async def test_an_older_broker_gets_single_messages(stub: lock_pb2_grpc.LockServiceAsyncStub) -> None:
    """A broker that does not grant batches (no initial metadata) gets each request alone."""

    class _NoGrant:
        def __init__(self, inner: lock_pb2_grpc.LockServiceAsyncStub) -> None:
            self.inner = inner

        def Session(self, metadata: tuple[tuple[str, str], ...] = ()) -> aio.StreamStreamCall:  # type: ignore[type-arg]
            # The request for batches never reaches the broker: as an older broker, it ignores it.
            return self.inner.Session(metadata=tuple(m for m in metadata if m != _writer.BATCH_METADATA))

    sid = (await stub.CreateSession(lock_pb2.CreateSessionRequest())).session_id
    stream = SessionStream(_NoGrant(stub), ())  # type: ignore[arg-type]
    try:
        await stream.request("keepalive", lock_pb2.RefreshRequest(session_id=sid), 10)
        (call,) = stream.streams
        assert call.writer is not None and not call.writer.batches
        before = call.writer.messages
        await asyncio.gather(
            *(stream.request("keepalive", lock_pb2.RefreshRequest(session_id=sid), 10) for _ in range(50))
        )
        assert call.writer.messages - before == 50
    finally:
        await stream.close()
        await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=sid))


async def test_a_request_that_waited_to_be_written_goes_with_what_is_left_of_its_timeout() -> None:
    call = _Call()
    w = StreamWriter(call, _nothing_failed)
    call.gate = asyncio.Event()
    w.send(_req(1))
    await _settle()
    now = time.monotonic()
    waited = lock_pb2.SessionRequest(id=2, timeout=Duration(seconds=5), keepalive=lock_pb2.RefreshRequest())
    fresh = lock_pb2.SessionRequest(id=3, timeout=Duration(seconds=5), keepalive=lock_pb2.RefreshRequest())
    w.send(waited, now + 5.0 - 1.0)  # as if queued a second ago with 5 s
    w.send(fresh, now + 5.0)
    call.gate.set()
    await _settle()
    first, second = call.written[1:]
    left = first.timeout.seconds + first.timeout.nanos / 1e9
    assert 3.5 < left < 4.01  # restamped: the broker counts from when it reads it
    assert (second.timeout.seconds, second.timeout.nanos) == (5, 0)  # no wait worth a rewrite
    w.cancel()
    await w.wait()
    with pytest.raises(StreamBroken):  # a cancelled writer takes nothing more
        w.send(_req(4))
