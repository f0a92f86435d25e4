"""Typed values the lock core and its backend exchange: no protobuf, no etcd types."""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field, replace

import orjson

# A session's release marks (see LockBackend.enqueue) are spread over this many keys by a hash of
# the entry key they guard. A release moves only its own entry's mark, so an enqueue conflicts
# with a release of the same key (which it must) and, by chance, with one of the about 1/256 of
# the session's other claims that share its mark, instead of with every release of the session:
# 64 claims of one session no longer retry each other's enqueues, and their writes no longer
# collide on one key in a group commit. Bounded, unlike one mark per claim (a new_claim key is
# new on every acquire, and the marks live as long as the session): at most 256 empty keys per
# session, and only as many as it has released distinct claims. More buckets would make chance
# conflicts rarer still, at the cost of more keys for etcd and for every scan of the key space
# (the metrics' tally): with 64 claims of one session cycling on their own locks over a real
# etcd, 4-6% of enqueues were tried twice at 256 buckets, 1-1.5% at 1024 (none failed).
MARK_BUCKETS = 256


def _compact(data: bytes) -> bytes:
    """`data` in a bytes object of its own size. orjson's result keeps the 4 KB buffer it wrote
    into (tracemalloc: 4,098 bytes for a 50-byte value), and a blocked Acquire holds its encoded
    entry until it is granted: 4 KB per queued waiter. The copy costs a memcpy."""
    return bytes(memoryview(data))


@dataclass(frozen=True, slots=True)
class EntryValue:
    """What a queue entry stores in etcd, next to the key's own revisions and lease."""

    owner: str
    request_id: str
    queued_at: float  # unix seconds, server clock
    implicit_session: bool = False  # the session was created by Acquire for this one lock
    # The quota slot keys this entry holds (see lockbroker.server.core.quota): deleted with it.
    slots: tuple[bytes, ...] = ()
    # Which call made the entry: the clean-up of a call whose enqueue had an unknown outcome
    # deletes only the entry that call made, never a retry's fresh entry of the same request.
    attempt: str = ""
    # A reentrant claim (AcquireRequest.reentrant): its owner, and the request id of each Acquire
    # counted as a hold (a retry of one is not counted twice). Stored, so holds survive restarts.
    reentrant_owner: str = ""
    holds: tuple[str, ...] = ()
    # The request ids of the last Releases that each took a hold off, so a retried one does not
    # take a second (see core.claims).
    released: tuple[str, ...] = ()
    # A shared (read) claim; False: exclusive (core/modes.py decides who holds).
    shared: bool = False
    # A semaphore permit of a semaphore with this many permits; 0: a lock. Every entry carries
    # it, so the limit lives exactly as long as the semaphore has claims (nothing else to clean up).
    limit: int = 0
    # An election candidate's value (ElectionService: Campaign, Proclaim); empty for locks.
    data: bytes = b""

    def moded(self, shared: bool, limit: int) -> EntryValue:
        """This value with a mode and a semaphore limit (itself for an exclusive lock)."""
        return self if not (shared or limit) else replace(self, shared=shared, limit=limit)

    def with_data(self, data: bytes) -> EntryValue:
        """This value with an election candidate's value (itself without one)."""
        return replace(self, data=data) if data else self

    @property
    def hold_count(self) -> int:
        return max(1, len(self.holds))

    def encode(self) -> bytes:
        doc: dict[str, object] = {"o": self.owner, "r": self.request_id, "t": round(self.queued_at, 6)}
        if self.implicit_session:
            doc["i"] = 1
        if self.slots:
            doc["q"] = [s.decode() for s in self.slots]
        if self.attempt:
            doc["a"] = self.attempt
        if self.reentrant_owner:
            doc["ro"] = self.reentrant_owner
            doc["h"] = list(self.holds)
            if self.released:
                doc["rr"] = list(self.released)
        if self.shared:
            doc["s"] = 1
        if self.limit:
            doc["n"] = self.limit
        if self.data:
            doc["v"] = base64.b64encode(self.data).decode()
        # orjson: the same compact JSON as json.dumps(separators=(",", ":")), non-ASCII as UTF-8
        # rather than \u escapes (both read back the same); a third of the CPU on every enqueue.
        return _compact(orjson.dumps(doc))

    @staticmethod
    def decode(raw: bytes) -> EntryValue:
        try:
            doc = orjson.loads(raw)
            return EntryValue(
                str(doc.get("o", "")),
                str(doc.get("r", "")),
                float(doc.get("t", 0.0)),
                bool(doc.get("i", 0)),
                tuple(str(s).encode() for s in doc.get("q", ())),
                str(doc.get("a", "")),
                str(doc.get("ro", "")),
                tuple(str(h) for h in doc.get("h", ())),
                tuple(str(r) for r in doc.get("rr", ())),
                bool(doc.get("s", 0)),
                int(doc.get("n", 0)),
                base64.b64decode(str(doc.get("v", ""))),
            )
        except (ValueError, TypeError, AttributeError, binascii.Error):
            # A key someone wrote by hand under our prefix: still an entry in the queue.
            return EntryValue("", "", 0.0)


@dataclass(frozen=True, slots=True)
class ReleaseMark:
    """A session's release marks (see LockBackend.enqueue): the key they share as a prefix, and
    the session's lease, which each is bound to."""

    base: bytes
    lease: int

    def of(self, entry_key: bytes) -> bytes:
        """The mark that guards the enqueues of `entry_key`."""
        return mark_key(self.base, entry_key)


def mark_key(base: bytes, entry_key: bytes) -> bytes:
    """The release mark under `base` that guards `entry_key`: the same on every replica (crc32 is
    fixed, unlike hash()), so a release anywhere moves the mark an enqueue anywhere compares."""
    return base + b"/%02x" % (zlib.crc32(entry_key) % MARK_BUCKETS)


@dataclass(frozen=True, slots=True)
class Entry:
    """One queue entry (the holder or a waiter) of a lock."""

    key: bytes
    create_revision: int
    lease: int
    value: EntryValue
    # Which call owns the entry's clean-up: a retry that resumes an entry re-puts it, so the
    # clean-up of an older, abandoned call of the same request (which compares on this) is a no-op.
    mod_revision: int = 0

    @property
    def owner(self) -> str:
        return self.value.owner

    @property
    def request_id(self) -> str:
        return self.value.request_id


@dataclass(frozen=True, slots=True)
class Position:
    """Where an entry stands in its lock's queue, as read at `revision`."""

    revision: int
    mine: Entry | None  # None: the entry is gone (its lease ended, or it was released)
    predecessor: Entry | None  # the entry just ahead; None: mine is the holder
    holder: Entry | None
    count: int  # entries in the queue, holder included
    ahead: int  # entries created before mine; -1 where not counted (re-reads while waiting)


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The outcome of putting an entry into a lock's queue.

    position.mine is None when a try-lock found the queue occupied and put nothing.
    """

    created: bool  # False: nothing was put (a retry found its entry, or a try-lock found the lock held)
    position: Position


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    lease_id: int
    ttl: int
    created: bool  # False: a lease with the requested id already existed


@dataclass(frozen=True, slots=True)
class Grant:
    name: str
    fencing_token: int
    session_id: str
    expires_at: float  # unix seconds
    owner: str
    queued_at: float
    request_id: str
    waited: float
    queue_position: int
    hold_count: int = 1
    shared: bool = False
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Revocation:
    """An admin took a grant (or, with token 0, the whole session) away from a session."""

    name: str
    fencing_token: int
    reason: str  # an ErrorReason value
    message: str  # the admin's reason
    admin: str = ""  # the admin's principal

    def encode(self) -> bytes:
        doc = {"n": self.name, "f": self.fencing_token, "r": self.reason, "m": self.message, "a": self.admin}
        return _compact(orjson.dumps(doc))  # as EntryValue.encode

    @staticmethod
    def decode(raw: bytes) -> Revocation | None:
        try:
            doc = orjson.loads(raw)
            return Revocation(str(doc["n"]), int(doc["f"]), str(doc["r"]), str(doc["m"]), str(doc.get("a", "")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    ttl: int
    expires_at: float
    # Grants of the session an admin revoked (reported on every refresh until the session ends).
    revoked: tuple[Revocation, ...] = ()


@dataclass(frozen=True, slots=True)
class LockState:
    name: str
    holder: Entry | None
    holder_expires_at: float | None
    waiters: list[Entry]
    # Every entry holding the lock (holder first): more than one for shared claims and permits.
    holders: list[Entry] = field(default_factory=list)
    limit: int = 0  # the semaphore's limit; 0 for a lock
    delay_until: float = 0.0  # a running lock-delay's end (unix seconds; core/delay.py), 0: none


@dataclass(frozen=True, slots=True)
class HeldLock:
    name: str
    holder: Entry
    waiters: int


@dataclass(frozen=True, slots=True)
class Page:
    locks: list[HeldLock]
    next_page_token: str
