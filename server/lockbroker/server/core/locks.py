"""`LockCore`: the lock service's semantics, as one facade the gRPC edge calls.

One concept per module, like etcd's client/v3/concurrency (session.go, mutex.go, key.go):
    sessions.py  create, refresh, close; LeaseClock
    acquire.py   acquire (queue, wait, not-acquired, abandon, late entries) and release
    slots.py     claiming quota slots (SlotClaimer)
    cleanup.py   clean-up that outlives its caller
    view.py      describe and list
    holds.py     maximum hold time: the sweep that revokes grants held too long
    owners.py    which principal a session acts for (ownership of sessions and grants)
    admin.py     the fence check and the admin plane (force release, revoke, list sessions)
The store behind it is a `LockBackend` (core/backend.py): etcd in production, core/memory.py in
tests and `lockbroker serve --backend memory`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Coroutine
from typing import Any

from lockbroker.server.core import delay as lock_delay
from lockbroker.server.core.acquire import AcquireParams, Acquirer
from lockbroker.server.core.admin import Admin, Fence, SessionSummary
from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.holds import HoldSweeper, hold_limit, start_hold
from lockbroker.server.core.model import Entry, Grant, LockState, Page, SessionInfo
from lockbroker.server.core.multi import ManyParams, acquire_many
from lockbroker.server.core.names import Keyspace
from lockbroker.server.core.owners import SessionOwners
from lockbroker.server.core.quota import UNLIMITED, QuotaLookup
from lockbroker.server.core.sessions import LeaseClock, Sessions
from lockbroker.server.core.slots import SlotClaimer
from lockbroker.server.core.view import describe, list_locks

__all__ = ["AcquireParams", "LeaseClock", "LockCore"]


class LockCore:
    def __init__(self, backend: LockBackend, key_root: str, quotas: QuotaLookup = lambda _t: UNLIMITED) -> None:
        self._backend = backend
        self._quotas = quotas
        self._root = key_root
        self._keyspaces: dict[str, Keyspace] = {}
        self._closing: asyncio.Future[None] | None = None
        self.leases = LeaseClock()
        self._cleanups = Cleanups()
        claimer = SlotClaimer(backend)
        self.owners = SessionOwners(backend, self.keyspace)
        self._sessions = Sessions(
            backend,
            keyspace=self.keyspace,
            quotas=quotas,
            leases=self.leases,
            claimer=claimer,
            cleanups=self._cleanups,
            owners=self.owners,
        )
        self.admin = Admin(backend, self.keyspace, self.owners)
        self._acquirer = Acquirer(
            backend,
            keyspace=self.keyspace,
            quotas=quotas,
            leases=self.leases,
            claimer=claimer,
            cleanups=self._cleanups,
            closing=lambda: self.closing,
        )
        self.holds = HoldSweeper(backend, key_root, self.keyspace)

    @property
    def backend(self) -> LockBackend:
        """The store (the Watch RPC reads etcd's event history through it)."""
        return self._backend

    def keyspace(self, tenant: str) -> Keyspace:
        ks = self._keyspaces.get(tenant)
        if ks is None:
            ks = self._keyspaces[tenant] = Keyspace(self._root, tenant)
        return ks

    async def create_session(
        self, tenant: str, ttl: int, owner: str, request_id: str, principal: str = ""
    ) -> SessionInfo:
        return await self._sessions.create(tenant, ttl, owner, request_id, principal)

    async def refresh(
        self, tenant: str, lease_id: int, *, owner_known: bool = False, principal: str = ""
    ) -> SessionInfo:
        return await self._sessions.refresh(tenant, lease_id, owner_known=owner_known, principal=principal)

    async def close_session(self, tenant: str, lease_id: int, principal: str = "") -> bool:
        return await self._sessions.close(tenant, lease_id, principal)

    def acquire(self, tenant: str, p: AcquireParams) -> Coroutine[Any, Any, Grant]:
        # Not async: the acquirer's coroutine is the call, with no frame of the facade kept alive
        # under every queued waiter (nor between the handler and the backend: tests/core/test_frames.py).
        if not (p.max_hold or self._quotas(tenant).max_hold):
            return self._acquirer.acquire(tenant, p)
        return self._acquire_held(tenant, p)

    async def _acquire_held(self, tenant: str, p: AcquireParams) -> Grant:
        # A maximum hold time (core/holds.py): checked before anything is queued, recorded once granted.
        limit = hold_limit(tenant, self._quotas(tenant), p.max_hold)
        g = await self._acquirer.acquire(tenant, p)
        try:
            await start_hold(self._backend, self._root, tenant=tenant, name=g.name, token=g.fencing_token, limit=limit)
        except BaseException:
            # A grant whose limit could not be recorded is not handed out.
            lease = int(g.session_id, 16)
            await self._cleanups.run(lambda: self.release(tenant, g.name, g.fencing_token, lease, p.principal))
            raise
        return g

    async def acquire_many(self, tenant: str, p: ManyParams) -> list[Grant]:
        """Several locks of one session, all granted or none (core/multi.py)."""
        return await acquire_many(tenant, p, self.acquire, self.release, self._cleanups)

    async def release(
        self, tenant: str, name: str, fencing_token: int, lease_id: int | None, principal: str = ""
    ) -> bool:
        return (await self.release_claim(tenant, name, fencing_token, lease_id, principal=principal))[0]

    async def release_claim(
        self,
        tenant: str,
        name: str,
        fencing_token: int,
        lease_id: int | None,
        request_id: str = "",
        *,
        principal: str = "",
    ) -> tuple[bool, int]:
        """(released, holds left): a reentrant grant held more than once loses one hold (once per
        request id: a retried Release takes no second hold off). Only the grant's own session, and
        only for the principal that made it (core/owners.py): NotOwner otherwise."""

        def release() -> Awaitable[tuple[bool, int]]:
            return self._acquirer.release(
                tenant, name, fencing_token, lease_id, request_id, owners=self.owners, principal=principal
            )

        if not lock_delay.enabled(self._quotas(tenant)):
            return await release()
        # A clean release: the grant's lock-delay (core/delay.py) must not apply.
        return await lock_delay.release_cleanly(self._backend, self.keyspace(tenant), name, fencing_token, release)

    async def check_fence(self, tenant: str, name: str, fencing_token: int) -> Fence:
        return await self.admin.check_fence(tenant, name, fencing_token)

    async def force_release(self, tenant: str, name: str, reason: str, admin: str) -> list[Entry]:
        return await self.admin.force_release(tenant, name, reason, admin)

    async def revoke_session(self, tenant: str, lease_id: int, reason: str, admin: str) -> bool:
        return await self.admin.revoke_session(tenant, lease_id, reason, admin)

    async def list_sessions(self, tenant: str, page_size: int, after: str | None) -> tuple[list[SessionSummary], str]:
        return await self.admin.list_sessions(tenant, page_size, after)

    async def describe(self, tenant: str, name: str) -> LockState:
        state = await describe(self._backend, self.keyspace(tenant), name)
        if lock_delay.enabled(self._quotas(tenant)):
            head = state.holder.create_revision if state.holder is not None else 2**63
            until = await lock_delay.until(self._backend, self.keyspace(tenant), name, head, start=False)
            state = dataclasses.replace(state, delay_until=until)
        return state

    async def list(self, tenant: str, prefix: str, page_size: int, after: str | None) -> Page:
        return await list_locks(self._backend, self.keyspace(tenant), prefix, page_size, after)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closing(self) -> asyncio.Future[None]:
        """Done once the broker begins to shut down (made on first use: it needs the running loop)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def start(self) -> None:
        """Start the background work of this replica: the max-hold sweep (core/holds.py)."""
        self.holds.start()

    def begin_shutdown(self) -> None:
        """Make every waiter give up (removing its entry) and refuse new waits."""
        if not self.closing.done():
            self.closing.set_result(None)
        self.holds.stop_soon()

    async def drain_cleanups(self, timeout: float) -> None:
        """Give pending clean-ups `timeout` to finish on shutdown; leases remove the rest."""
        await self._cleanups.drain(timeout)
