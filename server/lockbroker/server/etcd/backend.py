"""`LockBackend` on etcd: each queue operation is one etcd transaction.

The queue of a lock is the set of keys under its prefix; the holder is the key with the smallest
create revision (etcd's own recipe). Reads that decide anything are linearizable (etcd's default),
and a write that decides anything carries its condition in the same transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, Concatenate, ParamSpec

from lockbroker.server.core.backend import (
    EntryConflict,
    LeaseExists,
    SessionMissing,
    SessionTaken,
    SlotsTaken,
    remaining,
)
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.model import Enqueued, Entry, EntryValue, LeaseGrant, Position, ReleaseMark, mark_key
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.batch import TxnBatcher
from lockbroker.server.etcd.client import EtcdClient, LeaseNotFound
from lockbroker.server.etcd.streams import KeepAliveStream, WatchHub

P = ParamSpec("P")

_ASC = pb.RangeRequest.ASCEND
_DESC = pb.RangeRequest.DESCEND
_BY_CREATE = pb.RangeRequest.CREATE

# An enqueue whose release mark moved while it was in flight is tried again this often: each try
# needs a release, in between, of another claim of the same session that shares the mark (one in
# MARK_BUCKETS of them), or of this very key by another replica.
_MARK_TRIES = 4

# Enqueues one broker has in flight at once (building their Txn, queued for a group commit, or
# committing); the rest wait their turn, in arrival order, before building anything. A burst
# of 100,000 acquires otherwise built 100,000 Txns at once (about 25 KB of RSS each while in
# flight: the broker peaked at 2.65 GB) and queued them for etcd, which commits a few thousand
# a second here, while each one's etcd budget ran out in the queue. 4,096 keeps about 400 group
# commits (about 10 enqueues each) waiting for etcd: more only queues longer.
MAX_ENQUEUES_IN_FLIGHT = 4096


def _admitted(
    enqueue: Callable[Concatenate[EtcdLockBackend, P], Awaitable[Enqueued]],
) -> Callable[Concatenate[EtcdLockBackend, P], Coroutine[Any, Any, Enqueued]]:
    """`enqueue` with at most MAX_ENQUEUES_IN_FLIGHT running at once: the rest wait for a turn
    first, in arrival order and within their call's deadline, having built nothing."""

    async def admitted(self: EtcdLockBackend, /, *args: P.args, **kwargs: P.kwargs) -> Enqueued:
        admission = self._admission
        if admission.locked():
            self.admission_waits += 1
        async with admission:
            return await enqueue(self, *args, **kwargs)

    return admitted


def _entry(kv: pb.KeyValue) -> Entry:
    return Entry(kv.key, kv.create_revision, kv.lease, EntryValue.decode(kv.value), kv.mod_revision)


def _lock_of(key: bytes) -> bytes:
    """The lock prefix of an entry key (see core.names: "<locks root><name>#<lease hex>")."""
    return key[: key.rindex(b"#") + 1]


def _first(resp: pb.RangeResponse) -> Entry | None:
    return _entry(resp.kvs[0]) if resp.kvs else None


def _range(
    prefix: bytes,
    *,
    limit: int = 0,
    descending: bool = False,
    by_create: bool = True,
    max_create_revision: int = 0,
) -> pb.RequestOp:
    return pb.RequestOp(
        request_range=pb.RangeRequest(
            key=prefix,
            range_end=prefix_end(prefix),
            limit=limit,
            sort_target=_BY_CREATE if by_create else pb.RangeRequest.KEY,
            sort_order=_DESC if descending else _ASC,
            max_create_revision=max_create_revision,
        )
    )


def _get(key: bytes, *, count_only: bool = False) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, count_only=count_only))


def _put(key: bytes, value: bytes, lease: int) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))


def _holder(prefix: bytes) -> pb.RequestOp:
    # limit 1 still reports the full count: the holder and the queue length in one op
    return _range(prefix, limit=1)


def _created(key: bytes, result: int, rev: int, range_end: bytes = b"") -> pb.Compare:
    return pb.Compare(
        key=key,
        range_end=range_end,
        target=pb.Compare.CREATE,
        result=result,  # type: ignore[arg-type]
        create_revision=rev,
    )


def _modified_before(key: bytes, rev: int) -> pb.Compare:
    return pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.LESS, mod_revision=rev)


def _queued_at(resp: pb.TxnResponse, mine: Entry) -> Position:
    """The position of `mine`, just queued by the successful enqueue Txn `resp`."""
    holder_r = resp.responses[-2].response_range
    tail = resp.responses[-1].response_range.kvs
    # As stored (queued_at rounded as encode rounds it), so a retry that reads it back sees the
    # same; without decoding what was just encoded. The Acquirer rounds it already: then no
    # dataclasses.replace (which inspects the fields on every call), twice per enqueue.
    stored = round(mine.value.queued_at, 6)
    if stored != mine.value.queued_at:
        mine = replace(mine, value=replace(mine.value, queued_at=stored))
    pred = _entry(tail[1]) if len(tail) > 1 else None
    # An uncontended lock's holder is this very entry: no second decode of it.
    head = holder_r.kvs[0] if holder_r.kvs else None
    holder = mine if head is None or head.key == mine.key else _entry(head)
    return Position(mine.create_revision, mine, pred, holder, holder_r.count, holder_r.count - 1)


class EtcdLockBackend:
    """Writes go through `batch` (group commit: batch.py), each with its conflict keys: its lock's
    prefix and every key it writes, compares or reads. Reads are sent alone."""

    def __init__(
        self, client: EtcdClient, *, batching: bool = True, max_enqueues: int = MAX_ENQUEUES_IN_FLIGHT
    ) -> None:
        self.client = client
        self.batch = TxnBatcher(client, enabled=batching)
        self._admission = asyncio.Semaphore(max_enqueues)
        self.admission_waits = 0  # enqueues that waited for a turn (tests, and the logs' story)
        self.watches = WatchHub(client)
        self.keepalives = KeepAliveStream(client)

    async def close(self) -> None:
        await self.batch.close()
        await self.watches.close()
        await self.keepalives.close()

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int, lease_id: int = 0) -> LeaseGrant:
        try:
            resp = await self.client.lease_grant(ttl, lease_id)
        except LeaseExists:
            return LeaseGrant(lease_id, ttl, created=False)
        return LeaseGrant(resp.ID, resp.TTL, created=True)

    async def revoke_lease(self, lease_id: int) -> bool:
        try:
            await self.client.lease_revoke(lease_id)
        except LeaseNotFound:
            return False
        return True

    async def keepalive(self, lease_id: int) -> int:
        return await self.keepalives.keepalive(lease_id, remaining(self.client.request_timeout))

    async def lease_ttl(self, lease_id: int) -> int:
        resp = await self.client.lease_time_to_live(lease_id)
        return resp.TTL  # -1 for a lease that is gone; 0 for one with under a second left

    # -- sessions ---------------------------------------------------------------------------

    async def put_session(self, session_key: bytes, value: bytes, lease_id: int, slots: Sequence[bytes] = ()) -> None:
        try:
            # A Txn even without slots: a plain Put could not share a batch.
            resp = await self.batch.txn(
                pb.TxnRequest(
                    compare=[_created(s, pb.Compare.EQUAL, 0) for s in slots],
                    success=[_put(session_key, value, lease_id), *(_put(s, session_key, lease_id) for s in slots)],
                    failure=[_get(s, count_only=True) for s in slots],
                ),
                (session_key, *slots),
            )
        except LeaseNotFound:
            raise SessionMissing(session_key.decode()) from None
        if not resp.succeeded:
            raise SlotsTaken([s for s, r in zip(slots, resp.responses, strict=True) if r.response_range.count])

    async def session_exists(self, session_key: bytes) -> bool:
        resp = await self.client.range(pb.RangeRequest(key=session_key, count_only=True))
        return resp.count > 0

    # -- queues -----------------------------------------------------------------------------

    @_admitted
    async def enqueue(
        self,
        prefix: bytes,
        key: bytes,
        value: EntryValue,
        lease_id: int,
        *,
        session_key: bytes,
        new_session_value: bytes | None,
        only_if_free: bool,
        slots: Sequence[bytes] = (),
        mark: bytes = b"",
    ) -> Enqueued:
        raw = value.encode()
        compare = [_created(key, pb.Compare.EQUAL, 0), *(_created(s, pb.Compare.EQUAL, 0) for s in slots)]
        success: list[pb.RequestOp] = []
        if new_session_value is None:
            # The session record exists, so its lease is alive and it belongs to this tenant.
            compare.append(_created(session_key, pb.Compare.GREATER, 0))
        else:
            compare.append(_created(session_key, pb.Compare.EQUAL, 0))
            success.append(
                pb.RequestOp(request_put=pb.PutRequest(key=session_key, value=new_session_value, lease=lease_id))
            )
        if only_if_free:
            # Over an empty range etcd compares against a missing key (create revision 0): true
            # exactly when no entry is queued, so a try-lock never puts-then-deletes.
            compare.append(_created(prefix, pb.Compare.EQUAL, 0, range_end=prefix_end(prefix)))
        success += [
            *(_put(s, key, lease_id) for s in slots),
            _put(key, raw, lease_id),
            _holder(prefix),
            _range(prefix, descending=True, limit=2),  # mine and the one before
        ]
        failure = [
            _get(key),
            _get(session_key, count_only=True),
            _holder(prefix),
            *(_get(s, count_only=True) for s in slots),
        ]
        # The mark of this key (model.mark_key): every deletion of `key` moves it.
        mark = mark_key(mark, key) if mark else b""
        if mark:
            failure.append(_get(mark))
        # Every revision this client has seen was committed before this write was sent, and a
        # release that happens after the caller gave up on this write (and retried elsewhere) is
        # committed after it: "mark unchanged since `seen`" tells the two apart. A missing mark
        # has mod revision 0.
        seen = self.client.revision
        # Conflict keys (etcd/batch.py): the session record only when this Txn writes it. An
        # existing session's record is only compared (exists) and counted here, and no batched
        # Txn deletes it (its lease's end does), so enqueues of one session can share a batch:
        # in any order the batch applies them, each sees what it would see alone.
        keys = (
            prefix,
            key,
            *((session_key,) if new_session_value is not None else ()),
            *slots,
            *((mark,) if mark else ()),
        )
        for _ in range(_MARK_TRIES):
            guard = [_modified_before(mark, seen + 1)] if mark else []
            try:
                resp = await self.batch.txn(
                    pb.TxnRequest(compare=compare + guard, success=success, failure=failure), keys
                )
            except LeaseNotFound:
                raise SessionMissing(session_key.decode()) from None
            if resp.succeeded or not mark:
                break
            mark_kvs = resp.responses[-1].response_range.kvs
            if not mark_kvs or mark_kvs[0].mod_revision <= seen:
                break  # refused for another reason
            seen = resp.header.revision  # released meanwhile: this call is current, try again
        else:
            raise Unavailable("the session's locks kept changing while queueing; try again", retry_after=0.1)
        rev = resp.header.revision
        if resp.succeeded:
            return Enqueued(True, _queued_at(resp, Entry(key, rev, lease_id, value, rev)))
        existing = _first(resp.responses[0].response_range)
        if existing is not None:
            if existing.request_id != value.request_id:
                raise EntryConflict(existing)
            return Enqueued(False, await self._adopt(prefix, existing))
        session_count = resp.responses[1].response_range.count
        if new_session_value is None and session_count == 0:
            raise SessionMissing(session_key.decode())
        if new_session_value is not None and session_count > 0:
            raise SessionTaken(session_key.decode())
        holder_r = resp.responses[2].response_range
        if not (only_if_free and holder_r.count):
            counts = resp.responses[3 : 3 + len(slots)]
            taken = [s for s, r in zip(slots, counts, strict=True) if r.response_range.count]
            if taken:
                raise SlotsTaken(taken)
        return Enqueued(False, Position(rev, None, None, _first(holder_r), holder_r.count, holder_r.count))

    @staticmethod
    def _position_ops(prefix: bytes, key: bytes, create_revision: int) -> list[pb.RequestOp]:
        return [
            _get(key),
            _range(prefix, descending=True, limit=1, max_create_revision=create_revision - 1),
            _holder(prefix),
        ]

    async def _adopt(self, prefix: bytes, existing: Entry) -> Position:
        """Take over an entry a previous attempt of the same request made (see enqueue)."""
        rev = existing.create_revision
        # etcd's `count` ignores create-revision filters, so the entries ahead are counted by
        # listing their keys; only a retry pays for this.
        ahead = pb.RequestOp(
            request_range=pb.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), keys_only=True, max_create_revision=rev - 1
            )
        )
        reads = [*self._position_ops(prefix, existing.key, rev), ahead]
        put = pb.RequestOp(
            request_put=pb.PutRequest(key=existing.key, value=existing.value.encode(), lease=existing.lease)
        )
        same = [_created(existing.key, pb.Compare.EQUAL, rev)]
        resp = await self.batch.txn(
            pb.TxnRequest(compare=same, success=[put, *reads], failure=reads), (prefix, existing.key)
        )
        return self._read_position(
            resp, rev, skip=1 if resp.succeeded else 0, ahead=len(resp.responses[-1].response_range.kvs)
        )

    async def position(self, prefix: bytes, key: bytes, create_revision: int) -> Position:
        resp = await self.client.txn(
            pb.TxnRequest(success=self._position_ops(prefix, key, create_revision)), write=False
        )
        return self._read_position(resp, create_revision)

    @staticmethod
    def _read_position(resp: pb.TxnResponse, create_revision: int, skip: int = 0, ahead: int = -1) -> Position:
        mine_r, pred_r, holder_r = (r.response_range for r in resp.responses[skip : skip + 3])
        mine = _first(mine_r)
        if mine is not None and mine.create_revision != create_revision:
            mine = None  # a newer entry of the same session: ours is gone
        return Position(resp.header.revision, mine, _first(pred_r), _first(holder_r), holder_r.count, ahead)

    def wait_deleted(
        self, prefix: bytes, keys: tuple[bytes, ...], after_revision: int, mine: Entry | None = None, need: int = 1
    ) -> Coroutine[Any, Any, Position | None]:
        # Not async: the hub's coroutine is the wait, with no frame of this adapter kept alive
        # under every queued waiter.
        return self.watches.wait_deleted(prefix, keys, after_revision, mine, need)

    async def delete_entry(
        self,
        key: bytes,
        create_revision: int,
        mod_revision: int = 0,
        slots: Sequence[bytes] = (),
        mark: ReleaseMark | None = None,
    ) -> Entry | None:
        compare = [_created(key, pb.Compare.EQUAL, create_revision)]
        if mod_revision:
            compare.append(
                pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=mod_revision)
            )
        prefix = _lock_of(key)
        head: Entry | None = None
        revision = count = 0
        self.watches.releasing(key)
        try:
            resp = await self.batch.txn(
                pb.TxnRequest(
                    compare=compare,
                    success=[
                        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, prev_kv=True)),
                        # Slots were put in the entry's own transaction: same create revision, same lease.
                        *(_delete(s) for s in slots),
                        # The entry exists, so its lease does: this put cannot fail on the lease.
                        *([_put(mark.of(key), b"", mark.lease)] if mark is not None else []),
                        # The head of the queue once the entry is gone, read at the deletion's
                        # revision: the next holder, if it waits on this replica, learns it here.
                        _holder(prefix),
                    ],
                ),
                (prefix, key, *slots, *((mark.of(key),) if mark is not None else ())),
                # Not held behind a commit in flight when a waiter here waits on it; with none (an
                # uncontended lock, or waiters only on other replicas) it may wait to share a batch.
                urgent=self.watches.waiting_on(prefix),
            )
            if not resp.succeeded:
                return None
            after = resp.responses[-1].response_range
            head, revision, count = _first(after), resp.header.revision, after.count
        finally:
            # Hands the lock to the head if it waits here; wakes this replica's other waiters on `key`.
            self.watches.released(prefix, key, head, revision, count)
        prev = resp.responses[0].response_delete_range.prev_kvs
        return _entry(prev[0]) if prev else None

    async def update_entry(self, entry: Entry, value: EntryValue) -> Entry | None:
        raw = value.encode()
        same = pb.Compare(
            key=entry.key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=entry.mod_revision
        )
        resp = await self.client.txn(
            pb.TxnRequest(
                compare=[_created(entry.key, pb.Compare.EQUAL, entry.create_revision), same],
                success=[_put(entry.key, raw, entry.lease)],
            )
        )
        if not resp.succeeded:
            return None
        rev = resp.header.revision
        return Entry(entry.key, entry.create_revision, entry.lease, EntryValue.decode(raw), rev)

    async def seal_entry(self, key: bytes, mark: ReleaseMark) -> Entry | None:
        try:
            resp = await self.batch.txn(
                pb.TxnRequest(
                    compare=[_created(key, pb.Compare.EQUAL, 0)],
                    success=[_put(mark.of(key), b"", mark.lease)],
                    failure=[_get(key)],
                ),
                (_lock_of(key), key, mark.of(key)),
            )
        except LeaseNotFound:
            return None
        return None if resp.succeeded else _first(resp.responses[0].response_range)

    async def delete_slots(self, slots: Sequence[bytes], create_revision: int) -> None:
        if slots:
            await self.batch.txn(
                pb.TxnRequest(
                    compare=[_created(s, pb.Compare.EQUAL, create_revision) for s in slots],
                    success=[_delete(s) for s in slots],
                ),
                slots,
            )

    async def taken_slots(self, pool_prefix: bytes) -> set[bytes]:
        resp = await self.client.range(
            pb.RangeRequest(key=pool_prefix, range_end=prefix_end(pool_prefix), keys_only=True)
        )
        return {kv.key for kv in resp.kvs}

    async def taken_among(self, slots: Sequence[bytes]) -> set[bytes]:
        resp = await self.client.txn(pb.TxnRequest(success=[_get(s, count_only=True) for s in slots]), write=False)
        return {s for s, r in zip(slots, resp.responses, strict=True) if r.response_range.count}

    async def find_entry(self, prefix: bytes, create_revision: int) -> Entry | None:
        resp = await self.client.range(
            pb.RangeRequest(
                key=prefix,
                range_end=prefix_end(prefix),
                limit=1,
                min_create_revision=create_revision,
                max_create_revision=create_revision,
            )
        )
        return _first(resp)

    async def queue(self, prefix: bytes) -> list[Entry]:
        resp = await self.client.range(
            pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), sort_target=_BY_CREATE, sort_order=_ASC)
        )
        return [_entry(kv) for kv in resp.kvs]

    async def queue_at(self, prefix: bytes) -> tuple[int, list[Entry]]:
        resp = await self.client.range(
            pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), sort_target=_BY_CREATE, sort_order=_ASC)
        )
        return resp.header.revision, [_entry(kv) for kv in resp.kvs]

    async def scan(self, start: bytes, end: bytes, limit: int) -> tuple[list[Entry], bool]:
        resp = await self.client.range(pb.RangeRequest(key=start, range_end=end, limit=limit))
        return [_entry(kv) for kv in resp.kvs], resp.more

    # -- the admin plane and fences ------------------------------------------------------------

    async def holder(self, prefix: bytes) -> Entry | None:
        resp = await self.client.range(
            pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), limit=1, sort_target=_BY_CREATE, sort_order=_ASC)
        )
        return _first(resp)

    async def get_value(self, key: bytes) -> bytes | None:
        resp = await self.client.range(pb.RangeRequest(key=key))
        return resp.kvs[0].value if resp.kvs else None

    async def put_value(self, key: bytes, value: bytes, lease_id: int) -> None:
        try:
            await self.client.put(pb.PutRequest(key=key, value=value, lease=lease_id))
        except LeaseNotFound:
            raise SessionMissing(key.decode()) from None

    async def delete_value(self, key: bytes) -> None:
        await self.client.txn(pb.TxnRequest(success=[_delete(key)]))

    async def values(self, start: bytes, end: bytes, limit: int) -> tuple[list[tuple[bytes, bytes, int]], bool]:
        resp = await self.client.range(pb.RangeRequest(key=start, range_end=end, limit=limit))
        return [(kv.key, kv.value, kv.lease) for kv in resp.kvs], resp.more

    async def revoke_entry(self, entry: Entry, mark: ReleaseMark, marker: bytes, note: bytes) -> bool:
        resp = await self.client.txn(
            pb.TxnRequest(
                compare=[_created(entry.key, pb.Compare.EQUAL, entry.create_revision)],
                success=[
                    _delete(entry.key),
                    *(_delete(s) for s in entry.value.slots),
                    # The entry exists, so its lease does: these puts cannot fail on the lease.
                    _put(mark.of(entry.key), b"", mark.lease),
                    _put(marker, note, entry.lease),
                ],
            )
        )
        return resp.succeeded

    async def ping(self, key: bytes, timeout: float) -> None:
        """A linearizable read: succeeds only while etcd has a leader and a quorum."""
        await self.client.call(
            lambda s: s.kv.Range, pb.RangeRequest(key=key, count_only=True), write=False, timeout=timeout
        )
