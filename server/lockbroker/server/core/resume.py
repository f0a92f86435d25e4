"""A waiter cut off keeps its place in the queue for a short while (issue 19 item 3).

When a waiting Acquire's call is cancelled (the client cancelled it, or its connection dropped:
the broker cannot tell the two apart), its entry is not deleted at once. For RESUME_WINDOW a
retry of the same request (same session, same request id) adopts it and so keeps its place and
its fencing token (see LockBackend.enqueue). Meanwhile the entry stays a waiter only: if its turn
comes before anyone adopted it, it is deleted at once and the lock passes on, so a caller that
does not come back never holds the lock, and is gone from the queue after the window.

Only calls that can be retried keep their place: a request id chosen by the client, and a session
of the client's own (a session made for one Acquire ends with the call, as before). A timed-out
wait (WAIT_EXPIRED, DEADLINE_EXCEEDED) is answered, so its entry is removed at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.modes import blockers

if TYPE_CHECKING:
    from lockbroker.server.core.backend import LockBackend
    from lockbroker.server.core.model import Entry, ReleaseMark

# Long enough for a client to notice a dropped connection, reconnect and retry (the Python
# client's reconnect backoff starts at 250 ms); short, because until it ends a waiter that will
# never come back still counts against the lock's queue.
RESUME_WINDOW = 1.5


async def keep_place(
    backend: LockBackend, prefix: bytes, mine: Entry, mark: ReleaseMark, *, until: float, closing: asyncio.Future[None]
) -> None:
    """Keep `mine` queued until monotonic time `until` for a retry to adopt; then (or once it
    would become the holder unadopted) delete it, unless a retry has adopted it by then."""
    while True:
        current, block, revision = await _standing(backend, prefix, mine)
        if current is None or current.mod_revision != mine.mod_revision:
            return  # gone (session ended, released), or adopted: the retry owns it now
        left = until - time.monotonic()
        if not block or left <= 0 or closing.done():
            # The delete compares the mod revision too: a retry adopting it meanwhile keeps it.
            await backend.delete_entry(mine.key, mine.create_revision, mine.mod_revision, mine.value.slots, mark)
            return
        watch = backend.wait_deleted(prefix, (*block, mine.key), revision)
        try:
            await asyncio.wait_for(watch, left)
        except TimeoutError:
            pass
        except WatchInterrupted:
            await asyncio.sleep(0.05)


async def _standing(backend: LockBackend, prefix: bytes, mine: Entry) -> tuple[Entry | None, tuple[bytes, ...], int]:
    """`mine` as stored now (None: gone), the keys whose deletion would make it hold (none: it
    would hold now), and the revision of the read. A shared claim or a permit may hold behind
    others (core.modes), so for those the whole queue is read."""
    if not (mine.value.shared or mine.value.limit):
        pos = await backend.position(prefix, mine.key, mine.create_revision)
        return pos.mine, (pos.predecessor.key,) if pos.predecessor is not None else (), pos.revision
    revision, queue = await backend.queue_at(prefix)
    for at, e in enumerate(queue):
        if e.key == mine.key and e.create_revision == mine.create_revision:
            return e, tuple(b.key for b in blockers(mine.value, queue[:at])), revision
    return None, (), revision
