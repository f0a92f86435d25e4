"""Plain Python values for what the broker returns.

Callers should not have to know protobuf: times are timezone-aware UTC datetimes (server
clock), durations are float seconds. Message-to-value conversion lives here too, so that
errors.py and aio.py read the wire format in exactly one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2

from lockbroker.v1 import lock_pb2


@dataclass(frozen=True, slots=True)
class Session:
    """A session (an etcd lease) as the broker reported it."""

    session_id: str
    ttl: float
    # Server clock. Do not compare with the local clock to decide whether the session is
    # alive; SessionKeeper.expires_at is the local, monotonic answer to that.
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Grant:
    """One held lock, as Acquire granted it."""

    name: str
    fencing_token: int
    session_id: str
    expires_at: datetime | None
    owner: str
    request_id: str
    queued_at: datetime | None
    waited: float = 0.0
    queue_position: int = 0
    # Holds counted on a reentrant grant (1 otherwise); see Client.lock(reentrant=True).
    hold_count: int = 1
    # A shared (read) grant; see Client.lock(shared=True).
    shared: bool = False
    # A semaphore permit: the semaphore's limit; 0 for a lock. See Client.lock(limit=N).
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Holder:
    """The session holding a lock."""

    owner: str
    session_id: str
    fencing_token: int
    since: datetime | None
    # Unset in List results: the broker only reads the lease for Describe and NotAcquired.
    expires_at: datetime | None
    # The request id of the Acquire that made this claim ("" from a broker older than claims).
    request_id: str = ""
    hold_count: int = 1
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Waiter:
    """One queued Acquire; position 1 is first in line after the holder."""

    position: int
    owner: str
    session_id: str
    since: datetime | None
    waited: float
    # The claim's fencing token once granted, and its Acquire's request id: they tell apart the
    # claims of one session (0 and "" from a broker older than claims).
    fencing_token: int = 0
    request_id: str = ""
    shared: bool = False


@dataclass(frozen=True, slots=True)
class LockState:
    """Who holds a lock and who waits for it (Describe)."""

    name: str
    holder: Holder | None
    waiters: tuple[Waiter, ...]
    # A running lock-delay's end: the holder shown is next in line, granted then.
    delay_until: datetime | None = None
    # Every claim holding the lock, oldest first: more than one for shared claims and semaphore
    # permits (holder is the first).
    holders: tuple[Holder, ...] = ()
    limit: int = 0  # the semaphore's limit; 0 for a lock

    @property
    def held(self) -> bool:
        return self.holder is not None


@dataclass(frozen=True, slots=True)
class LockSummary:
    """One held lock in a List page (the wire type is lockbroker.v1.HeldLock).

    Named differently from the wire type because `HeldLock` is the handle that
    `Client.lock()` yields, which is what most callers touch.
    """

    name: str
    holder: Holder
    waiters: int


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def duration(value: float) -> duration_pb2.Duration:
    whole = int(value)
    return duration_pb2.Duration(seconds=whole, nanos=round((value - whole) * 1e9))


def timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def holder_of(msg: lock_pb2.LockHolder) -> Holder:
    return Holder(
        owner=msg.owner,
        session_id=msg.session_id,
        fencing_token=msg.fencing_token,
        since=timestamp(msg.since) if msg.HasField("since") else None,
        expires_at=timestamp(msg.expires_at) if msg.HasField("expires_at") else None,
        request_id=msg.request_id,
        hold_count=msg.hold_count or 1,
        shared=msg.mode == lock_pb2.LOCK_MODE_SHARED,
    )


def grant_of(resp: lock_pb2.AcquireResponse) -> Grant:
    g = resp.grant
    return Grant(
        name=g.name,
        fencing_token=g.fencing_token,
        session_id=g.session_id,
        expires_at=timestamp(g.expires_at) if g.HasField("expires_at") else None,
        owner=g.owner,
        request_id=g.request_id,
        queued_at=timestamp(g.queued_at) if g.HasField("queued_at") else None,
        waited=seconds(resp.waited),
        queue_position=resp.queue_position,
        hold_count=g.hold_count or 1,
        shared=g.mode == lock_pb2.LOCK_MODE_SHARED,
        limit=g.limit,
    )


def lock_state_of(resp: lock_pb2.DescribeResponse) -> LockState:
    return LockState(
        name=resp.name,
        holder=holder_of(resp.holder) if resp.HasField("holder") else None,
        waiters=tuple(
            Waiter(
                position=w.position,
                owner=w.owner,
                session_id=w.session_id,
                since=timestamp(w.since) if w.HasField("since") else None,
                waited=seconds(w.waited),
                fencing_token=w.fencing_token,
                request_id=w.request_id,
                shared=w.mode == lock_pb2.LOCK_MODE_SHARED,
            )
            for w in resp.waiters
        ),
        delay_until=timestamp(resp.delay_until) if resp.HasField("delay_until") else None,
        holders=tuple(holder_of(h) for h in resp.holders),
        limit=resp.limit,
    )


def summary_of(msg: lock_pb2.HeldLock) -> LockSummary:
    return LockSummary(name=msg.name, holder=holder_of(msg.holder), waiters=msg.waiters)


__all__ = ["Grant", "Holder", "LockState", "LockSummary", "Session", "Waiter"]


@dataclass(frozen=True, slots=True)
class FenceCheck:
    """CheckFence's answer: is the token's grant the lock's holder now?"""

    current: bool
    # The holder's fencing token now; 0 when the lock is free.
    current_fencing_token: int


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One session as AdminService.ListSessions shows it."""

    session_id: str
    owner: str
    principal: str
    ttl: float
    expires_at: datetime | None
    last_keepalive: datetime | None
    held: tuple[tuple[str, int], ...]  # (lock name, fencing token)
    waiting: tuple[str, ...]


def fence_of(resp: lock_pb2.CheckFenceResponse) -> FenceCheck:
    return FenceCheck(resp.status == lock_pb2.FENCE_STATUS_CURRENT, resp.current_fencing_token)


def session_summary_of(s: lock_pb2.SessionSummary) -> SessionSummary:
    return SessionSummary(
        s.session_id,
        s.owner,
        s.principal,
        seconds(s.ttl),
        timestamp(s.expires_at) if s.HasField("expires_at") else None,
        timestamp(s.last_keepalive) if s.HasField("last_keepalive") else None,
        tuple((h.name, h.fencing_token) for h in s.held),
        tuple(s.waiting),
    )
