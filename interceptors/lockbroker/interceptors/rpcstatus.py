"""google.rpc.Status in trailers: the error shape every part of lockbroker speaks.

Shared by the server's error mapping and by the interceptors that reject calls before the
handler runs, so a caller decodes an identity or quota rejection exactly like a lock error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "lockbroker"
DETAILS_KEY = "grpc-status-details-bin"


class Trailers(tuple[tuple[str, str | bytes], ...]):
    """Trailing metadata that also remembers the ErrorInfo reason it carries.

    `CallContext.abort` reads `.reason` to record the call's outcome, so the serialized
    google.rpc.Status is built once and never parsed back on the server. grpc's own Cython
    `context.abort` accepts only an exact tuple: `CallContext.abort` converts, and every handler
    and layer of ours is handed a CallContext (the service edge makes one when no chain did);
    code aborting on a bare grpc context must pass `tuple(trailers)`.
    """

    reason: str | None = None

    @staticmethod
    def of(items: tuple[tuple[str, str | bytes], ...], reason: str | None) -> Trailers:
        t = Trailers(items)
        t.reason = reason
        return t


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def trailers(
    code: grpc.StatusCode,
    message_text: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    details: Iterable[message.Message] = (),
) -> Trailers:
    """Trailing metadata carrying a google.rpc.Status with an ErrorInfo first, then `details`."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))
    status = status_pb2.Status(
        code=code.value[0], message=message_text, details=[pack(info), *(pack(d) for d in details)]
    )
    return Trailers.of(((DETAILS_KEY, status.SerializeToString()),), reason)


def quota_details(
    tenant: str, limit: str, value: float, description: str, retry_after: float | None
) -> list[message.Message]:
    """QuotaFailure naming the limit and its value, and RetryInfo when waiting can help."""
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=f"tenant:{tenant}",
        description=description,
        api_service="lockbroker.v1.LockService",
        quota_metric=f"lockbroker/{limit}",
        quota_id=limit,
        quota_dimensions={"tenant": tenant},
        quota_value=int(value),
    )
    details: list[message.Message] = [error_details_pb2.QuotaFailure(violations=[violation])]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(retry_after * 1e9)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details


def _metadata_items(metadata: Iterable[Any] | None) -> list[tuple[str, str | bytes]]:
    # Servers hand out tuples of pairs or of _Metadatum; clients an aio.Metadata of pairs.
    items: list[tuple[str, str | bytes]] = []
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        items.append((str(key), value))
    return items


def rich_status(trailing_metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    """The google.rpc.Status a server put in `grpc-status-details-bin`, if any and if parseable."""
    for key, value in _metadata_items(trailing_metadata):
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return None
            return status
    return None


def error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of our domain in a status, if any."""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:  # Unpack is False for other detail types
            return info
    return None


def error_reason(trailing_metadata: Iterable[Any] | None) -> str | None:
    """The ErrorInfo reason from trailing metadata (e.g. BACKEND_UNAVAILABLE), or None."""
    info = error_info(rich_status(trailing_metadata))
    return info.reason if info is not None else None


def retry_delay(trailing_metadata: Iterable[Any] | None) -> float | None:
    """Seconds the server asked the caller to wait (google.rpc.RetryInfo), or None."""
    status = rich_status(trailing_metadata)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None
