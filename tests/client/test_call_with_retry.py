"""The client's retry (`call_with_retry`, what `Client` uses for every call) against a scripted raw
server on 127.0.0.1: the same request bytes on every attempt, RetryInfo honoured, the deadline and
the attempt budget respected. These were the checks of the interceptors package's
ClientRetryInterceptor, a second copy of this retry that only a test used; it is gone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from lockbroker.client import Backoff, Client
from lockbroker.client._retry import call_with_retry
from lockbroker.client.errors import LockBrokerError, Unavailable
from lockbroker.interceptors.base import Context
from lockbroker.interceptors.rpcstatus import retry_delay
from lockbroker.server import status
from lockbroker.server.core import errors as server_errors
from lockbroker.v1 import lock_pb2

SERVICE = "lockbroker.v1.LockService"

Step = tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]] | None


def _trailers(code: int, *details: Any) -> tuple[tuple[str, bytes], ...]:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return (("grpc-status-details-bin", status_pb2.Status(code=code, details=packed).SerializeToString()),)


_code, _message, _trailers_of = status.to_status(server_errors.Unavailable("etcd did not answer", retry_after=0.01))
# grpc's own abort takes only an exact tuple (CallContext.abort converts our Trailers; this raw server has none).
UNAVAILABLE: Step = (_code, _message, tuple(_trailers_of))  # type: ignore[arg-type]
THROTTLED: Step = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "rate limited",
    _trailers(
        code_pb2.RESOURCE_EXHAUSTED,
        error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="lockbroker"),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=200_000_000)),
    ),
)
CAPPED: Step = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many locks", ())
INVALID: Step = (grpc.StatusCode.INVALID_ARGUMENT, "bad name", ())


class Scripted:
    """Raw bytes in, scripted statuses out; remembers every request's bytes."""

    def __init__(self, *script: Step) -> None:
        self.script = script
        self.seen: list[bytes] = []

    async def handle(self, request: bytes, context: Context) -> bytes:
        self.seen.append(request)
        step = self.script[min(len(self.seen), len(self.script)) - 1]
        if step is not None:
            await context.abort(*step)
        return lock_pb2.AcquireResponse(grant=lock_pb2.Grant(fencing_token=7)).SerializeToString()


@contextlib.asynccontextmanager
async def raw_server(backend: Scripted) -> AsyncIterator[int]:
    server = aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(backend.handle)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Acquire": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def acquire_rpc(channel: aio.Channel) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/Acquire",
        request_serializer=lock_pb2.AcquireRequest.SerializeToString,
        response_deserializer=lock_pb2.AcquireResponse.FromString,
    )


def acquire(request_id: str = "r-1") -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(name="jobs/a", session_id="s-1", request_id=request_id)


FAST = Backoff(base=0.01, cap=0.05, max_attempts=4)


async def retried(port: int, request: lock_pb2.AcquireRequest, timeout: float, backoff: Backoff = FAST) -> Any:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        rpc = acquire_rpc(ch)
        return await call_with_retry(
            lambda left: rpc(request, timeout=left), deadline=time.monotonic() + timeout, backoff=backoff
        )


async def test_client_retries_unavailable_with_the_same_request_bytes():
    backend = Scripted(UNAVAILABLE, UNAVAILABLE, None)
    async with raw_server(backend) as port:
        resp = await retried(port, acquire("r-same"), 5)
    assert resp.grant.fencing_token == 7
    assert len(backend.seen) == 3
    assert len(set(backend.seen)) == 1
    assert lock_pb2.AcquireRequest.FromString(backend.seen[0]).request_id == "r-same"


async def test_client_honours_retry_info_on_resource_exhausted_and_nothing_else():
    backend = Scripted(THROTTLED, None)
    async with raw_server(backend) as port:
        start = time.monotonic()
        await retried(port, acquire(), 5)
        assert time.monotonic() - start >= 0.2
    assert len(backend.seen) == 2
    for step in (CAPPED, INVALID):
        backend = Scripted(step, None)
        async with raw_server(backend) as port:
            with pytest.raises(LockBrokerError):
                await retried(port, acquire(), 5)
        assert len(backend.seen) == 1


async def test_client_never_sends_an_acquire_without_request_id_so_its_retries_are_safe():
    """The interceptor refused to retry an Acquire without a request_id; the client gives every
    Acquire one (the same on every attempt), so retrying it cannot take a second entry."""
    backend = Scripted(UNAVAILABLE, None)
    async with raw_server(backend) as port, Client(f"127.0.0.1:{port}", backoff=FAST, default_timeout=5) as c:
        grant = await c.acquire("jobs/a", session_id="s-1")
    assert grant.fencing_token == 7
    ids = [lock_pb2.AcquireRequest.FromString(seen).request_id for seen in backend.seen]
    assert len(ids) == 2
    assert ids[0] and ids[0] == ids[1]


async def test_client_retries_stay_within_the_timeout_and_max_attempts():
    backend = Scripted(UNAVAILABLE)
    async with raw_server(backend) as port:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await retried(port, acquire(), 0.5, Backoff(base=0.05, cap=0.1, max_attempts=1000))
        assert time.monotonic() - start < 0.6
    assert len(backend.seen) >= 2
    backend = Scripted(UNAVAILABLE)
    async with raw_server(backend) as port:
        with pytest.raises(Unavailable) as err:
            await retried(port, acquire(), 10, Backoff(base=0.01, cap=0.05, max_attempts=4))
    assert len(backend.seen) == 4
    cause = err.value.__cause__
    assert isinstance(cause, aio.AioRpcError)
    assert retry_delay(cause.trailing_metadata()) == pytest.approx(0.01)
