"""Domain errors of the lock core.

The core raises only these; the gRPC edge maps each to one status in `lockbroker.server.status`.
Every error has a stable `reason` (the google.rpc.ErrorInfo reason, a member of lock.proto's
`ErrorReason`) and string metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from lockbroker.server.core.model import Entry


class LockBrokerError(Exception):
    """Base of every error a caller can be told about."""

    # Every subclass names its own; the base is never raised, and would be a bug (status INTERNAL).
    reason: ErrorReason = ErrorReason.INTERNAL

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(LockBrokerError):
    reason = ErrorReason.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


@dataclass
class NotAcquiredInfo:
    name: str
    holder: Entry | None
    holder_expires_at: float | None
    waiters: int
    waited: float
    extra: dict[str, str] = field(default_factory=dict)


class NotAcquired(LockBrokerError):
    """The lock was not granted: a definite outcome, never a silent success."""

    def __init__(self, message: str, info: NotAcquiredInfo) -> None:
        meta = {"lock": info.name, "waiters": str(info.waiters)}
        if info.holder is not None:
            meta["holder_owner"] = info.holder.owner
            meta["holder_fencing_token"] = str(info.holder.create_revision)
        super().__init__(message, meta)
        self.info = info


class LockHeld(NotAcquired):
    reason = ErrorReason.LOCK_HELD


class WaitExpired(NotAcquired):
    reason = ErrorReason.WAIT_EXPIRED


class SessionNotFound(LockBrokerError):
    reason = ErrorReason.SESSION_NOT_FOUND


class SessionLost(LockBrokerError):
    """The session's lease ended while its Acquire waited in the queue."""

    reason = ErrorReason.SESSION_LOST


class SessionRevoked(SessionNotFound):
    """An admin revoked the session (AdminService.RevokeSession)."""

    reason = ErrorReason.REVOKED


class NotOwner(LockBrokerError):
    """The grant or session belongs to another session or principal of the tenant."""

    reason = ErrorReason.NOT_OWNER


class AlreadyQueued(LockBrokerError):
    reason = ErrorReason.ALREADY_QUEUED


class RequestIdReused(LockBrokerError):
    reason = ErrorReason.REQUEST_ID_REUSED


class LimitMismatch(LockBrokerError):
    """The lock is in use with another semaphore limit (0: as a lock) than the request names."""

    reason = ErrorReason.LIMIT_MISMATCH


class QuotaExceeded(LockBrokerError):
    """A tenant limit (see lockbroker.server.core.quota.LIMITS) would be exceeded; nothing was changed.

    retry_after: when waiting can help (held state is freed by releases and expiries), a hint of
    how long; None when it cannot (a TTL or wait above the tenant's maximum)."""

    reason = ErrorReason.QUOTA_EXCEEDED

    def __init__(self, tenant: str, limit: str, value: float, message: str, retry_after: float | None) -> None:
        shown = int(value) if float(value).is_integer() else value
        super().__init__(message, {"tenant": tenant, "limit": limit, "value": str(shown)})
        self.tenant = tenant
        self.limit = limit
        self.value = value
        self.retry_after = retry_after


class RevisionCompacted(LockBrokerError):
    """Watch's start_revision is below etcd's compact revision: the events after it are gone."""

    reason = ErrorReason.REVISION_COMPACTED

    def __init__(self, start_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"start_revision {start_revision} is compacted (etcd keeps revisions from {compact_revision}); "
            "read the lock again and watch without start_revision",
            {"start_revision": str(start_revision), "compact_revision": str(compact_revision)},
        )
        self.compact_revision = compact_revision


class DeadlineExceeded(LockBrokerError):
    """The RPC deadline passed before an answer (the wait was cleaned up)."""

    reason = ErrorReason.DEADLINE_EXCEEDED


class Unavailable(LockBrokerError):
    """etcd could not answer in time. Retrying later (with the same request_id) is safe."""

    reason = ErrorReason.BACKEND_UNAVAILABLE

    def __init__(self, message: str, retry_after: float = 1.0, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # A write that may or may not have been applied; callers resolve it by reading state.
        self.outcome_unknown = outcome_unknown


class ShuttingDown(Unavailable):
    reason = ErrorReason.SHUTTING_DOWN


class BackendNoSpace(Unavailable):
    """etcd refused a write because its database reached its space quota (etcd's NOSPACE alarm,
    "mvcc: database space exceeded"). Nothing was written. Writes keep failing until an operator
    frees space (compact, defragment, disarm the alarm: docs/security.md), so the hint is long.
    UNAVAILABLE like AUDIT_UNAVAILABLE, not RESOURCE_EXHAUSTED: the caller exceeded nothing of
    its own, and clients read RESOURCE_EXHAUSTED as their tenant's quota."""

    reason = ErrorReason.BACKEND_NO_SPACE

    def __init__(self, retry_after: float = 30.0) -> None:
        super().__init__(
            "etcd is out of space (its NOSPACE alarm is raised): the broker cannot write until an "
            "operator compacts and defragments etcd and disarms the alarm",
            retry_after=retry_after,
        )
