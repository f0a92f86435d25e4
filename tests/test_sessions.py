"""Sessions against a real etcd: TTLs, refresh, KeepAlive, close, expiry, lost and implicit sessions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from lockbroker.server.etcd.rpc_pb2 import Event
from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe
from tests.lockutil import (
    SESSIONS,
    Tracker,
    acquire,
    assert_untouched,
    dur,
    eventually,
    expect_error,
    lease_of,
    lock_keys,
    release,
    secs,
    snapshot,
    wait_waiters,
    writes_between,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def session_key(probe: EtcdProbe, session_id: str) -> bytes:
    return probe.root + f"{SESSIONS}{session_id}".encode()


async def lease_gone(probe: EtcdProbe, session_id: str, within: float) -> None:
    async def gone() -> bool:
        return await probe.lease_ttl(lease_of(session_id)) == -1

    await eventually(gone, within, f"lease of session {session_id} ends", interval=0.1)


async def refresh(stub: Any, session_id: str) -> lock_pb2.RefreshResponse:
    resp: lock_pb2.RefreshResponse = await stub.Refresh(lock_pb2.RefreshRequest(session_id=session_id))
    return resp


async def close(stub: Any, session_id: str) -> bool:
    resp = await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=session_id))
    return bool(resp.closed)


# -- create -------------------------------------------------------------------------------------


async def test_create_session_default_and_explicit_ttl(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    for ttl, expected in ((None, 10), (7, 7), (2, 2)):
        req = lock_pb2.CreateSessionRequest(owner="svc-a")
        if ttl is not None:
            req.ttl.CopyFrom(dur(ttl))
        now = time.time()
        resp = await stub.CreateSession(req)
        track.adopt(resp.session_id)
        assert len(resp.session_id) == 16
        int(resp.session_id, 16)
        assert secs(resp.ttl) == expected
        assert now + expected - 1 <= resp.expires_at.seconds <= now + expected + 1
        assert expected - 2 <= await probe.lease_ttl(lease_of(resp.session_id)) <= expected
        assert session_key(probe, resp.session_id) in await probe.keys(SESSIONS)


async def test_create_session_retry_returns_same_session(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    leases = await probe.leases()
    a = await track.session(ttl=10, owner="x", request_id="cs-retry-1")
    b = await track.session(ttl=10, owner="x", request_id="cs-retry-1")
    assert a == b
    assert await probe.leases() - leases == {lease_of(a)}
    assert await probe.keys(SESSIONS) == [session_key(probe, a)]
    c = await track.session(ttl=10, owner="x", request_id="cs-retry-2")
    assert c != a
    assert await probe.leases() - leases == {lease_of(a), lease_of(c)}


# -- refresh ------------------------------------------------------------------------------------


async def test_refresh_extends_a_live_session(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = await track.session(ttl=5)
    await asyncio.sleep(1.2)
    assert await probe.lease_ttl(lease_of(s)) <= 4
    now = time.time()
    r = await refresh(stub, s)
    assert secs(r.ttl) == 5
    assert now + 4 <= r.expires_at.seconds <= now + 6
    assert await probe.lease_ttl(lease_of(s)) >= 4


async def test_refresh_of_unknown_or_closed_session_is_not_found(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    await expect_error(refresh(stub, "00000000000000ab"), NOT_FOUND, "SESSION_NOT_FOUND")
    s = await track.session()
    assert await close(stub, s)
    before = await snapshot(probe)
    await expect_error(refresh(stub, s), NOT_FOUND, "SESSION_NOT_FOUND")
    assert await probe.lease_ttl(lease_of(s)) == -1
    await assert_untouched(probe, before)


async def test_refresh_never_revives_an_expired_session(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = await track.session(ttl=2)
    await lease_gone(probe, s, within=2 + 3)
    await expect_error(refresh(stub, s), NOT_FOUND, "SESSION_NOT_FOUND")
    await expect_error(refresh(stub, s), NOT_FOUND, "SESSION_NOT_FOUND")
    assert await probe.lease_ttl(lease_of(s)) == -1
    assert await probe.keys(SESSIONS) == []
    # Nor can the dead session take a lock.
    before = await snapshot(probe)
    await expect_error(acquire(stub, "sess/dead", s), NOT_FOUND, "SESSION_NOT_FOUND")
    await expect_error(acquire(stub, "sess/dead", s, wait=2), NOT_FOUND, "SESSION_NOT_FOUND")
    await assert_untouched(probe, before)


# -- close --------------------------------------------------------------------------------------


async def test_close_session_releases_all_its_locks_and_is_idempotent(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    names = ["close/a", "close/b", "close/c"]
    s = await track.session()
    for n in names:
        await acquire(stub, n, s)
    keep = await track.session()
    kept = await acquire(stub, "close/other", keep)
    assert len(await lock_keys(probe)) == 4

    owned = sorted(kv.key for kv in await probe.kvs() if kv.lease == lease_of(s))
    # three entries and the session record; and the quota slots they hold (bound to the same lease):
    # one session slot, and per entry one tenant slot and one slot of its lock's queue
    assert len([k for k in owned if b"/q/" not in k]) == 4
    assert len([k for k in owned if b"/q/" in k]) == 1 + 2 * len(names)
    rev = await probe.revision()
    assert await close(stub, s) is True
    # All of them went at once: deleted together at one revision (one lease revoke).
    events = [ev for ev in await writes_between(probe, rev, await probe.revision()) if ev.kv.key.startswith(probe.root)]
    assert sorted(ev.kv.key for ev in events) == owned
    assert {ev.type for ev in events} == {Event.DELETE}
    assert len({ev.kv.mod_revision for ev in events}) == 1
    assert [kv.key for kv in await probe.kvs() if kv.lease == lease_of(s)] == []
    for n in names:
        assert not (await stub.Describe(lock_pb2.DescribeRequest(name=n))).HasField("holder")
    assert (
        await stub.Describe(lock_pb2.DescribeRequest(name="close/other"))
    ).holder.fencing_token == kept.grant.fencing_token
    assert await probe.lease_ttl(lease_of(s)) == -1

    assert await close(stub, s) is False
    assert await close(stub, "00000000000000ab") is False
    # Another session can take the freed locks at once.
    other = await track.session()
    for n in names:
        assert (await acquire(stub, n, other)).queue_position == 0


# -- expiry -------------------------------------------------------------------------------------


# Locks freeing themselves when the session lapses: tests/core/test_sessions.py (every backend).


# -- KeepAlive ----------------------------------------------------------------------------------


async def test_keepalive_stream_keeps_sessions_alive_and_reports_expired(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    ttl = 2
    a = await track.session(ttl=ttl)
    b = await track.session(ttl=ttl)
    await acquire(stub, "ka/a", a)
    await acquire(stub, "ka/b", b)
    dead = await track.session(ttl=10)
    assert await close(stub, dead)

    call = stub.KeepAlive()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * ttl:
            for sid in (a, b):
                await call.write(lock_pb2.KeepAliveRequest(session_id=sid))
                resp = await call.read()
                assert resp.session_id == sid
                assert not resp.expired
                assert 0 < secs(resp.ttl) <= ttl
                assert resp.expires_at.seconds >= int(time.time())
            await asyncio.sleep(ttl / 4)
        assert await probe.lease_ttl(lease_of(a)) > 0
        assert await probe.lease_ttl(lease_of(b)) > 0
        assert len(await lock_keys(probe)) == 2

        # A gone session is answered with expired = true, and the stream stays open.
        for sid in (dead, "00000000000000ab"):
            await call.write(lock_pb2.KeepAliveRequest(session_id=sid))
            resp = await call.read()
            assert resp.session_id == sid
            assert resp.expired
            assert secs(resp.ttl) == 0
            assert not resp.HasField("expires_at")
        await call.write(lock_pb2.KeepAliveRequest(session_id=a))
        resp = await call.read()
        assert resp.session_id == a
        assert not resp.expired
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    finally:
        call.cancel()
    assert await probe.lease_ttl(lease_of(dead)) == -1


# -- lost sessions ------------------------------------------------------------------------------


async def test_waiter_whose_session_is_revoked_is_told_session_lost(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    # The holder keeps the lock throughout: the waiter must learn of its own lost lease, not of
    # its predecessor leaving.
    name = "lost/revoked"
    holder = await track.session(ttl=30)
    await acquire(stub, name, holder)
    holder_keys = await lock_keys(probe, name)
    w = await track.session(ttl=30)
    waiting = asyncio.create_task(acquire(stub, name, w, wait=4))
    try:
        await wait_waiters(stub, name, 1)
        await probe.revoke(lease_of(w))
        await expect_error(waiting, NOT_FOUND, "SESSION_LOST")
    finally:
        waiting.cancel()
    assert await lock_keys(probe, name) == holder_keys
    assert session_key(probe, w) not in await probe.keys(SESSIONS)


async def test_waiter_whose_session_is_closed_is_told_session_lost(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "lost/closed"
    holder = await track.session(ttl=30)
    await acquire(stub, name, holder)
    holder_keys = await lock_keys(probe, name)
    w = await track.session(ttl=30)
    waiting = asyncio.create_task(acquire(stub, name, w, wait=4))
    try:
        await wait_waiters(stub, name, 1)
        assert await close(stub, w)
        await expect_error(waiting, NOT_FOUND, "SESSION_LOST")
    finally:
        waiting.cancel()
    assert await lock_keys(probe, name) == holder_keys


async def test_revoked_waiter_learns_it_when_its_predecessor_leaves(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    name = "lost/then-release"
    holder = await track.session(ttl=30)
    held = await acquire(stub, name, holder)
    w = await track.session(ttl=30)
    waiting = asyncio.create_task(acquire(stub, name, w, wait=20))
    try:
        await wait_waiters(stub, name, 1)
        await probe.revoke(lease_of(w))
        assert await release(stub, name, held.grant.fencing_token)
        async with asyncio.timeout(5):
            await expect_error(waiting, NOT_FOUND, "SESSION_LOST")
    finally:
        waiting.cancel()
    assert await lock_keys(probe, name) == []
    assert not (await stub.Describe(lock_pb2.DescribeRequest(name=name))).HasField("holder")


async def test_queue_heals_when_a_middle_waiter_is_revoked(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "lost/middle"
    holder = await track.session(ttl=30)
    held = await acquire(stub, name, holder)
    sids = [await track.session(ttl=30) for _ in range(3)]
    tasks = []
    try:
        for i, s in enumerate(sids):
            tasks.append(asyncio.create_task(acquire(stub, name, s, wait=20)))
            await wait_waiters(stub, name, i + 1)
        await probe.revoke(lease_of(sids[1]))
        d = await wait_waiters(stub, name, 2)
        assert [x.session_id for x in d.waiters] == [sids[0], sids[2]]
        assert [x.position for x in d.waiters] == [1, 2]

        assert await release(stub, name, held.grant.fencing_token)
        async with asyncio.timeout(5):
            first = await tasks[0]
        assert first.grant.session_id == sids[0]
        assert not tasks[2].done()
        assert await release(stub, name, first.grant.fencing_token)
        async with asyncio.timeout(5):
            third = await tasks[2]
        assert third.grant.session_id == sids[2]
        assert third.grant.fencing_token > first.grant.fencing_token
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- implicit sessions --------------------------------------------------------------------------


async def test_sessionless_acquire_then_release_closes_the_implicit_session(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    leases = await probe.leases()
    now = time.time()
    got = await acquire(stub, "implicit/one", ttl=5, owner="job-7", request_id="impl-1")
    sid = track.adopt(got.grant.session_id)
    assert await probe.leases() - leases == {lease_of(sid)}
    assert now + 4 <= got.grant.expires_at.seconds <= now + 6
    assert session_key(probe, sid) in await probe.keys(SESSIONS)
    assert 0 < await probe.lease_ttl(lease_of(sid)) <= 5
    # The implicit session is a real session: Refresh works on it.
    assert secs((await refresh(stub, sid)).ttl) == 5

    assert await release(stub, "implicit/one", got.grant.fencing_token) is True
    assert await probe.lease_ttl(lease_of(sid)) == -1
    assert await probe.keys() == []
    assert await probe.leases() - leases == set()
    assert await release(stub, "implicit/one", got.grant.fencing_token) is False


async def test_releasing_one_lock_of_an_explicit_session_keeps_the_session(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    s = await track.session()
    a = await acquire(stub, "explicit/a", s)
    b = await acquire(stub, "explicit/b", s)
    assert await release(stub, "explicit/a", a.grant.fencing_token)
    assert await probe.lease_ttl(lease_of(s)) > 0
    assert (
        await stub.Describe(lock_pb2.DescribeRequest(name="explicit/b"))
    ).holder.fencing_token == b.grant.fencing_token
    assert await release(stub, "explicit/b", b.grant.fencing_token)
    assert await probe.lease_ttl(lease_of(s)) > 0, "releasing an explicit session's last lock closed it"
    assert await probe.keys(SESSIONS) == [session_key(probe, s)]


async def test_keepalive_stream_checks_a_session_owner_once_and_still_sees_it_end(
    broker: Any, stub: Any, track: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner check (tenant and principal: core/owners.py) is made once per session per stream.
    owners = broker.core.owners
    reads: list[int] = []
    real = owners.check

    async def counting(tenant: str, lease: int, principal: str) -> bool:
        reads.append(lease)
        return bool(await real(tenant, lease, principal))

    monkeypatch.setattr(owners, "check", counting)
    sid = await track.session()
    stream = stub.KeepAlive()
    try:
        for _ in range(3):
            await stream.write(lock_pb2.KeepAliveRequest(session_id=sid))
            assert not (await stream.read()).expired
        assert len(reads) == 1, "the owner of a session is read once per stream, not per refresh"
        await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=sid))
        await stream.write(lock_pb2.KeepAliveRequest(session_id=sid))
        assert (await stream.read()).expired, "a session closed behind the stream is reported expired"
    finally:
        stream.cancel()
