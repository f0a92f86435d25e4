"""Batches on the Session stream (lock.proto, `rpc Session`, "Batches"): several requests in one
message and several answers in one, granted by metadata; each request and answer means exactly
what it means alone. These pin the wire, as a client in any language sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from lockbroker.client._stream import SessionStream
from lockbroker.server.session_stream import BATCH_METADATA, MAX_BATCH, _answers, _Nothing
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.etcdutil import EtcdProbe
from tests.lockutil import assert_untouched, snapshot
from tests.test_session_stream import acquire, detail, dur

CREATE = lock_pb2.OpenSession(create=lock_pb2.CreateSessionRequest(ttl=dur(10)))


class BatchStream:
    """One Session call that may ask for batches: answers are unpacked and counted by message."""

    def __init__(self, stub: lock_pb2_grpc.LockServiceAsyncStub, *, ask: bool) -> None:
        self.call: Any = stub.Session(metadata=(BATCH_METADATA,) if ask else ())
        self.answers: dict[int, list[lock_pb2.SessionResponse]] = {}
        self.messages = 0  # response messages read
        self.batched = 0  # of them, batches
        self.arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for resp in self.call:
            self.messages += 1
            if resp.WhichOneof("kind") == "batch":
                self.batched += 1
                assert resp.id == 0
                assert all(r.WhichOneof("kind") != "batch" for r in resp.batch.responses)
                for r in resp.batch.responses:
                    self.answers.setdefault(r.id, []).append(r)
            else:
                self.answers.setdefault(resp.id, []).append(resp)
            self.arrived.set()

    async def write(self, *requests: lock_pb2.SessionRequest) -> None:
        msg = (
            requests[0]
            if len(requests) == 1
            else lock_pb2.SessionRequest(batch=lock_pb2.SessionRequests(requests=requests))
        )
        await self.call.write(msg)

    async def wait_for(self, ids: set[int], timeout: float = 10) -> dict[int, lock_pb2.SessionResponse]:
        async with asyncio.timeout(timeout):
            while not ids <= self.answers.keys():
                self.arrived.clear()
                await self.arrived.wait()
        # Exactly one answer per request, batched or not.
        assert all(len(self.answers[i]) == 1 for i in ids), {i: self.answers[i] for i in ids}
        return {i: self.answers[i][0] for i in ids}

    def cancel(self) -> None:
        self.call.cancel()
        self._reader.cancel()


@pytest.fixture
async def batching(stub: lock_pb2_grpc.LockServiceAsyncStub) -> AsyncIterator[BatchStream]:
    s = BatchStream(stub, ask=True)
    try:
        yield s
    finally:
        s.cancel()


async def _session(s: BatchStream, rid: int) -> str:
    await s.write(lock_pb2.SessionRequest(id=rid, open=CREATE))
    return (await s.wait_for({rid}))[rid].open.session_id


async def test_the_broker_grants_batches_only_when_asked(stub: lock_pb2_grpc.LockServiceAsyncStub) -> None:
    asked = BatchStream(stub, ask=True)
    plain = BatchStream(stub, ask=False)
    try:
        # The grant comes before any answer, so a client knows at once.
        assert tuple(BATCH_METADATA) in [tuple(m) for m in await asked.call.initial_metadata()]
        sid = await _session(plain, 1)
        assert tuple(BATCH_METADATA) not in [tuple(m) for m in await plain.call.initial_metadata()]
        # A stream that did not ask gets every answer alone, however many are ready at once; it may
        # still send batches (an older client never does).
        await plain.write(*(acquire(10 + i, f"b/plain/{i}", sid) for i in range(40)))
        got = await plain.wait_for({10 + i for i in range(40)})
        assert all(r.HasField("acquire") for r in got.values())
        assert plain.batched == 0 and plain.messages == 41
    finally:
        asked.cancel()
        plain.cancel()


async def test_a_batch_is_each_of_its_requests_in_order(batching: BatchStream, stub: Any) -> None:
    sid = await _session(batching, 1)
    # One message: 30 acquires of distinct locks, then a second acquire of the first lock (which
    # waits behind it: same session, new claim), then the cancel of that second acquire.
    second = acquire(100, "b/order/0", sid, wait=30)
    second.acquire.new_claim = True
    cancel = lock_pb2.SessionRequest(cancel=100)
    await batching.write(*(acquire(10 + i, f"b/order/{i}", sid) for i in range(30)), second, cancel)
    got = await batching.wait_for({10 + i for i in range(30)} | {100})
    tokens = [got[10 + i].acquire.grant.fencing_token for i in range(30)]
    assert all(t > 0 for t in tokens)
    for i in (0, 29):
        state = await stub.Describe(lock_pb2.DescribeRequest(name=f"b/order/{i}"))
        assert [h.fencing_token for h in state.holders] == [tokens[i]]
    # The cancel came after the request it names, in the same message: it found it in flight.
    assert got[100].error.code == grpc.StatusCode.CANCELLED.value[0], got[100]
    state = await stub.Describe(lock_pb2.DescribeRequest(name="b/order/0"))
    assert not state.waiters  # the cancelled acquire left nothing queued


async def test_answers_ready_together_share_a_message(batching: BatchStream) -> None:
    sid = await _session(batching, 1)
    n = 200
    await batching.write(
        *(lock_pb2.SessionRequest(id=10 + i, keepalive=lock_pb2.RefreshRequest(session_id=sid)) for i in range(n))
    )
    got = await batching.wait_for({10 + i for i in range(n)})
    assert all(r.HasField("keepalive") for r in got.values())
    # 200 answers, each once, in fewer messages: what is answered while a write is in flight
    # goes out together (one message each would be 201 with the open's).
    assert batching.messages < n


async def test_bad_batches_are_refused_and_run_nothing(batching: BatchStream, probe: EtcdProbe) -> None:
    sid = await _session(batching, 1)
    before = await snapshot(probe)
    # Too many requests: the whole batch is refused, with the batch's own id.
    too_many = [acquire(1000 + i, f"b/big/{i}", sid) for i in range(MAX_BATCH + 1)]
    await batching.call.write(lock_pb2.SessionRequest(id=7, batch=lock_pb2.SessionRequests(requests=too_many)))
    # Every request is refused under its own id (and the batch under its own), none runs.
    got = await batching.wait_for({7} | {1000 + i for i in range(MAX_BATCH + 1)})
    for answer in got.values():
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
        bad = detail(answer.error, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == ["batch"]
    # A batch in a batch: refused with its id; the requests around it run.
    inner = lock_pb2.SessionRequest(id=21, batch=lock_pb2.SessionRequests(requests=[acquire(22, "b/inner", sid)]))
    keep = lock_pb2.SessionRequest(id=23, keepalive=lock_pb2.RefreshRequest(session_id=sid))
    await batching.write(keep, inner)
    got = await batching.wait_for({21, 23})
    assert got[23].HasField("keepalive")
    assert got[21].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "must not hold a batch" in got[21].error.message
    assert 22 not in batching.answers
    await assert_untouched(probe, before)


def test_queued_answers_become_one_message_and_the_end_waits_its_turn() -> None:
    out: asyncio.Queue[Any] = asyncio.Queue()
    answers = [lock_pb2.SessionResponse(id=i, keepalive=lock_pb2.RefreshResponse()) for i in range(1, 4)]
    for a in answers[1:]:
        out.put_nowait(a)
    failure = RuntimeError("stream failed")
    out.put_nowait(failure)
    out.put_nowait(lock_pb2.SessionResponse(id=9))
    message, held = _answers(answers[0], out)
    assert message.id == 0 and [r.id for r in message.batch.responses] == [1, 2, 3]
    assert held is failure  # sent after the answers before it, never dropped
    assert out.qsize() == 1
    # One answer alone goes as itself; an empty queue holds nothing back.
    single, rest = _answers(out.get_nowait(), out)
    assert single.id == 9 and single.WhichOneof("kind") is None
    assert isinstance(rest, _Nothing)


async def test_the_python_client_keeps_a_batch_of_long_names_under_the_brokers_limit(
    stub: lock_pb2_grpc.LockServiceAsyncStub,
) -> None:
    """990 acquires with names near the longest allowed (1,020 bytes) queue at once: about 1 MiB,
    the broker's message limit. The client's writer splits them; all are granted, none is lost."""
    sid = (await stub.CreateSession(lock_pb2.CreateSessionRequest())).session_id
    stream = SessionStream(stub, ())
    try:
        await stream.request("keepalive", lock_pb2.RefreshRequest(session_id=sid), 10)
        (call,) = stream.streams
        assert call.writer is not None and call.writer.batches
        before = call.writer.messages
        names = [f"b/long/{i:04d}/" + "x" * 1008 for i in range(990)]
        answers = await asyncio.gather(
            *(
                stream.request("acquire", lock_pb2.AcquireRequest(name=n, session_id=sid, request_id=f"long-{i}"), 30)
                for i, n in enumerate(names)
            )
        )
        assert sorted(a.acquire.grant.name for a in answers) == sorted(names)
        assert 4 <= call.writer.messages - before < 990  # split into batches under 256 KiB
    finally:
        await stream.close()
        await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=sid))
