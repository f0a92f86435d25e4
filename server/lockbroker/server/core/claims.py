"""Several claims of one session on one lock, and reentrant claims (issue 19).

A session's claims on a lock are separate queue entries (see Keyspace.entry_key):

    <lock prefix><session>              the plain claim: the only one before claims existed
    <lock prefix><session>.c<request>   a claim made with new_claim, one per request id
    <lock prefix><session>.r<digest>    the claim of reentrant owner <digest> (sha256 of the owner)

Each is FIFO with every other entry, and has its own create revision, so its own fencing token.
Release names a claim by that token.

A reentrant claim counts holds in its stored value: the request id of each Acquire counted, so a
retry of one is not counted twice, and the count survives a broker restart. Its owner acquiring
it again while holding it adds a hold and gets the same grant; each Release takes one hold off,
and the last one deletes the entry. Re-entering a claim that still waits is refused
(ALREADY_QUEUED): only a holder re-enters.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from lockbroker.server.core.errors import AlreadyQueued, QuotaExceeded, SessionLost, Unavailable
from lockbroker.server.core.model import Entry, Grant
from lockbroker.server.core.names import session_id_of

if TYPE_CHECKING:
    from lockbroker.server.core.acquire import AcquireParams
    from lockbroker.server.core.backend import LockBackend
    from lockbroker.server.core.sessions import LeaseClock

# A hold is one request id in the entry's value: this bounds the value at about 140 kB.
MAX_HOLDS = 1000
# Compare-and-swap attempts when the entry changes between read and write (a concurrent re-entry
# or release of the same owner, which a well-behaved owner does not do).
_TRIES = 4
# Release request ids remembered per reentrant claim: enough for the retries of a few nested releases.
_RELEASES_KEPT = 16


# new_claim claims whose keys a replica remembers for their release: about 200 bytes each.
REMEMBERED_CLAIMS = 16384


class ClaimKeys:
    """The keys of the new_claim claims granted on this replica, by (session, token, lock prefix).

    A new_claim key embeds the Acquire's request id, which Release does not name: without this, a
    Release of such a claim costs a failed delete of the session's plain claim, a read to find the
    claim by its token, and the delete. With it, the Release is the one delete Txn a plain claim's
    is; a claim granted elsewhere (another replica, or forgotten here) takes the read path.

    A remembered key is exact, not a hint: an entry's create revision is its token, so the claim
    of a token on a lock, if it is still queued, is at that key, and a failed delete there means
    it is gone. The lock is part of what it is remembered by: entries of one batch (etcd/batch.py)
    share a create revision, so one session's claims on two locks can have the same token; two
    entries of one lock never do. The lock prefix names the tenant too.
    Reentrant claims are not remembered: their Release may take off one hold, not delete."""

    def __init__(self, size: int = REMEMBERED_CLAIMS) -> None:
        self._size = size
        self._keys: dict[tuple[int, int, bytes], bytes] = {}

    def remember(self, entry: Entry) -> None:
        """Remember `entry`'s key if it is a new_claim claim (see the class docstring)."""
        lock = entry.key.rindex(b"#") + 1
        at = lock + 16  # past "#<lease hex>"
        if entry.key[at : at + 2] != b".c":
            return
        if len(self._keys) >= self._size:
            for k in list(self._keys)[: self._size // 2]:  # the oldest half, in insertion order
                del self._keys[k]
        self._keys[(entry.lease, entry.create_revision, entry.key[:lock])] = entry.key

    def take(self, lease_id: int, fencing_token: int, prefix: bytes) -> bytes | None:
        """The key of session `lease_id`'s claim of `fencing_token` on the lock of `prefix` if it
        was granted here (then forgotten); None if not known here."""
        return self._keys.pop((lease_id, fencing_token, prefix), None)


async def reenter(  # noqa: PLR0917 - one call site, in Acquirer.acquire
    backend: LockBackend, leases: LeaseClock, p: AcquireParams, existing: Entry, request_id: str, started: float
) -> Grant:
    """Count one more hold on the owner's claim `existing`, which must be the holder."""
    prefix = existing.key[: existing.key.rindex(b"#") + 1]
    entry: Entry | None = existing
    for _ in range(_TRIES):
        if entry is None:
            raise Unavailable("the reentrant claim changed while re-entering it; try again", retry_after=0.05)
        if entry.value.reentrant_owner != p.reentrant_owner:
            raise _queued(p, entry, "its claim key is taken by another owner")
        pos = await backend.position(prefix, entry.key, entry.create_revision)
        if pos.mine is None:
            raise SessionLost(f"the claim of owner {p.reentrant_owner!r} on {p.name!r} ended while re-entering it")
        if pos.predecessor is not None:
            raise _queued(p, entry, "it is still waiting; only the holder re-enters")
        if request_id in entry.value.holds:
            break  # a retry of an Acquire already counted
        if len(entry.value.holds) >= MAX_HOLDS:
            raise QuotaExceeded("", "max_holds", MAX_HOLDS, f"a reentrant grant counts at most {MAX_HOLDS} holds", None)
        value = dataclasses.replace(entry.value, holds=(*entry.value.holds, request_id))
        updated = await backend.update_entry(pos.mine, value)
        if updated is not None:
            entry = updated
            break
        entry = await backend.find_entry(prefix, existing.create_revision)
    else:
        raise Unavailable("the reentrant claim kept changing while re-entering it; try again", retry_after=0.05)
    assert entry is not None
    expires_at = leases.get(entry.lease)
    if expires_at is None:
        left = await backend.lease_ttl(entry.lease)
        if left < 0:
            raise SessionLost(f"session {session_id_of(entry.lease)} has ended")
        expires_at = time.time() + left
    return Grant(
        p.name,
        entry.create_revision,
        session_id_of(entry.lease),
        expires_at,
        entry.owner,
        entry.value.queued_at,
        entry.request_id,
        time.monotonic() - started,
        0,
        entry.value.hold_count,
    )


async def release_hold(
    backend: LockBackend, prefix: bytes, entry: Entry, request_id: str = ""
) -> tuple[bool, int] | None:
    """Take one hold off a reentrant claim counting more than one: (True, holds left); None when
    only one hold is left by now (the caller deletes the entry), (False, 0) when it is gone.

    A Release with a request id that already took a hold off (a retry after a lost answer)
    answers as the first did, and takes nothing more."""
    found: Entry | None = entry
    for _ in range(_TRIES):
        if found is None:
            return False, 0
        if request_id and request_id in found.value.released:
            return True, found.value.hold_count
        if found.value.hold_count <= 1:
            return None
        released = (*found.value.released, request_id)[-_RELEASES_KEPT:] if request_id else found.value.released
        value = dataclasses.replace(found.value, holds=found.value.holds[:-1], released=released)
        if await backend.update_entry(found, value) is not None:
            return True, value.hold_count
        found = await backend.find_entry(prefix, entry.create_revision)
    raise Unavailable("the reentrant claim kept changing while releasing a hold; try again", retry_after=0.05)


def _queued(p: AcquireParams, entry: Entry, why: str) -> AlreadyQueued:
    return AlreadyQueued(
        f"owner {p.reentrant_owner!r} cannot re-enter lock {p.name!r}: {why}",
        {"lock": p.name, "request_id": entry.request_id, "fencing_token": str(entry.create_revision)},
    )
