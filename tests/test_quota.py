"""Tenant quotas on a real etcd, most of them across two broker replicas sharing it.

Limits on held state (sessions, queue entries, a lock's queue) are slot keys in etcd claimed in
the same transaction as the state they count, so they hold whichever replica a call reaches.
The acquire rate and the count of blocked waiters are per replica, and are tested as such.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.quota import Rate, TokenBucket
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig, Config, ConfigError, load
from lockbroker.server.core.names import Keyspace
from lockbroker.server.core.quota import UNLIMITED, Pool, TenantQuota
from lockbroker.server.core.slots import free_slot as _free_slot
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import (
    Rich,
    Tracker,
    acquire,
    assert_untouched,
    dur,
    eventually,
    expect_error,
    lease_of,
    release,
    snapshot,
    wait_waiters,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def quota(**limits: Any) -> TenantQuota:
    """Only the named limits; everything else unlimited, so each test sees one limit at work."""
    return dataclasses.replace(UNLIMITED, **limits)


@pytest.fixture
async def replicas(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Callable[..., Any]]:
    """Start two brokers on one etcd and key root with the given quota; yields their stubs."""
    started: list[tuple[Broker, aio.Channel]] = []

    async def start(q: TenantQuota, n: int = 2, auth: AuthConfig | None = None) -> list[Any]:
        cfg = dataclasses.replace(broker_config(etcd.endpoint, key_root), quota=q, auth=auth or AuthConfig())
        stubs = []
        for _ in range(n):
            b = Broker(cfg)
            await b.start()
            ch = aio.insecure_channel(f"127.0.0.1:{b.port}")
            started.append((b, ch))
            stubs.append(lock_pb2_grpc.LockServiceStub(ch))
        return stubs

    yield start
    for b, ch in started:
        await ch.close()
        await b.stop(grace=1.0)


@pytest.fixture
async def track(probe: EtcdProbe) -> AsyncIterator[Tracker]:
    t = Tracker(None, probe)
    yield t
    await t.cleanup()


async def session(stub: Any, track: Tracker, ttl: int = 10) -> str:
    resp = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=dur(ttl)))
    return track.adopt(resp.session_id)


def assert_quota(r: Rich, limit: str, value: int, *, retry: bool = True) -> None:
    assert r.quota is not None, str(r)
    (v,) = r.quota.violations
    assert (v.quota_id, v.quota_value, v.subject) == (limit, value, "tenant:default")
    assert r.info is not None and r.info.metadata["limit"] == limit
    assert (r.retry is not None) is retry, str(r)


async def slot_keys(probe: EtcdProbe) -> list[bytes]:
    return [k for k in await probe.keys() if b"/q/" in k]


# -- held state, across replicas --------------------------------------------------------------------


async def test_max_locks_holds_across_two_replicas_and_a_refusal_changes_nothing(
    replicas: Any, track: Tracker, probe: EtcdProbe
) -> None:
    a, b = await replicas(quota(max_locks=3))
    sa, sb = await session(a, track), await session(b, track)
    await acquire(a, "q/1", sa)
    await acquire(a, "q/2", sa)
    held = await acquire(b, "q/3", sb)

    for stub, sid in ((a, sa), (b, sb)):
        before = await snapshot(probe)
        r = await expect_error(acquire(stub, "q/4", sid), EXHAUSTED, "QUOTA_EXCEEDED")
        assert_quota(r, "max_locks", 3)
        await assert_untouched(probe, before)

    # A release on the other replica frees the slot (that replica never saw the grant).
    assert await release(a, "q/3", held.grant.fencing_token, sb)
    await acquire(b, "q/4", sb)
    await expect_error(acquire(a, "q/5", sa), EXHAUSTED, "QUOTA_EXCEEDED")


async def test_racing_acquires_on_two_replicas_never_exceed_max_locks(
    replicas: Any, track: Tracker, probe: EtcdProbe
) -> None:
    a, b = await replicas(quota(max_locks=5))
    sessions = [await session(s, track) for s in (a, b)]

    async def one(i: int) -> bool:
        stub = (a, b)[i % 2]
        try:
            await acquire(stub, f"race/{i}", sessions[i % 2])
        except aio.AioRpcError as err:
            assert err.code() == EXHAUSTED, err
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert sum(results) == 5
    entries = [k for k in await probe.keys() if b"/l/race/" in k]
    assert len(entries) == 5
    # Exactly one tenant slot per entry (and one slot of each entry's lock queue).
    assert len([k for k in await slot_keys(probe) if b"/q/e/" in k]) == 5


async def test_max_sessions_across_replicas_counts_session_less_acquires(
    replicas: Any, track: Tracker, probe: EtcdProbe
) -> None:
    a, b = await replicas(quota(max_sessions=2))
    await session(a, track)
    implicit = await acquire(b, "implicit/1", ttl=10)  # makes a one-lock session
    track.adopt(implicit.grant.session_id)

    before = await snapshot(probe)
    r = await expect_error(a.CreateSession(lock_pb2.CreateSessionRequest(ttl=dur(10))), EXHAUSTED, "QUOTA_EXCEEDED")
    assert_quota(r, "max_sessions", 2)
    await expect_error(acquire(b, "implicit/2", ttl=10), EXHAUSTED, "QUOTA_EXCEEDED")
    # The refused calls' leases were revoked: no key, no lease left behind.
    assert await eventually(lambda: _leases_back(probe, before.leases), 5, "refused sessions' leases revoked")
    assert await probe.keys() == before.keys

    # Releasing the one-lock session ends it, and frees its session slot.
    assert await release(a, "implicit/1", implicit.grant.fencing_token, implicit.grant.session_id)
    await session(b, track)


async def _leases_back(probe: EtcdProbe, leases: set[int]) -> bool:
    return await probe.leases() == leases


async def test_max_waiters_per_lock_counts_the_queue_behind_the_holder(
    replicas: Any, track: Tracker, probe: EtcdProbe
) -> None:
    a, b = await replicas(quota(max_waiters_per_lock=1))
    s1, s2, s3 = await session(a, track), await session(b, track), await session(a, track)
    await acquire(a, "queue", s1)
    waiter = asyncio.ensure_future(acquire(b, "queue", s2, wait=30))
    await wait_waiters(a, "queue", 1)

    before = await snapshot(probe)
    r = await expect_error(acquire(a, "queue", s3, wait=30), EXHAUSTED, "QUOTA_EXCEEDED")
    assert_quota(r, "max_waiters_per_lock", 1)
    await assert_untouched(probe, before)
    # A try-lock on the held lock is still told who holds it, not about the quota.
    await expect_error(acquire(a, "queue", s3, wait=0), grpc.StatusCode.ABORTED, "LOCK_HELD")
    # Another lock has its own queue.
    await acquire(a, "other", s3)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_slots_are_freed_by_release_wait_expiry_and_session_end(
    replicas: Any, track: Tracker, probe: EtcdProbe
) -> None:
    (a,) = await replicas(quota(max_locks=2, max_sessions=3), n=1)
    s1, s2 = await session(a, track), await session(a, track)
    for _ in range(5):  # release frees the slot every time
        g = await acquire(a, "cycle", s1)
        assert await release(a, "cycle", g.grant.fencing_token, s1)
    holder = await acquire(a, "held", s1)
    # A wait that runs out takes its slot back with its entry.
    await expect_error(acquire(a, "held", s2, wait=0.3), grpc.StatusCode.ABORTED, "WAIT_EXPIRED")
    await acquire(a, "second", s2)
    await expect_error(acquire(a, "third", s2), EXHAUSTED, "QUOTA_EXCEEDED")
    # A session that ends (its lease revoked behind the broker's back) frees all its slots.
    await probe.revoke(lease_of(s1))
    assert holder.grant.fencing_token > 0
    await acquire(a, "third", s2)
    assert not [k for k in await probe.kvs() if k.lease == lease_of(s1)]


# -- per replica: blocked waiters and the acquire rate ---------------------------------------------------


async def test_max_waiters_is_per_replica(replicas: Any, track: Tracker) -> None:
    a, b = await replicas(quota(max_waiters=1))
    s = [await session(a, track) for _ in range(3)]
    await acquire(a, "w", s[0])
    first = asyncio.ensure_future(acquire(a, "w", s[1], wait=30))
    await wait_waiters(a, "w", 1)
    r = await expect_error(acquire(a, "w", s[2], wait=30), EXHAUSTED, "QUOTA_EXCEEDED")
    assert_quota(r, "max_waiters", 1)
    # The same tenant may still wait on another replica; and try-locks never count as waiters.
    other = asyncio.ensure_future(acquire(b, "w", s[2], wait=30))
    await wait_waiters(a, "w", 2)
    await expect_error(acquire(a, "w", s[2], wait=0), grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_QUEUED")
    for t in (first, other):
        t.cancel()
    await asyncio.gather(first, other, return_exceptions=True)


async def test_acquire_rate_is_a_token_bucket_with_retry_info(replicas: Any, track: Tracker, probe: EtcdProbe) -> None:
    (a,) = await replicas(quota(acquire_rate=0.5, acquire_burst=2), n=1)
    s = await session(a, track)
    await acquire(a, "rate/1", s)
    await acquire(a, "rate/2", s)
    before = await snapshot(probe)
    r = await expect_error(acquire(a, "rate/3", s), EXHAUSTED, "RATE_LIMITED")
    assert_quota(r, "acquire_rate", 0, retry=True)
    assert r.retry is not None
    assert 0 < r.retry.retry_delay.ToTimedelta().total_seconds() <= 2.0
    await assert_untouched(probe, before)
    # Other calls do not spend tokens.
    await session(a, track)
    assert (await a.Describe(lock_pb2.DescribeRequest(name="rate/1"))).HasField("holder")


async def test_tenant_max_ttl_and_max_wait_are_refused_without_retry_info(replicas: Any, probe: EtcdProbe) -> None:
    (a,) = await replicas(quota(max_ttl=30, max_wait=5), n=1)
    before = await snapshot(probe)
    r = await expect_error(a.CreateSession(lock_pb2.CreateSessionRequest(ttl=dur(60))), EXHAUSTED, "QUOTA_EXCEEDED")
    assert_quota(r, "max_ttl", 30, retry=False)
    r = await expect_error(acquire(a, "long", ttl=10, wait=6), EXHAUSTED, "QUOTA_EXCEEDED")
    assert_quota(r, "max_wait", 5, retry=False)
    await expect_error(acquire(a, "long", ttl=60), EXHAUSTED, "QUOTA_EXCEEDED")
    await assert_untouched(probe, before)


# -- per-tenant quotas from the tenants file -------------------------------------------------------------


async def test_tenants_file_sets_one_tenants_quota(replicas: Any, tmp_path: Path, probe: EtcdProbe) -> None:
    path = tmp_path / "tenants.toml"
    keys = {name: tenants.add_tenant(path, name) for name in ("small", "big")}
    text = path.read_text().replace("[tenants.small]\n", "[tenants.small]\nquota = {max_locks = 1}\n")
    path.write_text(text)
    # The writers keep a tenant's quota when they rewrite the file.
    tenants.add_key(path, "big")
    assert "quota = {max_locks = 1}" in path.read_text()

    (a,) = await replicas(quota(max_locks=10), n=1, auth=AuthConfig(str(path)))

    def md(t: str) -> tuple[tuple[str, str]]:
        return (("x-api-key", keys[t]),)

    await a.Acquire(lock_pb2.AcquireRequest(name="x", ttl=dur(10)), metadata=md("small"))
    try:
        await a.Acquire(lock_pb2.AcquireRequest(name="y", ttl=dur(10)), metadata=md("small"))
        raise AssertionError("tenant small acquired past its quota of 1")
    except aio.AioRpcError as err:
        assert err.code() == EXHAUSTED
    for n in ("x", "y"):
        await a.Acquire(lock_pb2.AcquireRequest(name=n, ttl=dur(10)), metadata=md("big"))
    for lease in await probe.leases():
        await probe.revoke(lease)


async def test_a_typo_in_a_tenants_quota_stops_the_broker(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    tenants.add_tenant(path, "acme")
    path.write_text(path.read_text().replace("[tenants.acme]\n", "[tenants.acme]\nquota = {max_lock = 1}\n"))
    cfg = dataclasses.replace(broker_config(etcd.endpoint, key_root), auth=AuthConfig(str(path)))
    with pytest.raises(ConfigError, match="unknown quota 'max_lock'"):
        await Broker(cfg).start()


# -- pieces ----------------------------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(Rate(2.0, 3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0  # one token back after 1/rate
    assert bucket.take(0.5) > 0
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # never above the burst
    assert bucket.take(100.0) > 0


def test_quota_config_from_flags_env_and_overrides() -> None:
    cfg = load(None, {"LOCKBROKER_QUOTA_MAX_LOCKS": "7", "LOCKBROKER_QUOTA_ACQUIRE_RATE": "2.5"})
    assert isinstance(cfg, Config)
    assert (cfg.quota.max_locks, cfg.quota.acquire_rate) == (7, 2.5)
    assert cfg.quota.max_sessions == TenantQuota().max_sessions
    with pytest.raises(ConfigError):
        load(None, {"LOCKBROKER_QUOTA_MAX_LOCKS": "-1"})
    q = TenantQuota().with_overrides({"max_locks": 3, "acquire_rate": 1}, "here")
    assert (q.max_locks, q.acquire_rate) == (3, 1.0)
    with pytest.raises(ValueError, match="whole number"):
        TenantQuota().with_overrides({"max_locks": 1.5}, "here")


def test_free_slot_draws_from_big_pools_and_lists_nearly_full_ones() -> None:
    big = Pool(b"q/e/", 1_000_000, "max_locks")
    taken = {big.key(i) for i in range(1000)}
    for _ in range(50):
        slot = _free_slot(big, taken)
        assert slot is not None and slot not in taken and 0 <= big.index_of(slot) < big.size
    small = Pool(b"q/s/", 4, "max_sessions")
    assert _free_slot(small, {small.key(0), small.key(1), small.key(3)}) == small.key(2)
    assert _free_slot(small, {small.key(i) for i in range(4)}) is None


async def test_a_taken_slot_in_a_big_pool_costs_a_few_reads_not_a_listing_of_the_pool(
    etcd: EmbeddedEtcd, key_root: str, probe: EtcdProbe, track: Tracker
) -> None:
    """Half of a 1,000-slot pool taken: about half the Acquires find their hashed slot taken, and
    each then reads SLOT_PROBES random slots instead of every key of the pool."""
    pool = Keyspace(key_root, "default").entry_pool(1000)
    grant = await probe.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))
    track.leases.add(grant.ID)  # revoked at the end, with the slots
    for start in range(0, 1000, 2 * 100):
        puts = [
            pb.RequestOp(request_put=pb.PutRequest(key=pool.key(i), value=b"elsewhere", lease=grant.ID))
            for i in range(start, start + 2 * 100, 2)
        ]
        await probe.kv.Txn(pb.TxnRequest(success=puts))
    b = Broker(dataclasses.replace(broker_config(etcd.endpoint, key_root), quota=quota(max_locks=1000)))
    await b.start()
    assert b.core is not None
    backend: Any = b.core._backend
    calls: Counter[str] = Counter()
    for name in ("taken_slots", "taken_among"):
        real = getattr(backend, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return await _real(*args)

        setattr(backend, name, counted)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            sid = await session(stub, track)
            for i in range(30):
                await acquire(stub, f"probe-{i}", sid)
    finally:
        await b.stop(grace=1.0)
    assert calls["taken_among"] > 0  # slots were taken (all 30 missing the 500 is a 1e-9 chance)
    assert calls["taken_slots"] == 0
    assert len([k for k in await slot_keys(probe) if k.startswith(pool.prefix)]) == 500 + 30
