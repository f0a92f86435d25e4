"""The google.rpc.ErrorInfo reasons of lockbroker: a Python mirror of `lock.proto`'s `ErrorReason`.

The proto enum is the reference, documented value by value (status code, retryable or not, the
details and metadata that come along), and gives clients in every language their constants. On
the wire the reason stays a string: the proto value's name without its `ERROR_REASON_` prefix.
This StrEnum's members are those strings, so both `info.reason == ErrorReason.LOCK_HELD` and
`ErrorReason(info.reason)` work on a decoded ErrorInfo.

Written out rather than built from `lock_pb2` at import time so that type checkers and editors
see the members; tests/test_error_reasons.py checks that the two enums have exactly the same ones.
Shared by the server, the interceptors and the client (the client wheel ships it beside the stubs).
"""

from __future__ import annotations

from enum import StrEnum, unique

from lockbroker.v1 import lock_pb2

PROTO_PREFIX = "ERROR_REASON_"


@unique
class ErrorReason(StrEnum):
    """One google.rpc.ErrorInfo.reason (domain "lockbroker"); see lock.proto for each one's contract."""

    LOCK_HELD = "LOCK_HELD"
    WAIT_EXPIRED = "WAIT_EXPIRED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_LOST = "SESSION_LOST"
    ALREADY_QUEUED = "ALREADY_QUEUED"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
    INTERNAL = "INTERNAL"
    BACKEND_NO_SPACE = "BACKEND_NO_SPACE"
    NOT_OWNER = "NOT_OWNER"
    REVOKED = "REVOKED"
    MAX_HOLD_EXCEEDED = "MAX_HOLD_EXCEEDED"
    LIMIT_MISMATCH = "LIMIT_MISMATCH"
    NOT_LEADER = "NOT_LEADER"
    NO_LEADER = "NO_LEADER"
    REVISION_COMPACTED = "REVISION_COMPACTED"

    @property
    def proto(self) -> lock_pb2.ErrorReason.ValueType:
        """The `lock_pb2.ErrorReason` value of this reason (e.g. ERROR_REASON_LOCK_HELD)."""
        return lock_pb2.ErrorReason.Value(PROTO_PREFIX + self.value)


__all__ = ["PROTO_PREFIX", "ErrorReason"]
