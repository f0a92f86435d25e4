"""aetcd's client-side Lock recipe, run unchanged (imports only aetcd: it runs in aetcd's own venv).

The recipe grants a lease per attempt, tries a Txn put-if-absent, and on release deletes the key
but never revokes the lease, so every attempt leaves a lease behind until its TTL. The driver
notes those leases and revokes them after the job, outside every timed figure, so that etcd does
not spend the next target's run expiring them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd  # type: ignore[import-not-found, unused-ignore]

LOCK_TTL = 60  # aetcd's default


class AetcdDriver:
    def __init__(self) -> None:
        self.client: Any = None
        self.leases: list[int] = []

    async def open(self, job: dict[str, Any]) -> None:
        host, port = job["etcd"].rsplit(":", 1)
        self.client = aetcd.Client(host=host, port=int(port), timeout=60)
        await self.client.connect()
        grant = self.client.lease

        async def noted_grant(ttl: int, lease_id: int | None = None) -> Any:
            lease = await grant(ttl, lease_id)
            self.leases.append(lease.id)
            return lease

        self.client.lease = noted_grant

    async def close(self) -> None:
        if self.client is None:
            return
        sem = asyncio.Semaphore(64)

        async def revoke(lease_id: int) -> None:
            async with sem:
                await self.client.revoke_lease(lease_id)

        await asyncio.gather(*(revoke(i) for i in self.leases), return_exceptions=True)
        self.leases.clear()
        await self.client.close()

    async def session(self) -> None:
        return None

    async def end_session(self, session: None) -> None:
        return None

    async def acquire(self, session: None, name: str, wait: float) -> tuple[int, Any]:
        lock = self.client.lock(name.encode(), ttl=LOCK_TTL)
        if not await lock.acquire(timeout=wait):
            raise TimeoutError(f"{name}: not acquired within {wait:g}s")
        return int(lock.revision), lock

    async def release(self, session: None, name: str, handle: Any) -> None:
        if not await handle.release():
            raise RuntimeError(f"release of {name} found another holder")

    async def waiting(self, names: list[str]) -> int:
        raise NotImplementedError("aetcd's recipe keeps no queue")

    def error_kind(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {str(exc)[:60]}"
