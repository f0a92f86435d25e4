"""Writes of unknown outcome on every backend: whatever the enqueue did, a failed Acquire leaves nothing.

The backend fails an enqueue as Unavailable(outcome_unknown=True) after applying it (the answer was
lost) or without applying it (the request was lost); the core must find out which by reading, and
remove what landed (core/acquire.py: _abandon, _late_entry).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockbroker.server.core import cleanup
from lockbroker.server.core.backend import BackendError
from lockbroker.server.core.errors import Unavailable, WaitExpired
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.memory import ManualClock, MemoryLockBackend
from lockbroker.server.core.model import EntryValue
from tests.core.conftest import TENANT, Env, eventually, sid


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "lost"])
@pytest.mark.parametrize("wait", [0.0, 5.0], ids=["try", "wait"])
async def test_unknown_enqueue_leaves_nothing_and_the_lock_free(env: Env, applied: bool, wait: float) -> None:
    name = "unknown/enqueue"
    s = await env.session()
    env.fail("enqueue", applied=applied)
    with pytest.raises(Unavailable) as ei:
        await env.acquire(name, s, wait=wait, request_id="u-1")
    assert ei.value.outcome_unknown
    await env.core.drain_cleanups(3.0)
    assert await env.lock_keys(name) == []
    # The entry's release mark moved (sealed) or the entry was deleted (which moves it too).
    ks = env.core.keyspace(TENANT)
    assert await env.keys(f"/t/{TENANT}/m/") == [ks.mark(s).of(ks.entry_key(name, s))]
    # The same request, retried, is granted: nothing of the first attempt is in its way.
    got = await env.acquire(name, s, wait=wait, request_id="u-1")
    assert got.session_id == sid(s)
    assert got.queue_position == 0


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "lost"])
async def test_unknown_sessionless_enqueue_leaves_no_session(env: Env, applied: bool) -> None:
    leases = await env.leases()
    env.fail("enqueue", applied=applied)
    with pytest.raises(Unavailable):
        await env.acquire("unknown/implicit", None, ttl=10, request_id="u-2")
    await env.core.drain_cleanups(3.0)
    assert await env.leases() - leases == set()
    assert await env.keys() == []


async def test_unknown_enqueue_behind_a_holder_does_not_become_a_holder(env: Env) -> None:
    name = "unknown/behind"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    env.fail("enqueue", applied=True)
    with pytest.raises(Unavailable):
        await env.acquire(name, w, wait=5, request_id="u-3")
    await env.core.drain_cleanups(3.0)
    assert (await env.describe(name)).waiters == []
    assert await env.release(name, held.fencing_token)
    assert (await env.describe(name)).holder is None


async def test_a_late_enqueue_is_refused_after_the_seal() -> None:
    """An enqueue held in the network lands after its caller gave up and sealed the session's
    release mark: it must not queue the entry. The memory model delays the write itself; on etcd
    the same is tests/test_late_write.py, which holds up a real transaction and delivers it later."""
    mem = MemoryLockBackend(ManualClock())
    core = LockCore(mem, "/late")
    ks = core.keyspace(TENANT)
    name = "unknown/late"
    s = int((await core.create_session(TENANT, 30, "", "")).session_id, 16)
    gate = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate)
    with pytest.raises(Unavailable):
        await core.acquire(TENANT, AcquireParams(name, s, 30, 5.0, "", "late-1"))
    await core.drain_cleanups(3.0)
    gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert mem.keys(ks.lock_prefix(name)) == []
    # A write held up the same way but sent after the seal is applied when it lands: the mark that
    # moved while it was in flight is what refused the first one.
    gate2 = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate2)
    with pytest.raises(Unavailable):
        await mem.enqueue(
            ks.lock_prefix(name),
            ks.entry_key(name, s),
            EntryValue("o", "late-2", 0.0),
            s,
            session_key=ks.session_key(s),
            new_session_value=None,
            only_if_free=False,
            mark=ks.mark(s).base,
        )
    gate2.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(mem.keys(ks.lock_prefix(name))) == 1
    await mem.close()


async def test_clean_up_retries_while_the_backend_is_away(env: Env) -> None:
    """A waiter that gives up while its delete fails is still removed once the backend answers
    (core/cleanup.py), else the next release would hand the lock to a caller told it did not get it."""
    name = "unknown/cleanup"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    env.fail("delete_entry", applied=False)
    with pytest.raises(WaitExpired):
        await env.acquire(name, w, wait=0.2)
    await env.core.drain_cleanups(3.0)
    assert (await env.describe(name)).waiters == []
    assert await env.release(name, held.fencing_token)
    assert (await env.describe(name)).holder is None


async def _held_core() -> tuple[MemoryLockBackend, LockCore, int]:
    mem = MemoryLockBackend(ManualClock())
    core = LockCore(mem, "/marks")
    s = int((await core.create_session(TENANT, 30, "", "")).session_id, 16)
    return mem, core, s


def _enqueue(mem: MemoryLockBackend, core: LockCore, name: str, s: int, *, claim: str, request_id: str) -> Any:
    ks = core.keyspace(TENANT)
    return mem.enqueue(
        ks.lock_prefix(name),
        ks.entry_key(name, s, claim),
        EntryValue("o", request_id, 0.0),
        s,
        session_key=ks.session_key(s),
        new_session_value=None,
        only_if_free=False,
        mark=ks.mark(s).base,
    )


async def _land() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("claim", ["", "cretry-1"], ids=["plain", "new-claim"])
async def test_a_late_enqueue_is_refused_after_its_retry_was_granted_and_released(claim: str) -> None:
    """The guarantee of the release marks (LockBackend.enqueue): an enqueue held in the network
    that lands after the same request was retried, granted and released must not queue the
    released claim again, for the plain claim as for a new_claim claim (whose mark is its own
    key's, not the session's: model.mark_key). On etcd: tests/test_late_write.py."""
    mem, core, s = await _held_core()
    ks = core.keyspace(TENANT)
    name, key = "marks/late", ks.entry_key("marks/late", s, claim)
    gate = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate)
    with pytest.raises(Unavailable):
        await _enqueue(mem, core, name, s, claim=claim, request_id="retry-1")  # held up in the network
    retried = await _enqueue(mem, core, name, s, claim=claim, request_id="retry-1")
    assert retried.created and retried.position.mine is not None and retried.position.predecessor is None
    assert await mem.delete_entry(key, retried.position.mine.create_revision, mark=ks.mark(s)) is not None
    gate.set()
    await _land()
    assert mem.keys(ks.lock_prefix(name)) == []
    await mem.close()


async def test_a_release_of_another_claim_does_not_refuse_an_enqueue_in_flight() -> None:
    """Each claim's enqueue compares its own key's mark, so a release of another claim of the
    same session (here one whose mark differs) no longer refuses it: 64 claims of one session do
    not retry each other's enqueues (issue 19's bench)."""
    mem, core, s = await _held_core()
    ks = core.keyspace(TENANT)
    name = "marks/other"
    mine = ks.entry_key(name, s, "cmine")
    # The session id is random and a mark is one of 256 buckets of the key: pick the other claim's
    # name so that its mark differs (fixed names collided once in 256 runs).
    claim = next(
        c for c in (f"cother{i}" for i in range(64)) if ks.mark(s).of(ks.entry_key(name, s, c)) != ks.mark(s).of(mine)
    )
    other = ks.entry_key(name, s, claim)
    assert ks.mark(s).of(mine) != ks.mark(s).of(other)
    held = await _enqueue(mem, core, name, s, claim=claim, request_id="other")
    assert held.position.mine is not None
    gate = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate)
    with pytest.raises(Unavailable):
        await _enqueue(mem, core, name, s, claim="cmine", request_id="mine")
    assert await mem.delete_entry(other, held.position.mine.create_revision, mark=ks.mark(s)) is not None
    gate.set()
    await _land()
    assert mem.keys(ks.lock_prefix(name)) == [mine]
    await mem.close()


async def test_clean_up_retries_after_an_error_the_store_has_no_status_for(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only "unavailable": a clean-up that fails with any error of the store is tried again
    (tests/fault saw a stray entry left after a partition), so the entry never becomes a holder."""
    name = "unknown/cleanup-error"
    h = await env.session()
    held = await env.acquire(name, h)
    w = await env.session()
    real = env.backend.delete_entry
    failed: list[bytes] = []

    async def odd(key: bytes, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(key)
            raise BackendError("etcd UNKNOWN: something etcd has no status for")
        return await real(key, *args, **kwargs)

    monkeypatch.setattr(env.backend, "delete_entry", odd)
    with pytest.raises((WaitExpired, Unavailable)):
        await env.acquire(name, w, wait=0.2)
    await env.core.drain_cleanups(3.0)
    assert failed, "the premise: the clean-up's first delete failed"
    assert (await env.describe(name)).waiters == []
    assert await env.release(name, held.fencing_token)
    assert (await env.describe(name)).holder is None


async def test_clean_up_outlasts_its_window_while_the_session_lives(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CLEANUP_WINDOW the clean-up goes on while the session may be alive (its entry could
    still become a holder), and stops once the session's lease is gone."""
    monkeypatch.setattr(cleanup, "CLEANUP_WINDOW", 0.3)
    monkeypatch.setattr(cleanup, "LATE_DELAY", 0.1)
    name = "unknown/late-cleanup"
    h = await env.session(ttl=30)
    held = await env.acquire(name, h)
    w = await env.session(ttl=30)
    real = env.backend.delete_entry
    failing = True
    tries: list[float] = []

    async def away(*args: Any, **kwargs: Any) -> Any:
        if failing:
            tries.append(asyncio.get_running_loop().time())
            raise Unavailable("injected: etcd unreachable", retry_after=0.1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(env.backend, "delete_entry", away)
    with pytest.raises(Unavailable):  # the removal is not confirmed: the outcome is unknown
        await env.acquire(name, w, wait=0.2, request_id="late-1")
    await asyncio.sleep(1.0)  # well past the (shortened) window
    assert env.core._cleanups.pending == 1, "the clean-up gave up while the session lives"
    failing = False
    await env.core.drain_cleanups(3.0)
    assert (await env.describe(name)).waiters == []
    assert tries[-1] - tries[0] > 0.5

    # A clean-up whose session has ended stops: etcd removed its keys with the lease.
    failing = True
    again = await env.session(ttl=30)
    with pytest.raises(Unavailable):
        await env.acquire(name, again, wait=0.2, request_id="late-2")
    await env.backend.revoke_lease(again)

    async def stopped() -> bool:
        return env.core._cleanups.pending == 0

    await eventually(stopped, 5.0, "the clean-up of a gone session stops")
    failing = False
    assert await env.release(name, held.fencing_token)
