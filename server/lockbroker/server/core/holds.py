"""Maximum hold time: a grant held longer than its limit is revoked (reason MAX_HOLD_EXCEEDED).

When a grant with a limit is made, an index key is written beside the tenants' keys, named by
its deadline so that what is due is one range read:

    <root>/h/<deadline, ms since the epoch, 15 digits>/<tenant>/<fencing token>  -> {"n": lock name}

It has no lease: it outlives the holder and any broker, so a restart keeps the rule. Every broker
replica runs a `HoldSweeper` that reads the due keys every `interval` and revokes each grant still
there exactly like an admin's ForceRelease (core/admin.py: the holder's session is told on its next
keepalive), then deletes the index key. Replicas racing on one key do no harm: the revocation
compares the entry's create revision, so only one can delete it. A grant released before its
deadline leaves its index key until then; the sweep finds the entry gone and deletes the key.
Deadlines are wall-clock times (the replicas share no other clock); the sweep runs within
`interval` of one, so a grant is revoked within about a second of its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from lockbroker.server.core import delay as lock_delay
from lockbroker.server.core.backend import LockBackend
from lockbroker.server.core.errors import QuotaExceeded, Unavailable
from lockbroker.server.core.model import Revocation
from lockbroker.server.core.names import Keyspace, session_id_of
from lockbroker.server.core.quota import TenantQuota
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.core")

MIN_HOLD = 2.0  # seconds: below etcd's lease granularity a limit means nothing
SWEEP_INTERVAL = 0.25
SWEEP_BATCH = 256

# Told about each revocation (tenant, lock name, fencing token, session id): the broker writes it to
# its audit log and process log.
OnRevoked = Callable[[str, str, int, str], object]


def hold_limit(tenant: str, quota: TenantQuota, requested: float) -> float:
    """The maximum hold time of a grant in seconds (0: none): the request's, within the tenant's
    max_hold, else the tenant's."""
    if requested and quota.max_hold and requested > quota.max_hold:
        raise QuotaExceeded(
            tenant,
            "max_hold",
            quota.max_hold,
            f"max_hold {requested:g}s is above tenant {tenant!r}'s max_hold of {quota.max_hold:g}s",
            None,
        )
    return requested or quota.max_hold


def _root(key_root: str) -> bytes:
    return f"{key_root.rstrip('/')}/h/".encode()


def index_key(key_root: str, deadline: float, tenant: str, token: int) -> bytes:
    return _root(key_root) + f"{int(deadline * 1000):015d}/{tenant}/{token}".encode()


async def start_hold(backend: LockBackend, key_root: str, *, tenant: str, name: str, token: int, limit: float) -> None:
    """Put the index key of a grant made now with a maximum hold time of `limit` seconds."""
    value = json.dumps({"n": name}, separators=(",", ":")).encode()
    await backend.put_value(index_key(key_root, time.time() + limit, tenant, token), value, 0)


class HoldSweeper:
    def __init__(
        self,
        backend: LockBackend,
        key_root: str,
        keyspace: Callable[[str], Keyspace],
        on_revoked: OnRevoked | None = None,
        interval: float = SWEEP_INTERVAL,
    ) -> None:
        self._backend = backend
        self._root = _root(key_root)
        self._keyspace = keyspace
        self.on_revoked = on_revoked
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lockbroker-hold-sweeper")

    def stop_soon(self) -> None:
        """Stop sweeping (shutdown is synchronous: the task is cancelled, not awaited)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Unavailable as e:
                log.info("max-hold sweep: etcd unavailable (%s); trying again", e)
            except Exception:
                log.exception("max-hold sweep failed; trying again")
            await asyncio.sleep(self._interval)

    async def sweep(self, now: float | None = None) -> int:
        """Revoke every grant whose maximum hold time has passed by `now`; how many were revoked."""
        due_before = self._root + f"{int((time.time() if now is None else now) * 1000):015d}".encode()
        due, _ = await self._backend.values(self._root, due_before, SWEEP_BATCH)
        revoked = 0
        for key, raw, _lease in due:
            try:
                _deadline, tenant, token_text = key[len(self._root) :].decode().split("/")
                doc = json.loads(raw)
                name, token = str(doc["n"]), int(token_text)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                log.warning("max-hold index key %r is malformed; deleting it", key)
                await self._backend.delete_value(key)
                continue
            if await self._revoke(tenant, name, token):
                revoked += 1
            await self._backend.delete_value(key)
        return revoked

    async def _revoke(self, tenant: str, name: str, token: int) -> bool:
        ks = self._keyspace(tenant)
        entry = await self._backend.find_entry(ks.lock_prefix(name), token)
        if entry is None:
            return False  # released (or expired) in time
        note = Revocation(name, token, ErrorReason.MAX_HOLD_EXCEEDED, "held longer than its maximum hold time")
        marker = ks.revocation(entry.lease, token)
        if not await self._backend.revoke_entry(entry, ks.mark(entry.lease), marker, note.encode()):
            return False
        await lock_delay.start_now(self._backend, ks, name, token)  # a revocation starts its lock-delay
        log.warning(
            "revoked lock %r (fencing token %d, session %s) of tenant %r: maximum hold time exceeded",
            name,
            token,
            session_id_of(entry.lease),
            tenant,
            extra={"tenant": tenant, "lock": name, "fencing_token": token, "reason": ErrorReason.MAX_HOLD_EXCEEDED},
        )
        if self.on_revoked is not None:
            self.on_revoked(tenant, name, token, session_id_of(entry.lease))
        return True


__all__ = ["MIN_HOLD", "HoldSweeper", "hold_limit", "index_key", "start_hold"]
