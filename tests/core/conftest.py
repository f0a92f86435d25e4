"""The contract suite: the lock core's semantics, run against every backend.

Selected the way tooz selects drivers with TOOZ_TEST_URL:

    LOCKBROKER_TEST_BACKEND=memory        only the in-memory model (no etcd, milliseconds per test)
    LOCKBROKER_TEST_BACKEND=etcd          only the real etcd (tests/conftest.py starts it)
    LOCKBROKER_TEST_BACKEND=memory,etcd   both (the default, so the one CI command runs both halves)

Each test gets an `Env`: a `LockCore` over a fresh backend (a fresh key root on the shared etcd),
a way to read the raw keys and leases it left, and `age(seconds)`, which lets session TTLs run out:
a ManualClock moved by hand on memory, a real sleep on etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.memory import ManualClock, MemoryLockBackend
from lockbroker.server.core.model import Grant, LockState
from lockbroker.server.core.names import session_id_of
from lockbroker.server.core.quota import UNLIMITED, TenantQuota
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.client import EtcdClient
from tests.etcdutil import EtcdProbe
from tests.lockutil import writes_between

T = TypeVar("T")

TENANT = "default"
KNOWN = ("memory", "etcd")


def selected_backends() -> list[str]:
    raw = os.environ.get("LOCKBROKER_TEST_BACKEND", "memory,etcd")
    chosen = [b.strip() for b in raw.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(KNOWN))
    if unknown or not chosen:
        raise pytest.UsageError(f"LOCKBROKER_TEST_BACKEND={raw!r}: choose from {', '.join(KNOWN)} (comma-separated)")
    return chosen


@dataclass
class Env:
    kind: str
    core: LockCore
    backend: Any  # MemoryLockBackend | EtcdLockBackend
    root: bytes
    _age: Callable[[float], Awaitable[None]]
    _keys: Callable[[bytes], Awaitable[list[bytes]]]
    _leases: Callable[[], Awaitable[set[int]]]
    _revision: Callable[[], Awaitable[int]]
    _revoke: Callable[[int], Awaitable[None]]
    _writes: Callable[[int, int], Awaitable[list[bytes]]]
    sessions: set[int] = field(default_factory=set)

    @property
    def memory(self) -> bool:
        return self.kind == "memory"

    async def age(self, seconds: float) -> None:
        """Let `seconds` pass for session TTLs."""
        await self._age(seconds)

    async def keys(self, sub: str = "") -> list[bytes]:
        return await self._keys(self.root + sub.encode())

    async def lock_keys(self, name: str | None = None) -> list[bytes]:
        return await self.keys(f"/t/{TENANT}/l/" + (f"{name}#" if name is not None else ""))

    async def leases(self) -> set[int]:
        return await self._leases()

    async def revision(self) -> int:
        return await self._revision()

    def fail(self, method: str, *, applied: bool) -> None:
        """The next call of the backend's `method` fails as a write of unknown outcome, applied or not.

        On memory, the backend's own fault hook; on etcd, the adapter's method is wrapped the same way."""
        if self.memory:
            self.backend.fail(method, applied=applied)
            return
        real = getattr(self.backend, method)

        async def once(*args: Any, **kwargs: Any) -> Any:
            setattr(self.backend, method, real)
            if applied:
                await real(*args, **kwargs)
            raise Unavailable(f"injected fault in {method}: outcome unknown", retry_after=0.1, outcome_unknown=True)

        setattr(self.backend, method, once)

    def watches(self) -> int:
        """Acquire calls waiting on this backend for a deletion."""
        return int(self.backend.watches if self.memory else self.backend.watches.active)

    async def snapshot(self) -> tuple[list[bytes], set[int], int]:
        return await self.keys(), await self.leases(), await self.revision()

    async def assert_untouched(self, before: tuple[list[bytes], set[int], int]) -> None:
        """Nothing under this test's root was written since `before`, and no lease was granted
        (a put-then-delete cannot hide behind an unchanged key list: the writes are read back)."""
        keys, leases, revision = await self.snapshot()
        assert keys == before[0]
        assert leases - before[1] == set(), "a lease was granted"
        if revision != before[2]:
            ours = [k for k in await self._writes(before[2], revision) if k.startswith(self.root)]
            assert ours == [], f"revision moved {before[2]} -> {revision} by writes {ours}"

    async def session(self, ttl: int = 10, owner: str = "", request_id: str = "") -> int:
        s = await self.core.create_session(TENANT, ttl, owner, request_id)
        lease = int(s.session_id, 16)
        self.sessions.add(lease)
        return lease

    def adopt(self, lease: int) -> int:
        self.sessions.add(lease)
        return lease

    async def acquire(
        self,
        name: str,
        lease: int | None = None,
        *,
        wait: float = 0.0,
        owner: str = "",
        request_id: str = "",
        ttl: int = 10,
        shared: bool = False,
        limit: int = 0,
    ) -> Grant:
        p = AcquireParams(name, lease, ttl, wait, owner, request_id, shared=shared, limit=limit)
        return await self.core.acquire(TENANT, p)

    async def release(self, name: str, token: int, lease: int | None = None) -> bool:
        return await self.core.release(TENANT, name, token, lease)

    async def describe(self, name: str) -> LockState:
        return await self.core.describe(TENANT, name)

    async def wait_waiters(self, name: str, n: int, timeout: float = 5.0) -> LockState:
        async def check() -> LockState | None:
            d = await self.describe(name)
            return d if len(d.waiters) == n else None

        found = await eventually(check, timeout, f"{n} waiter(s) on {name!r}")
        assert found is not None
        return found

    async def cleanup(self) -> None:
        for lease in self.sessions:
            with contextlib.suppress(Exception):
                await self._revoke(lease)


def sid(lease: int) -> str:
    return session_id_of(lease)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.02) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: T = await check()
    while not last:
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(interval)
        last = await check()
    return last


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_kind" in metafunc.fixturenames:
        metafunc.parametrize("backend_kind", selected_backends())


@pytest.fixture
def quota() -> TenantQuota:
    """The tenant's quota in this test (override the fixture, or use `env_with`)."""
    return UNLIMITED


@pytest.fixture
def etcd_endpoint(backend_kind: str, request: pytest.FixtureRequest) -> str | None:
    """The shared etcd's endpoint, started only when an etcd test runs (a sync fixture: the
    session's async etcd fixture cannot be requested from inside a running loop)."""
    if backend_kind != "etcd":
        return None
    return str(request.getfixturevalue("etcd").endpoint)


@pytest.fixture
async def env(backend_kind: str, etcd_endpoint: str | None, quota: TenantQuota) -> AsyncIterator[Env]:
    root = f"/lbtest/{uuid.uuid4().hex[:10]}"
    if backend_kind == "memory":
        clock = ManualClock()
        mem_root = root.encode()
        mem = MemoryLockBackend(clock)

        async def age(seconds: float) -> None:
            clock.advance(seconds)
            await asyncio.sleep(0)

        async def mem_keys(prefix: bytes) -> list[bytes]:
            return mem.keys(prefix)

        async def mem_leases() -> set[int]:
            return mem.lease_ids()

        async def mem_revision() -> int:
            return mem.revision

        async def mem_revoke(lease: int) -> None:
            await mem.revoke_lease(lease)

        async def mem_writes(after: int, upto: int) -> list[bytes]:
            # One backend per test: any revision that moved is this test's write.
            return [b"%s<revision %d>" % (mem_root, r) for r in range(after + 1, upto + 1)]

        e = Env(
            "memory",
            LockCore(mem, root, lambda _t: quota),
            mem,
            root.encode(),
            age,
            mem_keys,
            mem_leases,
            mem_revision,
            mem_revoke,
            mem_writes,
        )
        try:
            yield e
        finally:
            await e.core.drain_cleanups(1.0)
            await mem.close()
        return
    assert etcd_endpoint is not None
    client = EtcdClient(EtcdConfig(endpoints=(etcd_endpoint,), key_root=root, request_timeout=2.0))
    backend = EtcdLockBackend(client)
    probe = EtcdProbe(etcd_endpoint, root)

    async def sleep(seconds: float) -> None:
        # etcd checks lease expiry about every 500 ms: tests that wait for an expiry leave room for it.
        await asyncio.sleep(seconds)

    async def etcd_keys(prefix: bytes) -> list[bytes]:
        return await probe.keys(prefix[len(probe.root) :].decode())

    async def etcd_revoke(lease: int) -> None:
        await probe.revoke(lease)

    async def etcd_writes(after: int, upto: int) -> list[bytes]:
        return [ev.kv.key for ev in await writes_between(probe, after, upto)]

    e = Env(
        "etcd",
        LockCore(backend, root, lambda _t: quota),
        backend,
        root.encode(),
        sleep,
        etcd_keys,
        probe.leases,
        probe.revision,
        etcd_revoke,
        etcd_writes,
    )
    try:
        yield e
    finally:
        await e.cleanup()
        await e.core.drain_cleanups(1.0)
        await backend.close()
        await client.close()
        await probe.close()
