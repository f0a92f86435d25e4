"""Claiming quota slots (see lockbroker.server.core.quota): which slot of a pool to put, and what
to do when the backend says it was taken.

The hashed slot first (no read); for a pool whose slot turned out taken, read the pool and pick a
free slot at random, so racing claimants rarely pick the same one again.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from lockbroker.server.core.backend import LockBackend, SlotsTaken
from lockbroker.server.core.errors import QuotaExceeded
from lockbroker.server.core.model import Entry
from lockbroker.server.core.quota import LIMITS, Pool

_T = TypeVar("_T")

# Attempts at claiming a free quota slot when the hashed one and then a read free one are taken
# (each later attempt reads again, so only a near-full pool under a race uses them all).
SLOT_ATTEMPTS = 4
# Random slots read when the hashed one is taken, before falling back to reading the whole pool:
# a pool of a million slots with a fifth taken would otherwise make etcd list 200,000 keys for
# one in five claims.
SLOT_PROBES = 16
# How soon a caller refused for held state may try again: state frees as locks are released.
QUOTA_RETRY_AFTER = 1.0
# Entries whose slots this replica remembers for their release; past this, the oldest half is
# forgotten (their releases read the slots back from the deleted entry, one more transaction).
REMEMBERED_SLOTS = 100_000

Claims = Sequence[tuple[Pool, bytes]]  # (pool, the key that owns the slot)


def free_slot(pool: Pool, taken: set[bytes]) -> bytes | None:
    """A free slot of `pool` picked at random, or None if every slot is taken.

    Pools can be large (a million slots) and mostly empty: draw at random while at most half is
    taken, and list the free slots only when the pool is fuller than that."""
    if len(taken) * 2 <= pool.size:
        while True:
            key = pool.key(random.randrange(pool.size))  # noqa: S311 - spreading, not secrecy
            if key not in taken:
                return key
    free = [j for j in range(pool.size) if pool.key(j) not in taken]
    return pool.key(random.choice(free)) if free else None  # noqa: S311


def full(tenant: str, pool: Pool) -> QuotaExceeded:
    size = pool.size - 1 if pool.limit == "max_waiters_per_lock" else pool.size
    return QuotaExceeded(
        tenant,
        pool.limit,
        size,
        f"tenant {tenant!r} is at its quota {pool.limit} = {size} ({LIMITS[pool.limit]})",
        QUOTA_RETRY_AFTER,
    )


class SlotClaimer:
    """Claims slots for writes, and remembers the slots of entries this replica granted, so that
    Release deletes them in its one transaction."""

    def __init__(self, backend: LockBackend) -> None:
        self._backend = backend
        # entry key -> its create revision and slots, packed into one bytes object (_pack): with
        # 100,000 locks held here a tuple of tuples took ~35 MB of the broker, this ~22 MB.
        self._granted: dict[bytes, bytes] = {}

    @staticmethod
    def first(claims: Claims) -> list[bytes]:
        """The slots to try first: each owner's hashed slot (no read)."""
        return [pool.slot(owner) for pool, owner in claims]

    async def claiming(self, tenant: str, claims: Claims, write: Callable[[Sequence[bytes]], Awaitable[_T]]) -> _T:
        """Run `write` with one free slot of each pool; QuotaExceeded if a pool is full."""
        slots = self.first(claims)
        try:
            return await write(slots)
        except SlotsTaken as e:
            return await self.again(tenant, claims, slots, e, write)

    async def again(
        self,
        tenant: str,
        claims: Claims,
        slots: list[bytes],
        taken: SlotsTaken,
        write: Callable[[Sequence[bytes]], Awaitable[_T]],
    ) -> _T:
        """Go on after `write(slots)` found `taken.taken` taken: pick free slots and write again."""
        collided = claims[0][0]  # SlotsTaken needs a slot, so there is a claim
        for attempt in range(1, SLOT_ATTEMPTS):
            for i, (pool, _) in enumerate(claims):
                if slots[i] not in taken.taken:
                    continue
                collided = pool
                slot = await self._another_slot(pool, taken.taken)
                if slot is None:
                    raise full(tenant, pool) from None
                slots[i] = slot
            try:
                return await write(slots)
            except SlotsTaken as e:
                taken = e
                if attempt == SLOT_ATTEMPTS - 1:
                    break
        # Every attempt lost a race for the last free slots: as good as full, for now.
        raise full(tenant, collided)

    async def _another_slot(self, pool: Pool, taken: Sequence[bytes]) -> bytes | None:
        """A slot of `pool` that was free just now, or None if the pool is full.

        SLOT_PROBES random slots are read first, at a cost that does not grow with the pool;
        only when they are all taken (a pool about 85% full or more) is the whole pool read."""
        if pool.size > 4 * SLOT_PROBES:
            candidates = {pool.key(random.randrange(pool.size)) for _ in range(SLOT_PROBES)}  # noqa: S311
            candidates.difference_update(taken)
            if candidates:
                busy = await self._backend.taken_among(sorted(candidates))
                free = sorted(candidates - busy)
                if free:
                    return random.choice(free)  # noqa: S311 - spreading, not secrecy
        return free_slot(pool, await self._backend.taken_slots(pool.prefix))

    def remember(self, entry: Entry) -> None:
        if len(self._granted) >= REMEMBERED_SLOTS:
            for k in list(self._granted)[: REMEMBERED_SLOTS // 2]:
                del self._granted[k]
        self._granted[entry.key] = _pack(entry.create_revision, entry.value.slots)

    def take(self, key: bytes, create_revision: int) -> tuple[bytes, ...] | None:
        """The slots remembered for the entry at `key` if it is the one of `create_revision`
        (then forgotten); None if not known here. A release that tries the session's plain claim
        with another claim's token must not make the plain claim's slots forgotten."""
        known = self._granted.get(key)
        if known is None or int.from_bytes(known[:8], "big") != create_revision:
            return None
        del self._granted[key]
        return _unpack(known)


def _pack(create_revision: int, slots: Sequence[bytes]) -> bytes:
    """The create revision (8 bytes) then each slot key, length-prefixed (4 bytes): exact for any
    key, and one object per remembered entry."""
    parts = [create_revision.to_bytes(8, "big")]
    for slot in slots:
        parts += (len(slot).to_bytes(4, "big"), slot)
    return b"".join(parts)


def _unpack(packed: bytes) -> tuple[bytes, ...]:
    slots = []
    at = 8
    while at < len(packed):
        n = int.from_bytes(packed[at : at + 4], "big")
        slots.append(packed[at + 4 : at + 4 + n])
        at += 4 + n
    return tuple(slots)
