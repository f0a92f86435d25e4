"""Python client of lockbroker: fair, fenced, lease-based distributed locks over gRPC.

asyncio first (`Client`), with a blocking facade (`SyncClient`) over the same code.
"""

from lockbroker.client._retry import Backoff
from lockbroker.client._watch import LockEvent
from lockbroker.client.aio import Client, HeldLock, LockContext, SessionKeeper
from lockbroker.client.errors import (
    AlreadyQueued,
    DeadlineExceeded,
    InvalidArgument,
    LimitMismatch,
    LockBrokerError,
    LockHeld,
    LockLost,
    NotAcquired,
    NotOwner,
    PermissionDenied,
    QuotaExceeded,
    RequestIdReused,
    RevisionCompacted,
    RichStatus,
    SessionLost,
    SessionNotFound,
    SessionRevoked,
    Unauthenticated,
    Unavailable,
    WaitExpired,
    from_rpc_error,
    rich_status,
)
from lockbroker.client.sync import SyncClient, SyncHeldLock, SyncSession
from lockbroker.client.types import (
    FenceCheck,
    Grant,
    Holder,
    LockState,
    LockSummary,
    Session,
    SessionSummary,
    Waiter,
)
from lockbroker.v1.reasons import ErrorReason

__all__ = [
    "AlreadyQueued",
    "Backoff",
    "Client",
    "DeadlineExceeded",
    "ErrorReason",
    "FenceCheck",
    "Grant",
    "HeldLock",
    "Holder",
    "InvalidArgument",
    "LimitMismatch",
    "LockBrokerError",
    "LockContext",
    "LockEvent",
    "LockHeld",
    "LockLost",
    "LockState",
    "LockSummary",
    "NotAcquired",
    "NotOwner",
    "PermissionDenied",
    "QuotaExceeded",
    "RequestIdReused",
    "RevisionCompacted",
    "RichStatus",
    "Session",
    "SessionKeeper",
    "SessionLost",
    "SessionNotFound",
    "SessionRevoked",
    "SessionSummary",
    "SyncClient",
    "SyncHeldLock",
    "SyncSession",
    "Unauthenticated",
    "Unavailable",
    "WaitExpired",
    "Waiter",
    "from_rpc_error",
    "rich_status",
]
