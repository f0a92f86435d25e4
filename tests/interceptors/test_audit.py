"""The audit interceptor on real grpc.aio servers (127.0.0.1): one record per RPC, whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lockbroker.interceptors.audit import (
    AUDIT_UNAVAILABLE,
    DEFAULT_PROCESSORS,
    SCHEMA,
    AuditInterceptor,
    AuditLog,
    AuditWriteError,
    FileSink,
    Record,
    add_fields,
    redact_secrets,
)
from lockbroker.interceptors.audit._interceptor import _AuditIds, _UtcStamp
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import Context
from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.server import status
from lockbroker.server.auth.tenants import add_tenant, load
from lockbroker.server.core.errors import FieldViolation, InvalidArgument, Unavailable
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

LOCK = "/lockbroker.v1.LockService/"


class Scripted(lock_pb2_grpc.LockServiceServicer):
    """A LockService whose Acquire does what the request's `owner` says."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Context) -> lock_pb2.AcquireResponse:
        self._count("Acquire")
        mode = request.owner
        if mode == "invalid":
            await context.abort(*status.to_status(InvalidArgument([FieldViolation("name", "must not be empty")])))
        if mode == "unavailable":
            await context.abort(*status.to_status(Unavailable("etcd did not answer")))
        if mode == "slow":
            await asyncio.sleep(30)
        if mode == "boom":
            raise RuntimeError("kaboom: internal detail")
        if mode == "echo-key":
            key = dict(context.invocation_metadata() or ()).get("x-api-key", "")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a careless handler echoing {key!s}")
        return lock_pb2.AcquireResponse(
            grant=lock_pb2.Grant(
                name=request.name, fencing_token=42, session_id=request.session_id, request_id=request.request_id
            ),
            waited=duration_pb2.Duration(seconds=1, nanos=500_000_000),
            queue_position=2,
        )

    async def Release(self, request: lock_pb2.ReleaseRequest, context: Context) -> lock_pb2.ReleaseResponse:
        self._count("Release")
        return lock_pb2.ReleaseResponse(released=True)

    async def CreateSession(
        self, request: lock_pb2.CreateSessionRequest, context: Context
    ) -> lock_pb2.CreateSessionResponse:
        self._count("CreateSession")
        return lock_pb2.CreateSessionResponse(session_id="s-new")

    async def Describe(self, request: lock_pb2.DescribeRequest, context: Context) -> lock_pb2.DescribeResponse:
        self._count("Describe")
        return lock_pb2.DescribeResponse(name=request.name)

    async def KeepAlive(
        self, request_iterator: AsyncIterator[lock_pb2.KeepAliveRequest], context: Context
    ) -> AsyncIterator[lock_pb2.KeepAliveResponse]:
        self._count("KeepAlive")
        async for req in request_iterator:
            yield lock_pb2.KeepAliveResponse(session_id=req.session_id)


@dataclass
class Server:
    port: int
    servicer: Scripted
    key: str = ""
    extra: list[Any] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(interceptors: Sequence[aio.ServerInterceptor], key: str = "") -> AsyncIterator[Server]:
    server = aio.server(interceptors=list(interceptors))
    # The generated stubs mark every servicer method abstract; the runtime base answers UNIMPLEMENTED.
    servicer = Scripted()  # type: ignore[abstract]
    lock_pb2_grpc.add_LockServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Server(port, servicer, key)
    finally:
        await server.stop(None)
        # The chain's audit logs: an unclosed one's idle writer task is collected later, still
        # pending, in whichever test runs then ("Task was destroyed but it is pending!").
        for interceptor in interceptors:
            if isinstance(interceptor, AuditInterceptor):
                await interceptor.log.close()


@pytest.fixture(scope="module")
def api_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, IdentityInterceptor]:
    path = tmp_path_factory.mktemp("audit-tenants") / "tenants.toml"
    key = add_tenant(path, "acme")
    identity = IdentityInterceptor.from_registry(load(path))
    assert identity is not None
    return key, identity


def chain(audit: AuditInterceptor, identity: IdentityInterceptor, staged: bool = False) -> list[aio.ServerInterceptor]:
    """The broker's order; `staged` adds the request stage last, as the broker does."""
    return [audit, identity, audit.request_stage] if staged else [audit, identity]


def stub(channel: aio.Channel) -> lock_pb2_grpc.LockServiceAsyncStub:
    return lock_pb2_grpc.LockServiceStub(channel)


def rich(err: aio.AioRpcError) -> tuple[str, float | None]:
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes)
    st = status_pb2.Status.FromString(raw)
    reason, delay = "", None
    for d in st.details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, delay


async def until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def outcome_of(coro: Any) -> grpc.StatusCode:
    try:
        await coro
    except aio.AioRpcError as e:
        return e.code()
    except asyncio.CancelledError:  # awaiting a call this side cancelled
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_exactly_one_record_per_rpc_whatever_the_outcome(
    api_key: tuple[str, IdentityInterceptor], tmp_path: Path, staged: bool
):
    """One ResponseComplete record per RPC; with the request stage, also one RequestReceived
    record per mutating unary call whose handler ran (the schema's deliberate addition)."""
    key, identity = api_key
    memory = MemorySink()
    path = tmp_path / "audit.jsonl"
    log = AuditLog([memory, FileSink(path, fsync="always")])
    audit = AuditInterceptor(log)
    md = (("x-api-key", key),)
    async with (
        serving(chain(audit, identity, staged)) as srv,
        aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch,
    ):
        s = stub(ch)

        def acquire(owner: str, **kw: Any) -> Any:
            req = lock_pb2.AcquireRequest(name="jobs/nightly", session_id="s-1", owner=owner, request_id=f"r-{owner}")
            return s.Acquire(req, metadata=md, **kw)

        codes = [
            await outcome_of(acquire("ok")),
            await outcome_of(acquire("invalid")),
            await outcome_of(acquire("unavailable")),
            await outcome_of(acquire("boom")),
            await outcome_of(acquire("echo-key")),
            await outcome_of(acquire("slow", timeout=0.3)),
            await outcome_of(s.Release(lock_pb2.ReleaseRequest(name="jobs/nightly", fencing_token=7), metadata=md)),
            await outcome_of(s.Describe(lock_pb2.DescribeRequest(name="jobs/nightly"))),  # no key
        ]
        cancelled = acquire("slow")
        await until(lambda: srv.servicer.calls.get("Acquire", 0) == 7)
        cancelled.cancel()
        codes.append(await outcome_of(cancelled))

        async def beats() -> AsyncIterator[lock_pb2.KeepAliveRequest]:
            for _ in range(3):
                yield lock_pb2.KeepAliveRequest(session_id="s-1")

        replies = [r async for r in s.KeepAlive(beats(), metadata=md)]
        assert len(replies) == 3
        codes.append(grpc.StatusCode.OK)
        unknown: aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/lockbroker.v1.LockService/Steal")
        codes.append(await outcome_of(unknown(b"", metadata=md)))
        # Health checks are not lock operations: not recorded (include_open_services=False).
        health = health_pb2_grpc.HealthStub(ch)
        await health.Check(health_pb2.HealthCheckRequest())

        n = len(codes)
        # Acquire x7 (ok, invalid, unavailable, boom, echo-key, slow, cancelled) and Release ran
        # their handlers; the unauthenticated Describe, KeepAlive (a stream) and Steal did not get one.
        received = 8 if staged else 0
        await until(lambda: len(memory.lines) >= n + received)
        await asyncio.sleep(0.3)  # nothing else may trickle in
    await log.close()

    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OK,
        grpc.StatusCode.UNIMPLEMENTED,
    ]
    everything = memory.records()
    records = [r for r in everything if r["stage"] == "ResponseComplete"]
    assert len(records) == n
    requests = [r for r in everything if r["stage"] == "RequestReceived"]
    assert len(requests) == received
    # The file holds exactly the same lines, each a complete JSON document.
    assert path.read_bytes() == b"".join(memory.lines)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    by_owner = {r["requestId"]: r for r in records if r["requestId"]}
    ok = by_owner["r-ok"]
    key_id = key.split("_")[1]
    assert ok == {
        "schema": SCHEMA,
        "time": ok["time"],
        "auditId": ok["auditId"],
        "stage": "ResponseComplete",
        "requestAuditId": ok["requestAuditId"],
        "tenant": "acme",
        "principal": {"kind": "api-key", "id": key_id},
        "credential": None,  # only for calls whose authentication failed
        "sourceAddress": ok["sourceAddress"],
        "userAgent": ok["userAgent"],
        "method": LOCK + "Acquire",
        "lock": "jobs/nightly",
        "session": "s-1",
        "fencingToken": "42",
        "requestId": "r-ok",
        "outcome": {"code": "OK", "reason": None, "message": None},
        "durationMs": ok["durationMs"],
        "retryAttempts": 0,
        "traceId": None,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ok["time"])
    assert datetime.fromisoformat(ok["time"]).utcoffset() is not None
    assert ok["sourceAddress"].startswith("ipv4:127.0.0.1:")
    assert "grpc-python" in ok["userAgent"]
    assert ok["durationMs"] >= 0
    assert len({r["auditId"] for r in everything}) == n + received
    if staged:
        # Each RequestReceived record precedes its ResponseComplete one and says who asked what,
        # with no outcome yet; the ResponseComplete record points back at it.
        (ok_request,) = [r for r in requests if r["requestId"] == "r-ok"]
        assert ok["requestAuditId"] == ok_request["auditId"]
        assert everything.index(ok_request) < everything.index(ok)
        assert ok_request == {
            **ok,
            "auditId": ok_request["auditId"],
            "stage": "RequestReceived",
            "requestAuditId": None,
            "fencingToken": None,  # the grant's token is in the response, not known yet
            "outcome": None,
            "durationMs": None,
            "retryAttempts": None,
        }
        assert {r["auditId"] for r in requests} == {r["requestAuditId"] for r in records if r["requestAuditId"]}
    else:
        assert ok["requestAuditId"] is None

    assert by_owner["r-invalid"]["outcome"]["code"] == "INVALID_ARGUMENT"
    assert by_owner["r-invalid"]["outcome"]["reason"] == "INVALID_ARGUMENT"
    assert by_owner["r-invalid"]["fencingToken"] is None
    assert by_owner["r-unavailable"]["outcome"] == {
        "code": "UNAVAILABLE",
        "reason": "BACKEND_UNAVAILABLE",
        "message": "etcd did not answer",
    }
    # An unhandled exception: grpc answers UNKNOWN; the record names the type, never the text.
    assert by_owner["r-boom"]["outcome"] == {"code": "UNKNOWN", "reason": None, "message": "unhandled RuntimeError"}
    assert by_owner["r-slow"]["outcome"]["code"] in {"DEADLINE_EXCEEDED", "CANCELLED"}
    slow = [r for r in records if r["requestId"] == "r-slow"]
    assert sorted(r["outcome"]["code"] for r in slow) == ["CANCELLED", "DEADLINE_EXCEEDED"]

    release = next(r for r in records if r["method"] == LOCK + "Release")
    assert (release["fencingToken"], release["lock"], release["outcome"]["code"]) == ("7", "jobs/nightly", "OK")

    unauth = next(r for r in records if r["method"] == LOCK + "Describe")
    assert unauth["outcome"]["code"] == "UNAUTHENTICATED"
    assert (unauth["principal"], unauth["tenant"]) == (None, None)  # never blamed on the default tenant
    assert unauth["credential"] is None  # it presented nothing
    assert unauth["lock"] is None  # a stranger's request fields are not copied (issue 18, item 5)

    keepalive = next(r for r in records if r["method"] == LOCK + "KeepAlive")
    assert keepalive["stream"] == {"received": 3, "sent": 3, "sessions": ["s-1"]}
    assert (keepalive["session"], keepalive["outcome"]["code"], keepalive["tenant"]) == ("s-1", "OK", "acme")

    steal = next(r for r in records if r["method"] == LOCK + "Steal")
    assert steal["outcome"]["code"] == "UNIMPLEMENTED"
    assert (steal["principal"], steal["tenant"]) == (None, None)  # no identity check ran for it

    # No credential anywhere: not the key, not its secret part, even when a handler echoed it.
    text = path.read_text()
    assert key not in text
    # The secret is everything after "lbk_<id>_" (it may hold "_" itself: token_urlsafe).
    assert key.split("_", 2)[2] not in text
    assert "[REDACTED]" in by_owner["r-echo-key"]["outcome"]["message"]
    assert "kaboom" not in text


async def test_records_are_processed_by_the_pipeline(api_key: tuple[str, IdentityInterceptor]):
    key, identity = api_key
    memory = MemorySink()

    def drop_user_agent(record: Record) -> Record:
        return {k: v for k, v in record.items() if k != "userAgent"}

    log = AuditLog([memory], [redact_secrets, add_fields(cluster="eu-1"), drop_user_agent])
    async with (
        serving(chain(AuditInterceptor(log), identity)) as srv,
        aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch,
    ):
        await stub(ch).Describe(lock_pb2.DescribeRequest(name="a"), metadata=(("x-api-key", key),))
    (record,) = memory.records()
    assert record["cluster"] == "eu-1"
    assert "userAgent" not in record
    assert not any(k.startswith("_") for k in record)
    await log.close()


# --- when the audit log cannot be written ---------------------------------------------------------


async def _acquire(port: int, key: str, owner: str = "ok") -> Any:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        req = lock_pb2.AcquireRequest(name="a", session_id="s-1", owner=owner, request_id="r-1")
        return await stub(ch).Acquire(req, metadata=(("x-api-key", key),), timeout=10)


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_mutating_call_fails_unavailable_when_the_record_cannot_be_written(
    api_key: tuple[str, IdentityInterceptor], staged: bool
):
    key, identity = api_key
    sink = MemorySink(fail=True)  # ready, but every write fails: the grant was made, the record not
    async with serving(chain(AuditInterceptor(AuditLog([sink])), identity, staged)) as srv:
        with pytest.raises(aio.AioRpcError) as err:
            await _acquire(srv.port, key)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rich(err.value) == (AUDIT_UNAVAILABLE, 1.0)
        assert srv.servicer.calls["Acquire"] == 1
        # Reads are answered: nobody has to trust a Describe to be in the log.
        async with aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            resp = await stub(ch).Describe(lock_pb2.DescribeRequest(name="a"), metadata=(("x-api-key", key),))
        assert resp.name == "a"


async def test_unhealthy_sink_refuses_mutating_calls_before_the_handler_runs(
    api_key: tuple[str, IdentityInterceptor],
):
    key, identity = api_key
    sink = MemorySink(ready=False)
    async with serving(chain(AuditInterceptor(AuditLog([sink])), identity)) as srv:
        with pytest.raises(aio.AioRpcError) as err:
            await _acquire(srv.port, key)
        assert (err.value.code(), rich(err.value)[0]) == (grpc.StatusCode.UNAVAILABLE, AUDIT_UNAVAILABLE)
        assert "Acquire" not in srv.servicer.calls  # refused early: no grant exists

        # The stream is refused before the handler reads anything, so the client sends no message:
        # a write racing the refusal can fail in grpc's core, and grpc.aio then reports its own
        # INTERNAL "Internal error from Core" instead of the broker's status (grpc/grpc#36066).
        async with aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            call = stub(ch).KeepAlive(metadata=(("x-api-key", key),))
            code = await asyncio.wait_for(call.code(), 10)
        assert code == grpc.StatusCode.UNAVAILABLE, await call.details()
        assert "KeepAlive" not in srv.servicer.calls
        # The refusals themselves are recorded when the sink can still take them.
        assert [r["outcome"]["reason"] for r in sink.records()] == [AUDIT_UNAVAILABLE] * 2


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_a_lost_record_goes_to_the_process_log_redacted(
    api_key: tuple[str, IdentityInterceptor], caplog: pytest.LogCaptureFixture, staged: bool
):
    key, identity = api_key
    async with serving(chain(AuditInterceptor(AuditLog([MemorySink(fail=True)])), identity, staged)) as srv:
        with pytest.raises(aio.AioRpcError) as err:
            await _acquire(srv.port, key, owner="echo-key")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # already sent: it stands
    lost = [r for r in caplog.records if r.name == "lockbroker.audit" and "not written" in r.getMessage()]
    # Staged: the RequestReceived record is lost as well (it carries no message to redact).
    assert [json.loads(r.getMessage()[r.getMessage().index("{") :])["stage"] for r in lost] == (
        ["RequestReceived", "ResponseComplete"] if staged else ["ResponseComplete"]
    )
    assert "[REDACTED]" in lost[-1].getMessage()
    assert key not in caplog.text


async def test_a_lost_record_is_logged_as_rendered_when_processors_are_not_pure(
    api_key: tuple[str, IdentityInterceptor], caplog: pytest.LogCaptureFixture
):
    """A blocked call keeps its RequestReceived record but not its line, which is rendered again
    if it is lost: that gives the same line only with the default processors. A processor that
    stamps a sequence number must see its line logged as it was written, not stamped again."""
    key, identity = api_key
    seq = itertools.count(1)

    def stamp(record: Record) -> Record:
        return {**record, "seq": next(seq)}

    log = AuditLog([MemorySink(fail=True)], [*DEFAULT_PROCESSORS, stamp])
    async with serving(chain(AuditInterceptor(log), identity, True)) as srv:
        with pytest.raises(aio.AioRpcError):
            await _acquire(srv.port, key)
    await log.close()  # its idle writer task must not be left for a later test's collector
    lost = [r.getMessage() for r in caplog.records if r.name == "lockbroker.audit" and "not written" in r.getMessage()]
    logged = {json.loads(m[m.index("{") :])["stage"]: json.loads(m[m.index("{") :])["seq"] for m in lost}
    assert logged == {"RequestReceived": 1, "ResponseComplete": 2}


def test_long_messages_are_cut_after_redaction():
    secret = "s3cr3t-" * 3
    record: Record = {"outcome": {"message": "x" * 1020 + secret}, "_secrets": [secret]}
    for process in DEFAULT_PROCESSORS:
        record = process(record)
    # Cut at 1024 characters, with a marker saying how long it was (1020 + "[REDACTED]").
    assert record["outcome"]["message"] == "x" * 1020 + "[RED…[truncated, 1030 chars]"
    assert "_secrets" not in record


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_fail_open_answers_despite_a_failing_sink(api_key: tuple[str, IdentityInterceptor], staged: bool):
    key, identity = api_key
    sink = MemorySink(ready=False, fail=True)
    async with serving(chain(AuditInterceptor(AuditLog([sink]), fail_open=True), identity, staged)) as srv:
        resp = await _acquire(srv.port, key)
    assert resp.grant.fencing_token == 42


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_a_full_disk_makes_acquire_unavailable_then_refuses_early(
    api_key: tuple[str, IdentityInterceptor], staged: bool
):
    key, identity = api_key
    # /dev/full opens fine and has "free space", but every write fails with ENOSPC.
    sink = FileSink("/dev/full", fsync="never", retry_after=30.0)
    async with serving(chain(AuditInterceptor(AuditLog([sink])), identity, staged)) as srv:
        for _ in range(2):
            with pytest.raises(aio.AioRpcError) as err:
                await _acquire(srv.port, key)
            assert (err.value.code(), rich(err.value)[0]) == (grpc.StatusCode.UNAVAILABLE, AUDIT_UNAVAILABLE)
        # The first call ran (and failed to be recorded); the second was refused before its handler.
        assert srv.servicer.calls["Acquire"] == 1
    await sink.close()


async def test_an_unwritable_path_refuses_early(api_key: tuple[str, IdentityInterceptor], tmp_path: Path):
    key, identity = api_key
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # root ignores permissions, but not a file standing where a directory must be
    sink = FileSink(blocker / "audit.jsonl")
    async with serving(chain(AuditInterceptor(AuditLog([sink])), identity)) as srv:
        with pytest.raises(aio.AioRpcError) as err:
            await _acquire(srv.port, key)
        assert rich(err.value)[0] == AUDIT_UNAVAILABLE
        assert "Acquire" not in srv.servicer.calls


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_a_failing_processor_is_a_failing_audit_log(api_key: tuple[str, IdentityInterceptor], staged: bool):
    key, identity = api_key

    def broken(record: Record) -> Record:
        raise KeyError("oops")

    async with serving(chain(AuditInterceptor(AuditLog([MemorySink()], [broken])), identity, staged)) as srv:
        with pytest.raises(aio.AioRpcError) as err:
            await _acquire(srv.port, key)
    assert rich(err.value)[0] == AUDIT_UNAVAILABLE


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
async def test_file_sink_policies_append_whole_lines(tmp_path: Path, policy: Any):
    path = tmp_path / f"{policy}.jsonl"
    sink = FileSink(path, fsync=policy, fsync_interval=0.05)
    log = AuditLog([sink])
    await asyncio.gather(*(log.write({"n": i}) for i in range(50)))
    await asyncio.sleep(0.1)  # the interval syncer runs at least once
    await log.close()
    # A reopened log appends; it never truncates what an auditor already has.
    log2 = AuditLog([FileSink(path, fsync=policy)])
    await log2.write({"n": 50})
    await log2.close()
    assert sorted(json.loads(line)["n"] for line in path.read_text().splitlines()) == list(range(51))


def test_fsync_policy_is_validated(tmp_path: Path):
    with pytest.raises(ValueError, match="fsync"):
        FileSink(tmp_path / "x", fsync="sometimes")  # type: ignore[arg-type]


class HangingSink(MemorySink):
    """Writes hang until released, as a stuck disk or a pipe nobody reads would."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writes = 0

    async def write(self, lines: Sequence[bytes]) -> None:
        self.writes += 1
        await self.release.wait()
        self.lines.extend(lines)


async def test_a_hung_sink_fails_each_record_after_write_timeout_and_keeps_one_write():
    sink = HangingSink()
    log = AuditLog([sink], write_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.ensure_future(log.write({"n": 1}))
    await asyncio.sleep(0.15)
    second = asyncio.ensure_future(log.write({"n": 2}))  # queued behind the stuck write
    with pytest.raises(AuditWriteError, match=r"did not finish within 0\.3s"):
        await first
    assert 0.29 < loop.time() - started < 2.0
    with pytest.raises(AuditWriteError, match=r"did not finish within 0\.3s"):
        await second
    assert 0.44 < loop.time() - started < 2.0  # its own 0.3 s, counted from when it was queued
    # The writer waited on its one write rather than starting another behind it.
    assert sink.writes == 1
    sink.release.set()
    await log.write({"n": 3})  # the sink is back: records are confirmed again
    await log.close()
    assert [json.loads(x)["n"] for x in sink.lines] == [1, 2, 3]  # late, but never dropped


async def test_a_cancelled_writer_of_a_record_does_not_cancel_its_batch():
    sink = HangingSink()
    log = AuditLog([sink], write_timeout=5.0)
    waiting = [asyncio.ensure_future(log.write({"n": n})) for n in range(3)]
    await asyncio.sleep(0.05)
    waiting[1].cancel()
    sink.release.set()
    await asyncio.gather(waiting[0], waiting[2])
    await log.close()
    assert sorted(json.loads(x)["n"] for x in sink.lines) == [0, 1, 2]


def test_record_times_and_ids_match_the_standard_library() -> None:
    stamp, ids = _UtcStamp(), _AuditIds()
    rng = random.Random(7)
    for _ in range(20_000):
        t = rng.uniform(0, 4e9)
        if rng.random() < 0.3:  # halfway between two microseconds: rounding must agree too
            t = round(t, 6) + rng.choice((5e-7, -5e-7))
        expected = datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert stamp(t) == expected, t
    made = [ids.next() for _ in range(1_000)]  # several refills of the pool
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


async def test_a_record_late_only_because_the_loop_was_busy_is_written_not_failed(tmp_path: Path) -> None:
    """An overloaded broker steps thousands of calls between two looks at the audit writer, so a
    record can pass write_timeout while the disk keeps up. It failed then (and its call was
    answered UNAVAILABLE); now it fails only when a sink's own write has hung that long."""
    log = AuditLog([FileSink(tmp_path / "audit.jsonl", fsync="always")], write_timeout=0.2)
    try:
        first = asyncio.ensure_future(log.write({"n": 1}))
        await asyncio.sleep(0)
        time.sleep(0.5)  # noqa: ASYNC251 - the loop busy past the record's deadline (the disk is not)
        await asyncio.wait_for(first, 5)
        assert [json.loads(x)["n"] for x in (tmp_path / "audit.jsonl").read_bytes().splitlines()] == [1]
    finally:
        await log.close()


async def test_a_file_sinks_hung_write_still_fails_its_records_after_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FileSink(tmp_path / "audit.jsonl", fsync="always")
    unblock = threading.Event()
    write = sink._write_sync

    def hung(data: bytes) -> None:
        unblock.wait(10)  # a disk that stopped answering
        write(data)

    monkeypatch.setattr(sink, "_write_sync", hung)
    log = AuditLog([sink], write_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(AuditWriteError, match=r"did not finish within 0\.3s"):
            await log.write({"n": 1})
        assert loop.time() - started < 3.0  # within about write_timeout, not the late limit
    finally:
        unblock.set()
        await log.close()
