"""Decoding google.rpc.Status details into the client's exceptions."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from lockbroker.client import (
    AlreadyQueued,
    Client,
    ErrorReason,
    InvalidArgument,
    LockBrokerError,
    PermissionDenied,
    QuotaExceeded,
    RequestIdReused,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
    rich_status,
)
from lockbroker.v1 import lock_pb2


async def test_invalid_argument_names_every_bad_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as ei:
        await client.acquire(
            "orders/\n42", session_id="not-a-session", ttl=5, owner="tab\there", request_id="spaces are bad"
        )
    err = ei.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_ARGUMENT"
    fields = dict(err.field_violations)
    assert set(fields) == {"name", "session_id", "ttl", "owner", "request_id"}
    # (A name with an empty segment, "orders//42", was the bad name here before issue 19.)
    assert "control character" in fields["name"] and "16 hex digits" in fields["session_id"]
    assert isinstance(err.detail(error_details_pb2.ErrorInfo), error_details_pb2.ErrorInfo)


async def test_invalid_ttl_is_rejected_not_rounded(client: Client) -> None:
    with pytest.raises(InvalidArgument) as ei:
        await client.create_session(ttl=2.5)
    assert [f for f, _ in ei.value.field_violations] == ["ttl"]
    with pytest.raises(InvalidArgument) as ei:
        await client.create_session(ttl=1)
    assert "between" in ei.value.field_violations[0][1]


async def test_already_queued_and_request_id_reused(client: Client) -> None:
    s = await client.create_session(ttl=5)
    g = await client.acquire("dup", session_id=s.session_id)
    with pytest.raises(AlreadyQueued) as ei:
        await client.acquire("dup", session_id=s.session_id)
    assert ei.value.existing_request_id == g.request_id
    assert ei.value.existing_fencing_token == g.fencing_token
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION

    g2 = await client.acquire("one", ttl=5, request_id="rid-1")
    with pytest.raises(RequestIdReused):
        await client.acquire("other", ttl=5, request_id="rid-1")
    await client.release("one", g2.fencing_token)
    await client.close_session(s.session_id)
    with pytest.raises(SessionNotFound):
        await client.acquire("dup", session_id=s.session_id)


def _error(code: grpc.StatusCode, *details: Any, message: str = "m") -> aio.AioRpcError:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    trailers = aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return aio.AioRpcError(code, aio.Metadata(), trailers, message)


def test_quota_failure_and_retry_info() -> None:
    err = from_rpc_error(
        _error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            error_details_pb2.ErrorInfo(reason="QUOTA_EXCEEDED", domain="lockbroker", metadata={"tenant": "t"}),
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject="tenant:t", description="too many locks")]
            ),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)),
        )
    )
    assert isinstance(err, QuotaExceeded)
    assert err.violations == [("tenant:t", "too many locks")]
    assert err.retry_after == 2.5 and err.metadata == {"tenant": "t"} and err.reason == "QUOTA_EXCEEDED"


def test_unavailable_carries_retry_after_and_keeps_unknown_details() -> None:
    unknown = error_details_pb2.Help(links=[error_details_pb2.Help.Link(url="https://example.invalid")])
    err = from_rpc_error(
        _error(
            grpc.StatusCode.UNAVAILABLE,
            error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN", domain="lockbroker"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000)),
            unknown,
        )
    )
    assert isinstance(err, Unavailable) and err.retry_after == 0.5 and err.reason == "SHUTTING_DOWN"
    assert err.detail(error_details_pb2.Help) == unknown


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.INTERNAL, LockBrokerError),
    ],
)
def test_errors_without_details_map_by_code(code: grpc.StatusCode, cls: type[LockBrokerError]) -> None:
    err = from_rpc_error(aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), "plain"))
    assert type(err) is cls and err.reason == "" and err.message == "plain" and err.details == ()


def test_foreign_domain_reason_is_ignored() -> None:
    err = from_rpc_error(
        _error(grpc.StatusCode.NOT_FOUND, error_details_pb2.ErrorInfo(reason="SESSION_NOT_FOUND", domain="elsewhere"))
    )
    assert type(err) is LockBrokerError and err.reason == ""


def test_sync_rpc_error_is_decoded_too() -> None:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad", details=[])
    a = any_pb2.Any()
    a.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="name", description="must not be empty")
            ]
        )
    )
    status.details.append(a)

    class SyncError(grpc.RpcError, grpc.Call):  # the shape grpc's blocking stubs raise
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self) -> str:
            return "bad"

        def trailing_metadata(self) -> Any:
            return (("grpc-status-details-bin", status.SerializeToString()),)

        def initial_metadata(self) -> Any:
            return ()

        def is_active(self) -> bool:
            return False

        def time_remaining(self) -> float:
            return 0.0

        def cancel(self) -> bool:
            return False

        def add_callback(self, callback: Any) -> bool:
            return False

    err = from_rpc_error(SyncError())
    assert isinstance(err, InvalidArgument) and err.field_violations == [("name", "must not be empty")]


def test_rich_status_decodes_once_for_every_caller() -> None:
    holder = lock_pb2.NotAcquired(name="orders/1", waiters=2)
    unknown = error_details_pb2.Help(links=[error_details_pb2.Help.Link(url="https://example.invalid")])
    err = _error(
        grpc.StatusCode.ABORTED,
        error_details_pb2.ErrorInfo(reason="OTHER", domain="elsewhere"),
        error_details_pb2.ErrorInfo(reason="LOCK_HELD", domain="lockbroker", metadata={"lock": "orders/1"}),
        holder,
        unknown,
        message="held",
    )
    rich = rich_status(err, strict=True)
    assert rich is not None
    assert rich.reason == ErrorReason.LOCK_HELD and ErrorReason(rich.reason) is ErrorReason.LOCK_HELD
    assert rich.metadata == {"lock": "orders/1"}
    assert rich.detail(lock_pb2.NotAcquired) == holder and rich.detail(error_details_pb2.Help) == unknown
    assert rich.detail(error_details_pb2.RetryInfo) is None
    # The status as sent keeps its details packed, for callers that unpack with classes of their own.
    assert [d.TypeName() for d in rich.status.details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.ErrorInfo",
        "lockbroker.v1.NotAcquired",
        "google.rpc.Help",
    ]
    assert rich.status.message == "held" and rich.status.code == code_pb2.ABORTED


def test_rich_status_without_a_trailer_or_with_a_broken_one() -> None:
    bare = aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connect failed")
    assert rich_status(bare) is None and rich_status(bare, strict=True) is None
    assert rich_status(grpc.RpcError()) is None  # not a call at all

    garbage = aio.Metadata(("grpc-status-details-bin", b"\xff\xff\xff"))
    broken = aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), garbage, "x")
    assert rich_status(broken) is None
    with pytest.raises(DecodeError):
        rich_status(broken, strict=True)
    assert type(from_rpc_error(broken)) is Unavailable


def test_strict_rich_status_holds_the_trailer_to_the_calls_status() -> None:
    info = error_details_pb2.ErrorInfo(reason="LOCK_HELD", domain="lockbroker")
    status = status_pb2.Status(code=code_pb2.ABORTED, message="held")
    status.details.add().Pack(info)
    trailers = aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    other_code = aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), trailers, "held")
    with pytest.raises(ValueError, match="code"):
        rich_status(other_code, strict=True)
    other_message = aio.AioRpcError(grpc.StatusCode.ABORTED, aio.Metadata(), trailers, "something else")
    with pytest.raises(ValueError, match="something else"):
        rich_status(other_message, strict=True)
    lenient = rich_status(other_code)
    assert lenient is not None and lenient.reason == "LOCK_HELD"
