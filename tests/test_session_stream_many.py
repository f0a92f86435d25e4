"""AcquireMany as an `acquire_many` message on a raw Session stream (issue 14 item 1): the grant,
the unary call's errors detail for detail, its wait budget, its audit record, and the session's
events.

tests/test_multilock.py runs the client's AcquireMany tests over both transports; these pin the
wire: what a client in any language sees on the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.config import AuditConfig, Config
from lockbroker.server.core.quota import TenantQuota
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.abuse_util import served
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker, assert_untouched, eventually, lease_of, snapshot, wait_waiters
from tests.test_session_stream import Stream, detail, dur, open_session
from tests.test_shared_validation import _cases
from tests.test_validation import Case

DETAILS_KEY = "grpc-status-details-bin"
SHARED = lock_pb2.LOCK_MODE_SHARED
EXCLUSIVE = lock_pb2.LOCK_MODE_UNSPECIFIED  # unset: exclusive


@pytest.fixture
async def stream(stub: lock_pb2_grpc.LockServiceAsyncStub) -> AsyncIterator[Stream]:
    s = Stream(stub)
    try:
        yield s
    finally:
        s.cancel()


def many(rid: int, sid: str, *locks: str, wait: float = 0, request_id: str = "") -> lock_pb2.SessionRequest:
    """An acquire_many request; a name ending in "+r" is claimed shared (without the suffix)."""
    claims = [
        lock_pb2.LockClaim(name=x.removesuffix("+r"), mode=SHARED if x.endswith("+r") else EXCLUSIVE) for x in locks
    ]
    req = lock_pb2.AcquireManyRequest(locks=claims, session_id=sid, request_id=request_id or f"m{rid}")
    if wait:
        req.wait_timeout.CopyFrom(dur(wait))
    return lock_pb2.SessionRequest(id=rid, acquire_many=req)


async def test_acquire_many_grants_one_token_per_lock(stream: Stream, stub: Any) -> None:
    sid = await open_session(stream, 1)
    got = await stream.ask(many(2, sid, "m/b", "m/a+r", "m/c"))
    assert got.id == 2 and got.HasField("acquire_many"), got
    grants = got.acquire_many.grants
    assert [(g.name, g.mode == SHARED) for g in grants] == [("m/b", False), ("m/a", True), ("m/c", False)]
    assert all(g.session_id == sid and g.fencing_token > 0 for g in grants)
    assert len({g.fencing_token for g in grants}) == 3  # one token per lock
    for g in grants:
        state = await stub.Describe(lock_pb2.DescribeRequest(name=g.name))
        assert [h.fencing_token for h in state.holders] == [g.fencing_token]
    # A retry with the same request_id (on the stream or as the unary call) finds the same claims.
    again = await stream.ask(many(3, sid, "m/b", "m/a+r", "m/c", request_id="m2"))
    assert [g.fencing_token for g in again.acquire_many.grants] == [g.fencing_token for g in grants]
    unary = await stub.AcquireMany(many(0, sid, "m/b", "m/a+r", "m/c", request_id="m2").acquire_many)
    assert [g.fencing_token for g in unary.grants] == [g.fencing_token for g in grants]
    # Each grant is released on its own, on the same stream.
    for i, g in enumerate(grants):
        rel = await stream.ask(
            lock_pb2.SessionRequest(
                id=10 + i, release=lock_pb2.ReleaseRequest(name=g.name, fencing_token=g.fencing_token)
            )
        )
        assert rel.release.released


def _many_cases() -> list[Any]:
    return [p for p in _cases() if p.values[0].rpc == "AcquireMany"]


@pytest.mark.parametrize("case", _many_cases())
async def test_a_bad_acquire_many_gets_the_unary_calls_status_and_touches_nothing(
    stream: Stream, stub: Any, probe: EtcdProbe, track: Tracker, case: Case
) -> None:
    s = await track.session()
    await stub.Acquire(lock_pb2.AcquireRequest(name="ok/name", session_id=s))
    before = await snapshot(probe)
    with pytest.raises(aio.AioRpcError) as ei:
        await stub.AcquireMany(case.request)
    unary = [v for k, v in ei.value.trailing_metadata() or () if k == DETAILS_KEY]
    assert len(unary) == 1 and isinstance(unary[0], bytes), unary
    resp = await stream.ask(lock_pb2.SessionRequest(id=1, acquire_many=case.request))
    assert resp.HasField("error"), resp
    assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = detail(resp.error, error_details_pb2.BadRequest)
    assert bad is not None and [v.field for v in bad.field_violations] == [case.field], bad
    # The same google.rpc.Status as the unary call's trailer: code, message and every detail.
    assert resp.error == lock_pb2.Status.FromString(unary[0])
    await assert_untouched(probe, before)
    # The stream goes on.
    assert (await stream.ask(many(2, s, "ok/other"))).HasField("acquire_many")


async def test_the_default_budget_includes_the_wait(broker: Any, stream: Stream, stub: Any, probe: EtcdProbe) -> None:
    # A message's default deadline is the message timeout plus its wait_timeout, as for an acquire:
    # with a message timeout of 1 s, a 2 s wait is not cut short and ends ABORTED (WAIT_EXPIRED),
    # not DEADLINE_EXCEEDED, with nothing left queued.
    broker.service.sessions.message_timeout = 1.0
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    held = await stream.ask(many(3, a, "w/2"))
    assert held.HasField("acquire_many")
    keys = await probe.keys("/t/default/l/")
    waiting = await stream.send(many(4, b, "w/1", "w/2", wait=2))
    await wait_waiters(stub, "w/2", 1)
    answer = await asyncio.wait_for(waiting, 10)
    assert answer.error.code == grpc.StatusCode.ABORTED.value[0], answer
    assert detail(answer.error, error_details_pb2.ErrorInfo).reason == "WAIT_EXPIRED"

    async def only_the_holder() -> bool:
        return await probe.keys("/t/default/l/") == keys

    await eventually(only_the_holder, 3.0, "w/1 given back and no waiter left on w/2")


async def test_a_session_used_only_by_acquire_many_is_announced_when_it_lapses(
    stream: Stream, stub: Any, probe: EtcdProbe
) -> None:
    # Created as a unary call: the stream knows it only from the acquire_many.
    sid = (await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=dur(10)))).session_id
    assert (await stream.ask(many(1, sid, "e/1", "e/2"))).HasField("acquire_many")
    await probe.revoke(lease_of(sid))
    gone = await stream.ask(lock_pb2.SessionRequest(id=2, keepalive=lock_pb2.RefreshRequest(session_id=sid)))
    assert gone.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    await asyncio.sleep(0.1)
    assert [(e.session_id, e.kind) for e in stream.events] == [(sid, lock_pb2.SessionEvent.KIND_EXPIRED)]


async def test_acquire_many_message_has_its_audit_record(etcd: Any, key_root: str, tmp_path: Any) -> None:
    log = tmp_path / "audit.jsonl"
    base = broker_config(etcd.endpoint, key_root)
    sections = {f: getattr(base, f) for f in base.__dataclass_fields__}
    broker = Broker(Config(**{**sections, "audit": AuditConfig(file=str(log))}))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            s = Stream(lock_pb2_grpc.LockServiceStub(ch))
            sid = await open_session(s, 1)
            got = await s.ask(many(2, sid, "au/b", "au/a", request_id="req-many"))
            assert got.HasField("acquire_many"), got
            await s.call.done_writing()
            await asyncio.wait_for(s._reader, 5)
        await asyncio.sleep(0.2)
    finally:
        await broker.stop(grace=1.0)
    everything = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [r for r in everything if r["method"] == "/lockbroker.v1.LockService/Session/AcquireMany"]
    # A mutating call: RequestReceived, then ResponseComplete, as for the unary AcquireMany.
    assert [r["stage"] for r in mine] == ["RequestReceived", "ResponseComplete"], mine
    done = mine[1]
    assert done["requestId"] == "req-many" and done["outcome"]["code"] == "OK"
    assert done["lock"] == "au/b,au/a"


async def test_acquire_many_messages_spend_the_acquire_rate(tmp_path: Any) -> None:
    # Charged like the unary AcquireMany (and an acquire message): one token of the tenant's
    # acquire bucket per message. Burst 2, almost no refill: the third and later are refused.
    async with served(tmp_path, quota=TenantQuota(acquire_rate=0.01, acquire_burst=2)) as s:
        st = Stream(s.stub, s.md("flood"))
        try:
            sid = await open_session(st, 1)
            answers = [await st.ask(many(10 + i, sid, f"rate/{i}", f"rate/{i}x")) for i in range(5)]
        finally:
            st.cancel()
    assert [a.HasField("acquire_many") for a in answers] == [True, True, False, False, False], answers
    for a in answers[2:]:
        assert a.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], a
        assert detail(a.error, error_details_pb2.ErrorInfo).reason == "RATE_LIMITED"
        failure = detail(a.error, error_details_pb2.QuotaFailure)
        assert [v.quota_id for v in failure.violations] == ["acquire_rate"]
        assert detail(a.error, error_details_pb2.RetryInfo) is not None
