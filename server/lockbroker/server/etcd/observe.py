"""An election's leader changes, from one etcd watch (ElectionService.Observe).

The candidates of an election are the keys under its prefix; the leader is the one with the lowest
create revision (core/election.py). Observe reads every candidate at one revision, then applies the
watch's events from the next revision on, one revision at a time, and reports each revision after
which the leader (its key or its value) differs from the last one reported. Replaying from a given
revision is what makes a stream resumable: after_revision is read at that revision itself.

Each Observe call has a Watch stream of its own, not the shared WatchHub (which watches deletions
for waiters): observers are few and long-lived, and their events must be replayed in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc import aio

from lockbroker.server.core.backend import BackendError
from lockbroker.server.core.errors import RevisionCompacted, Unavailable
from lockbroker.server.core.model import Entry, EntryValue
from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import REQUIRE_LEADER, EtcdClient


@dataclass(frozen=True, slots=True)
class LeaderState:
    leader: Entry | None  # None: nobody leads
    revision: int


def _entry(kv: pb.KeyValue) -> Entry:
    return Entry(kv.key, kv.create_revision, kv.lease, EntryValue.decode(kv.value), kv.mod_revision)


def _same(a: Entry | None, b: Entry | None) -> bool:
    """The same leader proclaiming the same value (a retried Campaign re-puts its key unchanged)."""
    if a is None or b is None:
        return a is b
    return a.create_revision == b.create_revision and a.value.data == b.value.data and a.owner == b.owner


def _lead(candidates: dict[bytes, Entry]) -> Entry | None:
    return min(candidates.values(), key=lambda e: e.create_revision, default=None)


def _compacted(after: int, compact: int) -> RevisionCompacted:
    """The Watch API's error (core/errors.py), in Observe's words."""
    err = RevisionCompacted(after, compact)
    err.message = (
        f"revision {after} is compacted in etcd (history kept from {compact}); observe again without after_revision"
    )
    err.args = (err.message,)
    err.metadata = {"after_revision": str(after), "compact_revision": str(compact)}
    return err


async def leader_changes(client: EtcdClient, prefix: bytes, after_revision: int = 0) -> AsyncIterator[LeaderState]:
    """The leader states of the election under `prefix`: first the current one (unless resuming
    `after_revision`), then one per revision that changed who leads or what it proclaims."""
    end = prefix_end(prefix)
    try:
        resp = await client.range(pb.RangeRequest(key=prefix, range_end=end, revision=after_revision))
    except BackendError as e:
        if "compacted" in str(e):
            raise _compacted(after_revision, 0) from None
        raise
    candidates = {kv.key: _entry(kv) for kv in resp.kvs}
    revision = after_revision or resp.header.revision
    last = _lead(candidates)
    if not after_revision:
        yield LeaderState(last, revision)
    _, stubs = client.current()
    call = stubs.watch.Watch(metadata=client.metadata(REQUIRE_LEADER))
    try:
        await call.write(
            pb.WatchRequest(
                create_request=pb.WatchCreateRequest(key=prefix, range_end=end, start_revision=revision + 1)
            )
        )
        async for msg in call:
            if msg.compact_revision:
                raise _compacted(revision, msg.compact_revision)
            if msg.canceled:
                raise Unavailable(f"etcd ended the watch: {msg.cancel_reason or 'canceled'}", retry_after=0.5)
            # One response can carry the events of several revisions: report each revision's outcome.
            i, events = 0, msg.events
            while i < len(events):
                rev = events[i].kv.mod_revision
                while i < len(events) and events[i].kv.mod_revision == rev:
                    ev = events[i]
                    if ev.type == pb.Event.DELETE:
                        candidates.pop(ev.kv.key, None)
                    else:
                        candidates[ev.kv.key] = _entry(ev.kv)
                    i += 1
                lead = _lead(candidates)
                if not _same(lead, last):
                    last = lead
                    yield LeaderState(lead, rev)
    except aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            raise
        raise Unavailable("the watch on etcd broke; resume with after_revision", retry_after=0.5) from None
    finally:
        call.cancel()
    raise Unavailable("etcd ended the watch; resume with after_revision", retry_after=0.5)
