"""Leader election (ElectionService), built like etcd's client/v3/concurrency.Election.

A candidate is a queue entry under the election's prefix, bound to its session's lease; the leader
is the entry with the lowest create revision. That is exactly a lock's FIFO queue, so a Campaign is
the lock core's blocking Acquire (`Acquirer`) over a keyspace of its own: every path that ends
without leadership removes the candidate's key (cancellation, wait timeout, unknown outcomes,
the resume window of a dropped connection), quotas count a candidate as a queue entry and a
waiter and a leader as a held lock, and the fencing token is the key's create revision. What an
election adds is the candidate's value, stored with its entry (`EntryValue.data`), which Proclaim
rewrites while the entry still leads.

Keys, beside the locks' `l/` (so an election and a lock of the same name are unrelated):

    <root>/t/<tenant>/e/<key name>#<lease hex>   one candidate of election <name>
    <root>/t/<tenant>/q/v/<key name>#<i>         quota slot i of election <name>'s candidates
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from lockbroker.server.core.acquire import AcquireParams, Acquirer
from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.cleanup import Cleanups
from lockbroker.server.core.errors import LockBrokerError, Unavailable
from lockbroker.server.core.model import Entry, Grant
from lockbroker.server.core.names import Keyspace, key_name, session_id_of
from lockbroker.server.core.owners import SessionOwners
from lockbroker.server.core.quota import Pool, QuotaLookup
from lockbroker.server.core.sessions import LeaseClock
from lockbroker.server.core.slots import SlotClaimer
from lockbroker.v1.reasons import ErrorReason

# A candidate's value, like etcd's own recipes keep small ones: it travels in every Observe message.
MAX_VALUE_BYTES = 4096
# Proclaims racing on one leadership (the leader's own concurrent calls) each re-read and retry.
_PROCLAIM_TRIES = 5
# Campaign without wait_timeout on a broker without max_wait: wait until the RPC's deadline.
FOREVER = 365 * 86400.0


class NotLeader(LockBrokerError):
    """FAILED_PRECONDITION: the leadership named no longer leads (or never did)."""

    reason = ErrorReason.NOT_LEADER


class NoLeader(LockBrokerError):
    """NOT_FOUND: nobody leads the election."""

    reason = ErrorReason.NO_LEADER


class ElectionKeyspace(Keyspace):
    """A tenant's keys with elections where locks would be: the queue logic is shared unchanged."""

    __slots__ = ()

    def __init__(self, root: str, tenant: str) -> None:
        super().__init__(root, tenant)
        self.locks_root = self.base + b"e/"

    def lock_pool(self, name: str, size: int) -> Pool:
        return Pool(self.quota_root + b"v/" + key_name(name) + b"#", size, "max_waiters_per_lock")


@dataclasses.dataclass(frozen=True, slots=True)
class Campaign:
    election: str
    lease_id: int
    value: bytes
    wait: float  # seconds
    owner: str
    request_id: str
    principal: str


class ElectionCore:
    def __init__(
        self,
        backend: LockBackend,
        key_root: str,
        *,
        quotas: QuotaLookup,
        leases: LeaseClock,
        owners: SessionOwners,
        closing: Callable[[], asyncio.Future[None]],
    ) -> None:
        self._backend = backend
        self._root = key_root
        self._keyspaces: dict[str, ElectionKeyspace] = {}
        self._owners = owners
        self.cleanups = Cleanups()
        self._acquirer = Acquirer(
            backend,
            keyspace=self.keyspace,
            quotas=quotas,
            leases=leases,
            claimer=SlotClaimer(backend),
            cleanups=self.cleanups,
            closing=closing,
        )

    def keyspace(self, tenant: str) -> ElectionKeyspace:
        ks = self._keyspaces.get(tenant)
        if ks is None:
            ks = self._keyspaces[tenant] = ElectionKeyspace(self._root, tenant)
        return ks

    def prefix(self, tenant: str, election: str) -> bytes:
        """The prefix of every candidate key of `election` (what Observe watches)."""
        return self.keyspace(tenant).lock_prefix(election)

    async def _own(self, tenant: str, lease_id: int, principal: str) -> None:
        """NotOwner if the session is another principal's; a session that is gone is left to the
        write that follows (SESSION_NOT_FOUND from Campaign, NOT_LEADER from Proclaim)."""
        await self._owners.check(tenant, lease_id, principal)

    async def campaign(self, tenant: str, c: Campaign) -> Grant:
        """Block until `c`'s session leads the election (FIFO among candidates); the leadership."""
        await self._own(tenant, c.lease_id, c.principal)
        p = AcquireParams(c.election, c.lease_id, 0, c.wait, c.owner, c.request_id, principal=c.principal, data=c.value)
        return await self._acquirer.acquire(tenant, p)

    async def proclaim(
        self, tenant: str, election: str, *, lease_id: int, token: int, value: bytes, principal: str
    ) -> Entry:
        """Rewrite the leader's value if leadership (`lease_id`, `token`) still leads; the entry as written.

        Only deleting the leader's own key ends its leadership (later candidates have higher create
        revisions), and the write compares the key's create and mod revisions: if it applies, the
        key was still there, hence still the leader, when it did."""
        await self._own(tenant, lease_id, principal)
        prefix = self.prefix(tenant, election)
        for _ in range(_PROCLAIM_TRIES):
            holder = await self._backend.holder(prefix)
            if holder is None or holder.create_revision != token or holder.lease != lease_id:
                raise NotLeader(
                    f"session {session_id_of(lease_id)} with fencing token {token} does not lead election {election!r}",
                    {"election": election, "fencing_token": str(token)},
                )
            if holder.value.data == value:
                return holder  # already proclaimed (a retry): nothing to write
            written = await self._backend.update_entry(holder, dataclasses.replace(holder.value, data=value))
            if written is not None:
                return written
        raise Unavailable(f"concurrent proclaims on election {election!r}; retry", retry_after=0.1)

    async def resign(self, tenant: str, election: str, lease_id: int, token: int, principal: str) -> bool:
        """Give up the leadership (or candidacy); False if it was already gone."""
        released, _ = await self._acquirer.release(
            tenant, election, token, lease_id, "", owners=self._owners, principal=principal
        )
        return released

    async def leader(self, tenant: str, election: str) -> Entry:
        holder = await self._backend.holder(self.prefix(tenant, election))
        if holder is None:
            raise NoLeader(f"nobody leads election {election!r}", {"election": election})
        return holder

    async def drain(self, timeout: float) -> None:
        await self.cleanups.drain(timeout)
