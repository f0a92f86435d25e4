"""The two long-lived etcd streams a broker shares among all its calls.

A broker opens one Watch stream and one LeaseKeepAlive stream (per current endpoint) and multiplexes
every waiter and every refresh over them, instead of one stream per call. Both carry etcd's
"hasleader" metadata, so a member cut off from its leader ends them rather than going silent; a
lost stream fails whatever was pending on it (waiters then re-read state and watch again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Generic, TypeVar

from grpc import aio

from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import REQUIRE_LEADER, EtcdClient

log = logging.getLogger("lockbroker.etcd")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _SharedStream(Generic[Req, Resp]):
    """One bidirectional stream, opened on demand, with serialized writes and one reader task."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._call: aio.StreamStreamCall[Req, Resp] | None = None
        self._endpoint = -1
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False

    def _open(self) -> aio.StreamStreamCall[Req, Resp]:
        raise NotImplementedError

    def _on_response(self, resp: Resp) -> None:
        raise NotImplementedError

    def _on_lost(self, error: Exception) -> None:
        raise NotImplementedError

    async def write(self, req: Req) -> None:
        if self._closed:
            raise Unavailable("the broker is shutting down", retry_after=1.0)
        async with self._write_lock:
            if self._call is None:
                if self._client.needs_token():
                    await self._client.authenticate()
                self._endpoint, _ = self._client.current()
                self._call = self._open()
                self._reader = asyncio.create_task(self._read(self._call))
            call = self._call
            try:
                await call.write(req)
            except (aio.AioRpcError, asyncio.InvalidStateError) as e:
                lost = Unavailable(f"etcd stream lost: {e}", retry_after=1.0)
                # Everything pending on the stream gets the domain error, never the transport's.
                self._lose(call, lost)
                raise lost from None

    async def _read(self, call: aio.StreamStreamCall[Req, Resp]) -> None:
        error: Exception = Unavailable("etcd closed the stream", retry_after=1.0)
        try:
            while True:
                resp = await call.read()
                if resp is aio.EOF:
                    break
                self._on_response(resp)  # type: ignore[arg-type]
        except aio.AioRpcError as e:
            if self._client.is_stale_token(e):
                self._client.forget_token()
            self._client.report_stream_error(e, self._endpoint)
            error = Unavailable(f"etcd stream lost: {e.code().name} {e.details()}", retry_after=1.0)
        except asyncio.CancelledError:
            error = Unavailable("the broker is shutting down", retry_after=1.0)
            raise
        finally:
            self._lose(call, error)

    def _lose(self, call: aio.StreamStreamCall[Req, Resp], error: Exception) -> None:
        if self._call is call:
            self._call = None
            call.cancel()
            self._on_lost(error)

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._lose(self._call, Unavailable("the broker is shutting down", retry_after=1.0))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class WatchHub(_SharedStream[pb.WatchRequest, pb.WatchResponse]):
    """Waits for key deletions; every waiter of this broker shares one Watch stream."""

    def __init__(self, client: EtcdClient) -> None:
        super().__init__(client)
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _open(self) -> aio.StreamStreamCall[pb.WatchRequest, pb.WatchResponse]:
        _, stubs = self._client.current()
        return stubs.watch.Watch(metadata=self._client.metadata(REQUIRE_LEADER))

    @property
    def active(self) -> int:
        return len(self._waiting)

    async def wait_deleted(self, key: bytes, after_revision: int) -> None:
        # Starting at the revision we read + 1 puts the watcher in etcd's synced group, served as
        # events happen; starting at or below the current revision would queue it for etcd's
        # 100 ms catch-up loop, which is what slows handoffs in etcd's own Lock service.
        wid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[wid] = fut
        try:
            await self.write(
                pb.WatchRequest(
                    create_request=pb.WatchCreateRequest(
                        key=key, start_revision=after_revision + 1, watch_id=wid, filters=[pb.WatchCreateRequest.NOPUT]
                    )
                )
            )
            await fut
        finally:
            if self._waiting.pop(wid, None) is not None or fut.done():
                # Cancel the watcher in etcd without holding up the caller (it may be cancelled).
                task = asyncio.create_task(self._cancel(wid))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _cancel(self, wid: int) -> None:
        if self._call is None:
            return
        with contextlib.suppress(Exception):
            await self.write(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=wid)))

    def _on_response(self, resp: pb.WatchResponse) -> None:
        fut = self._waiting.get(resp.watch_id)
        if fut is None or fut.done():
            return
        if resp.canceled or resp.compact_revision:
            self._waiting.pop(resp.watch_id, None)
            fut.set_exception(WatchInterrupted(resp.cancel_reason or f"compacted at {resp.compact_revision}"))
        elif any(ev.type == pb.Event.DELETE for ev in resp.events):
            self._waiting.pop(resp.watch_id, None)
            fut.set_result(None)

    def _on_lost(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(WatchInterrupted(str(error)))


class KeepAliveStream(_SharedStream[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]):
    """Refreshes leases; every refresh of this broker shares one LeaseKeepAlive stream."""

    def __init__(self, client: EtcdClient) -> None:
        super().__init__(client)
        self._pending: dict[int, deque[asyncio.Future[int]]] = {}

    def _open(self) -> aio.StreamStreamCall[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse]:
        _, stubs = self._client.current()
        return stubs.lease.LeaseKeepAlive(metadata=self._client.metadata(REQUIRE_LEADER))

    async def keepalive(self, lease_id: int, timeout: float) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(lease_id, deque()).append(fut)
        try:
            await self.write(pb.LeaseKeepAliveRequest(ID=lease_id))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise Unavailable("etcd did not answer the keepalive in time", retry_after=1.0) from None
        finally:
            queue = self._pending.get(lease_id)
            if queue is not None and fut in queue:
                queue.remove(fut)
                if not queue:
                    del self._pending[lease_id]

    def _on_response(self, resp: pb.LeaseKeepAliveResponse) -> None:
        queue = self._pending.get(resp.ID)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(resp.TTL)  # etcd answers TTL 0 for a lease that is gone
                break
        if queue is not None and not queue:
            self._pending.pop(resp.ID, None)

    def _on_lost(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for queue in pending.values():
            for fut in queue:
                if not fut.done():
                    fut.set_exception(error)
