"""The operators' calls (lockbroker.v1.AdminService), as `client.admin`: they need the admin role.

    async with Client(target, api_key=ADMIN_KEY) as client:
        await client.admin.force_release("orders/42", reason="holder wedged, INC-1234")

Each takes a `reason`, which the holder's client is shown and the audit log records. Without the
admin role every call raises PermissionDenied.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from grpc import aio

from lockbroker.client.errors import from_rpc_error
from lockbroker.client.types import SessionSummary, session_summary_of
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

Unary = Callable[[Any, Any, "float | None"], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ForceReleased:
    """What ForceRelease removed: released False (and the rest empty) when the lock was free."""

    released: bool
    fencing_token: int
    session_id: str


class AdminClient:
    def __init__(
        self,
        stub: lock_pb2_grpc.AdminServiceAsyncStub,
        unary: Unary,
        metadata: tuple[tuple[str, str], ...],
        default_timeout: float,
    ) -> None:
        self._stub = stub
        self._unary = unary  # the Client's retrying call, for the reads
        self._metadata = metadata
        self._timeout = default_timeout

    async def _once(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def force_release(
        self, name: str, *, reason: str, tenant: str = "", timeout: float | None = None
    ) -> ForceReleased:
        """Take `name` away from its holder, or from every holder of a shared lock or semaphore
        (each client sees the loss with cause REVOKED); the answer names the oldest grant taken.

        Not retried after a lost answer: a second forced release would take the next grant too."""
        req = lock_pb2.ForceReleaseRequest(name=name, reason=reason, tenant=tenant)
        resp = await self._once(self._stub.ForceRelease, req, timeout)
        return ForceReleased(resp.released, resp.fencing_token, resp.session_id)

    async def revoke_session(
        self, session_id: str, *, reason: str, tenant: str = "", timeout: float | None = None
    ) -> bool:
        """End a session and release its locks; False if it was already gone (also after a lost
        answer: not retried)."""
        req = lock_pb2.RevokeSessionRequest(session_id=session_id, reason=reason, tenant=tenant)
        resp = await self._once(self._stub.RevokeSession, req, timeout)
        return bool(resp.revoked)

    async def list_sessions(
        self, tenant: str = "", page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncGenerator[SessionSummary, None]:
        """Every session of `tenant` (unset: the admin's own), by session id, across all pages."""
        token = ""
        while True:
            req = lock_pb2.ListSessionsRequest(tenant=tenant, page_size=page_size, page_token=token)
            resp = await self._unary(self._stub.ListSessions, req, timeout)
            for s in resp.sessions:
                yield session_summary_of(s)
            token = resp.next_page_token
            if not token:
                return
