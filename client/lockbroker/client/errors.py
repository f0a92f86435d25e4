"""Exceptions decoded from the broker's rich status (google.rpc.Status in grpc-status-details-bin).

`rich_status` is the one decoder of that trailer (the client's and the test suite's), and
`from_rpc_error` is the only place that turns a gRPC error into an exception. Classes are chosen
by the ErrorInfo reason (`lockbroker.v1.reasons.ErrorReason`) when the status carries one from
the "lockbroker" domain, and by the status code otherwise (a proxy, a load balancer or the
transport itself can fail a call too, and those errors carry no ErrorInfo).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from lockbroker.client.types import Holder, holder_of, seconds
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from grpc import aio

DOMAIN = "lockbroker"
_M = TypeVar("_M", bound=Message)
_DETAILS_KEY = "grpc-status-details-bin"
# The reason of LockLost, which this client raises by itself: never on the wire, so not an ErrorReason.
LOCK_LOST: Final = "LOCK_LOST"

# Detail types this client knows how to unpack; anything else stays a packed Any in `details`.
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    lock_pb2.NotAcquired,
)


class LockBrokerError(Exception):
    """Base of every error this client raises about a call or a lock.

    `reason` is the ErrorInfo reason (a string equal to an `ErrorReason` member, e.g.
    `err.reason == ErrorReason.LOCK_HELD`; a reason newer than this client stays a plain string)
    or "" when the status carried none;
    `details` are the unpacked google.rpc.Status details (ErrorInfo included).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.details: tuple[Message, ...] = tuple(details)

    def detail(self, kind: type[_M]) -> _M | None:
        """The first detail of this type, if the status carried one."""
        return _first(self.details, kind)

    def __str__(self) -> str:
        label = f"{self.code.name}/{self.reason}" if self.reason else self.code.name
        return f"{label}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, reason={self.reason!r})"


class NotAcquired(LockBrokerError):
    """Acquire gave a definite no: the lock is not held by the caller and nothing stays queued."""

    default_code = grpc.StatusCode.ABORTED

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(code, message, reason, metadata, details)
        info = self.detail(lock_pb2.NotAcquired)
        self.name: str = info.name if info is not None else self.metadata.get("lock", "")
        self.holder: Holder | None = holder_of(info.holder) if info is not None and info.HasField("holder") else None
        self.waiters: int = info.waiters if info is not None else int(self.metadata.get("waiters", "0"))
        self.waited: float = seconds(info.waited) if info is not None else 0.0


class LockHeld(NotAcquired):
    """A try-lock (wait = 0) found the lock held; `holder` says by whom."""


class WaitExpired(NotAcquired):
    """The wait ran out before the lock was granted; `holder` says who still held it."""


class SessionNotFound(LockBrokerError):
    """The session is unknown, closed or expired. It is never revived: create a new one."""

    default_code = grpc.StatusCode.NOT_FOUND


class SessionLost(LockBrokerError):
    """The session's lease ended while its Acquire waited in the queue."""

    default_code = grpc.StatusCode.NOT_FOUND


class LimitMismatch(LockBrokerError):
    """The lock is in use as a semaphore with another limit (or as a lock): use the limit it has."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def limit(self) -> int:
        """The limit in use (0: a lock)."""
        return int(self.metadata.get("limit", "0") or 0)


class AlreadyQueued(LockBrokerError):
    """The session already holds or waits for this lock under another request_id (not reentrant)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def existing_request_id(self) -> str:
        return self.metadata.get("request_id", "")

    @property
    def existing_fencing_token(self) -> int | None:
        token = self.metadata.get("fencing_token")
        return int(token) if token else None


class RequestIdReused(LockBrokerError):
    """A request_id was reused for a different request."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(LockBrokerError):
    """The request was malformed; `field_violations` names each bad field."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of each bad field, from the google.rpc.BadRequest detail."""
        bad = self.detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in bad.field_violations] if bad is not None else []


def _retry_after(details: Iterable[Message]) -> float | None:
    for d in details:
        if isinstance(d, error_details_pb2.RetryInfo) and d.HasField("retry_delay"):
            return seconds(d.retry_delay)
    return None


class Unavailable(LockBrokerError):
    """The broker or its etcd could not answer in time. Retrying (same request_id) is safe.

    `retry_after` is the broker's RetryInfo hint in seconds, or None when the status had none
    (e.g. the connection itself failed).
    """

    default_code = grpc.StatusCode.UNAVAILABLE

    @property
    def retry_after(self) -> float | None:
        return _retry_after(self.details)


class DeadlineExceeded(LockBrokerError):
    """The call's deadline passed. For Acquire the broker has already removed the queued wait."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(LockBrokerError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class NotOwner(PermissionDenied):
    """The grant or session is another session's or another principal's; nothing was changed."""


class Unauthenticated(LockBrokerError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class QuotaExceeded(LockBrokerError):
    """RESOURCE_EXHAUSTED: `violations` are the QuotaFailure (subject, description) pairs."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def violations(self) -> list[tuple[str, str]]:
        """(subject, description) of each exceeded limit, from the google.rpc.QuotaFailure detail."""
        failure = self.detail(error_details_pb2.QuotaFailure)
        return [(v.subject, v.description) for v in failure.violations] if failure is not None else []

    @property
    def retry_after(self) -> float | None:
        return _retry_after(self.details)


class SessionRevoked(SessionNotFound):
    """An admin revoked the session (AdminService.RevokeSession); `metadata["admin_reason"]` says why."""


class NotLeader(LockBrokerError):
    """FAILED_PRECONDITION from Proclaim: the leadership no longer leads; nothing was changed."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class NoLeader(LockBrokerError):
    """NOT_FOUND from Leader: nobody leads the election."""

    default_code = grpc.StatusCode.NOT_FOUND


class RevisionCompacted(LockBrokerError):
    """Watch's start_revision (or Observe's after_revision) is older than etcd keeps:
    `metadata["compact_revision"]` says from where. Read again and watch (observe) without it."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class LockLost(LockBrokerError):
    """Raised by the client itself (no RPC): the lock can no longer be assumed held.

    The session lapsed, was revoked, or was not confirmed alive before its local expiry.
    Work done under the lock after this point may have overlapped another holder; only the
    fencing token, checked by the protected resource, makes that safe.
    """

    default_code = grpc.StatusCode.ABORTED

    def __init__(
        self, message: str, *, name: str = "", fencing_token: int | None = None, cause: str | None = None
    ) -> None:
        super().__init__(self.default_code, message, LOCK_LOST, {"lock": name, "cause": cause or ""})
        self.name = name
        self.fencing_token = fencing_token
        # "REVOKED" (an admin took it), "SESSION_LOST", or None when not known.
        self.cause = cause


# Every reason the broker sends (tests/client/test_errors.py checks that none is missing).
_BY_REASON: dict[str, type[LockBrokerError]] = {
    ErrorReason.LOCK_HELD: LockHeld,
    ErrorReason.WAIT_EXPIRED: WaitExpired,
    ErrorReason.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorReason.SESSION_NOT_FOUND: SessionNotFound,
    ErrorReason.SESSION_LOST: SessionLost,
    ErrorReason.ALREADY_QUEUED: AlreadyQueued,
    ErrorReason.REQUEST_ID_REUSED: RequestIdReused,
    ErrorReason.LIMIT_MISMATCH: LimitMismatch,
    ErrorReason.INVALID_ARGUMENT: InvalidArgument,
    ErrorReason.UNAUTHENTICATED: Unauthenticated,
    ErrorReason.PERMISSION_DENIED: PermissionDenied,
    ErrorReason.QUOTA_EXCEEDED: QuotaExceeded,
    ErrorReason.RATE_LIMITED: QuotaExceeded,
    ErrorReason.BACKEND_UNAVAILABLE: Unavailable,
    ErrorReason.SHUTTING_DOWN: Unavailable,
    ErrorReason.BACKEND_NO_SPACE: Unavailable,
    ErrorReason.AUDIT_UNAVAILABLE: Unavailable,
    ErrorReason.NOT_OWNER: NotOwner,
    ErrorReason.REVOKED: SessionRevoked,
    ErrorReason.NOT_LEADER: NotLeader,
    ErrorReason.NO_LEADER: NoLeader,
    # Never a call's status (it names revoked grants in keepalive answers): the base, if ever seen.
    ErrorReason.MAX_HOLD_EXCEEDED: LockBrokerError,
    ErrorReason.REVISION_COMPACTED: RevisionCompacted,
    ErrorReason.INTERNAL: LockBrokerError,  # a broker bug: nothing to catch it as but the base
}

_BY_CODE: dict[grpc.StatusCode, type[LockBrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
}


def _first(details: Iterable[Message], kind: type[_M]) -> _M | None:
    for d in details:
        if isinstance(d, kind):
            return d
    return None


def _unpack(packed: any_pb2.Any) -> Message:
    for kind in _DETAIL_TYPES:
        msg = kind()
        if packed.Unpack(msg):  # False (and msg untouched) when the type does not match
            return msg
    return packed


@dataclass(frozen=True, slots=True)
class RichStatus:
    """The google.rpc.Status of a failed call, with its details unpacked.

    `status` is the message as sent (details still packed, for a caller that unpacks them with
    classes of its own); `details` are the same details unpacked where this client knows the type
    (google.rpc's and lockbroker.v1.NotAcquired), else left as the packed Any; `info` is the
    ErrorInfo of the "lockbroker" domain, if there is one.
    """

    status: status_pb2.Status
    details: tuple[Message, ...]
    info: error_details_pb2.ErrorInfo | None

    @property
    def reason(self) -> str:
        """The ErrorInfo reason (compare it with `ErrorReason` members), or "" without one."""
        return self.info.reason if self.info is not None else ""

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata) if self.info is not None else {}

    def detail(self, kind: type[_M]) -> _M | None:
        """The first detail of this type, if the status carried one."""
        return _first(self.details, kind)


def _status_trailer(err: grpc.RpcError | grpc.Call) -> bytes | None:
    try:
        trailers = err.trailing_metadata()
    except AttributeError:  # a bare grpc.RpcError raised by something that is not a call
        return None
    # aio.Metadata yields (key, value) tuples; the sync API yields namedtuples of the same shape.
    pairs = cast(Iterable[tuple[str, str | bytes]], trailers or ())
    for key, value in pairs:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


def rich_status(err: grpc.RpcError | grpc.Call, *, strict: bool = False) -> RichStatus | None:
    """Decode the google.rpc.Status a failed call carries in grpc-status-details-bin.

    `err` is what a call raised: an aio.AioRpcError, or the sync API's RpcError (also a grpc.Call).
    None when it carries none (the transport, a proxy or a deadline failed the call). A trailer
    that does not parse counts as none, unless `strict`: then it raises DecodeError, and a status
    whose code or message disagrees with the call's own raises ValueError (the check
    grpc_status.rpc_status.from_call makes; the test suite holds the broker to it).
    """
    raw = _status_trailer(err)
    if raw is None:
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except DecodeError:
        if strict:
            raise
        return None
    if strict:
        code, message = err.code(), err.details() or ""
        if status.code != code.value[0]:
            raise ValueError(f"the status trailer says code {status.code}, the call {code.name}")
        if status.message != message:
            raise ValueError(f"the status trailer says {status.message!r}, the call {message!r}")
    details = tuple(_unpack(d) for d in status.details)
    info = next(
        (d for d in details if isinstance(d, error_details_pb2.ErrorInfo) and d.domain == DOMAIN),
        None,
    )
    return RichStatus(status, details, info)


def from_rpc_error(err: aio.AioRpcError | grpc.RpcError) -> LockBrokerError:
    """Translate a failed call into the LockBrokerError subclass it stands for."""
    try:
        code = err.code()
        text = err.details() or ""
    except AttributeError:
        code, text = grpc.StatusCode.UNKNOWN, str(err)
    rich = rich_status(err)
    if rich is None:
        return _BY_CODE.get(code, LockBrokerError)(code, text)
    text = text or rich.status.message
    cls = _BY_REASON.get(rich.reason) or _BY_CODE.get(code, LockBrokerError)
    if cls is LockBrokerError and rich.detail(lock_pb2.NotAcquired) is not None:
        # An ABORTED Acquire with a reason this client predates is still a definite "no".
        cls = NotAcquired
    return cls(code, text, rich.reason, rich.metadata, rich.details)


__all__ = [
    "DOMAIN",
    "LOCK_LOST",
    "AlreadyQueued",
    "DeadlineExceeded",
    "InvalidArgument",
    "LimitMismatch",
    "LockBrokerError",
    "LockHeld",
    "LockLost",
    "NoLeader",
    "NotAcquired",
    "NotLeader",
    "NotOwner",
    "PermissionDenied",
    "QuotaExceeded",
    "RequestIdReused",
    "RevisionCompacted",
    "RichStatus",
    "SessionLost",
    "SessionNotFound",
    "SessionRevoked",
    "Unauthenticated",
    "Unavailable",
    "WaitExpired",
    "from_rpc_error",
    "rich_status",
]
