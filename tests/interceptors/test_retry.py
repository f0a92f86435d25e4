"""Retries on real grpc.aio servers (127.0.0.1): the service edge's, and the service config's for other languages.

The Python client's retry is tested in tests/client/test_call_with_retry.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import Context
from lockbroker.interceptors.retry import SERVICE_CONFIG, SERVICE_CONFIG_JSON
from lockbroker.interceptors.rpcstatus import error_reason
from lockbroker.server import status
from lockbroker.server.core.backend import ANSWER_MARGIN, call_deadline
from lockbroker.server.core.errors import (
    FieldViolation,
    InvalidArgument,
    LockBrokerError,
    ShuttingDown,
    Unavailable,
)
from lockbroker.server.service import NO_RETRY, RetryPolicy, rpc
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.client.test_call_with_retry import UNAVAILABLE, Scripted, acquire_rpc, raw_server

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "lockbroker.v1.LockService"


# --- the fact the design rests on -------------------------------------------------------------------


async def test_aio_abort_sends_the_status_at_once_so_a_handler_cannot_be_rerun():
    """grpcio 1.85: after context.abort, a second run's response is dropped and a second abort fails."""
    seen: list[str] = []

    async def handler(request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "first")

    async def rerun(request: bytes, context: Context) -> bytes:
        try:
            return await handler(request, context)
        except aio.AbortError:
            seen.append(f"{context.code().name}:{context.details()}")
        try:
            await context.abort(grpc.StatusCode.INTERNAL, "second")
        except Exception as exc:  # UsageError: Abort already called!
            seen.append(type(exc).__name__)
        return b"a response nobody will see"

    server = aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.S", {"M": grpc.unary_unary_rpc_method_handler(rerun)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(aio.AioRpcError) as err:
                rpc: aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/t.S/M")
                await rpc(b"", timeout=5)
    finally:
        await server.stop(None)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, "first")
    assert seen == ["UNAVAILABLE:first", "UsageError"]


# --- server side ------------------------------------------------------------------------------------


class Flaky(lock_pb2_grpc.LockServiceServicer):
    """Fails the first `failures` attempts of every call with `error`, then answers; its handlers
    go through the service edge's `rpc` decorator, which owns the retry."""

    draining = False

    def __init__(
        self, failures: int, error: LockBrokerError, *, direct_abort: bool = False, retry: RetryPolicy = NO_RETRY
    ) -> None:
        self.retry = retry
        self.failures = failures
        self.error = error
        self.direct_abort = direct_abort
        self.attempts: dict[str, int] = {}

    async def _attempt(self, name: str, context: Context) -> None:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if self.attempts[name] <= self.failures:
            if self.direct_abort:  # today's service.py: abort inside the handler
                await context.abort(*status.to_status(self.error))
            raise self.error

    @rpc()
    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Context) -> lock_pb2.AcquireResponse:
        await self._attempt("Acquire", context)
        return lock_pb2.AcquireResponse(
            grant=lock_pb2.Grant(name=request.name, fencing_token=42, request_id=request.request_id)
        )

    @rpc()
    async def CreateSession(
        self, request: lock_pb2.CreateSessionRequest, context: Context
    ) -> lock_pb2.CreateSessionResponse:
        await self._attempt("CreateSession", context)
        return lock_pb2.CreateSessionResponse(session_id="s-1")

    @rpc()
    async def Describe(self, request: lock_pb2.DescribeRequest, context: Context) -> lock_pb2.DescribeResponse:
        await self._attempt("Describe", context)
        return lock_pb2.DescribeResponse(name=request.name)


FAST = RetryPolicy(max_attempts=5, multiplier=0.01, max_backoff=0.02)


def new_flaky(failures: int, error: LockBrokerError, *, direct_abort: bool = False, retry: RetryPolicy = FAST) -> Flaky:
    # The generated stubs declare every servicer method abstract; the runtime base answers UNIMPLEMENTED.
    return Flaky(failures, error, direct_abort=direct_abort, retry=retry)  # type: ignore[abstract]


@contextlib.asynccontextmanager
async def lock_server(
    servicer: lock_pb2_grpc.LockServiceServicer, interceptors: Sequence[aio.ServerInterceptor]
) -> AsyncIterator[lock_pb2_grpc.LockServiceAsyncStub]:
    server = aio.server(interceptors=list(interceptors))
    lock_pb2_grpc.add_LockServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield lock_pb2_grpc.LockServiceStub(ch)
    finally:
        await server.stop(None)


def acquire(request_id: str = "r-1") -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(name="jobs/a", session_id="s-1", request_id=request_id)


async def test_transient_backend_errors_are_retried_and_the_audit_record_counts_them():
    sink = MemorySink()
    log = AuditLog([sink])
    flaky = new_flaky(2, Unavailable("etcd did not answer"))
    async with lock_server(flaky, [AuditInterceptor(log)]) as stub:
        resp = await stub.Acquire(acquire(), timeout=5)
    await log.close()
    assert resp.grant.fencing_token == 42
    assert flaky.attempts["Acquire"] == 3
    (record,) = sink.records()
    assert (record["outcome"]["code"], record["retryAttempts"], record["fencingToken"]) == ("OK", 2, "42")


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (ShuttingDown("draining", retry_after=0.5), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
        (InvalidArgument([FieldViolation("name", "empty")]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
async def test_other_errors_are_not_retried_and_reach_the_caller_unchanged(
    error: LockBrokerError, code: grpc.StatusCode, reason: str
):
    flaky = new_flaky(1, error)
    async with lock_server(flaky, []) as stub:
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Acquire(acquire(), timeout=5)
    assert flaky.attempts["Acquire"] == 1
    assert err.value.code() == code
    assert err.value.trailing_metadata() == status.to_status(error)[2]  # the exact details, RetryInfo included
    assert error_reason(err.value.trailing_metadata()) == reason


async def test_calls_without_request_id_are_not_retried_unless_always_idempotent():
    flaky = new_flaky(1, Unavailable("etcd did not answer"))
    async with lock_server(flaky, []) as stub:
        for call in (
            stub.Acquire(acquire(request_id=""), timeout=5),
            stub.CreateSession(lock_pb2.CreateSessionRequest(), timeout=5),
        ):
            with pytest.raises(aio.AioRpcError) as err:
                await call
            assert error_reason(err.value.trailing_metadata()) == "BACKEND_UNAVAILABLE"
        assert (await stub.Describe(lock_pb2.DescribeRequest(name="a"), timeout=5)).name == "a"
        assert (await stub.CreateSession(lock_pb2.CreateSessionRequest(request_id="c-1"), timeout=5)).session_id
    assert flaky.attempts == {"Acquire": 1, "CreateSession": 2, "Describe": 2}


async def test_retries_stop_before_the_deadline_and_the_caller_sees_the_real_error():
    slow = RetryPolicy(max_attempts=1000, multiplier=0.1, max_backoff=0.2)
    flaky = new_flaky(10_000, Unavailable("etcd did not answer"), retry=slow)
    async with lock_server(flaky, []) as stub:
        start = time.monotonic()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Acquire(acquire(), timeout=0.6)
        elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # not a DEADLINE_EXCEEDED of our making
    assert elapsed < 0.6
    assert flaky.attempts["Acquire"] >= 2


class HungThenFlaky(Flaky):
    """Its first attempt waits out its etcd budget (a hung etcd: the call ends ANSWER_MARGIN before
    the RPC's deadline), then fails; later attempts fail at once."""

    async def _attempt(self, name: str, context: Context) -> None:
        if not self.attempts.get(name):
            deadline = call_deadline.get()
            assert deadline is not None
            await asyncio.sleep(max(0.0, deadline - ANSWER_MARGIN - time.monotonic()))
        await super()._attempt(name, context)


async def test_no_retry_starts_inside_the_answer_margin():
    """A retry begun inside the margin cannot reach etcd: it only pushed the answer past the
    caller's deadline (the fault suite's quorum loss saw Releases answered late)."""
    policy = RetryPolicy(max_attempts=5, multiplier=0.001, max_backoff=0.001)
    flaky = HungThenFlaky(10, Unavailable("etcd did not answer"), retry=policy)  # type: ignore[abstract]
    async with lock_server(flaky, []) as stub:
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Acquire(acquire(), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts["Acquire"] == 1


async def test_without_a_deadline_retries_are_bounded_by_attempts_and_elapsed_time():
    flaky = new_flaky(10_000, Unavailable("etcd did not answer"), retry=RetryPolicy(max_attempts=3, multiplier=0.01))
    async with lock_server(flaky, []) as stub:
        with pytest.raises(aio.AioRpcError):
            await stub.Acquire(acquire())
    assert flaky.attempts["Acquire"] == 3
    bounded = RetryPolicy(max_attempts=10_000, multiplier=0.05, max_backoff=0.05, max_elapsed=0.3)
    flaky = new_flaky(10_000, Unavailable("etcd did not answer"), retry=bounded)
    async with lock_server(flaky, []) as stub:
        start = time.monotonic()
        with pytest.raises(aio.AioRpcError):
            await stub.Acquire(acquire())
    assert time.monotonic() - start < 1.0


async def test_a_handler_that_aborts_by_itself_is_passed_through_untouched():
    flaky = new_flaky(1, Unavailable("etcd did not answer"), direct_abort=True)
    async with lock_server(flaky, []) as stub:
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Acquire(acquire(), timeout=5)
    assert flaky.attempts["Acquire"] == 1
    assert error_reason(err.value.trailing_metadata()) == "BACKEND_UNAVAILABLE"


# --- service config for other languages -----------------------------------------------------------


def test_docs_service_config_is_the_python_constant():
    on_disk = (ROOT / "docs" / "service-config.json").read_text()
    assert on_disk == SERVICE_CONFIG_JSON  # regenerate: uv run python -m lockbroker.interceptors.retry
    assert json.loads(on_disk) == SERVICE_CONFIG


async def test_grpc_honours_the_service_config_retry_policy():
    backend = Scripted(UNAVAILABLE, UNAVAILABLE, None)
    async with raw_server(backend) as port:
        options = [("grpc.service_config", SERVICE_CONFIG_JSON), ("grpc.enable_retries", 1)]
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
            resp = await acquire_rpc(ch)(acquire(), timeout=10)
    assert resp.grant.fencing_token == 7
    assert len(backend.seen) == 3
    assert len(set(backend.seen)) == 1
