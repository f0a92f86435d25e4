"""A real gRPC server in front of the real broker that can lose answers on purpose.

It forwards each call to the broker and, when told to, replaces the broker's answer with
UNAVAILABLE (carrying the broker's own rich-status shape: ErrorInfo + RetryInfo). That is the
"response lost after the work was done" case an idempotent retry exists for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from lockbroker.v1 import lock_pb2, lock_pb2_grpc

Ctx = aio.ServicerContext[Any, Any]


def unavailable_trailers(retry_after: float) -> tuple[tuple[str, bytes], ...]:
    info, retry = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="BACKEND_UNAVAILABLE", domain="lockbroker"))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(retry_after * 1e9))))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="injected", details=[info, retry])
    return (("grpc-status-details-bin", status.SerializeToString()),)


class LossyProxy(lock_pb2_grpc.LockServiceServicer):
    def __init__(self, upstream: lock_pb2_grpc.LockServiceAsyncStub) -> None:
        self.up = upstream
        self.acquires: list[lock_pb2.AcquireRequest] = []
        self.api_keys: list[str] = []
        self.lose_acquire_answers = 0  # forward, then answer UNAVAILABLE this many times
        self.blackhole_keepalive = False  # read KeepAlive requests and never answer

    def _seen(self, context: Ctx) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-api-key":
                self.api_keys.append(str(value))

    async def CreateSession(self, request: lock_pb2.CreateSessionRequest, context: Ctx) -> Any:
        self._seen(context)
        return await self.up.CreateSession(request, timeout=context.time_remaining())

    async def CloseSession(self, request: lock_pb2.CloseSessionRequest, context: Ctx) -> Any:
        return await self.up.CloseSession(request, timeout=context.time_remaining())

    async def Release(self, request: lock_pb2.ReleaseRequest, context: Ctx) -> Any:
        return await self.up.Release(request, timeout=context.time_remaining())

    async def Refresh(self, request: lock_pb2.RefreshRequest, context: Ctx) -> Any:
        return await self.up.Refresh(request, timeout=context.time_remaining())

    async def List(self, request: lock_pb2.ListRequest, context: Ctx) -> Any:
        return await self.up.List(request, timeout=context.time_remaining())

    async def Describe(self, request: lock_pb2.DescribeRequest, context: Ctx) -> Any:
        return await self.up.Describe(request, timeout=context.time_remaining())

    async def CheckFence(self, request: lock_pb2.CheckFenceRequest, context: Ctx) -> Any:
        return await self.up.CheckFence(request, timeout=context.time_remaining())

    async def AcquireMany(self, request: lock_pb2.AcquireManyRequest, context: Ctx) -> Any:
        return await self.up.AcquireMany(request, timeout=context.time_remaining())

    async def Acquire(self, request: lock_pb2.AcquireRequest, context: Ctx) -> Any:
        self._seen(context)
        self.acquires.append(request)
        resp = await self.up.Acquire(request, timeout=context.time_remaining())
        if self.lose_acquire_answers > 0:
            self.lose_acquire_answers -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected", unavailable_trailers(0.05))
        return resp

    async def KeepAlive(
        self, request_iterator: AsyncIterator[lock_pb2.KeepAliveRequest], context: Ctx
    ) -> AsyncIterator[lock_pb2.KeepAliveResponse]:
        async for req in request_iterator:
            if self.blackhole_keepalive:
                continue
            try:
                r = await self.up.Refresh(lock_pb2.RefreshRequest(session_id=req.session_id), timeout=5)
            except aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                yield lock_pb2.KeepAliveResponse(session_id=req.session_id, expired=True)
                continue
            yield lock_pb2.KeepAliveResponse(session_id=req.session_id, ttl=r.ttl, expires_at=r.expires_at)

    async def Session(
        self, request_iterator: AsyncIterator[lock_pb2.SessionRequest], context: Ctx
    ) -> AsyncIterator[lock_pb2.SessionResponse]:
        # Not forwarded: the proxy stands for a broker without the Session stream, so a client
        # falls back to the unary calls this proxy can lose answers of.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield lock_pb2.SessionResponse()  # an async generator, like every stream behavior

    async def Watch(self, request: lock_pb2.WatchRequest, context: Ctx) -> AsyncIterator[lock_pb2.WatchResponse]:
        async for response in self.up.Watch(request):
            yield response


class RunningProxy:
    def __init__(self, broker_port: int, listen_port: int = 0) -> None:
        self.channel = aio.insecure_channel(f"127.0.0.1:{broker_port}")
        self.servicer = LossyProxy(lock_pb2_grpc.LockServiceStub(self.channel))
        self.server = aio.server()
        lock_pb2_grpc.add_LockServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{listen_port}")

    async def __aenter__(self) -> RunningProxy:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)
        await self.channel.close()
        await asyncio.sleep(0)
