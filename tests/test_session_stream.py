"""The Session stream on the wire (raw stubs): answers matched by id, concurrency, lifetime, errors.

The semantics of each message are the unary RPCs' (tests/client/ runs the client's suite over
both transports); these tests pin what only a stream has.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockbroker.interceptors.base import PinnedContext
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuditConfig, AuthConfig, Config
from lockbroker.server.telemetry import tracing_for
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import eventually, lease_of, lock_keys, wait_waiters


def dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class Stream:
    """One Session call: send requests, await answers by id, collect events."""

    def __init__(self, stub: lock_pb2_grpc.LockServiceAsyncStub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.call: Any = stub.Session(metadata=metadata)
        self.answers: dict[int, asyncio.Future[lock_pb2.SessionResponse]] = {}
        self.events: list[lock_pb2.SessionEvent] = []
        self.order: list[int] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for resp in self.call:
            if resp.id == 0 and resp.HasField("event"):
                self.events.append(resp.event)
                continue
            self.order.append(resp.id)
            self.answers.setdefault(resp.id, asyncio.get_running_loop().create_future()).set_result(resp)

    async def send(self, req: lock_pb2.SessionRequest) -> asyncio.Future[lock_pb2.SessionResponse]:
        fut = self.answers.setdefault(req.id, asyncio.get_running_loop().create_future())
        await self.call.write(req)
        return fut

    async def ask(self, req: lock_pb2.SessionRequest, timeout: float = 10) -> lock_pb2.SessionResponse:
        return await asyncio.wait_for(await self.send(req), timeout)

    def cancel(self) -> None:
        self.call.cancel()
        self._reader.cancel()


@pytest.fixture
async def stream(stub: lock_pb2_grpc.LockServiceAsyncStub) -> AsyncIterator[Stream]:
    s = Stream(stub)
    try:
        yield s
    finally:
        s.cancel()


async def open_session(s: Stream, rid: int, ttl: float = 10) -> str:
    resp = await s.ask(
        lock_pb2.SessionRequest(id=rid, open=lock_pb2.OpenSession(create=lock_pb2.CreateSessionRequest(ttl=dur(ttl))))
    )
    assert resp.HasField("open"), resp
    return resp.open.session_id


def acquire(rid: int, name: str, sid: str, wait: float = 0, request_id: str = "") -> lock_pb2.SessionRequest:
    req = lock_pb2.AcquireRequest(name=name, session_id=sid, request_id=request_id or f"r{rid}")
    if wait:
        req.wait_timeout.CopyFrom(dur(wait))
    return lock_pb2.SessionRequest(id=rid, acquire=req)


def detail(status: lock_pb2.Status, cls: Any) -> Any:
    # lock_pb2.Status is google.rpc.Status on the wire.
    rpc = status_pb2.Status.FromString(status.SerializeToString())
    for d in rpc.details:
        if d.Is(cls.DESCRIPTOR):
            out = cls()
            d.Unpack(out)
            return out
    return None


async def test_acquire_release_and_errors_as_the_unary_rpc(stream: Stream) -> None:
    sid = await open_session(stream, 1)
    got = await stream.ask(acquire(2, "a/1", sid))
    assert got.id == 2 and got.acquire.grant.fencing_token > 0
    # A second try-lock of the held lock: ABORTED LOCK_HELD with NotAcquired, as Acquire gives.
    other = await open_session(stream, 3)
    held = await stream.ask(acquire(4, "a/1", other))
    assert held.error.code == grpc.StatusCode.ABORTED.value[0]
    info = detail(held.error, error_details_pb2.ErrorInfo)
    assert info.reason == "LOCK_HELD" and info.domain == "lockbroker"
    assert detail(held.error, lock_pb2.NotAcquired).holder.session_id == sid
    rel = await stream.ask(
        lock_pb2.SessionRequest(
            id=5, release=lock_pb2.ReleaseRequest(name="a/1", fencing_token=got.acquire.grant.fencing_token)
        )
    )
    assert rel.release.released
    ka = await stream.ask(lock_pb2.SessionRequest(id=6, keepalive=lock_pb2.RefreshRequest(session_id=sid)))
    assert ka.keepalive.ttl.seconds > 0
    closed = await stream.ask(lock_pb2.SessionRequest(id=7, close=lock_pb2.CloseSessionRequest(session_id=sid)))
    assert closed.close.closed


async def test_bad_messages_get_invalid_argument_with_bad_request(stream: Stream) -> None:
    sid = await open_session(stream, 1)
    cases = [
        (lock_pb2.SessionRequest(id=2), "kind"),  # no operation
        (lock_pb2.SessionRequest(id=3, open=lock_pb2.OpenSession()), "open"),
        (acquire(4, "", sid), "name"),  # the unary validation, field for field
        (lock_pb2.SessionRequest(acquire=lock_pb2.AcquireRequest(name="x", session_id=sid)), "id"),  # id 0
    ]
    for req, field in cases:
        resp = await stream.ask(req)
        assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], resp
        bad = detail(resp.error, error_details_pb2.BadRequest)
        assert bad is not None and field in [v.field for v in bad.field_violations], (field, bad)
    # the stream survived every one of them
    assert (await stream.ask(acquire(9, "ok", sid))).HasField("acquire")


async def test_blocked_acquire_does_not_stall_a_release_and_answers_come_by_id(stream: Stream) -> None:
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    first = await stream.ask(acquire(3, "q", a))
    waiting = await stream.send(acquire(4, "q", b, wait=10))  # queues behind `a`
    await asyncio.sleep(0.2)
    assert not waiting.done()
    # Sent after the waiting acquire, answered before it: by id, not by order.
    rel = await stream.ask(
        lock_pb2.SessionRequest(
            id=5, release=lock_pb2.ReleaseRequest(name="q", fencing_token=first.acquire.grant.fencing_token)
        )
    )
    assert rel.release.released
    granted = await asyncio.wait_for(waiting, 10)
    assert granted.acquire.grant.session_id == b
    assert stream.order.index(5) < stream.order.index(4)


async def test_duplicate_id_in_flight_is_refused(stream: Stream) -> None:
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    await stream.ask(acquire(3, "d", a))
    waiting = await stream.send(acquire(4, "d", b, wait=10))
    await asyncio.sleep(0.1)
    dup = await asyncio.wait_for(stream.call.write(acquire(4, "e", b)), 5)
    assert dup is None
    await asyncio.sleep(0.2)
    # The refusal of the duplicate is the first answer with id 4; the waiting one is still waiting.
    first = waiting.result() if waiting.done() else None
    assert first is not None and first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_stream_break_keeps_the_session_and_resume_works(stub: Any, probe: EtcdProbe) -> None:
    s1 = Stream(stub)
    sid = await open_session(s1, 1, ttl=10)
    grant = (await s1.ask(acquire(2, "keep", sid))).acquire.grant
    s1.cancel()
    await asyncio.sleep(0.3)
    s2 = Stream(stub)
    try:
        resumed = await s2.ask(lock_pb2.SessionRequest(id=1, open=lock_pb2.OpenSession(resume=sid)))
        assert resumed.open.session_id == sid and resumed.open.ttl.seconds > 0
        # The grant made on the first stream still stands.
        rel = await s2.ask(
            lock_pb2.SessionRequest(
                id=2, release=lock_pb2.ReleaseRequest(name="keep", fencing_token=grant.fencing_token)
            )
        )
        assert rel.release.released
        # An unknown session cannot be resumed.
        gone = await s2.ask(lock_pb2.SessionRequest(id=3, open=lock_pb2.OpenSession(resume="00000000000000ff")))
        assert gone.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        s2.cancel()


async def test_cancelled_stream_leaves_no_queued_acquire(stub: Any, probe: EtcdProbe) -> None:
    s = Stream(stub)
    a, b = await open_session(s, 1), await open_session(s, 2)
    await s.ask(acquire(3, "c", a))
    holder_keys = await lock_keys(probe, "c")
    await s.send(acquire(4, "c", b, wait=30))
    await wait_waiters(stub, "c", 1)
    s.cancel()

    async def only_holder() -> bool:
        return await lock_keys(probe, "c") == holder_keys

    # As a cancelled unary Acquire: the waiter's entry goes, the holder's grant (its session
    # outlives the stream) stays.
    await eventually(only_holder, 3.0, "the cancelled stream's waiter key is removed")
    assert list((await stub.Describe(lock_pb2.DescribeRequest(name="c"))).waiters) == []


async def test_in_flight_bound_is_resource_exhausted(broker: Any, stub: Any) -> None:
    broker.service.sessions.max_in_flight = 2
    s = Stream(stub)
    try:
        a, b = await open_session(s, 1), await open_session(s, 2)
        await s.ask(acquire(3, "f", a))
        await s.ask(acquire(8, "h", a))  # held, so w3 below waits (on a free lock it could be granted first)
        w1 = await s.send(acquire(4, "f", b, wait=10))
        w2 = await s.send(acquire(5, "g", b, wait=0.0))
        await w2
        w3 = await s.send(acquire(6, "h", b, wait=10))
        w4 = await s.send(acquire(7, "i", b, wait=10))
        over = await asyncio.wait_for(w4, 5)
        assert over.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        info = detail(over.error, error_details_pb2.ErrorInfo)
        assert info.reason == "QUOTA_EXCEEDED" and info.metadata["limit"] == "stream_in_flight"
        assert not w1.done() and not w3.done()
    finally:
        s.cancel()


async def test_unimplemented_server_says_unimplemented() -> None:
    # What the client's fallback keys on: a server without Session answers UNIMPLEMENTED.
    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call: Any = lock_pb2_grpc.LockServiceStub(ch).Session()
            with pytest.raises(aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


# -- the chain: audit and tracing per message ----------------------------------------------------


async def test_audit_record_and_server_span_per_message(etcd: Any, key_root: str, tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tfile = tmp_path / "tenants.toml"
    key = tenants.add_tenant(tfile, "acme")
    log = tmp_path / "audit.jsonl"
    base = broker_config(etcd.endpoint, key_root)
    sections = {f: getattr(base, f) for f in base.__dataclass_fields__}
    cfg = Config(**{**sections, "auth": AuthConfig(str(tfile)), "audit": AuditConfig(file=str(log))})
    broker = Broker(cfg, tracing=tracing_for(provider, {}))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            s = Stream(stub, (("x-api-key", key),))
            sid = await open_session(s, 1)
            g = await s.ask(acquire(2, "t/1", sid, request_id="req-2"))
            held = await s.ask(acquire(3, "t/1", sid, request_id="req-3"))  # ALREADY_QUEUED: same session
            assert held.HasField("error")
            await s.ask(
                lock_pb2.SessionRequest(
                    id=4, release=lock_pb2.ReleaseRequest(name="t/1", fencing_token=g.acquire.grant.fencing_token)
                )
            )
            await s.ask(lock_pb2.SessionRequest(id=5, close=lock_pb2.CloseSessionRequest(session_id=sid)))
            await s.call.done_writing()
            await asyncio.wait_for(s._reader, 5)
            # A bad key: the stream is refused once, with no record per message.
            bad = stub.Session(metadata=(("x-api-key", "nope"),))
            with pytest.raises(aio.AioRpcError) as e:
                await bad.read()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await asyncio.sleep(0.2)
    finally:
        await broker.stop(grace=1.0)

    everything = [json.loads(line) for line in log.read_text().splitlines()]
    # As for unary calls (docs/audit.md, "Stages"): one ResponseComplete record per message, and a
    # RequestReceived one before it for each (they all change state), named by the completion.
    records = [r for r in everything if r["stage"] == "ResponseComplete"]
    received = {r["auditId"]: r for r in everything if r["stage"] == "RequestReceived"}
    assert sorted(r["method"].rsplit("/", 1)[1] for r in received.values()) == [
        "Acquire",
        "Acquire",
        "Close",
        "Open",
        "Release",
    ]
    assert set(received) == {r["requestAuditId"] for r in records if r["requestAuditId"]}
    methods = [r["method"].removeprefix("/lockbroker.v1.LockService/") for r in records]
    per_message = [m for m in methods if m.startswith("Session/")]
    assert per_message == ["Session/Open", "Session/Acquire", "Session/Acquire", "Session/Release", "Session/Close"]
    assert methods.count("Session") == 2  # the stream's own record, and the refused stream's
    by_request = {r["requestId"]: r for r in records if r["requestId"]}
    grant = by_request["req-2"]
    assert grant["tenant"] == "acme" and grant["fencingToken"] == str(g.acquire.grant.fencing_token)
    assert grant["outcome"]["code"] == "OK" and grant["lock"] == "t/1"
    refused = by_request["req-3"]
    assert refused["outcome"]["code"] == "FAILED_PRECONDITION" and refused["outcome"]["reason"] == "ALREADY_QUEUED"

    spans = [sp for sp in exporter.get_finished_spans() if sp.name.startswith("lockbroker.v1.LockService/Session/")]
    names = sorted(sp.name.rsplit("/", 1)[1] for sp in spans)
    assert names == ["Acquire", "Acquire", "Close", "Open", "Release"]
    span = next(sp for sp in spans if sp.attributes and sp.attributes.get("lockbroker.request_id") == "req-2")
    attrs = dict(span.attributes or {})
    assert attrs["lockbroker.tenant"] == "acme"
    assert attrs["lockbroker.fencing_token"] == g.acquire.grant.fencing_token
    assert attrs["lockbroker.lock.name"] == "t/1"
    # The audit record names the message's own trace.
    assert grant["traceId"] == format(span.context.trace_id, "032x")
    failed = next(sp for sp in spans if sp.attributes and sp.attributes.get("lockbroker.request_id") == "req-3")
    assert (failed.attributes or {})["lockbroker.error.reason"] == "ALREADY_QUEUED"


async def test_a_lapsed_session_is_announced_once(stream: Stream, probe: EtcdProbe) -> None:
    sid = await open_session(stream, 1)
    await probe.revoke(lease_of(sid))  # the lease ends behind the stream's back
    gone = await stream.ask(lock_pb2.SessionRequest(id=2, keepalive=lock_pb2.RefreshRequest(session_id=sid)))
    assert gone.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    again = await stream.ask(lock_pb2.SessionRequest(id=3, keepalive=lock_pb2.RefreshRequest(session_id=sid)))
    assert again.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    await asyncio.sleep(0.1)
    assert [(e.session_id, e.kind) for e in stream.events] == [(sid, lock_pb2.SessionEvent.KIND_EXPIRED)]


async def test_cancel_message_stops_a_waiting_acquire(stream: Stream, stub: Any, probe: EtcdProbe) -> None:
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    await stream.ask(acquire(3, "x", a))
    holder_keys = await lock_keys(probe, "x")
    waiting = await stream.send(acquire(4, "x", b, wait=30))
    await wait_waiters(stub, "x", 1)
    await stream.call.write(lock_pb2.SessionRequest(cancel=4))
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.error.code == grpc.StatusCode.CANCELLED.value[0]

    async def only_holder() -> bool:
        return await lock_keys(probe, "x") == holder_keys

    await eventually(only_holder, 3.0, "the cancelled request's waiter key is removed")
    # the stream goes on
    assert (await stream.ask(acquire(5, "y", b))).HasField("acquire")


def test_pinned_context_never_reads_the_callers_facts_from_grpc_again() -> None:
    """A stream wrapper's clean-up may run after the call is gone; reading `peer()` of a finished
    call crashed cygrpc. PinnedContext reads peer, metadata and auth context once, up front."""

    class Finishing:
        done = False

        def peer(self) -> str:
            assert not self.done, "peer() of a finished call"
            return "ipv4:127.0.0.1:1"

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            assert not self.done, "invocation_metadata() of a finished call"
            return (("user-agent", "t"),)

        def auth_context(self) -> dict[str, list[bytes]]:
            assert not self.done, "auth_context() of a finished call"
            return {}

        def code(self) -> None:
            return None

    grpc_context = Finishing()
    pinned: Any = PinnedContext(grpc_context)  # type: ignore[arg-type]
    grpc_context.done = True
    assert pinned.peer() == "ipv4:127.0.0.1:1"
    assert pinned.invocation_metadata() == (("user-agent", "t"),)
    assert pinned.auth_context() == {}
    assert pinned.code() is None  # everything else still goes to grpc's context


async def test_draining_ends_the_stream_with_shutting_down(etcd: Any, key_root: str, probe: EtcdProbe) -> None:
    b = Broker(broker_config(etcd.endpoint, key_root))
    await b.start()
    stopped = False
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            s = Stream(stub)
            a, c = await open_session(s, 1), await open_session(s, 2)
            await s.ask(acquire(3, "drain", a))
            waiting = await s.send(acquire(4, "drain", c, wait=30))
            await wait_waiters(stub, "drain", 1)
            holder_keys = [k for k in await lock_keys(probe, "drain") if a.encode() in k]
            await b.stop(grace=2.0)
            stopped = True
            with pytest.raises(aio.AioRpcError) as e:
                await asyncio.wait_for(s._reader, 10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            rpc = status_pb2.Status.FromString(dict(e.value.trailing_metadata())["grpc-status-details-bin"])
            info = error_details_pb2.ErrorInfo()
            rpc.details[0].Unpack(info)
            assert info.reason == "SHUTTING_DOWN"
            assert not waiting.done()  # never answered: the client retries it elsewhere by request_id
        # The waiter's entry is gone; the holder's grant stays with its session.
        assert await lock_keys(probe, "drain") == holder_keys
    finally:
        if not stopped:
            await b.stop(grace=0.5)


async def test_a_message_timeout_bounds_a_waiting_acquire(stream: Stream, stub: Any, probe: EtcdProbe) -> None:
    # A request's `timeout` is its unary deadline: the wait ends by it, DEADLINE_EXCEEDED, and the
    # waiter's entry goes, although wait_timeout (30 s) and the default budget are far longer.
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    await stream.ask(acquire(3, "t", a))
    holder_keys = await lock_keys(probe, "t")
    req = acquire(4, "t", b, wait=30)
    req.timeout.CopyFrom(dur(0.5))
    answer = await stream.ask(req, timeout=5)
    assert answer.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], answer

    async def only_holder() -> bool:
        return await lock_keys(probe, "t") == holder_keys

    await eventually(only_holder, 3.0, "the expired request's waiter key is removed")
    assert (await stream.ask(acquire(5, "u", b))).HasField("acquire")


async def test_past_its_timeout_a_stuck_message_is_cancelled_and_answered(broker: Any, stub: Any) -> None:
    # Whatever a message's layers do, past its timeout the broker cancels it and answers
    # DEADLINE_EXCEEDED (grpc does this for a unary call); the stream goes on.
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: Any, context: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    broker.service.Refresh = stuck
    s = Stream(stub)
    try:
        req = lock_pb2.SessionRequest(id=1, keepalive=lock_pb2.RefreshRequest(session_id="x"), timeout=dur(0.3))
        answer = await s.ask(req, timeout=5)
        assert started.is_set() and cancelled.is_set()
        assert answer.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], answer
        assert detail(answer.error, error_details_pb2.ErrorInfo).reason == "DEADLINE_EXCEEDED"
        assert (await s.ask(lock_pb2.SessionRequest(id=2))).error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    finally:
        s.cancel()


async def test_a_negative_timeout_is_invalid_argument(stream: Stream) -> None:
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    req = acquire(3, "n", a)
    req.timeout.CopyFrom(duration_pb2.Duration(seconds=-1))
    resp = await stream.ask(req)
    assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], resp
    bad = detail(resp.error, error_details_pb2.BadRequest)
    assert bad is not None and [v.field for v in bad.field_violations] == ["timeout"]
    # The refused request ran nothing: another session's try-lock of its lock succeeds.
    assert (await stream.ask(acquire(4, "n", b))).HasField("acquire")


async def test_a_zero_timeout_means_the_default_budget(stream: Stream) -> None:
    # Zero reads the same as unset on the wire: the default budget, not "already expired".
    a, b = await open_session(stream, 1), await open_session(stream, 2)
    await stream.ask(acquire(3, "z", a))
    req = acquire(4, "z", b, wait=0.3)
    req.timeout.CopyFrom(duration_pb2.Duration())
    answer = await stream.ask(req, timeout=5)
    # The wait ran out (WAIT_EXPIRED), not the message's deadline.
    assert answer.error.code == grpc.StatusCode.ABORTED.value[0], answer
    assert detail(answer.error, error_details_pb2.ErrorInfo).reason == "WAIT_EXPIRED"
