"""Drivers for issue 17's shared locks and semaphores: the broker through the public Python client,
and two etcd recipes written here from their documentation (no broker hop), on raw etcd stubs as
the other etcd peers (bench/drivers_grpc.py).

Each reads the job's `shared` (a read lock) and `limit` (a semaphore of that many permits).

- `BrokerClientDriver`: `lockbroker.client.Client` with its default transport (the Session stream),
  a session per worker (`client.session()`), and per cycle `client.lock(name, session=s,
  shared=..., limit=...)` entered and left, as a user's `async with` block.
- `EtcdRWMutexDriver`: the read/write lock of etcd's contrib/recipes (RWMutex). A claim is a key of
  its own under `<name>/read/` or `<name>/write/`, bound to the worker's lease; its create revision
  is its place in the queue. A reader holds once no writer key has a lower create revision; a
  writer once no key at all has. Waiting is for the deletion of the nearest such key, then reading
  again (the key read may not be the last one in the way).
- `EtcdSemaphoreDriver`: a counting semaphore of N permits on the same idea. A claim is a key under
  `<name>/` bound to the worker's lease; it holds while fewer than N keys have a lower create
  revision. A waiter reads the keys ahead of it once, then watches the prefix for their deletions
  (any of them leaving frees a place: holders release in any order), and holds when fewer than N
  are left.

A recipe's waiter opens one etcd Watch call per wait, as the etcd-txn driver does: each client
process of a recipe watches on its own, where the broker shares one etcd watch per lock.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

import grpc

from bench.drivers_grpc import RPC_SLACK, SESSION_TTL, _Etcd
from lockbroker.client import Client
from lockbroker.client._lock import LockContext
from lockbroker.client._session import SessionKeeper
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as etcd_pb

MAX_WAKEUPS = 1_000_000  # every wait loop is bounded (and by the wait's deadline)


class BrokerClientDriver:
    """The broker through `lockbroker.client.Client` (default transport), a session per worker."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self._next = 0
        self.shared = False
        self.limit = 0

    async def open(self, job: dict[str, Any]) -> None:
        self.shared = bool(job.get("shared"))
        self.limit = int(job.get("limit") or 0)
        # One Client per broker address: what one process of the application would hold.
        self.clients = [Client(address, default_timeout=30.0) for address in job["addresses"]]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def session(self) -> tuple[Client, SessionKeeper]:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        # The TTL outlasts every run: no keepalive inside a measurement, as for the raw drivers.
        keeper = await client.session(ttl=SESSION_TTL, owner="bench").start()
        return client, keeper

    async def end_session(self, session: tuple[Client, SessionKeeper]) -> None:
        _client, keeper = session
        await keeper.__aexit__(None, None, None)

    async def acquire(self, session: tuple[Client, SessionKeeper], name: str, wait: float) -> tuple[int, LockContext]:
        client, keeper = session
        ctx = client.lock(name, session=keeper, wait=wait, owner="bench", shared=self.shared, limit=self.limit)
        held = await ctx.__aenter__()
        return held.fencing_token, ctx

    async def release(self, session: tuple[Client, SessionKeeper], name: str, handle: LockContext) -> None:
        await handle.__aexit__(None, None, None)

    async def waiting(self, names: list[str]) -> int:
        total = 0
        for name in names:
            total += len((await self.clients[0].describe(name)).waiters)
        return total

    def error_kind(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {str(exc).split(';')[0][:60]}"


class _Recipe(_Etcd):
    """A claim is a lease-bound key of its own; its create revision is its place in the queue."""

    async def open(self, job: dict[str, Any]) -> None:
        await super().open(job)
        self.shared = bool(job.get("shared"))
        self.limit = int(job.get("limit") or 0)
        self.seq = itertools.count()

    async def _claim(self, session: int, prefix: str) -> tuple[bytes, int]:
        # Unique without a put-if-absent: the worker's lease and a counter of this process.
        key = f"{prefix}{session:x}-{next(self.seq)}".encode()
        put = await self.kv.Put(etcd_pb.PutRequest(key=key, value=b"bench", lease=session), timeout=30)
        return key, int(put.header.revision)  # a new key: its create revision is this revision

    async def _unclaim(self, key: bytes) -> None:
        # A claim that gave up must not stay in the queue in front of others until its lease ends.
        with contextlib.suppress(Exception):
            await self.kv.DeleteRange(etcd_pb.DeleteRangeRequest(key=key), timeout=5)

    async def release(self, session: int, name: str, handle: bytes) -> None:
        await self.kv.DeleteRange(etcd_pb.DeleteRangeRequest(key=handle), timeout=30)

    async def waiting(self, names: list[str]) -> int:
        raise NotImplementedError("not used by the shared-read and semaphore workloads")

    async def _watch_deletes(
        self, key: bytes, range_end: bytes, revision: int, *, give_up: float, ahead: set[bytes], fewer_than: int
    ) -> None:
        """Watch [key, range_end) from `revision`, taking each deleted key out of `ahead`, until fewer
        than `fewer_than` are left. Returns also when the watch is cancelled (a compacted revision)
        or the wait is over: the caller reads again or gives up."""
        create = etcd_pb.WatchRequest(
            create_request=etcd_pb.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=revision, filters=[etcd_pb.WatchCreateRequest.NOPUT]
            )
        )
        left = give_up - time.monotonic()
        if left <= 0:
            return
        call = self.watch.Watch(timeout=left)
        try:
            await call.write(create)
            for _ in range(MAX_WAKEUPS):
                resp = await call.read()
                if not isinstance(resp, etcd_pb.WatchResponse) or resp.canceled:
                    return
                for ev in resp.events:
                    if ev.type == etcd_pb.Event.DELETE:
                        ahead.discard(ev.kv.key)  # no key joins them: later keys have later revisions
                if len(ahead) < fewer_than:
                    return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            call.cancel()


class EtcdRWMutexDriver(_Recipe):
    """etcd's contrib/recipes RWMutex: a reader waits for writer keys ahead, a writer for any key ahead."""

    async def acquire(self, session: int, name: str, wait: float) -> tuple[int, bytes]:
        give_up = time.monotonic() + wait
        key, mine = await self._claim(session, f"{name}/read/" if self.shared else f"{name}/write/")
        in_the_way = f"{name}/write/" if self.shared else f"{name}/"
        try:
            await self._wait_for_last(in_the_way.encode(), mine, give_up, name, wait)
        except BaseException:
            await self._unclaim(key)
            raise
        return mine, key

    async def _wait_for_last(self, prefix: bytes, mine: int, give_up: float, name: str, wait: float) -> None:
        for _ in range(MAX_WAKEUPS):
            left = give_up - time.monotonic()
            if left <= 0:
                break
            resp = await self.kv.Range(
                etcd_pb.RangeRequest(
                    key=prefix,
                    range_end=prefix_end(prefix),
                    max_create_revision=mine - 1,
                    sort_order=etcd_pb.RangeRequest.DESCEND,
                    sort_target=etcd_pb.RangeRequest.CREATE,
                    limit=1,
                    keys_only=True,
                ),
                timeout=left + RPC_SLACK,
            )
            if not resp.kvs:
                return
            last = resp.kvs[0].key
            await self._watch_deletes(last, b"", resp.header.revision + 1, give_up=give_up, ahead={last}, fewer_than=1)
        raise TimeoutError(f"{name}: not acquired within {wait:g}s")


class EtcdSemaphoreDriver(_Recipe):
    """A semaphore of `limit` permits: a claim holds while fewer than `limit` keys are ahead of it."""

    async def acquire(self, session: int, name: str, wait: float) -> tuple[int, bytes]:
        if self.limit < 1:
            raise ValueError("the semaphore recipe needs the job's limit")
        give_up = time.monotonic() + wait
        prefix = f"{name}/"
        key, mine = await self._claim(session, prefix)
        try:
            await self._wait_for_place(prefix.encode(), mine, give_up, name, wait)
        except BaseException:
            await self._unclaim(key)
            raise
        return mine, key

    async def _wait_for_place(self, prefix: bytes, mine: int, give_up: float, name: str, wait: float) -> None:
        for _ in range(MAX_WAKEUPS):
            left = give_up - time.monotonic()
            if left <= 0:
                break
            # count_only would count every key: etcd applies the create-revision filter to the
            # keys it returns, so ask for the keys (names only) ahead of ours.
            resp = await self.kv.Range(
                etcd_pb.RangeRequest(
                    key=prefix, range_end=prefix_end(prefix), max_create_revision=mine - 1, keys_only=True
                ),
                timeout=left + RPC_SLACK,
            )
            ahead = {kv.key for kv in resp.kvs}
            if len(ahead) < self.limit:
                return
            end = prefix_end(prefix)
            await self._watch_deletes(
                prefix, end, resp.header.revision + 1, give_up=give_up, ahead=ahead, fewer_than=self.limit
            )
            if len(ahead) < self.limit:
                return
        raise TimeoutError(f"{name}: not acquired within {wait:g}s")


__all__ = ["BrokerClientDriver", "EtcdRWMutexDriver", "EtcdSemaphoreDriver"]
