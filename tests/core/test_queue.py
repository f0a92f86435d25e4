"""The lock queue on every backend: exclusion, fencing, FIFO, try-lock, waits, idempotency, release, List.

Moved here from tests/test_locks.py (the gRPC edge's own checks stayed there), so they run on both
backends; see conftest.py for LOCKBROKER_TEST_BACKEND.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest

from lockbroker.server.core.errors import AlreadyQueued, LockHeld, RequestIdReused, WaitExpired
from lockbroker.server.core.model import Grant
from tests.core.conftest import Env, eventually, sid


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def same_grant(a: Grant, b: Grant) -> None:
    assert (a.name, a.fencing_token, a.session_id, a.owner, a.request_id) == (
        b.name,
        b.fencing_token,
        b.session_id,
        b.owner,
        b.request_id,
    )
    assert a.queued_at == b.queued_at


async def test_mutual_exclusion_and_fencing_under_contention(env: Env) -> None:
    name = "contended/resource"
    clients, rounds = 20, 4
    sessions = [await env.session(ttl=30, owner=f"c{i}") for i in range(clients)]
    records: list[tuple[float, float, int, int]] = []  # (start, end, token, client)
    inside = 0

    async def client(i: int) -> None:
        nonlocal inside
        for r in range(rounds):
            g = await env.acquire(name, sessions[i], wait=30, owner=f"c{i}", request_id=f"c{i}-r{r}")
            start = time.monotonic()
            assert inside == 0, f"client {i} was granted the lock while another client held it"
            inside += 1
            assert g.session_id == sid(sessions[i])
            assert g.name == name
            await asyncio.sleep(0.002)  # hold it across a few event-loop turns
            inside -= 1
            end = time.monotonic()
            records.append((start, end, g.fencing_token, i))
            assert await env.release(name, g.fencing_token, sessions[i])

    async with asyncio.timeout(40):
        await asyncio.gather(*(client(i) for i in range(clients)))

    assert len(records) == clients * rounds
    records.sort()
    for a, b in itertools.pairwise(records):
        assert a[1] <= b[0], f"hold intervals overlap: client {a[3]} {a[:2]} and client {b[3]} {b[:2]}"
    tokens = [r[2] for r in records]
    assert strictly_increasing(tokens), "fencing tokens do not increase in grant order"
    assert len(set(tokens)) == len(tokens)
    assert await env.lock_keys(name) == []


async def test_fifo_grants_in_queue_order(env: Env) -> None:
    name = "fifo/one"
    n = 8
    holder = await env.session(owner="holder")
    held = await env.acquire(name, holder, owner="the-holder")
    sids = [await env.session(owner=f"w{i}") for i in range(n)]
    order: list[int] = []
    grants: dict[int, Grant] = {}

    async def waiter(i: int) -> None:
        g = await env.acquire(name, sids[i], wait=30, owner=f"w{i}", request_id=f"fifo-w{i}")
        order.append(i)
        grants[i] = g
        assert await env.release(name, g.fencing_token, sids[i])

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            tasks.append(asyncio.create_task(waiter(i)))
            await env.wait_waiters(name, i + 1)

        d = await env.describe(name)
        assert d.name == name
        assert d.holder is not None
        assert d.holder.lease == holder
        assert d.holder.owner == "the-holder"
        assert d.holder.create_revision == held.fencing_token
        assert [w.lease for w in d.waiters] == sids
        assert [w.owner for w in d.waiters] == [f"w{i}" for i in range(n)]
        assert order == []

        assert await env.release(name, held.fencing_token)
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks)
    finally:
        await cancel_all(tasks)

    assert order == list(range(n))
    tokens = [grants[i].fencing_token for i in range(n)]
    assert strictly_increasing([held.fencing_token, *tokens])
    assert [grants[i].queue_position for i in range(n)] == list(range(1, n + 1))
    assert await env.lock_keys(name) == []


async def test_try_lock_on_held_lock_puts_nothing(env: Env) -> None:
    name = "try/held"
    alpha = await env.session(owner="alpha")
    held = await env.acquire(name, alpha, owner="alpha-owner")
    assert held.queue_position == 0
    token = held.fencing_token
    beta = await env.session(owner="beta")

    before = await env.snapshot()
    now = time.time()
    with pytest.raises(LockHeld) as ei:
        await env.acquire(name, beta, owner="beta-owner")
    info = ei.value.info
    assert info.name == name
    assert info.holder is not None
    assert info.holder.owner == "alpha-owner"
    assert info.holder.lease == alpha
    assert info.holder.create_revision == token
    assert info.holder_expires_at is not None
    assert now - 1 <= info.holder_expires_at <= now + 11
    assert info.waiters == 0
    assert ei.value.metadata["holder_fencing_token"] == str(token)
    assert ei.value.metadata["holder_owner"] == "alpha-owner"
    await env.assert_untouched(before)

    # Session-less try-lock: the session it would have created is gone too (no lease, no key).
    before = await env.snapshot()
    with pytest.raises(LockHeld) as ei:
        await env.acquire(name, None, ttl=5, request_id="try-implicit")
    assert ei.value.info.holder is not None
    assert ei.value.info.holder.create_revision == token
    await env.assert_untouched(before)

    d = await env.describe(name)
    assert d.holder is not None
    assert d.holder.create_revision == token
    assert d.waiters == []


async def test_try_lock_on_free_lock_is_granted(env: Env) -> None:
    s = await env.session()
    g = await env.acquire("try/free", s, owner="o", request_id="free-1")
    assert g.queue_position == 0
    assert g.session_id == sid(s)
    assert g.owner == "o"
    assert g.request_id == "free-1"
    d = await env.describe("try/free")
    assert d.holder is not None
    assert g.fencing_token == d.holder.create_revision


async def test_wait_expires_and_leaves_nothing(env: Env) -> None:
    name = "wait/expires"
    holder = await env.session()
    held = await env.acquire(name, holder, owner="h")
    holder_keys = await env.lock_keys(name)
    beta = await env.session()

    t0 = time.monotonic()
    with pytest.raises(WaitExpired) as ei:
        await env.acquire(name, beta, wait=0.3, owner="b")
    assert time.monotonic() - t0 >= 0.25
    info = ei.value.info
    assert info.holder is not None
    assert info.holder.create_revision == held.fencing_token
    assert info.holder.owner == "h"
    assert info.waited >= 0.25
    assert await env.lock_keys(name) == holder_keys
    assert (await env.describe(name)).waiters == []

    # Session-less: the session made for the wait is revoked with it.
    leases = await env.leases()
    sessions = await env.keys("/t/default/s/")
    with pytest.raises(WaitExpired):
        await env.acquire(name, None, ttl=10, wait=0.3, request_id="wait-implicit")
    assert await env.leases() - leases == set()
    assert await env.lock_keys(name) == holder_keys
    assert await env.keys("/t/default/s/") == sessions

    # beta's session survived its failed wait and can take the lock once it is free.
    assert await env.release(name, held.fencing_token)
    assert (await env.acquire(name, beta)).session_id == sid(beta)


async def test_cancelled_wait_leaves_nothing(env: Env) -> None:
    name = "wait/cancel"
    holder = await env.session()
    await env.acquire(name, holder)
    holder_keys = await env.lock_keys(name)
    beta = await env.session()

    async def only_holder() -> bool:
        return await env.lock_keys(name) == holder_keys

    task = asyncio.create_task(env.acquire(name, beta, wait=30, request_id="cancel-task"))
    await env.wait_waiters(name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await eventually(only_holder, 3.0, "the cancelled call's key is removed")

    # Session-less: the cancelled wait's session goes too.
    leases = await env.leases()
    task = asyncio.create_task(env.acquire(name, None, ttl=10, wait=30, request_id="cancel-implicit"))
    await env.wait_waiters(name, 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await eventually(only_holder, 3.0, "the cancelled session-less call's key is removed")

    async def no_new_lease() -> bool:
        return await env.leases() - leases == set()

    await eventually(no_new_lease, 3.0, "the cancelled session-less call's lease is revoked")


async def test_retry_of_granted_acquire_returns_same_grant(env: Env) -> None:
    name = "idem/granted"
    s = await env.session()
    first = await env.acquire(name, s, owner="o", request_id="rid-a")
    for wait in (0.0, 5.0):
        again = await env.acquire(name, s, owner="o", request_id="rid-a", wait=wait)
        same_grant(first, again)
        assert again.request_id == "rid-a"
        # etcd's range count ignores create-revision filters: the retry must count entries ahead itself.
        assert again.queue_position == 0, again
    assert len(await env.lock_keys(name)) == 1


async def test_concurrent_retry_of_waiting_acquire_shares_one_place(env: Env) -> None:
    name = "idem/waiting"
    holder = await env.session()
    held = await env.acquire(name, holder)
    s = await env.session()
    first = asyncio.create_task(env.acquire(name, s, wait=20, owner="o", request_id="rid-b"))
    second: asyncio.Task[Grant] | None = None
    try:
        await env.wait_waiters(name, 1)
        second = asyncio.create_task(env.acquire(name, s, wait=20, owner="o", request_id="rid-b"))

        async def both_watching() -> bool:
            return env.watches() == 2

        await eventually(both_watching, 3.0, "both calls wait in the queue")
        d = await env.describe(name)
        assert [w.lease for w in d.waiters] == [s], "the retry took a second place in the queue"
        assert len(await env.lock_keys(name)) == 2

        assert await env.release(name, held.fencing_token)
        async with asyncio.timeout(5):
            a, b = await asyncio.gather(first, second)
    finally:
        await cancel_all([t for t in (first, second) if t is not None])
    same_grant(a, b)
    assert a.fencing_token > held.fencing_token
    assert len(await env.lock_keys(name)) == 1


async def test_retry_keeps_its_place_when_the_original_call_is_cancelled(env: Env) -> None:
    name = "idem/retry-after-cancel"
    holder = await env.session()
    held = await env.acquire(name, holder)
    w = await env.session()
    first = asyncio.create_task(env.acquire(name, w, wait=20, request_id="rid-g"))
    retry: asyncio.Task[Grant] | None = None
    try:
        queued = (await env.wait_waiters(name, 1)).waiters[0]
        retry = asyncio.create_task(env.acquire(name, w, wait=20, request_id="rid-g"))

        async def both_watching() -> bool:
            return env.watches() == 2

        await eventually(both_watching, 3.0, "the retry waits too")
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await env.core.drain_cleanups(3.0)  # the cancelled call's clean-up has run
        assert not retry.done()
        assert await env.release(name, held.fencing_token)
        async with asyncio.timeout(5):
            got = await retry
    finally:
        await cancel_all([t for t in (first, retry) if t is not None])
    assert got.session_id == sid(w)
    assert got.fencing_token == queued.create_revision


async def test_sessionless_retry_returns_same_session_and_one_lease(env: Env) -> None:
    name = "idem/implicit"
    leases = await env.leases()
    first = await env.acquire(name, None, ttl=10, owner="o", request_id="rid-d")
    lease = env.adopt(int(first.session_id, 16))
    again = await env.acquire(name, None, ttl=10, owner="o", request_id="rid-d")
    same_grant(first, again)
    assert first.session_id != ""
    assert await env.leases() - leases == {lease}
    assert len(await env.lock_keys(name)) == 1
    assert await env.keys("/t/default/s/") == [env.root + f"/t/default/s/{first.session_id}".encode()]
    assert 0 < await env.backend.lease_ttl(lease) <= 10


async def test_sessionless_request_id_reused_for_other_lock_keeps_first_grant(env: Env) -> None:
    first = await env.acquire("idem/reuse-x", None, ttl=10, owner="o", request_id="rid-f")
    lease = env.adopt(int(first.session_id, 16))
    before = await env.snapshot()
    with pytest.raises(RequestIdReused):
        await env.acquire("idem/reuse-y", None, ttl=10, owner="o", request_id="rid-f")
    d = await env.describe("idem/reuse-x")
    assert d.holder is not None
    assert d.holder.create_revision == first.fencing_token
    assert await env.backend.lease_ttl(lease) > 0
    assert (await env.describe("idem/reuse-y")).holder is None
    await env.assert_untouched(before)


async def test_release_is_exact_and_idempotent(env: Env) -> None:
    name = "idem/release"
    a = await env.session()
    ra = await env.acquire(name, a)
    assert await env.release(name, ra.fencing_token) is True
    assert await env.release(name, ra.fencing_token) is False
    assert await env.release(name, ra.fencing_token, a) is False

    b = await env.session()
    rb = await env.acquire(name, b)
    assert rb.fencing_token > ra.fencing_token
    before = await env.snapshot()
    # A stale token never releases the current grant, whichever session it names.
    assert await env.release(name, ra.fencing_token) is False
    assert await env.release(name, ra.fencing_token, a) is False
    assert await env.release(name, ra.fencing_token, b) is False
    await env.assert_untouched(before)
    holder = (await env.describe(name)).holder
    assert holder is not None
    assert holder.create_revision == rb.fencing_token

    # Same session again: its new entry has the same key as its old one, but a new token.
    assert await env.release(name, rb.fencing_token, b) is True
    ra2 = await env.acquire(name, a)
    assert ra2.fencing_token > rb.fencing_token
    assert await env.release(name, ra.fencing_token, a) is False
    holder = (await env.describe(name)).holder
    assert holder is not None
    assert holder.create_revision == ra2.fencing_token
    assert await env.release(name, ra2.fencing_token) is True
    assert await env.lock_keys(name) == []


async def test_same_session_other_request_id_is_already_queued(env: Env) -> None:
    name = "reentry/one"
    s = await env.session()
    held = await env.acquire(name, s, request_id="first")
    before = await env.snapshot()
    for wait in (0.0, 2.0):
        with pytest.raises(AlreadyQueued) as ei:
            await env.acquire(name, s, wait=wait, request_id="second")
        assert ei.value.metadata["request_id"] == "first"
        assert ei.value.metadata["fencing_token"] == str(held.fencing_token)
    await env.assert_untouched(before)

    # The same for a session that is waiting, not holding; its wait goes on undisturbed.
    w = await env.session()
    waiting = asyncio.create_task(env.acquire(name, w, wait=20, request_id="w-first"))
    try:
        await env.wait_waiters(name, 1)
        before = await env.snapshot()
        with pytest.raises(AlreadyQueued):
            await env.acquire(name, w, wait=5, request_id="w-second")
        await env.assert_untouched(before)
        assert [x.lease for x in (await env.describe(name)).waiters] == [w]
        assert await env.release(name, held.fencing_token)
        async with asyncio.timeout(5):
            got = await waiting
    finally:
        await cancel_all([waiting])
    assert got.session_id == sid(w)
    assert got.request_id == "w-first"


async def test_list_pages_and_prefix(env: Env) -> None:
    names = [f"page/{i:02d}" for i in range(7)]
    s = await env.session()
    tokens = {n: (await env.acquire(n, s, owner=f"o-{n}")).fencing_token for n in names}
    other = await env.session()
    await env.acquire("pagf/outside", other)
    await env.acquire("other/x", other)
    waiting = asyncio.create_task(env.acquire("page/03", other, wait=20, owner="waiting"))
    try:
        await env.wait_waiters("page/03", 1)
        pages = []
        after: str | None = None
        for _ in range(10):
            page = await env.core.list("default", "page/", 3, after)
            pages.append(page.locks)
            if not page.next_page_token:
                break
            after = page.next_page_token
        assert [len(p) for p in pages] == [3, 3, 1]
        flat = [lk for p in pages for lk in p]
        assert [lk.name for lk in flat] == names
        for lk in flat:
            assert lk.holder.create_revision == tokens[lk.name]
            assert lk.holder.lease == s
            assert lk.holder.owner == f"o-{lk.name}"
            assert lk.waiters == (1 if lk.name == "page/03" else 0)
        exact = await env.core.list("default", "page/", 7, None)
        assert len(exact.locks) == 7
        assert exact.next_page_token == ""
        short = await env.core.list("default", "page/", 6, None)
        assert len(short.locks) == 6
        assert short.next_page_token != ""
        last = await env.core.list("default", "page/", 6, short.next_page_token)
        assert [lk.name for lk in last.locks] == ["page/06"]
        assert last.next_page_token == ""
        assert await list_names(env, "") == sorted([*names, "pagf/outside", "other/x"])
        assert await list_names(env, "pag") == sorted([*names, "pagf/outside"])
        # A released lock is no longer listed.
        assert await env.release("page/00", tokens["page/00"])
        assert await list_names(env, "page/") == names[1:]
    finally:
        await cancel_all([waiting])


async def list_names(env: Env, prefix: str) -> list[str]:
    page = await env.core.list("default", prefix, 100, None)
    assert page.next_page_token == ""
    return [lk.name for lk in page.locks]


async def test_lock_names_sharing_a_prefix_do_not_mix(env: Env) -> None:
    names = ["a", "a/b", "a-b"]
    sids = {n: await env.session(owner=n) for n in names}
    tokens = {n: (await env.acquire(n, sids[n], owner=n)).fencing_token for n in names}
    for n in names:
        d = await env.describe(n)
        assert d.holder is not None
        assert d.holder.create_revision == tokens[n]
        assert d.holder.lease == sids[n]
        assert d.waiters == [], f"{n!r} sees another lock's entry as a waiter"
        assert len(await env.lock_keys(n)) == 1

    assert await list_names(env, "a") == ["a", "a-b", "a/b"]
    assert await list_names(env, "a/") == ["a/b"]
    assert await list_names(env, "a-") == ["a-b"]

    assert await env.release("a", tokens["a"])
    assert (await env.describe("a")).holder is None
    for n in ("a/b", "a-b"):
        holder = (await env.describe(n)).holder
        assert holder is not None
        assert holder.create_revision == tokens[n]
    # "a" is free although "a/b" and "a-b" are held: a try-lock gets it at once.
    fresh = await env.session()
    assert (await env.acquire("a", fresh)).queue_position == 0
    # A stale "a" token does not reach into "a/b".
    assert await env.release("a/b", tokens["a"]) is False
    holder = (await env.describe("a/b")).holder
    assert holder is not None
    assert holder.create_revision == tokens["a/b"]


async def test_list_is_ordered_by_name(env: Env) -> None:
    # Every name character sorts above the "#" that ends a lock's key prefix ("!" was once allowed
    # and sorted below it, listing "a!" before "a").
    names = ["a", "a%", "a%b", "a-b", "a/b", "b"]
    s = await env.session()
    for n in reversed(names):
        await env.acquire(n, s)
    assert await list_names(env, "") == sorted(names)
    paged: list[str] = []
    after: str | None = None
    for _ in range(10):
        page = await env.core.list("default", "", 2, after)
        paged += [lk.name for lk in page.locks]
        if not page.next_page_token:
            break
        after = page.next_page_token
    assert paged == sorted(names)
