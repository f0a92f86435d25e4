"""Lock semantics through the gRPC edge on a real etcd: FIFO, no herd, try-lock, waits, idempotency, List.

The checks of the core alone (exclusion and fencing under contention, retries, exact release, name
prefixes, List order) moved to tests/core/test_queue.py, which runs them on every backend."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import (
    LOCKS,
    SESSIONS,
    Tracker,
    acquire,
    active_watches,
    assert_untouched,
    eventually,
    expect_error,
    lease_of,
    lock_keys,
    release,
    secs,
    snapshot,
    wait_waiters,
)

ABORTED = grpc.StatusCode.ABORTED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@contextlib.asynccontextmanager
async def replica(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[tuple[Broker, Any]]:
    """A second broker on the same etcd and key root, with its own stub."""
    b = Broker(broker_config(etcd.endpoint, key_root))
    await b.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            yield b, lock_pb2_grpc.LockServiceStub(ch)
    finally:
        await b.stop(grace=1.0)


def entry_key(probe: EtcdProbe, name: str, session_id: str) -> bytes:
    return probe.root + f"{LOCKS}{name}#{session_id}".encode()


async def describe(stub: Any, name: str) -> lock_pb2.DescribeResponse:
    resp: lock_pb2.DescribeResponse = await stub.Describe(lock_pb2.DescribeRequest(name=name))
    return resp


async def list_names(stub: Any, prefix: str = "", page_size: int = 0) -> list[str]:
    resp = await stub.List(lock_pb2.ListRequest(prefix=prefix, page_size=page_size))
    assert resp.next_page_token == ""
    return [lk.name for lk in resp.locks]


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


# -- 2. FIFO ------------------------------------------------------------------------------------


async def test_fifo_grants_in_queue_order(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "fifo/one"
    n = 8
    holder = await track.session(owner="holder")
    held = await acquire(stub, name, holder, owner="the-holder")
    sids = [await track.session(owner=f"w{i}") for i in range(n)]
    order: list[int] = []
    grants: dict[int, lock_pb2.AcquireResponse] = {}

    async def waiter(i: int) -> None:
        resp = await acquire(stub, name, sids[i], wait=30, owner=f"w{i}", request_id=f"fifo-w{i}")
        order.append(i)
        grants[i] = resp
        assert await release(stub, name, resp.grant.fencing_token, sids[i])

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            tasks.append(asyncio.create_task(waiter(i)))
            await wait_waiters(stub, name, i + 1)

        d = await describe(stub, name)
        assert d.name == name
        assert d.holder.session_id == holder
        assert d.holder.owner == "the-holder"
        assert d.holder.fencing_token == held.grant.fencing_token
        assert [w.session_id for w in d.waiters] == sids
        assert [w.position for w in d.waiters] == list(range(1, n + 1))
        assert [w.owner for w in d.waiters] == [f"w{i}" for i in range(n)]
        assert order == []

        assert await release(stub, name, held.grant.fencing_token)
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks)
    finally:
        await cancel_all(tasks)

    assert order == list(range(n))
    tokens = [grants[i].grant.fencing_token for i in range(n)]
    assert strictly_increasing([held.grant.fencing_token, *tokens])
    assert [grants[i].queue_position for i in range(n)] == list(range(1, n + 1))
    assert await lock_keys(probe, name) == []


# -- 3. no thundering herd ----------------------------------------------------------------------


async def test_release_wakes_only_the_next_waiter(
    broker: Any, stub: Any, track: Tracker, probe: EtcdProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = broker.core._backend
    real_position = backend.position
    reads: list[bytes] = []

    async def counting_position(prefix: bytes, key: bytes, create_revision: int) -> Any:
        reads.append(key)
        return await real_position(prefix, key, create_revision)

    monkeypatch.setattr(backend, "position", counting_position)

    name = "herd/one"
    n = 6
    holder = await track.session()
    held = await acquire(stub, name, holder)
    sids = [await track.session() for _ in range(n)]
    keys = [entry_key(probe, name, s) for s in sids]
    granted = [asyncio.Event() for _ in range(n)]
    let_go = [asyncio.Event() for _ in range(n)]

    async def waiter(i: int) -> None:
        resp = await acquire(stub, name, sids[i], wait=30, request_id=f"herd-{i}")
        granted[i].set()
        await let_go[i].wait()
        assert await release(stub, name, resp.grant.fencing_token, sids[i])

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            tasks.append(asyncio.create_task(waiter(i)))
            await wait_waiters(stub, name, i + 1)
        await asyncio.sleep(0.2)
        assert reads == [], "waiters re-read the queue while nothing changed"

        # One release: only the first waiter re-reads, the other five keep watching their predecessor.
        assert await release(stub, name, held.grant.fencing_token)
        async with asyncio.timeout(5):
            await granted[0].wait()
        await asyncio.sleep(0.3)  # room for any herd re-reads to show up
        assert reads == keys[:1]
        assert not any(g.is_set() for g in granted[1:])

        # Let the chain run to the end: one re-read per handoff, in queue order.
        for ev in let_go:
            ev.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
        await asyncio.sleep(0.2)
        assert reads == keys
    finally:
        await cancel_all(tasks)


# -- 4. try-lock --------------------------------------------------------------------------------


async def test_try_lock_on_held_lock_puts_nothing(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "try/held"
    alpha = await track.session(owner="alpha")
    held = await acquire(stub, name, alpha, owner="alpha-owner")
    assert held.queue_position == 0
    token = held.grant.fencing_token
    beta = await track.session(owner="beta")

    for wait in (None, 0.0):  # unset and zero wait_timeout both mean "try once"
        before = await snapshot(probe)
        now = time.time()
        r = await expect_error(acquire(stub, name, beta, wait=wait, owner="beta-owner"), ABORTED, "LOCK_HELD")
        na = r.not_acquired
        assert na is not None, "LOCK_HELD without a NotAcquired detail"
        assert na.name == name
        assert na.holder.owner == "alpha-owner"
        assert na.holder.session_id == alpha
        assert na.holder.fencing_token == token
        assert na.holder.HasField("expires_at")
        assert now - 1 <= na.holder.expires_at.seconds <= now + 11
        assert na.waiters == 0
        assert r.info is not None
        assert r.info.metadata["holder_fencing_token"] == str(token)
        assert r.info.metadata["holder_owner"] == "alpha-owner"
        await assert_untouched(probe, before)

    # Session-less try-lock: the session it would have created is gone too (no lease, no key).
    before = await snapshot(probe)
    r = await expect_error(acquire(stub, name, ttl=5, request_id="try-implicit"), ABORTED, "LOCK_HELD")
    assert r.not_acquired is not None
    assert r.not_acquired.holder.fencing_token == token
    await assert_untouched(probe, before)

    # The holder is untouched.
    d = await describe(stub, name)
    assert d.holder.fencing_token == token
    assert list(d.waiters) == []


async def test_try_lock_on_free_lock_is_granted(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = await track.session()
    r = await acquire(stub, "try/free", s, owner="o", request_id="free-1")
    assert r.queue_position == 0
    assert r.grant.session_id == s
    assert r.grant.owner == "o"
    assert r.grant.request_id == "free-1"
    assert r.grant.fencing_token == (await probe.kvs(LOCKS + "try/free#"))[0].create_revision


# -- 5. waits that end without a grant ------------------------------------------------------------


async def test_wait_expires_with_wait_expired_and_leaves_nothing(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "wait/expires"
    holder = await track.session()
    held = await acquire(stub, name, holder, owner="h")
    holder_keys = await lock_keys(probe, name)
    beta = await track.session()

    t0 = time.monotonic()
    r = await expect_error(acquire(stub, name, beta, wait=1.0, owner="b"), ABORTED, "WAIT_EXPIRED")
    assert time.monotonic() - t0 >= 0.9
    na = r.not_acquired
    assert na is not None
    assert na.holder.fencing_token == held.grant.fencing_token
    assert na.holder.owner == "h"
    assert secs(na.waited) >= 0.9
    assert await lock_keys(probe, name) == holder_keys
    assert list((await describe(stub, name)).waiters) == []

    # Session-less: the session made for the wait is revoked with it.
    leases = await probe.leases()
    await expect_error(acquire(stub, name, ttl=10, wait=1.0, request_id="wait-implicit"), ABORTED, "WAIT_EXPIRED")
    assert await probe.leases() - leases == set()
    assert await lock_keys(probe, name) == holder_keys
    assert await probe.keys(SESSIONS) == sorted(probe.root + f"{SESSIONS}{s}".encode() for s in (holder, beta))

    # beta's session survived its failed wait and can take the lock once it is free.
    assert await release(stub, name, held.grant.fencing_token)
    assert (await acquire(stub, name, beta)).grant.session_id == beta


async def test_rpc_deadline_shorter_than_wait(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "wait/deadline"
    holder = await track.session()
    await acquire(stub, name, holder)
    holder_keys = await lock_keys(probe, name)
    beta = await track.session()

    with pytest.raises(aio.AioRpcError) as ei:
        await acquire(stub, name, beta, wait=30, timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def only_holder() -> bool:
        return await lock_keys(probe, name) == holder_keys

    await eventually(only_holder, 3.0, "the timed-out waiter's key is removed")
    assert list((await describe(stub, name)).waiters) == []


async def test_cancelled_wait_leaves_nothing(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "wait/cancel"
    holder = await track.session()
    await acquire(stub, name, holder)
    holder_keys = await lock_keys(probe, name)
    beta = await track.session()

    async def only_holder() -> bool:
        return await lock_keys(probe, name) == holder_keys

    # Cancel the call object.
    req = lock_pb2.AcquireRequest(name=name, session_id=beta, request_id="cancel-call")
    req.wait_timeout.seconds = 30
    call = stub.Acquire(req)
    await wait_waiters(stub, name, 1)
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(only_holder, 3.0, "the cancelled call's key is removed")

    # Cancel the task awaiting the call.
    task = asyncio.create_task(acquire(stub, name, beta, wait=30, request_id="cancel-task"))
    await wait_waiters(stub, name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await eventually(only_holder, 3.0, "the cancelled task's key is removed")

    # Session-less: the cancelled wait's session goes too.
    leases = await probe.leases()
    task = asyncio.create_task(acquire(stub, name, ttl=10, wait=30, request_id="cancel-implicit"))
    await wait_waiters(stub, name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await eventually(only_holder, 3.0, "the cancelled session-less call's key is removed")

    async def no_new_lease() -> bool:
        return await probe.leases() - leases == set()

    await eventually(no_new_lease, 3.0, "the cancelled session-less call's lease is revoked")


# -- 6. idempotency -----------------------------------------------------------------------------


def same_grant(a: lock_pb2.Grant, b: lock_pb2.Grant) -> None:
    assert (a.name, a.fencing_token, a.session_id, a.owner, a.request_id) == (
        b.name,
        b.fencing_token,
        b.session_id,
        b.owner,
        b.request_id,
    )
    assert a.queued_at == b.queued_at


async def test_retry_on_second_replica_returns_same_grant(
    etcd: EmbeddedEtcd, key_root: str, stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    async with replica(etcd, key_root) as (other, stub2):
        # Granted on replica 1, retried on replica 2.
        s = await track.session()
        first = await acquire(stub, "idem/replica", s, owner="o", request_id="rid-c")
        again = await acquire(stub2, "idem/replica", s, owner="o", request_id="rid-c")
        same_grant(first.grant, again.grant)
        assert len(await lock_keys(probe, "idem/replica")) == 1

        # Waiting on replica 1, retried on replica 2 while it waits.
        name = "idem/replica-wait"
        holder = await track.session()
        held = await acquire(stub, name, holder)
        w = await track.session()
        t1 = asyncio.create_task(acquire(stub, name, w, wait=20, owner="w", request_id="rid-c2"))
        t2: asyncio.Task[lock_pb2.AcquireResponse] | None = None
        try:
            await wait_waiters(stub, name, 1)
            t2 = asyncio.create_task(acquire(stub2, name, w, wait=20, owner="w", request_id="rid-c2"))

            async def replica_watching() -> bool:
                return active_watches(other) == 1

            await eventually(replica_watching, 3.0, "the retry waits on replica 2")
            assert len((await describe(stub2, name)).waiters) == 1
            assert await release(stub2, name, held.grant.fencing_token)
            async with asyncio.timeout(5):
                a, b = await asyncio.gather(t1, t2)
        finally:
            await cancel_all([t for t in (t1, t2) if t is not None])
        same_grant(a.grant, b.grant)
        assert len(await lock_keys(probe, name)) == 1

        # Session-less on replica 2, retried on replica 1: still one session.
        leases = await probe.leases()
        x = await acquire(stub2, "idem/replica-implicit", ttl=10, request_id="rid-c3")
        track.adopt(x.grant.session_id)
        y = await acquire(stub, "idem/replica-implicit", ttl=10, request_id="rid-c3")
        same_grant(x.grant, y.grant)
        assert await probe.leases() - leases == {lease_of(x.grant.session_id)}


async def test_retry_keeps_its_place_when_the_original_call_is_cancelled(
    etcd: EmbeddedEtcd, key_root: str, stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    """The documented retry: the client lost replica 1 mid-wait and retried on replica 2.

    Replica 1 then sees its call cancelled. The retry must keep the place it resumed (the same
    entry, the same fencing token) and be granted when the holder leaves; its session is alive,
    so it must not be told SESSION_LOST.
    """
    name = "idem/retry-after-cancel"
    holder = await track.session()
    held = await acquire(stub, name, holder)
    w = await track.session()
    async with replica(etcd, key_root) as (other, stub2):
        first = asyncio.create_task(acquire(stub, name, w, wait=20, request_id="rid-g"))
        retry: asyncio.Task[lock_pb2.AcquireResponse] | None = None
        try:
            await wait_waiters(stub, name, 1)
            queued = [kv for kv in await probe.kvs(LOCKS + f"{name}#") if kv.key.endswith(w.encode())]
            assert len(queued) == 1
            retry = asyncio.create_task(acquire(stub2, name, w, wait=20, request_id="rid-g"))

            async def replica_watching() -> bool:
                return active_watches(other) == 1

            await eventually(replica_watching, 3.0, "the retry waits on replica 2")
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await asyncio.sleep(0.5)  # replica 1 finishes its clean-up
            assert not retry.done()
            assert await release(stub, name, held.grant.fencing_token)
            async with asyncio.timeout(5):
                got = await retry
        finally:
            await cancel_all([t for t in (first, retry) if t is not None])
    assert got.grant.session_id == w
    assert got.grant.fencing_token == queued[0].create_revision


async def test_sessionless_request_id_reused_for_other_lock_keeps_first_grant(
    stub: Any, track: Tracker, probe: EtcdProbe
) -> None:
    first = await acquire(stub, "idem/reuse-x", ttl=10, owner="o", request_id="rid-f")
    track.adopt(first.grant.session_id)
    before = await snapshot(probe)
    await expect_error(
        acquire(stub, "idem/reuse-y", ttl=10, owner="o", request_id="rid-f"), FAILED_PRECONDITION, "REQUEST_ID_REUSED"
    )
    # A refused request changes nothing: the first grant and its session are still there.
    d = await describe(stub, "idem/reuse-x")
    assert d.holder.fencing_token == first.grant.fencing_token
    assert await probe.lease_ttl(lease_of(first.grant.session_id)) > 0
    assert (await describe(stub, "idem/reuse-y")).HasField("holder") is False
    await assert_untouched(probe, before)


# -- 7. not reentrant ---------------------------------------------------------------------------


async def test_same_session_other_request_id_is_already_queued(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    name = "reentry/one"
    s = await track.session()
    held = await acquire(stub, name, s, request_id="first")
    before = await snapshot(probe)
    for wait in (None, 2.0):
        r = await expect_error(
            acquire(stub, name, s, wait=wait, request_id="second"), FAILED_PRECONDITION, "ALREADY_QUEUED"
        )
        assert r.info is not None
        assert r.info.metadata["request_id"] == "first"
        assert r.info.metadata["fencing_token"] == str(held.grant.fencing_token)
    await assert_untouched(probe, before)
    assert (await describe(stub, name)).holder.fencing_token == held.grant.fencing_token

    # The same for a session that is waiting, not holding; its wait goes on undisturbed.
    w = await track.session()
    waiting = asyncio.create_task(acquire(stub, name, w, wait=20, request_id="w-first"))
    try:
        await wait_waiters(stub, name, 1)
        before = await snapshot(probe)
        await expect_error(acquire(stub, name, w, wait=5, request_id="w-second"), FAILED_PRECONDITION, "ALREADY_QUEUED")
        await assert_untouched(probe, before)
        assert [x.session_id for x in (await describe(stub, name)).waiters] == [w]
        assert await release(stub, name, held.grant.fencing_token)
        async with asyncio.timeout(5):
            got = await waiting
    finally:
        await cancel_all([waiting])
    assert got.grant.session_id == w
    assert got.grant.request_id == "w-first"


# -- 11. Describe and List ----------------------------------------------------------------------


async def test_describe_free_held_and_waiting(stub: Any, track: Tracker) -> None:
    name = "desc/one"
    d = await describe(stub, name)
    assert d.name == name
    assert not d.HasField("holder")
    assert list(d.waiters) == []

    h = await track.session(ttl=20)
    now = time.time()
    held = await acquire(stub, name, h, owner="holder-1")
    w = await track.session()
    waiting = asyncio.create_task(acquire(stub, name, w, wait=20, owner="waiter-1"))
    try:
        d = await wait_waiters(stub, name, 1)
        assert d.holder.owner == "holder-1"
        assert d.holder.session_id == h
        assert d.holder.fencing_token == held.grant.fencing_token
        assert now - 1 <= d.holder.since.seconds <= time.time() + 1
        assert now + 15 <= d.holder.expires_at.seconds <= now + 21
        assert d.waiters[0].position == 1
        assert d.waiters[0].owner == "waiter-1"
        assert d.waiters[0].session_id == w
        assert secs(d.waiters[0].waited) >= 0
        assert d.waiters[0].since.seconds >= d.holder.since.seconds
    finally:
        await cancel_all([waiting])


async def test_list_pages_and_prefix(stub: Any, track: Tracker) -> None:
    names = [f"page/{i:02d}" for i in range(7)]
    s = await track.session()
    tokens = {n: (await acquire(stub, n, s, owner=f"o-{n}")).grant.fencing_token for n in names}
    other = await track.session()
    await acquire(stub, "pagf/outside", other)
    await acquire(stub, "other/x", other)
    waiting = asyncio.create_task(acquire(stub, "page/03", other, wait=20, owner="waiting"))
    try:
        await wait_waiters(stub, "page/03", 1)

        pages: list[list[lock_pb2.HeldLock]] = []
        token = ""
        for _ in range(10):
            resp = await stub.List(lock_pb2.ListRequest(prefix="page/", page_size=3, page_token=token))
            pages.append(list(resp.locks))
            token = resp.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        flat = [lk for p in pages for lk in p]
        assert [lk.name for lk in flat] == names
        for lk in flat:
            assert lk.holder.fencing_token == tokens[lk.name]
            assert lk.holder.session_id == s
            assert lk.holder.owner == f"o-{lk.name}"
            assert lk.waiters == (1 if lk.name == "page/03" else 0)

        # Exactly one full page: no token. One short of it: a token, then the last lock.
        exact = await stub.List(lock_pb2.ListRequest(prefix="page/", page_size=7))
        assert len(exact.locks) == 7
        assert exact.next_page_token == ""
        short = await stub.List(lock_pb2.ListRequest(prefix="page/", page_size=6))
        assert len(short.locks) == 6
        assert short.next_page_token != ""
        last = await stub.List(lock_pb2.ListRequest(prefix="page/", page_size=6, page_token=short.next_page_token))
        assert [lk.name for lk in last.locks] == ["page/06"]
        assert last.next_page_token == ""

        assert await list_names(stub, "page/") == names  # page_size unset: the default 100
        assert await list_names(stub) == sorted([*names, "pagf/outside", "other/x"])
        assert await list_names(stub, "pag") == sorted([*names, "pagf/outside"])

        # A token only fits the prefix it was issued for.
        r = await expect_error(
            stub.List(lock_pb2.ListRequest(prefix="other/", page_size=6, page_token=short.next_page_token)),
            INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert r.fields == ["page_token"]
        # b"a\nb" is not a name (a control character); b"a//b" was not one before issue 19.
        for bad in ("not a token!", base64.urlsafe_b64encode(b"a\nb").decode(), "////"):
            r = await expect_error(
                stub.List(lock_pb2.ListRequest(prefix="", page_token=bad)), INVALID_ARGUMENT, "INVALID_ARGUMENT"
            )
            assert r.fields == ["page_token"]

        # A released lock is no longer listed.
        assert await release(stub, "page/00", tokens["page/00"])
        assert await list_names(stub, "page/") == names[1:]
    finally:
        await cancel_all([waiting])
