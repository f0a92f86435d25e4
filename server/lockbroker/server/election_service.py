"""`lockbroker.v1.ElectionService`: leader election over sessions (core/election.py).

The edge is LockService's (`rpc`: deadline, retry by idempotency, one mapping of errors to
statuses) and so is the interceptor chain: the requests name the election in `name`, the
session in `session_id` and the leadership in `fencing_token`, the fields audit and tracing
read from lock calls, and Campaign answers with a lock `Grant`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from lockbroker.interceptors.base import CallInfo, scoped
from lockbroker.server import convert
from lockbroker.server.core.election import FOREVER, MAX_VALUE_BYTES, Campaign, ElectionCore
from lockbroker.server.core.errors import FieldViolation, InvalidArgument, ShuttingDown
from lockbroker.server.core.model import Entry
from lockbroker.server.core.names import owner_problem, request_id_problem, session_id_of
from lockbroker.server.core.quota import UNLIMITED, QuotaLookup
from lockbroker.server.service import NO_RETRY, Ctx, Malformed, RetryPolicy, _fail, principal_of, rpc, tenant_of
from lockbroker.server.validation import _Checker
from lockbroker.v1 import election_pb2, election_pb2_grpc

if TYPE_CHECKING:
    from lockbroker.server.config import LockLimits
    from lockbroker.server.etcd.client import EtcdClient
    from lockbroker.server.service import LockService

ELECTION_SERVICE = election_pb2.DESCRIPTOR.services_by_name["ElectionService"]
_OBSERVE = CallInfo(f"/{ELECTION_SERVICE.full_name}/Observe", ELECTION_SERVICE.full_name, "Observe", False, True)


def leader_info(name: str, e: Entry) -> election_pb2.LeaderInfo:
    return election_pb2.LeaderInfo(
        name=name, session_id=session_id_of(e.lease), fencing_token=e.create_revision, value=e.value.data, owner=e.owner
    )


def _value(c: _Checker, value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        c.bad("value", f"is {len(value)} bytes; the limit is {MAX_VALUE_BYTES} bytes")


def _leadership(c: _Checker, req: Any, limits: LockLimits) -> int:
    """The session of a Proclaim or Resign (its name and token checked too)."""
    c.name("name", req.name, limits)
    lease = c.session("session_id", req.session_id, required=True)
    if req.fencing_token <= 0:
        c.bad("fencing_token", "must be the positive fencing token Campaign returned")
    return lease or 0


class ElectionService(election_pb2_grpc.ElectionServiceServicer):
    def __init__(
        self,
        core: ElectionCore,
        limits: LockLimits,
        *,
        locks: LockService,
        etcd: EtcdClient | None,
        retry: RetryPolicy = NO_RETRY,
        quotas: QuotaLookup = lambda _t: UNLIMITED,
    ) -> None:
        self.core = core
        self.limits = limits
        self.locks = locks  # its per-tenant count of open streams bounds Observe streams too
        self.etcd = etcd  # Observe watches etcd; the memory backend has no watch to replay
        self.retry = retry
        self.quotas = quotas
        self.draining = False

    def _wait(self, c: _Checker, req: election_pb2.CampaignRequest, tenant: str) -> float:
        if req.HasField("wait_timeout"):
            return c.wait("wait_timeout", True, req.wait_timeout, self.limits)
        # Unset: as long as the broker and the tenant allow (the RPC deadline still ends it).
        caps = [w for w in (self.limits.max_wait, self.quotas(tenant).max_wait) if w]
        return min(caps, default=FOREVER)

    @rpc(ELECTION_SERVICE)
    async def Campaign(self, request: election_pb2.CampaignRequest, context: Ctx) -> election_pb2.CampaignResponse:
        tenant = tenant_of(context)
        c = _Checker()
        c.name("name", request.name, self.limits)
        lease = c.session("session_id", request.session_id, required=True)
        _value(c, request.value)
        wait = self._wait(c, request, tenant)
        c.check("owner", owner_problem(request.owner))
        c.check("request_id", request_id_problem(request.request_id))
        c.done()
        assert lease is not None
        g = await self.core.campaign(
            tenant,
            Campaign(
                request.name, lease, request.value, wait, request.owner, request.request_id, principal_of(context)
            ),
        )
        return election_pb2.CampaignResponse(grant=convert.grant(g), waited=convert.dur(g.waited))

    @rpc(ELECTION_SERVICE)
    async def Proclaim(self, request: election_pb2.ProclaimRequest, context: Ctx) -> election_pb2.ProclaimResponse:
        c = _Checker()
        lease = _leadership(c, request, self.limits)
        _value(c, request.value)
        c.done()
        written = await self.core.proclaim(
            tenant_of(context),
            request.name,
            lease_id=lease,
            token=request.fencing_token,
            value=request.value,
            principal=principal_of(context),
        )
        return election_pb2.ProclaimResponse(revision=written.mod_revision)

    @rpc(ELECTION_SERVICE)
    async def Resign(self, request: election_pb2.ResignRequest, context: Ctx) -> election_pb2.ResignResponse:
        c = _Checker()
        lease = _leadership(c, request, self.limits)
        c.done()
        resigned = await self.core.resign(
            tenant_of(context), request.name, lease, request.fencing_token, principal_of(context)
        )
        return election_pb2.ResignResponse(resigned=resigned)

    @rpc(ELECTION_SERVICE)
    async def Leader(self, request: election_pb2.LeaderRequest, context: Ctx) -> election_pb2.LeaderResponse:
        c = _Checker()
        c.name("name", request.name, self.limits)
        c.done()
        e = await self.core.leader(tenant_of(context), request.name)
        return election_pb2.LeaderResponse(leader=leader_info(request.name, e), revision=e.mod_revision)

    async def Observe(
        self, request: election_pb2.ObserveRequest, context: Ctx
    ) -> AsyncIterator[election_pb2.ObserveResponse]:
        context = scoped(context, _OBSERVE)
        tenant = tenant_of(context)
        opened = False
        try:
            if self.draining:
                raise ShuttingDown("the broker is shutting down; retry on another replica", retry_after=0.5)
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation("request", f"is not a valid request message: {request.error}")])
            c = _Checker()
            c.name("name", request.name, self.limits)
            if request.after_revision < 0:
                c.bad("after_revision", "must not be negative")
            c.done()
            if self.etcd is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Observe needs the etcd backend")
                return
            self.locks._open_stream(tenant)  # Observe streams count against max_streams like KeepAlive's
            opened = True
            async for state in self._until_draining(self._changes(tenant, request)):
                out = election_pb2.ObserveResponse(revision=state.revision)
                if state.leader is not None:
                    out.leader.CopyFrom(leader_info(request.name, state.leader))
                yield out
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _fail(context, exc, "Observe")
        finally:
            if opened:
                self.locks._close_stream(tenant)

    def _changes(self, tenant: str, request: election_pb2.ObserveRequest) -> AsyncIterator[Any]:
        from lockbroker.server.etcd.observe import leader_changes  # noqa: PLC0415 - etcd only

        assert self.etcd is not None
        return leader_changes(self.etcd, self.core.prefix(tenant, request.name), request.after_revision)

    async def _until_draining(self, states: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The states, ending with SHUTTING_DOWN once the broker drains (observers resume elsewhere)."""
        closing = self.locks.core.closing
        it = aiter(states)
        nxt: asyncio.Future[Any] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(it))
                await asyncio.wait({nxt, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    raise ShuttingDown("the broker is shutting down; resume on another replica", retry_after=0.5)
                try:
                    state = nxt.result()
                except StopAsyncIteration:
                    return
                yield state
        finally:
            # The read in flight first: the generator cannot be closed while it runs.
            if nxt is not None and not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()
