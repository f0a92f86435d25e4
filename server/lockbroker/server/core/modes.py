"""Shared (read) and exclusive (write) claims, and semaphore permits, over the one FIFO queue.

Every claim is one entry in its lock's queue, ordered by create revision (its fencing token), in
whatever mode. Who holds is a function of the queue alone, so every replica agrees:
- an exclusive entry holds at the head of the queue (the plain lock; core.acquire's fast path);
- a shared entry holds once every entry ahead of it is shared: readers share, a writer waits for
  the readers ahead of it and blocks the readers behind it (FIFO across modes, no starvation);
- a semaphore permit (limit N) holds while fewer than N entries are ahead of it.
A writer is granted after every reader ahead of it has gone, and its create revision is greater
than theirs: the fencing-token order of the plain lock holds across modes.

A waiter is woken only by the deletions that can grant it (no thundering herd): a reader watches
the nearest exclusive entry ahead of it; a permit at index i of a semaphore of limit N watches
every entry ahead of it but is woken only once i - N + 1 of them are gone, counted from the
watch's events (etcd's semaphore recipe), so a release wakes one permit waiter, not all of them.
A release on this replica hands the lock straight to a waiter at the head of the queue
(LockBackend.wait_deleted); a waiter woken otherwise reads the queue once to confirm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Protocol

from lockbroker.server.core.backend import ANSWER_MARGIN, LockBackend, WatchInterrupted, call_deadline
from lockbroker.server.core.errors import DeadlineExceeded, LimitMismatch, LockHeld, SessionLost, WaitExpired
from lockbroker.server.core.model import Entry, EntryValue, Position
from lockbroker.server.core.names import session_id_of

if TYPE_CHECKING:
    from lockbroker.server.core.acquire import AcquireParams

# The most permits a semaphore may have (AcquireRequest.limit).
MAX_LIMIT = 10_000


class Waiting(Protocol):
    """What the wait borrows from core.acquire.Acquirer: its answer and its watch."""

    def _not_acquired(
        self, kind: type[LockHeld] | type[WaitExpired], name: str, pos: Position, started: float
    ) -> Awaitable[LockHeld | WaitExpired]: ...

    def _until_deleted(  # noqa: PLR0917 - Acquirer's signature
        self, prefix: bytes, keys: tuple[bytes, ...], revision: int, timeout: float, mine: Entry, need: int = 1
    ) -> Awaitable[Position | None]: ...


def blockers(mine: EntryValue, ahead: Sequence[Entry]) -> tuple[Entry, ...]:
    """The entries of `ahead` (oldest first) whose deletion may grant `mine`; () when it holds."""
    if not ahead:
        return ()
    if mine.limit:
        return tuple(ahead) if len(ahead) >= mine.limit else ()
    if mine.shared:
        for e in reversed(ahead):
            if not e.value.shared:
                return (e,)
        return ()
    return (ahead[-1],)


def holders(queue: Sequence[Entry]) -> list[Entry]:
    """The entries of `queue` (oldest first) that hold the lock; a prefix of the queue."""
    held: list[Entry] = []
    for i, e in enumerate(queue):
        if blockers(e.value, queue[:i]):
            break
        held.append(e)
    return held


def mismatch(name: str, head: Entry, limit: int) -> LimitMismatch:
    """The refusal of a claim with `limit` on a lock whose head claim has another one."""
    used = head.value.limit
    what = f"a semaphore with limit {used}" if used else "a lock (no limit)"
    asked = f"limit {limit}" if limit else "a lock (no limit)"
    return LimitMismatch(
        f"{name!r} is in use as {what}; this request asked for {asked}",
        {"lock": name, "limit": str(used), "requested": str(limit)},
    )


async def wait_turn(  # noqa: PLR0917 - the waiting half of Acquirer.acquire for modes
    backend: LockBackend, p: AcquireParams, prefix: bytes, mine: Entry, started: float, acq: Waiting
) -> None:
    """Return once `mine` (a shared entry or a permit) holds its lock; raise LockHeld (wait 0),
    WaitExpired, DeadlineExceeded or SessionLost otherwise. The caller removes the entry then."""
    name, wait = p.name, p.wait
    not_acquired, until_deleted = acq._not_acquired, acq._until_deleted
    wait_until = started + wait
    rpc_deadline = call_deadline.get()
    first = True
    while True:
        revision, queue = await backend.queue_at(prefix)
        if first and queue and queue[0].value.limit != mine.value.limit:
            # Checked once, on entering: the head then is the claim that set the limit in use
            # (an entry that came in with another one is removed by its own call).
            raise mismatch(name, queue[0], mine.value.limit)
        first = False
        at = next(
            (i for i, e in enumerate(queue) if e.key == mine.key and e.create_revision == mine.create_revision), None
        )
        if at is None:
            raise SessionLost(
                f"the claim of session {session_id_of(mine.lease)} on {name!r} was removed while waiting "
                "(the session ended, or the claim was released by its fencing token)"
            )
        block = blockers(mine.value, queue[:at])
        if not block:
            return
        pos = Position(revision, mine, queue[at - 1], queue[0], len(queue), at)
        if wait <= 0:
            raise await not_acquired(LockHeld, name, pos, started)
        until = wait_until if rpc_deadline is None else min(wait_until, rpc_deadline - ANSWER_MARGIN)
        left = until - time.monotonic()
        if left <= 0:
            if until < wait_until:
                raise DeadlineExceeded("the RPC deadline passed while waiting for the lock")
            raise await not_acquired(WaitExpired, name, pos, started)
        # A permit at index `at` holds once `at - limit + 1` of the entries ahead have gone (new
        # entries join behind it): the watch counts their deletions, and only the waiter whose
        # count is reached reads the queue (once, to confirm), not every waiter at every release.
        need = at - mine.value.limit + 1 if mine.value.limit else 1
        try:
            handed = await until_deleted(prefix, (*(e.key for e in block), mine.key), revision, left, mine, need)
        except WatchInterrupted:
            await asyncio.sleep(0.05)
            continue
        except TimeoutError:
            continue  # read once more: the answer at the wait's end is what the queue says then
        if handed is not None:
            return  # a release here read `mine` at the head of the queue: it holds
