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
        pos = await backend.position(prefix, mine.key, mine.create_revision)
        current = pos.mine
        if current is None or current.mod_revision != mine.mod_revision:
            return  # gone (session ended, released), or adopted: the retry owns it now
        left = until - time.monotonic()
        if pos.predecessor is None or left <= 0 or closing.done():
            # The delete compares the mod revision too: a retry adopting it meanwhile keeps it.
            await backend.delete_entry(mine.key, mine.create_revision, mine.mod_revision, mine.value.slots, mark)
            return
        watch = backend.wait_deleted(prefix, (pos.predecessor.key, mine.key), pos.revision)
        try:
            await asyncio.wait_for(watch, left)
        except TimeoutError:
            pass
        except WatchInterrupted:
            await asyncio.sleep(0.05)
