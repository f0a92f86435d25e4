"""Drivers over raw generated stubs: the broker (a session per worker, one shared session, a lease
per acquire), etcd's Lock service, the least-etcd-work Txn floor, and the echo ceiling. Each
opens one channel per server for its job, as one client process would, and shares it between the
job's workers."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from bench import v3lock_pb2 as v3lock_pb
from bench import v3lock_pb2_grpc as v3lock_grpc
from lockbroker.client._writer import BATCH_METADATA, StreamBroken, StreamWriter, granted
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as etcd_pb
from lockbroker.server.etcd import rpc_pb2_grpc as etcd_grpc
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

SESSION_TTL = 600  # longer than any run: no keepalive traffic inside a measurement
RPC_SLACK = 10.0  # the RPC deadline is the wait plus this, so the wait is what ends a blocked call


def _kind(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        details = (exc.details() or "").split(";")[0][:60]
        return f"{code.name if code else '?'}: {details}"
    return f"{type(exc).__name__}: {str(exc)[:60]}"


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


class BrokerDriver:
    """lockbroker.v1 over the generated stubs: one session per worker (CreateSession once, then
    Acquire/Release with its session_id), the analogue of a per-worker lease on etcd."""

    def __init__(self) -> None:
        self.channels: list[aio.Channel] = []
        self.stubs: list[lock_pb2_grpc.LockServiceAsyncStub] = []
        self._next = 0

    async def open(self, job: dict[str, Any]) -> None:
        addresses = job["addresses"]
        # grpc shares one connection among channels to one target; a listed-twice address asks
        # for a connection each, for the kernel to spread over a broker's workers.
        options = [("grpc.use_local_subchannel_pool", 1)] if len(set(addresses)) < len(addresses) else []
        for address in addresses:
            channel = aio.insecure_channel(address, options)
            self.channels.append(channel)
            self.stubs.append(lock_pb2_grpc.LockServiceStub(channel))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def session(self) -> tuple[lock_pb2_grpc.LockServiceAsyncStub, str]:
        # Several replicas: sessions (and so workers) are spread over them round robin.
        stub = self.stubs[self._next % len(self.stubs)]
        self._next += 1
        resp = await stub.CreateSession(
            lock_pb2.CreateSessionRequest(ttl=_duration(SESSION_TTL), owner="bench"), timeout=30
        )
        return stub, resp.session_id

    async def end_session(self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str]) -> None:
        stub, session_id = session
        await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=session_id), timeout=30)

    async def acquire(
        self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str], name: str, wait: float
    ) -> tuple[int, int]:
        stub, session_id = session
        # A request id, as the Python client sends with every Acquire: it makes the call retryable
        # (and so takes the broker's retry path), which is what deployed clients pay for.
        req = lock_pb2.AcquireRequest(
            name=name, session_id=session_id, wait_timeout=_duration(wait), owner="bench", request_id=uuid.uuid4().hex
        )
        resp = await stub.Acquire(req, timeout=wait + RPC_SLACK)
        token = resp.grant.fencing_token
        return token, token

    async def release(self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str], name: str, handle: int) -> None:
        stub, session_id = session
        resp = await stub.Release(
            lock_pb2.ReleaseRequest(name=name, fencing_token=handle, session_id=session_id), timeout=30
        )
        if not resp.released:
            raise RuntimeError(f"release of {name} token {handle} found nothing")

    async def waiting(self, names: list[str]) -> int:
        stub = self.stubs[0]
        sem = asyncio.Semaphore(16)

        async def one(name: str) -> int:
            async with sem:
                resp = await stub.Describe(lock_pb2.DescribeRequest(name=name), timeout=30)
                return len(resp.waiters)

        return sum(await asyncio.gather(*(one(n) for n in names)))

    def error_kind(self, exc: BaseException) -> str:
        return _kind(exc)


class StreamError(Exception):
    """An error answer on the Session stream: the unary call's status."""

    def __init__(self, status: lock_pb2.Status) -> None:
        super().__init__(status.message)
        self.code = status.code


class _SessionMux:
    """One Session stream per channel, shared by the job's workers, answers matched by id: what
    the Python client does by default (client/lockbroker/client/_stream.py), without its retry."""

    def __init__(self, stub: lock_pb2_grpc.LockServiceAsyncStub, *, batches: bool = True) -> None:
        self.call: Any = stub.Session(metadata=(BATCH_METADATA,) if batches else ())
        self.pending: dict[int, asyncio.Future[lock_pb2.SessionResponse]] = {}
        self.ids = itertools.count(1)
        # The client's writer: one write at a time, in order, batched once the broker grants it.
        self.writer = StreamWriter(self.call, self._write_failed)
        self.reader = asyncio.create_task(self._read())

    async def _write_failed(self, requests: list[lock_pb2.SessionRequest], exc: BaseException) -> None:
        for r in requests:
            fut = self.pending.pop(r.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()

    def _answer(self, resp: lock_pb2.SessionResponse) -> None:
        fut = self.pending.pop(resp.id, None)
        if fut is not None and not fut.done():
            fut.set_result(resp)

    async def _read(self) -> None:
        failure: BaseException = ConnectionError("session stream ended")
        try:
            self.writer.batches = granted(await self.call.initial_metadata())
            async for resp in self.call:
                if resp.WhichOneof("kind") == "batch":
                    for one in resp.batch.responses:
                        self._answer(one)
                else:
                    self._answer(resp)
        except grpc.RpcError as exc:
            failure = exc
        finally:
            self.writer.cancel()
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(failure)
                    fut.exception()  # retrieved: a worker cancelled at the end of a run never reads it

    async def ask(self, **kind: Any) -> lock_pb2.SessionResponse:
        rid = next(self.ids)
        fut: asyncio.Future[lock_pb2.SessionResponse] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            self.writer.send(lock_pb2.SessionRequest(id=rid, **kind))
        except StreamBroken as exc:
            del self.pending[rid]
            raise ConnectionError("session stream ended") from exc
        resp = await fut
        if resp.HasField("error"):
            raise StreamError(resp.error)
        return resp

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.writer.wait()


class _MuxPool:
    """The Session streams of one channel: a request goes on the first with room, and another
    stream opens when all are full. The broker refuses more than MAX_IN_FLIGHT (1,024) requests
    in flight on one stream; any stream may carry any of the tenant's sessions. The uncontended
    and contended workloads never fill one, so they run on one stream per channel as before."""

    ROOM = 1_000  # below the broker's session_stream.MAX_IN_FLIGHT

    def __init__(self, stub: lock_pb2_grpc.LockServiceAsyncStub) -> None:
        self.stub = stub
        self.muxes = [_SessionMux(stub)]

    async def ask(self, **kind: Any) -> lock_pb2.SessionResponse:
        mux = next((m for m in self.muxes if len(m.pending) < self.ROOM), None)
        if mux is None:
            mux = _SessionMux(self.stub)
            self.muxes.append(mux)
        return await mux.ask(**kind)

    async def close(self) -> None:
        for mux in self.muxes:
            await mux.close()


class BrokerStreamDriver(BrokerDriver):
    """lockbroker.v1 over the Session stream: one stream per channel carrying every worker's
    session, acquire and release as messages (the Python client's default transport), and more
    streams only when one would pass the broker's cap of requests in flight (_MuxPool)."""

    def __init__(self) -> None:
        super().__init__()
        self.muxes: list[_MuxPool] = []

    async def open(self, job: dict[str, Any]) -> None:
        await super().open(job)
        self.muxes = [_MuxPool(stub) for stub in self.stubs]

    async def close(self) -> None:
        for mux in self.muxes:
            await mux.close()
        await super().close()

    async def session(self) -> tuple[_MuxPool, str]:  # type: ignore[override]
        mux = self.muxes[self._next % len(self.muxes)]
        self._next += 1
        create = lock_pb2.CreateSessionRequest(ttl=_duration(SESSION_TTL), owner="bench")
        resp = await mux.ask(open=lock_pb2.OpenSession(create=create))
        return mux, resp.open.session_id

    async def end_session(self, session: tuple[_MuxPool, str]) -> None:  # type: ignore[override]
        mux, session_id = session
        await mux.ask(close=lock_pb2.CloseSessionRequest(session_id=session_id))

    async def acquire(self, session: tuple[_MuxPool, str], name: str, wait: float) -> tuple[int, int]:  # type: ignore[override]
        mux, session_id = session
        req = lock_pb2.AcquireRequest(
            name=name, session_id=session_id, wait_timeout=_duration(wait), owner="bench", request_id=uuid.uuid4().hex
        )
        token = (await mux.ask(acquire=req)).acquire.grant.fencing_token
        return token, token

    async def release(self, session: tuple[_MuxPool, str], name: str, handle: int) -> None:  # type: ignore[override]
        mux, session_id = session
        resp = await mux.ask(release=lock_pb2.ReleaseRequest(name=name, fencing_token=handle, session_id=session_id))
        if not resp.release.released:
            raise RuntimeError(f"release of {name} token {handle} found nothing")

    def error_kind(self, exc: BaseException) -> str:
        if isinstance(exc, StreamError):
            code = next((c.name for c in grpc.StatusCode if c.value[0] == exc.code), str(exc.code))
            return f"{code}: {str(exc).split(';')[0][:60]}"
        return _kind(exc)


class SharedSessionDriver(BrokerDriver):
    """Issue 19's one session per process: every worker of the job shares ONE session (one
    CreateSession, made by the first worker to ask), and each Acquire queues a claim of its own
    (`new_claim`) with its own request_id; Release names the claim by its fencing token. The
    Python client sets `new_claim` only when another thread or task of the session already holds
    or waits for the name; here every Acquire sets it, so each cycle takes the claim path."""

    def __init__(self) -> None:
        super().__init__()
        self._shared: tuple[lock_pb2_grpc.LockServiceAsyncStub, str] | None = None
        self._making = asyncio.Lock()
        self._closed = False

    async def session(self) -> tuple[lock_pb2_grpc.LockServiceAsyncStub, str]:
        async with self._making:
            if self._shared is None:
                self._shared = await super().session()
            return self._shared

    async def end_session(self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str]) -> None:
        if not self._closed:  # every worker hands the same session back: close it once
            self._closed = True
            await super().end_session(session)

    async def acquire(
        self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str], name: str, wait: float
    ) -> tuple[int, int]:
        stub, session_id = session
        req = lock_pb2.AcquireRequest(
            name=name,
            session_id=session_id,
            wait_timeout=_duration(wait),
            owner="bench",
            request_id=uuid.uuid4().hex,
            new_claim=True,
        )
        resp = await stub.Acquire(req, timeout=wait + RPC_SLACK)
        token = resp.grant.fencing_token
        return token, token


LEASE_PER_ACQUIRE_TTL = 60  # longer than any wait of a run (contended: warm-up + 12 s + 10 s)


class LeasePerAcquireDriver(BrokerDriver):
    """The workaround issue 19 describes, a lease per acquire: no CreateSession; every Acquire is
    session-less, so the broker creates a session for that one lock (with a TTL) and Release,
    naming that session, ends it. The TTL outlasts every cycle, so no keepalive is sent: the
    heartbeat per held lock this workaround costs in real use is not in its figures."""

    async def session(self) -> tuple[lock_pb2_grpc.LockServiceAsyncStub, str]:
        stub = self.stubs[self._next % len(self.stubs)]
        self._next += 1
        return stub, ""

    async def end_session(self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str]) -> None:
        return None

    async def acquire(  # type: ignore[override]
        self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str], name: str, wait: float
    ) -> tuple[int, tuple[int, str]]:
        stub, _ = session
        req = lock_pb2.AcquireRequest(
            name=name,
            ttl=_duration(LEASE_PER_ACQUIRE_TTL),
            wait_timeout=_duration(wait),
            owner="bench",
            request_id=uuid.uuid4().hex,
        )
        resp = await stub.Acquire(req, timeout=wait + RPC_SLACK)
        return resp.grant.fencing_token, (resp.grant.fencing_token, resp.grant.session_id)

    async def release(  # type: ignore[override]
        self, session: tuple[lock_pb2_grpc.LockServiceAsyncStub, str], name: str, handle: tuple[int, str]
    ) -> None:
        stub, _ = session
        token, session_id = handle
        resp = await stub.Release(
            lock_pb2.ReleaseRequest(name=name, fencing_token=token, session_id=session_id), timeout=30
        )
        if not resp.released:
            raise RuntimeError(f"release of {name} token {token} found nothing")


class _Etcd:
    def __init__(self) -> None:
        self.channel: aio.Channel | None = None
        self.prefix = b""

    async def open(self, job: dict[str, Any]) -> None:
        self.channel = aio.insecure_channel(job["etcd"])
        self.kv: etcd_grpc.KVAsyncStub = etcd_grpc.KVStub(self.channel)
        self.lease: etcd_grpc.LeaseAsyncStub = etcd_grpc.LeaseStub(self.channel)
        self.watch: etcd_grpc.WatchAsyncStub = etcd_grpc.WatchStub(self.channel)
        self.exact_tokens = bool(job.get("exact_tokens"))

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def session(self) -> int:
        resp = await self.lease.LeaseGrant(etcd_pb.LeaseGrantRequest(TTL=SESSION_TTL), timeout=30)
        return int(resp.ID)

    async def end_session(self, session: int) -> None:
        await self.lease.LeaseRevoke(etcd_pb.LeaseRevokeRequest(ID=session), timeout=30)

    def error_kind(self, exc: BaseException) -> str:
        return _kind(exc)


class EtcdLockDriver(_Etcd):
    """etcd's own Lock service (v3lockpb): Lock on the worker's lease, Unlock by the key it returns."""

    async def open(self, job: dict[str, Any]) -> None:
        await super().open(job)
        assert self.channel is not None
        self.lock: v3lock_grpc.LockAsyncStub = v3lock_grpc.LockStub(self.channel)

    async def acquire(self, session: int, name: str, wait: float) -> tuple[int, bytes]:
        resp = await self.lock.Lock(v3lock_pb.LockRequest(name=name.encode(), lease=session), timeout=wait)
        token = resp.header.revision
        if self.exact_tokens:
            # The FIFO check needs the key's create revision (its place in the queue); outside
            # any timed figure but the drain time of the waiters workload.
            got = await self.kv.Range(etcd_pb.RangeRequest(key=resp.key), timeout=30)
            token = got.kvs[0].create_revision if got.kvs else -1
        return token, resp.key

    async def release(self, session: int, name: str, handle: bytes) -> None:
        await self.lock.Unlock(v3lock_pb.UnlockRequest(key=handle), timeout=30)

    async def waiting(self, names: list[str]) -> int:
        total = 0
        for name in names:
            # etcd's recipe keys are <name>/<lease hex>: every one but the holder waits.
            start = name.encode() + b"/"
            resp = await self.kv.Range(
                etcd_pb.RangeRequest(key=start, range_end=prefix_end(start), count_only=True), timeout=30
            )
            total += max(0, resp.count - 1)
        return total


class EtcdTxnDriver(_Etcd):
    """The least etcd work for a lock: one Txn put-if-absent with the worker's lease, one
    DeleteRange. Contended, it is a herd: every loser watches the key and all retry at once."""

    async def acquire(self, session: int, name: str, wait: float) -> tuple[int, bytes]:
        key = name.encode()
        give_up = time.monotonic() + wait
        txn = etcd_pb.TxnRequest(
            compare=[etcd_pb.Compare(result=etcd_pb.Compare.EQUAL, target=etcd_pb.Compare.CREATE, key=key)],
            success=[etcd_pb.RequestOp(request_put=etcd_pb.PutRequest(key=key, value=b"bench", lease=session))],
            failure=[etcd_pb.RequestOp(request_range=etcd_pb.RangeRequest(key=key))],
        )
        txn.compare[0].create_revision = 0
        for _ in range(1_000_000):
            left = give_up - time.monotonic()
            if left <= 0:
                break
            resp = await self.kv.Txn(txn, timeout=left + RPC_SLACK)
            if resp.succeeded:
                return resp.header.revision, key
            kvs = resp.responses[0].response_range.kvs
            if kvs:
                await self._until_deleted(key, kvs[0].mod_revision + 1, give_up)
        raise TimeoutError(f"{name}: not acquired within {wait:g}s")

    async def _until_deleted(self, key: bytes, revision: int, give_up: float) -> None:
        create = etcd_pb.WatchRequest(
            create_request=etcd_pb.WatchCreateRequest(
                key=key, start_revision=revision, filters=[etcd_pb.WatchCreateRequest.NOPUT]
            )
        )
        call = self.watch.Watch(timeout=max(0.1, give_up - time.monotonic()))
        try:
            await call.write(create)
            for _ in range(1_000_000):
                resp = await call.read()
                if not isinstance(resp, etcd_pb.WatchResponse) or resp.canceled or resp.events:
                    return  # EOF, a cancelled watch (compacted: read again) or the delete
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            call.cancel()

    async def release(self, session: int, name: str, handle: bytes) -> None:
        await self.kv.DeleteRange(etcd_pb.DeleteRangeRequest(key=handle), timeout=30)

    async def waiting(self, names: list[str]) -> int:
        raise NotImplementedError("a put-if-absent herd keeps no queue")


class EchoDriver:
    """Two unary calls per cycle to a trivial grpc.aio server: what Python gRPC alone costs."""

    PAYLOAD = b"\n\x0bbench/u0000\x12\x10694d8c3f12a0b217\x22\x02\x08\x05\x2a\x05bench"

    def __init__(self) -> None:
        self.channel: aio.Channel | None = None

    async def open(self, job: dict[str, Any]) -> None:
        self.channel = aio.insecure_channel(job["addresses"][0])
        self.acquire_call: aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary("/bench.Echo/Acquire")
        self.release_call: aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary("/bench.Echo/Release")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def session(self) -> None:
        return None

    async def end_session(self, session: None) -> None:
        return None

    async def acquire(self, session: None, name: str, wait: float) -> tuple[int, None]:
        await self.acquire_call(self.PAYLOAD, timeout=wait + RPC_SLACK)
        return 0, None

    async def release(self, session: None, name: str, handle: None) -> None:
        await self.release_call(self.PAYLOAD, timeout=30)

    async def waiting(self, names: list[str]) -> int:
        raise NotImplementedError("the echo server holds no locks")

    def error_kind(self, exc: BaseException) -> str:
        return _kind(exc)


__all__ = [
    "BrokerDriver",
    "EchoDriver",
    "EtcdLockDriver",
    "EtcdTxnDriver",
    "LeasePerAcquireDriver",
    "SharedSessionDriver",
]
