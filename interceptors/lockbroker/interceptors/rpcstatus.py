"""google.rpc.Status in trailers: the error shape every part of lockbroker speaks.

Shared by the server's error mapping and by the interceptors that reject calls before the
handler runs, so a caller decodes an identity or quota rejection exactly like a lock error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "lockbroker"
DETAILS_KEY = "grpc-status-details-bin"

Trailers = tuple[tuple[str, str | bytes], ...]


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
    return ((DETAILS_KEY, status.SerializeToString()),)


def status_of(metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    """The google.rpc.Status in trailing metadata, if any."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def reason_of(metadata: Iterable[Any] | None) -> str | None:
    """The ErrorInfo reason in trailing metadata (our domain only), if any."""
    status = status_of(metadata)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info.reason
    return None
