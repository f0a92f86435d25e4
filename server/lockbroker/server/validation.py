"""Turn requests into core parameters, or into one InvalidArgument naming every bad field.

Out-of-range values are rejected, never clamped: a caller asking for a 1 h TTL and silently
getting 1 min would lose its locks without knowing why.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import TYPE_CHECKING

from google.protobuf import duration_pb2

from lockbroker.interceptors.principal import tenant_problem
from lockbroker.server.core.acquire import AcquireParams
from lockbroker.server.core.errors import FieldViolation, InvalidArgument
from lockbroker.server.core.holds import MIN_HOLD
from lockbroker.server.core.modes import MAX_LIMIT
from lockbroker.server.core.multi import MAX_LOCKS, ManyParams
from lockbroker.server.core.names import (
    MAX_NAME_BYTES,
    name_problem,
    new_claim_id,
    owner_problem,
    parse_session_id,
    reentrant_claim_id,
    request_id_problem,
)
from lockbroker.v1 import lock_pb2

if TYPE_CHECKING:
    from lockbroker.server.config import LockLimits

MAX_PAGE_SIZE = 1000
# A session id is 16 hex digits. A KeepAlive answers an unknown id with `expired` and the id
# echoed back, and the audit names a stream's ids: far longer ones would be copied into both.
MAX_SESSION_ID_CHARS = 64
DEFAULT_PAGE_SIZE = 100


def _max_name(limits: LockLimits | None) -> int:
    # Release, Describe and List take the limits optionally, so a caller that does not pass them
    # still gets the default rule.
    return limits.max_name_bytes if limits is not None else MAX_NAME_BYTES


class _Checker:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def check(self, field: str, problem: str | None) -> None:
        if problem is not None:
            self.bad(field, problem)

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)

    def session(self, field: str, session_id: str, *, required: bool) -> int | None:
        if not session_id:
            if required:
                self.bad(field, "is required")
            return None
        parsed = parse_session_id(session_id, field)
        if isinstance(parsed, FieldViolation):
            self.violations.append(parsed)
            return None
        return parsed

    def _seconds(self, field: str, d: duration_pb2.Duration) -> float | None:
        if abs(d.nanos) >= 1_000_000_000 or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
            self.bad(field, "is not a valid google.protobuf.Duration")
            return None
        value = d.seconds + d.nanos / 1e9
        if value < 0:
            self.bad(field, "must not be negative")
            return None
        return value

    def ttl(self, field: str, present: bool, d: duration_pb2.Duration, limits: LockLimits) -> int:
        if not present:
            return limits.default_ttl
        value = self._seconds(field, d)
        if value is None:
            return 0
        if d.nanos != 0:
            self.bad(field, "must be a whole number of seconds (etcd leases count whole seconds)")
        elif not limits.min_ttl <= value <= limits.max_ttl:
            self.bad(field, f"must be between {limits.min_ttl}s and {limits.max_ttl}s")
        return int(value)

    def wait(self, field: str, present: bool, d: duration_pb2.Duration, limits: LockLimits) -> float:
        if not present:
            return 0.0
        value = self._seconds(field, d)
        if value is None:
            return 0.0
        # max_wait 0: no cap; the RPC deadline (and a tenant's own max_wait) still bound the wait.
        if limits.max_wait and value > limits.max_wait:
            self.bad(field, f"must be at most {limits.max_wait:g}s")
        return value

    def seconds(self, field: str, d: duration_pb2.Duration) -> float:
        """A duration >= 0 in seconds (0 when invalid, with the violation recorded)."""
        return self._seconds(field, d) or 0.0

    def max_hold(self, field: str, d: duration_pb2.Duration) -> float:
        value = self._seconds(field, d)
        if value is None:
            return 0.0
        if d.nanos != 0 or value < MIN_HOLD:
            self.bad(field, f"must be a whole number of seconds, at least {MIN_HOLD:g}s")
        return value

    def name(self, field: str, name: str, limits: LockLimits | None) -> None:
        self.check(field, name_problem(name, max_bytes=_max_name(limits)))


def create_session(req: lock_pb2.CreateSessionRequest, limits: LockLimits) -> tuple[int, str, str]:
    c = _Checker()
    ttl = c.ttl("ttl", req.HasField("ttl"), req.ttl, limits)
    c.check("owner", owner_problem(req.owner))
    c.check("request_id", request_id_problem(req.request_id))
    c.done()
    return ttl, req.owner, req.request_id


def keepalive(req: lock_pb2.KeepAliveRequest) -> None:
    """A KeepAlive request whose session id could be one; an unknown or malformed id of a sane size
    is answered `expired` (it must not end the stream the other sessions share), a huge one ends
    the stream INVALID_ARGUMENT."""
    if len(req.session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidArgument(
            [
                FieldViolation(
                    "session_id",
                    f"is {len(req.session_id)} characters; a session id as returned by CreateSession has 16",
                )
            ]
        )


def session_id(session: str) -> int:
    c = _Checker()
    lease = c.session("session_id", session, required=True)
    c.done()
    assert lease is not None
    return lease


def acquire(req: lock_pb2.AcquireRequest, limits: LockLimits, principal: str = "") -> AcquireParams:
    c = _Checker()
    c.name("name", req.name, limits)
    lease = c.session("session_id", req.session_id, required=False)
    if req.session_id and req.HasField("ttl"):
        c.bad("ttl", "must be unset when session_id is given (the session already has a TTL)")
        ttl = 0
    else:
        ttl = c.ttl("ttl", req.HasField("ttl"), req.ttl, limits)
    wait = c.wait("wait_timeout", req.HasField("wait_timeout"), req.wait_timeout, limits)
    c.check("owner", owner_problem(req.owner))
    c.check("request_id", request_id_problem(req.request_id))
    request_id, claim = req.request_id, ""
    if req.reentrant:
        if not req.session_id:
            c.bad("reentrant", "needs session_id: a session made for one Acquire cannot be re-entered")
        if not req.reentrant_owner:
            c.bad("reentrant_owner", "is required with reentrant (a thread or task identity)")
        else:
            c.check("reentrant_owner", owner_problem(req.reentrant_owner))
        claim = reentrant_claim_id(req.reentrant_owner)
    elif req.reentrant_owner:
        c.bad("reentrant_owner", "must be unset without reentrant")
    elif req.new_claim:
        if not req.session_id:
            c.bad("new_claim", "needs session_id: a session made for one Acquire has one claim")
        # The claim is named after its request id, so the server picks one if the caller did not.
        request_id = request_id or uuid.uuid4().hex
        claim = new_claim_id(request_id)
    hold = c.max_hold("max_hold", req.max_hold) if req.HasField("max_hold") else 0.0
    delay = c.seconds("lock_delay", req.lock_delay) if req.HasField("lock_delay") else 0.0
    shared = _mode(c, req)
    c.done()
    return AcquireParams(
        req.name,
        lease,
        ttl,
        wait,
        req.owner,
        request_id,
        claim,
        req.reentrant_owner if req.reentrant else "",
        principal,
        hold,
        delay,
        shared,
        req.limit,
    )


def _mode_of(c: _Checker, field: str, mode: int) -> bool:
    if mode not in lock_pb2.LockMode.values():
        c.bad(field, f"unknown mode {mode}: use LOCK_MODE_EXCLUSIVE or LOCK_MODE_SHARED")
    return mode == lock_pb2.LOCK_MODE_SHARED


def acquire_many(req: lock_pb2.AcquireManyRequest, limits: LockLimits, principal: str = "") -> ManyParams:
    c = _Checker()
    if not 1 <= len(req.locks) <= MAX_LOCKS:
        c.bad("locks", f"must name 1 to {MAX_LOCKS} locks (got {len(req.locks)})")
    seen: set[str] = set()
    for i, claim in enumerate(req.locks):
        c.name(f"locks[{i}].name", claim.name, limits)
        if claim.name in seen:
            c.bad(f"locks[{i}].name", f"names {claim.name!r} a second time: each lock at most once")
        seen.add(claim.name)
    locks = tuple((claim.name, _mode_of(c, f"locks[{i}].mode", claim.mode)) for i, claim in enumerate(req.locks))
    lease = c.session("session_id", req.session_id, required=True)
    wait = c.wait("wait_timeout", req.HasField("wait_timeout"), req.wait_timeout, limits)
    c.check("owner", owner_problem(req.owner))
    c.check("request_id", request_id_problem(req.request_id))
    c.done()
    assert lease is not None
    return ManyParams(locks, lease, wait, req.owner, req.request_id, principal)


def _mode(c: _Checker, req: lock_pb2.AcquireRequest) -> bool:
    """Whether the claim is shared; checks `mode` and `limit` (core/modes.py)."""
    shared = _mode_of(c, "mode", req.mode)
    if req.limit < 0 or req.limit > MAX_LIMIT:
        c.bad("limit", f"must be 1 to {MAX_LIMIT} permits for a semaphore, or unset for a lock")
    elif req.limit and shared:
        c.bad("mode", "must be unset (or exclusive) with limit: a semaphore's permits have no mode")
    if (shared or req.limit) and req.reentrant:
        c.bad("reentrant", "only an exclusive lock is reentrant (unset mode and limit)")
    return shared


def release(req: lock_pb2.ReleaseRequest, limits: LockLimits | None = None) -> tuple[str, int, int | None]:
    """(name, fencing token, session lease or None); the request id is req.request_id, checked here."""
    c = _Checker()
    c.name("name", req.name, limits)
    if req.fencing_token <= 0:
        c.bad("fencing_token", "must be the positive fencing token of a grant")
    lease = c.session("session_id", req.session_id, required=False)
    c.check("request_id", request_id_problem(req.request_id))
    c.done()
    return req.name, req.fencing_token, lease


def describe(req: lock_pb2.DescribeRequest, limits: LockLimits | None = None) -> str:
    c = _Checker()
    c.name("name", req.name, limits)
    c.done()
    return req.name


def list_locks(req: lock_pb2.ListRequest, limits: LockLimits | None = None) -> tuple[str, int, str | None]:
    c = _Checker()
    c.check("prefix", name_problem(req.prefix, max_bytes=_max_name(limits), prefix=True))
    size = req.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        c.bad("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    after: str | None = None
    if req.page_token:
        try:
            after = base64.urlsafe_b64decode(req.page_token.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            after = None
        # No size rule here: a name listed before the operator lowered max_name_bytes must not
        # break paging through it.
        if after is None or name_problem(after, max_bytes=2**31) is not None or not after.startswith(req.prefix):
            c.bad("page_token", "is not a next_page_token returned by List with this prefix")
    c.done()
    return req.prefix, size, after


def check_fence(req: lock_pb2.CheckFenceRequest, limits: LockLimits | None = None) -> tuple[str, int]:
    c = _Checker()
    c.name("name", req.name, limits)
    if req.fencing_token <= 0:
        c.bad("fencing_token", "must be the positive fencing token of a grant")
    c.done()
    return req.name, req.fencing_token


def watch(req: lock_pb2.WatchRequest, limits: LockLimits | None = None) -> tuple[str, bool, int]:
    """(name or prefix, prefix?, start revision)."""
    c = _Checker()
    if req.prefix:
        c.check("name", name_problem(req.name, max_bytes=_max_name(limits), prefix=True))
    else:
        c.name("name", req.name, limits)
    if req.start_revision < 0:
        c.bad("start_revision", "must not be negative (0: start now; else the revision of the last WatchResponse)")
    c.done()
    return req.name, req.prefix, req.start_revision


MAX_ADMIN_REASON = 256


def admin_reason(c: _Checker, reason: str) -> None:
    if not reason.strip():
        c.bad("reason", "is required: say why (the holder and the audit log are told)")
    elif len(reason.encode("utf-8", "surrogatepass")) > MAX_ADMIN_REASON:
        c.bad("reason", f"is longer than {MAX_ADMIN_REASON} bytes")
    elif any(not ch.isprintable() for ch in reason):
        c.bad("reason", "contains control or non-printable characters")


def admin_tenant(c: _Checker, tenant: str, own: str) -> str:
    if not tenant:
        return own
    c.check("tenant", tenant_problem(tenant))
    return tenant


def force_release(
    req: lock_pb2.ForceReleaseRequest, own_tenant: str, limits: LockLimits | None = None
) -> tuple[str, str, str]:
    c = _Checker()
    c.name("name", req.name, limits)
    admin_reason(c, req.reason)
    tenant = admin_tenant(c, req.tenant, own_tenant)
    c.done()
    return tenant, req.name, req.reason


def revoke_session(req: lock_pb2.RevokeSessionRequest, own_tenant: str) -> tuple[str, int, str]:
    c = _Checker()
    lease = c.session("session_id", req.session_id, required=True)
    admin_reason(c, req.reason)
    tenant = admin_tenant(c, req.tenant, own_tenant)
    c.done()
    assert lease is not None
    return tenant, lease, req.reason


def list_sessions(req: lock_pb2.ListSessionsRequest, own_tenant: str) -> tuple[str, int, str | None]:
    c = _Checker()
    tenant = admin_tenant(c, req.tenant, own_tenant)
    size = req.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        c.bad("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    after = req.page_token or None
    if after is not None and isinstance(parse_session_id(after, "page_token"), FieldViolation):
        c.bad("page_token", "is not a next_page_token returned by ListSessions")
    c.done()
    return tenant, size, after
