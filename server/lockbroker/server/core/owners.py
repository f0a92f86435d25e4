"""Ownership: a session acts only for the principal that created it.

A session record carries the principal ("api-key:<id>", "mtls:<identity>") whose call created it;
"" (the anonymous caller of a broker without authentication, or a record written before this
field existed) matches every caller of the tenant. Refresh, CloseSession, KeepAlive and Release
compare the caller with it. Session ids are no secret inside a tenant (Describe shows them), so
knowing one is not enough to act on another principal's session.

`SessionOwners` caches the principal per lease (it never changes for the life of a lease), so a
Release or refresh through the replica that created or refreshed the session reads nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.errors import NotOwner
from lockbroker.server.core.names import Keyspace, session_id_of


def record_principal(raw: bytes) -> str:
    """The principal a session record names; "" for none (anyone in the tenant)."""
    try:
        doc = json.loads(raw)
        return str(doc.get("p", "")) if isinstance(doc, dict) else ""
    except ValueError:
        return ""


def allowed(owner: str, caller: str) -> bool:
    return not owner or owner == caller


class SessionOwners:
    MAX = 100_000

    def __init__(self, backend: LockBackend, keyspace: Callable[[str], Keyspace]) -> None:
        self._backend = backend
        self._keyspace = keyspace
        # (tenant, lease) -> principal: keyed by tenant too, so that a session of one tenant is never
        # taken for a session of another (the record read below is what proves the tenant).
        self._owner: dict[tuple[str, int], str] = {}

    def note(self, tenant: str, lease_id: int, principal: str) -> None:
        if len(self._owner) >= self.MAX:
            self._owner.clear()  # a cache: the records in etcd stay the truth
        self._owner[(tenant, lease_id)] = principal

    def forget(self, tenant: str, lease_id: int) -> None:
        self._owner.pop((tenant, lease_id), None)

    async def owner(self, tenant: str, lease_id: int) -> str | None:
        """The principal of session `lease_id` of `tenant`; None if it has no session record
        (gone, or not a session of this tenant)."""
        known = self._owner.get((tenant, lease_id))
        if known is not None:
            return known
        raw = await self._backend.get_value(self._keyspace(tenant).session_key(lease_id))
        if raw is None:
            return None
        principal = record_principal(raw)
        self.note(tenant, lease_id, principal)
        return principal

    async def check(self, tenant: str, lease_id: int, caller: str) -> bool:
        """False if the session is gone; NotOwner if it is another principal's."""
        owner = await self.owner(tenant, lease_id)
        if owner is None:
            return False
        if not allowed(owner, caller):
            raise NotOwner(
                f"session {session_id_of(lease_id)} was created by another principal of the tenant",
                {"session": session_id_of(lease_id)},
            )
        return True
