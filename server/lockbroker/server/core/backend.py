"""The interface the lock core needs from a store, and the per-call deadline it honours.

It speaks in queue entries, not in etcd requests. Two implementations: `lockbroker.server.etcd.backend`
with etcd transactions (each method one round trip unless it says otherwise), and
`lockbroker.server.core.memory`, a faithful in-process model of the same semantics (tests/core runs one
contract suite over both). Implementations raise only `Unavailable` (and the subclasses of
`BackendError` below) so the core never sees a transport's exceptions. Entry values cross this seam
as `EntryValue`; only the implementation encodes them.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from typing import Protocol

from lockbroker.server.core.model import Enqueued, Entry, EntryValue, LeaseGrant, Position, ReleaseMark

# The monotonic time by which the current RPC must have answered. Set by the gRPC edge from
# context.time_remaining(); every backend call uses what remains of it as its own timeout.
# The one ContextVar in the broker: the layers above the edge share a CallState through the
# call's context (lockbroker.interceptors.base), but the core and the backend take no grpc
# context, and threading a deadline argument through every core and backend method would
# touch every signature for a value only the innermost etcd call reads.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


# A backend call ends this long before the RPC's deadline, so the broker still has time to answer
# with its own status (UNAVAILABLE with RetryInfo) instead of the caller timing out on a hung etcd.
# 50 ms was too little on a loaded 2-core machine: during the fault suite's quorum loss two
# Releases answered ~30 ms after their deadline (the client's own DEADLINE_EXCEEDED, invariant 8).
ANSWER_MARGIN = 0.15


def remaining(default: float) -> float:
    """Seconds a backend call may take: `default`, shortened by the RPC's deadline."""
    deadline = call_deadline.get()
    if deadline is None:
        return default
    return max(0.0, min(default, deadline - ANSWER_MARGIN - time.monotonic()))


class BackendError(Exception):
    pass


class LeaseExists(BackendError):
    pass


class WatchInterrupted(BackendError):
    """The watch ended before the event (stream lost, revision compacted): read state again."""


class SessionMissing(BackendError):
    """The session record is gone (never existed in this tenant, closed, or expired)."""


class SessionTaken(BackendError):
    """A session an Acquire was to create already exists without this lock's entry: the request id
    that names it was used before, for another lock."""


class SlotsTaken(BackendError):
    """Quota slot keys the write compared as free were taken: nothing was written."""

    def __init__(self, taken: Sequence[bytes]) -> None:
        super().__init__(b", ".join(taken).decode())
        self.taken = tuple(taken)


class EntryConflict(BackendError):
    """The session already has an entry in this lock's queue, made by another request id."""

    def __init__(self, existing: Entry) -> None:
        super().__init__(existing.request_id)
        self.existing = existing


class LockBackend(Protocol):
    async def grant_lease(self, ttl: int, lease_id: int = 0) -> LeaseGrant:
        """Grant a lease; with a lease_id that already exists, return it with created=False."""
        ...

    async def revoke_lease(self, lease_id: int) -> bool:
        """Revoke; False if the lease was already gone."""
        ...

    async def keepalive(self, lease_id: int) -> int:
        """Refresh once; the new TTL, or 0 if the lease is gone (never revived)."""
        ...

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL in whole seconds (rounded down), or -1 if the lease is gone."""
        ...

    async def put_session(self, session_key: bytes, value: bytes, lease_id: int, slots: Sequence[bytes] = ()) -> None:
        """Put the session record, with its quota slots if they are free (else SlotsTaken)."""
        ...

    async def session_exists(self, session_key: bytes) -> bool: ...

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
        """Put `key` at the end of the queue under `prefix`, if the session has no entry there yet.

        mark: the base of the session's release marks (ReleaseMark.base); `key`'s own mark
        (model.mark_key), which `delete_entry` of `key` rewrites. The write is applied only if
        that mark has not changed since this call began, so a write held up in the network (a
        partition, a frozen etcd member) that arrives after the request was retried elsewhere,
        granted and released cannot queue the entry again. A mark that changed for another reason
        (another claim of the session sharing the mark released meanwhile, one in MARK_BUCKETS)
        costs this call a second try, not a failure.

        slots: quota slot keys put with the entry (bound to the same lease) if every one is free;
        if one is taken, nothing is put and SlotsTaken names them (checked after the conditions below).

        new_session_value: the session record is created in the same transaction (a session made
        by Acquire); otherwise the session record must exist (raises SessionMissing).
        only_if_free: put only if the queue is empty (try-lock); when it is not, nothing is put and
        the result's position has mine=None, unless the entry already exists with the same request id.
        With new_session_value, an existing session record without this entry raises SessionTaken.
        An existing entry with the same request id (a retry) is adopted: put again unchanged, so its
        create revision (place and fencing token) stays and its mod revision now names this call;
        it is returned with created=False. One with another request id raises EntryConflict.
        """
        ...

    async def position(self, prefix: bytes, key: bytes, create_revision: int) -> Position:
        """Read the entry, its predecessor and the holder at one revision."""
        ...

    async def wait_deleted(
        self, prefix: bytes, keys: tuple[bytes, ...], after_revision: int, mine: Entry | None = None, need: int = 1
    ) -> Position | None:
        """Return None once `need` distinct keys of `keys` (entries under the lock prefix `prefix`)
        are deleted at revisions > after_revision, or at once when `mine`'s key is. It may return
        early; WatchInterrupted: the watch broke. Either way the caller reads the queue again.

        need > 1: a semaphore permit waits for `need` of the entries ahead of it to go; the
        deletions are counted from the watch's events, so the waiters of a semaphore are not all
        woken (each to read the queue) by every release, only the one that may now hold.

        Direct handoff: with `mine` (the caller's own entry, one of `keys`), when a `delete_entry`
        through this backend (this replica) leaves `mine` at the head of the queue, the call
        returns the Position that delete read at its own revision (mine is the holder, its key
        existed then): the caller holds the lock with no further read. Deletions by other
        replicas or by lease expiry still return None.

        Cancelling the call removes the watch."""
        ...

    async def delete_entry(
        self,
        key: bytes,
        create_revision: int,
        mod_revision: int = 0,
        slots: Sequence[bytes] = (),
        mark: ReleaseMark | None = None,
    ) -> Entry | None:
        """Delete exactly this entry (and, if mod_revision is given, only as last written by the
        caller), with the quota slots it holds, and rewrite its release mark (mark.of(key)); the deleted
        entry, or None if it was already gone or adopted by another call."""
        ...

    async def update_entry(self, entry: Entry, value: EntryValue) -> Entry | None:
        """Rewrite `entry`'s value if it is unchanged since read (same create and mod revision);
        the entry as written, or None if it is gone or was written since."""
        ...

    async def seal_entry(self, key: bytes, mark: ReleaseMark) -> Entry | None:
        """The entry at `key` if there is one; if not, move its release mark (mark.of(key)) in the same
        transaction, so that no enqueue of `key` sent before this call can still be applied.
        None as well if the session has ended (then no such enqueue can be applied either)."""
        ...

    async def delete_slots(self, slots: Sequence[bytes], create_revision: int) -> None:
        """Delete quota slots put together with the entry of `create_revision` (a no-op once they
        are gone: their lease ended, or they were deleted with the entry)."""
        ...

    async def taken_slots(self, pool_prefix: bytes) -> set[bytes]:
        """The keys of a quota pool that are taken."""
        ...

    async def taken_among(self, slots: Sequence[bytes]) -> set[bytes]:
        """Which of `slots` are taken, read at one revision."""
        ...

    async def find_entry(self, prefix: bytes, create_revision: int) -> Entry | None: ...

    async def queue(self, prefix: bytes) -> list[Entry]:
        """Every entry of the lock, holder first."""
        ...

    async def queue_at(self, prefix: bytes) -> tuple[int, list[Entry]]:
        """Every entry of the lock, oldest first, and the revision of the read (core.modes waits
        for deletions after it)."""
        ...

    async def scan(self, start: bytes, end: bytes, limit: int) -> tuple[list[Entry], bool]:
        """Entries with start <= key < end in key order; and whether more follow."""
        ...

    # -- the admin plane and fences (core/admin.py) -------------------------------------------

    async def holder(self, prefix: bytes) -> Entry | None:
        """The lock's holder (the entry with the smallest create revision), in one read."""
        ...

    async def get_value(self, key: bytes) -> bytes | None:
        """The value at `key`, or None."""
        ...

    async def put_value(self, key: bytes, value: bytes, lease_id: int) -> None:
        """Put `key` bound to `lease_id` (SessionMissing if the lease is gone)."""
        ...

    async def delete_value(self, key: bytes) -> None:
        """Delete `key` (a no-op if it is gone)."""
        ...

    async def values(self, start: bytes, end: bytes, limit: int) -> tuple[list[tuple[bytes, bytes, int]], bool]:
        """(key, value, lease) of the keys start <= key < end in key order; and whether more follow."""
        ...

    async def revoke_entry(self, entry: Entry, mark: ReleaseMark, marker: bytes, note: bytes) -> bool:
        """Delete exactly `entry` (compared on its create revision) with its quota slots, move the
        entry's release mark, and put `marker` = `note` bound to the entry's lease, in one
        transaction; False if the entry was already gone."""
        ...
