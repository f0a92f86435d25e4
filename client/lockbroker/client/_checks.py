"""What the client checks before sending: only what protobuf itself cannot carry.

A lock name may be any UTF-8 text the broker accepts, and its rules (the size limit is the
broker's configuration) are the broker's to enforce. But a Python str can hold lone surrogates,
which have no UTF-8 form: `os.fsdecode` makes them from bytes that are not UTF-8 (a file name, a
command-line argument), and protobuf would refuse to build the request with a bare
UnicodeEncodeError. Such a value is refused here as the broker refuses a bad field: InvalidArgument
with a BadRequest naming it, and nothing sent.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from lockbroker.client.errors import DOMAIN, InvalidArgument
from lockbroker.v1.reasons import ErrorReason


def check_utf8(**fields: str) -> None:
    """Raise InvalidArgument naming each of `fields` (field name = value) that UTF-8 cannot encode."""
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for field, value in fields.items():
        try:
            value.encode()
        except UnicodeEncodeError as e:
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field=field,
                    description=f"is not valid UTF-8: it has a lone surrogate U+{ord(value[e.start]):04X} "
                    f"at index {e.start}",
                )
            )
    if violations:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            ErrorReason.INVALID_ARGUMENT,
            details=(
                error_details_pb2.ErrorInfo(reason=ErrorReason.INVALID_ARGUMENT, domain=DOMAIN),
                error_details_pb2.BadRequest(field_violations=violations),
            ),
        )
