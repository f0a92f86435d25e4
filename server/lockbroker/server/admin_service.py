"""`lockbroker.v1.AdminService`: the operators' plane over the lock core (core/admin.py).

Every call needs the admin role (`require_admin`): a principal of a tenant with `admin = true` in
the tenants file is a cluster admin and may name any tenant (unset: its own). Without
authentication nobody is an admin. The audit record of each call names the admin (its principal)
and the reason given (`adminReason`); the edge and the interceptor chain are LockService's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lockbroker.interceptors.audit import SCHEMA, AuditLog, AuditWriteError
from lockbroker.interceptors.base import state_of
from lockbroker.interceptors.identity import require_admin
from lockbroker.server import convert, validation
from lockbroker.server.core.holds import OnRevoked
from lockbroker.server.core.names import session_id_of
from lockbroker.server.service import NO_RETRY, Ctx, RetryPolicy, principal_of, rpc, tenant_of
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from lockbroker.v1.reasons import ErrorReason

if TYPE_CHECKING:
    from lockbroker.server.core.locks import LockCore

ADMIN_SERVICE = lock_pb2.DESCRIPTOR.services_by_name["AdminService"]
# The `method` of audit records of revocations the broker makes itself (no RPC made them).
MAX_HOLD_METHOD = "lockbroker.internal/MaxHoldExceeded"


# The `method` of the audit record of each grant a ForceRelease removed (one per holder: a shared
# lock or a semaphore has several), next to the record of the RPC itself.
FORCE_RELEASED_METHOD = "lockbroker.internal/GrantForceReleased"


class AdminService(lock_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: LockCore, retry: RetryPolicy = NO_RETRY, audit_log: AuditLog | None = None) -> None:
        self.core = core
        self.retry = retry
        self.draining = False
        self.audit_log = audit_log
        self._audits: set[asyncio.Task[Any]] = set()

    @rpc(ADMIN_SERVICE)
    async def ForceRelease(self, request: lock_pb2.ForceReleaseRequest, context: Ctx) -> lock_pb2.ForceReleaseResponse:
        await require_admin(context)
        tenant, name, reason = validation.force_release(request, tenant_of(context))
        admin = principal_of(context)
        gone = await self.core.force_release(tenant, name, reason, admin)
        if not gone:
            return lock_pb2.ForceReleaseResponse(released=False)
        if self.audit_log is not None:
            who = state_of(context).principal
            principal = {"kind": who.kind, "id": who.id} if who is not None else None
            for grant in gone:
                rec = _revocation_record(tenant, name, grant.create_revision, session_id_of(grant.lease), principal)
                rec["method"] = FORCE_RELEASED_METHOD
                rec["adminReason"] = reason
                rec["outcome"] = {"code": "OK", "reason": ErrorReason.REVOKED, "message": "force-released by an admin"}
                task = asyncio.get_running_loop().create_task(_write(self.audit_log, rec))
                self._audits.add(task)
                task.add_done_callback(self._audits.discard)
        # The oldest grant removed (a lock's only holder); the others of a shared lock or a
        # semaphore are in the audit log, one record each.
        first = gone[0]
        return lock_pb2.ForceReleaseResponse(
            released=True, fencing_token=first.create_revision, session_id=session_id_of(first.lease)
        )

    @rpc(ADMIN_SERVICE)
    async def RevokeSession(
        self, request: lock_pb2.RevokeSessionRequest, context: Ctx
    ) -> lock_pb2.RevokeSessionResponse:
        await require_admin(context)
        tenant, lease, reason = validation.revoke_session(request, tenant_of(context))
        return lock_pb2.RevokeSessionResponse(
            revoked=await self.core.revoke_session(tenant, lease, reason, principal_of(context))
        )

    @rpc(ADMIN_SERVICE)
    async def ListSessions(self, request: lock_pb2.ListSessionsRequest, context: Ctx) -> lock_pb2.ListSessionsResponse:
        await require_admin(context)
        tenant, size, after = validation.list_sessions(request, tenant_of(context))
        sessions, token = await self.core.list_sessions(tenant, size, after)
        resp = lock_pb2.ListSessionsResponse(next_page_token=token)
        for s in sessions:
            out = resp.sessions.add(
                session_id=session_id_of(s.lease),
                owner=s.owner,
                principal=s.principal,
                ttl=convert.dur(s.ttl),
                held=[lock_pb2.HeldGrant(name=n, fencing_token=t) for n, t in s.held],
                waiting=s.waiting,
            )
            if s.expires_at is not None:
                out.expires_at.CopyFrom(convert.ts(s.expires_at))
                out.last_keepalive.CopyFrom(convert.ts(s.expires_at - s.ttl))
        return resp


def revocation_auditor(log: AuditLog | None) -> OnRevoked:
    """What the max-hold sweep (core/holds.py) calls on each revocation: one audit record, as an RPC
    would have, with the broker itself as the principal (no call made it)."""
    tasks: set[asyncio.Task[Any]] = set()

    def record(tenant: str, name: str, token: int, session: str) -> None:
        if log is None:
            return
        rec = _revocation_record(tenant, name, token, session, {"kind": "broker", "id": "max-hold"})
        task = asyncio.get_running_loop().create_task(_write(log, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return record


def _revocation_record(
    tenant: str, name: str, token: int, session: str, principal: dict[str, str] | None
) -> dict[str, Any]:
    """An audit record of one grant the broker took away (max hold, or an admin's ForceRelease)."""
    return {
        "schema": SCHEMA,
        "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "auditId": str(uuid.uuid4()),
        "stage": "ResponseComplete",
        "requestAuditId": None,
        "tenant": tenant,
        "principal": principal,
        "method": MAX_HOLD_METHOD,
        "lock": name,
        "session": session,
        "fencingToken": str(token),
        "outcome": {
            "code": "OK",
            "reason": ErrorReason.MAX_HOLD_EXCEEDED,
            "message": "held longer than its maximum hold time; revoked",
        },
    }


async def _write(log: AuditLog, rec: dict[str, Any]) -> None:
    try:
        await log.write(rec)
    except AuditWriteError as e:
        logging.getLogger("lockbroker.audit").error("audit record of a revocation not written: %s", e)
