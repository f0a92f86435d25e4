"""Read-only views of the queues: Describe (one lock) and List (the held locks, paged)."""

from __future__ import annotations

import time

from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.model import Entry, HeldLock, LockState, Page
from lockbroker.server.core.modes import holders
from lockbroker.server.core.names import Keyspace, prefix_end


async def describe(backend: LockBackend, ks: Keyspace, name: str) -> LockState:
    entries = await backend.queue(ks.lock_prefix(name))
    if not entries:
        return LockState(name, None, None, [])
    holder = entries[0]
    left = await backend.lease_ttl(holder.lease)
    # Shared claims and semaphore permits: more than one entry may hold (core.modes).
    held = holders(entries)
    expires = time.time() + left if left >= 0 else None
    return LockState(name, holder, expires, entries[len(held) :], held, holder.value.limit)


async def list_locks(backend: LockBackend, ks: Keyspace, prefix: str, page_size: int, after: str | None) -> Page:
    # Key order is name order (see core.names), so the page after `after` starts past its entries.
    start = ks.after_lock(after) if after is not None else ks.names_prefix(prefix)
    end = prefix_end(ks.names_prefix(prefix))
    order: list[str] = []
    found: dict[str, list[Entry]] = {}
    more = True
    # Entries of one lock are contiguous in key order; stop once a page+1st name appears,
    # which proves every name before it is complete.
    while more and len(order) <= page_size:
        batch, more = await backend.scan(start, end, max(64, page_size * 4))
        for e in batch:
            name = ks.name_of(e.key)
            if name not in found:
                order.append(name)
                found[name] = []
            found[name].append(e)
        if batch:
            start = batch[-1].key + b"\0"
    page = order[:page_size]
    token = page[-1] if len(order) > page_size else ""
    return Page([_held(n, found[n]) for n in page], token)


def _held(name: str, entries: list[Entry]) -> HeldLock:
    """The first holder, and how many wait: not counting the others that hold with it (core.modes)."""
    queue = sorted(entries, key=lambda e: e.create_revision)
    return HeldLock(name, queue[0], len(queue) - len(holders(queue)))
