"""Core values to lockbroker.v1 messages."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from lockbroker.server.core.errors import NotAcquiredInfo
from lockbroker.server.core.model import Entry, Grant, Revocation, SessionInfo
from lockbroker.server.core.names import session_id_of
from lockbroker.v1 import lock_pb2


def ts(unix: float) -> timestamp_pb2.Timestamp:
    seconds = int(unix)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((unix - seconds) * 1e9))


def dur(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def holder(entry: Entry, expires_at: float | None = None) -> lock_pb2.LockHolder:
    msg = lock_pb2.LockHolder(
        owner=entry.owner,
        session_id=session_id_of(entry.lease),
        fencing_token=entry.create_revision,
        since=ts(entry.value.queued_at),
        request_id=entry.request_id,
        hold_count=entry.value.hold_count,
        mode=mode(entry.value.shared),
    )
    if expires_at is not None:
        msg.expires_at.CopyFrom(ts(expires_at))
    return msg


def grant(g: Grant) -> lock_pb2.Grant:
    return lock_pb2.Grant(
        name=g.name,
        fencing_token=g.fencing_token,
        session_id=g.session_id,
        expires_at=ts(g.expires_at),
        owner=g.owner,
        queued_at=ts(g.queued_at),
        request_id=g.request_id,
        hold_count=g.hold_count,
        mode=mode(g.shared),
        limit=g.limit,
    )


def mode(shared: bool) -> lock_pb2.LockMode.ValueType:
    return lock_pb2.LOCK_MODE_SHARED if shared else lock_pb2.LOCK_MODE_EXCLUSIVE


def session(s: SessionInfo) -> tuple[duration_pb2.Duration, timestamp_pb2.Timestamp]:
    return dur(s.ttl), ts(s.expires_at)


def not_acquired(info: NotAcquiredInfo) -> lock_pb2.NotAcquired:
    msg = lock_pb2.NotAcquired(name=info.name, waiters=info.waiters, waited=dur(info.waited))
    if info.holder is not None:
        msg.holder.CopyFrom(holder(info.holder, info.holder_expires_at))
    return msg


def revoked(revocations: tuple[Revocation, ...]) -> list[lock_pb2.RevokedGrant]:
    return [
        lock_pb2.RevokedGrant(name=r.name, fencing_token=r.fencing_token, reason=r.reason, message=r.message)
        for r in revocations
    ]
