"""Watch: one lock's (or a name prefix's) queue changes, as lock events, from one etcd watch.

Each Watch call reads the queue entries under its key prefix at one revision, then opens an etcd
watch from the next revision on a Watch stream of its own. Not multiplexed on the broker's shared
WatchHub stream (etcd/streams.py), on purpose: that stream wakes waiters, and a dashboard that
reads slowly would hold up its handoffs (grpc flow control stalls a whole stream); a stream per
call is closed with the call, so the etcd watch never outlives it. max_streams bounds them.

Events are derived from the entries (core/names.py key layout), keeping each lock's queue:
- a new entry: GRANTED if it is the head of its queue, else WAITER_QUEUED;
- a deleted head: REVOKED if the same revision put its revocation marker (ForceRelease, max hold),
  RELEASED if the same revision rewrote its session's release mark (a Release), else REVOKED if
  an admin revoked its session (tombstone), else EXPIRED (its lease ended: TTL, or CloseSession);
  then GRANTED for the new head, at the same revision;
- a deleted waiter: WAITER_LEFT. Rewrites of an entry (reentrant holds, adoption) are no event.
The revision reads that tell a release from a revocation run only when a holder goes, and are not
traced: the stream is one span, not one per event.

Every message carries whole etcd revisions (etcd never splits one across responses without the
`fragment` option), so resuming from the last message's revision repeats and skips nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

from grpc import aio
from opentelemetry.instrumentation.utils import suppress_instrumentation

from lockbroker.server.core.backend import BackendError
from lockbroker.server.core.errors import (
    FieldViolation,
    InvalidArgument,
    LockBrokerError,
    RevisionCompacted,
    ShuttingDown,
    Unavailable,
)
from lockbroker.server.core.model import Entry, EntryValue, Revocation
from lockbroker.server.core.names import Keyspace, prefix_end, session_id_of
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.client import REQUIRE_LEADER
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import ErrorReason

COMPACTED_WAIT = 2.0  # seconds to wait for etcd's compact revision after a compacted read

E = lock_pb2.LockEventType


def _entry(kv: pb.KeyValue) -> Entry:
    return Entry(kv.key, kv.create_revision, kv.lease, EntryValue.decode(kv.value), kv.mod_revision)


def _event(kind: lock_pb2.LockEventType.ValueType, name: str, revision: int, e: Entry) -> lock_pb2.LockEvent:
    return lock_pb2.LockEvent(
        type=kind,
        name=name,
        revision=revision,
        owner=e.owner,
        session_id=session_id_of(e.lease),
        fencing_token=e.create_revision,
    )


class EventMapper:
    """The queues under one key prefix, and the lock events their etcd events mean."""

    def __init__(self, backend: EtcdLockBackend, ks: Keyspace) -> None:
        self._backend = backend
        self._ks = ks
        self._queues: dict[str, dict[bytes, Entry]] = {}

    def load(self, kvs: Iterable[pb.KeyValue]) -> None:
        for kv in kvs:
            self._queues.setdefault(self._ks.name_of(kv.key), {})[kv.key] = _entry(kv)

    def snapshot(self, revision: int) -> list[lock_pb2.LockEvent]:
        out: list[lock_pb2.LockEvent] = []
        for name in sorted(self._queues):
            for i, e in enumerate(sorted(self._queues[name].values(), key=lambda e: e.create_revision)):
                out.append(
                    _event(E.LOCK_EVENT_TYPE_GRANTED if i == 0 else E.LOCK_EVENT_TYPE_WAITER_QUEUED, name, revision, e)
                )
        return out

    @staticmethod
    def _head(queue: dict[bytes, Entry]) -> Entry | None:
        return min(queue.values(), key=lambda e: e.create_revision, default=None)

    async def apply(self, events: Iterable[pb.Event]) -> list[lock_pb2.LockEvent]:
        out: list[lock_pb2.LockEvent] = []
        for ev in events:
            kv = ev.kv
            if b"#" not in kv.key[len(self._ks.locks_root) :]:
                continue  # not an entry key (written by hand under our prefix)
            name = self._ks.name_of(kv.key)
            queue = self._queues.setdefault(name, {})
            if ev.type == pb.Event.PUT:
                if kv.key in queue and kv.create_revision == queue[kv.key].create_revision:
                    queue[kv.key] = _entry(kv)  # a rewrite: reentrant holds, an adopted retry
                    continue
                e = queue[kv.key] = _entry(kv)
                kind = E.LOCK_EVENT_TYPE_GRANTED if self._head(queue) is e else E.LOCK_EVENT_TYPE_WAITER_QUEUED
                out.append(_event(kind, name, kv.mod_revision, e))
                continue
            gone = queue.get(kv.key)
            if gone is None:
                continue
            was_head = self._head(queue) is gone
            del queue[kv.key]
            revision = kv.mod_revision  # a deletion's kv carries the revision it happened at
            if not was_head:
                out.append(_event(E.LOCK_EVENT_TYPE_WAITER_LEFT, name, revision, gone))
                continue
            out.append(await self._ended(name, gone, revision))
            head = self._head(queue)
            if head is not None:
                out.append(_event(E.LOCK_EVENT_TYPE_GRANTED, name, revision, head))
            if not queue:
                del self._queues[name]
        return out

    async def _ended(self, name: str, e: Entry, revision: int) -> lock_pb2.LockEvent:
        """Why the holder `e` went at `revision`: what else that revision wrote says."""
        ks, client = self._ks, self._backend.client
        ev = _event(E.LOCK_EVENT_TYPE_EXPIRED, name, revision, e)
        with suppress_instrumentation():
            try:
                marker = await client.range(
                    pb.RangeRequest(key=ks.revocation(e.lease, e.create_revision), revision=revision)
                )
                if marker.kvs and marker.kvs[0].mod_revision == revision:
                    note = Revocation.decode(marker.kvs[0].value)
                    ev.type = E.LOCK_EVENT_TYPE_REVOKED
                    ev.reason = note.reason if note is not None else ErrorReason.REVOKED
                    ev.message = note.message if note is not None else ""
                    return ev
                mark = await client.range(pb.RangeRequest(key=ks.mark(e.lease).of(e.key), revision=revision))
                if mark.kvs and mark.kvs[0].mod_revision == revision:
                    ev.type = E.LOCK_EVENT_TYPE_RELEASED
                    return ev
                tomb = await self._backend.get_value(ks.tomb(e.lease))
            except (BackendError, LockBrokerError):
                # Compacted meanwhile, or etcd away: the best answer from what is left now.
                tomb = None
                if await self._alive(e.lease):
                    ev.type = E.LOCK_EVENT_TYPE_RELEASED
                    return ev
        if tomb is not None:
            note = Revocation.decode(tomb)
            ev.type, ev.reason = E.LOCK_EVENT_TYPE_REVOKED, ErrorReason.REVOKED
            ev.message = note.message if note is not None else ""
        return ev

    async def _alive(self, lease: int) -> bool:
        with contextlib.suppress(BackendError, LockBrokerError):
            return await self._backend.lease_ttl(lease) >= 0
        return False


def key_range(ks: Keyspace, name: str, prefix: bool) -> bytes:
    return ks.names_prefix(name) if prefix else ks.lock_prefix(name)


async def watch(
    backend: EtcdLockBackend, ks: Keyspace, key: bytes, start_revision: int, closing: asyncio.Future[None]
) -> AsyncIterator[lock_pb2.WatchResponse]:
    """The WatchResponses of the entries under `key`, after `start_revision` (0: now, snapshot first)."""
    client = backend.client
    mapper = EventMapper(backend, ks)
    base = start_revision
    read = pb.RangeRequest(key=key, range_end=prefix_end(key), revision=start_revision)
    try:
        state = await client.range(read)
    except BackendError as e:
        if "compacted" in str(e):
            raise RevisionCompacted(start_revision, await _compact_revision(backend, key, start_revision)) from None
        if "future revision" in str(e):
            raise InvalidArgument([FieldViolation("start_revision", "is ahead of etcd's current revision")]) from None
        raise
    mapper.load(state.kvs)
    if not start_revision:
        base = state.header.revision
        yield lock_pb2.WatchResponse(revision=base, events=mapper.snapshot(base), snapshot=True)
    _, stubs = client.current()
    call = stubs.watch.Watch(metadata=client.metadata(REQUIRE_LEADER))
    try:
        create = pb.WatchCreateRequest(key=key, range_end=prefix_end(key), start_revision=base + 1)
        await call.write(pb.WatchRequest(create_request=create))
        while True:
            resp = await _next(call, closing)
            if resp.compact_revision:
                raise RevisionCompacted(base, resp.compact_revision)
            if resp.canceled:
                raise Unavailable(f"etcd ended the watch: {resp.cancel_reason or 'no reason given'}", retry_after=0.5)
            if not resp.events:
                continue  # created, or a progress notification
            events = await mapper.apply(resp.events)
            if events:
                yield lock_pb2.WatchResponse(revision=resp.events[-1].kv.mod_revision, events=events)
    finally:
        call.cancel()  # ends the etcd stream, and with it the watch


async def _next(
    call: aio.StreamStreamCall[pb.WatchRequest, pb.WatchResponse], closing: asyncio.Future[None]
) -> pb.WatchResponse:
    read: asyncio.Future[object] = asyncio.ensure_future(call.read())
    try:
        waits: set[asyncio.Future[object]] = {read, closing}  # type: ignore[arg-type]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not read.done():
            read.cancel()
            with contextlib.suppress(BaseException):
                await read
    if not read.done() or read.cancelled():
        raise ShuttingDown("the broker is shutting down; watch again on another replica", retry_after=0.5)
    try:
        resp = read.result()
    except aio.AioRpcError as e:
        raise Unavailable(
            f"the etcd watch stream broke ({e.code().name}); watch again from the last revision"
        ) from None
    if resp is aio.EOF:
        raise Unavailable("the etcd watch stream ended; watch again from the last revision", retry_after=0.5)
    assert isinstance(resp, pb.WatchResponse)
    return resp


async def _compact_revision(backend: EtcdLockBackend, key: bytes, start_revision: int) -> int:
    """etcd's compact revision, as a watch from a compacted revision reports it (0: not told)."""
    _, stubs = backend.client.current()
    call = stubs.watch.Watch(metadata=backend.client.metadata(REQUIRE_LEADER))
    try:
        create = pb.WatchCreateRequest(key=key, range_end=prefix_end(key), start_revision=start_revision + 1)
        await call.write(pb.WatchRequest(create_request=create))
        async with asyncio.timeout(COMPACTED_WAIT):
            while True:
                resp = await call.read()
                if resp is aio.EOF:
                    return 0
                assert isinstance(resp, pb.WatchResponse)
                if resp.compact_revision:
                    return resp.compact_revision
    except (TimeoutError, aio.AioRpcError):
        return 0
    finally:
        call.cancel()


__all__ = ["EventMapper", "key_range", "watch"]
