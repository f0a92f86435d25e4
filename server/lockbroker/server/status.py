"""The one place that turns domain errors into gRPC statuses with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2

from lockbroker.interceptors.rpcstatus import DOMAIN, Trailers, quota_details, trailers
from lockbroker.server import convert
from lockbroker.server.core import errors as e
from lockbroker.server.core.election import NoLeader, NotLeader
from lockbroker.v1.reasons import ErrorReason

_CODES: list[tuple[type[e.LockBrokerError], grpc.StatusCode]] = [
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotAcquired, grpc.StatusCode.ABORTED),
    (e.SessionNotFound, grpc.StatusCode.NOT_FOUND),  # and SessionRevoked
    (e.NotOwner, grpc.StatusCode.PERMISSION_DENIED),
    (e.SessionLost, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyQueued, grpc.StatusCode.FAILED_PRECONDITION),
    (e.RequestIdReused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.LimitMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (e.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.RevisionCompacted, grpc.StatusCode.OUT_OF_RANGE),
    (NotLeader, grpc.StatusCode.FAILED_PRECONDITION),
    (NoLeader, grpc.StatusCode.NOT_FOUND),
    (e.BackendNoSpace, grpc.StatusCode.UNAVAILABLE),  # before Unavailable, its base: see the class
    (e.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def code_of(exc: e.LockBrokerError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _details(exc: e.LockBrokerError) -> list[message.Message]:
    if isinstance(exc, e.InvalidArgument):
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        ]
    if isinstance(exc, e.NotAcquired):
        return [convert.not_acquired(exc.info)]
    if isinstance(exc, e.QuotaExceeded):
        return quota_details(exc.tenant, exc.limit, exc.value, exc.message, exc.retry_after)
    if isinstance(exc, e.Unavailable):
        return [error_details_pb2.RetryInfo(retry_delay=convert.dur(exc.retry_after))]
    return []


def to_status(exc: e.LockBrokerError) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailing metadata) for `context.abort`."""
    code = code_of(exc)
    return code, exc.message, trailers(code, exc.message, exc.reason, exc.metadata, _details(exc))


def internal(incident: str) -> tuple[grpc.StatusCode, str, Trailers]:
    message_text = f"internal error (incident {incident}); the broker's log has the details"
    code = grpc.StatusCode.INTERNAL
    return code, message_text, trailers(code, message_text, ErrorReason.INTERNAL, {"incident": incident})


__all__ = ["DOMAIN", "code_of", "internal", "to_status"]
