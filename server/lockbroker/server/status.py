"""The one place that turns domain errors into gRPC statuses with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lockbroker.interceptors.rpcstatus import DOMAIN
from lockbroker.server import convert
from lockbroker.server.core import errors as e
from lockbroker.v1 import lock_pb2

_CODES: list[tuple[type[e.LockBrokerError], grpc.StatusCode]] = [
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotAcquired, grpc.StatusCode.ABORTED),
    (e.SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (e.SessionLost, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyQueued, grpc.StatusCode.FAILED_PRECONDITION),
    (e.RequestIdReused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.Unavailable, grpc.StatusCode.UNAVAILABLE),
]

Trailers = tuple[tuple[str, str | bytes], ...]


def code_of(exc: e.LockBrokerError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


def to_status(exc: e.LockBrokerError) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailing metadata) for `context.abort`."""
    code = code_of(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))]
    if isinstance(exc, e.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in exc.violations
                    ]
                )
            )
        )
    elif isinstance(exc, e.NotAcquired):
        details.append(_pack(convert.not_acquired(exc.info)))
    elif isinstance(exc, e.Unavailable):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(__import__("datetime").timedelta(seconds=exc.retry_after))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=details)
    return code, exc.message, (("grpc-status-details-bin", status.SerializeToString()),)


def internal(incident: str) -> tuple[grpc.StatusCode, str, Trailers]:
    message = f"internal error (incident {incident}); the broker's log has the details"
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=message,
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"incident": incident}))],
    )
    return grpc.StatusCode.INTERNAL, message, (("grpc-status-details-bin", status.SerializeToString()),)


__all__ = ["DOMAIN", "code_of", "internal", "lock_pb2", "to_status"]
