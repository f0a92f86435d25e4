"""Writes of unknown outcome on every backend: whatever the enqueue did, a failed Acquire leaves nothing.

The backend fails an enqueue as Unavailable(outcome_unknown=True) after applying it (the answer was
lost) or without applying it (the request was lost); the core must find out which by reading, and
remove what landed (core/acquire.py: _abandon, _late_entry).
"""

from __future__ import annotations

import asyncio

import pytest

from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.memory import MemoryLockBackend
from lockbroker.server.core.model import EntryValue
from tests.core.conftest import TENANT, Env, sid


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
    # The session's release mark moved (sealed) or the entry was deleted (which moves it too).
    assert env.root + f"/t/{TENANT}/m/{sid(s)}".encode() in await env.keys(f"/t/{TENANT}/m/")
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


async def test_a_late_enqueue_is_refused_after_the_seal(env: Env) -> None:
    """An enqueue held in the network lands after its caller gave up and sealed the session's
    release mark: it must not queue the entry (the memory model delays the write itself; the etcd
    half of this is tests/test_late_write.py, which holds up a real transaction)."""
    if not env.memory:
        pytest.skip("a held-up etcd transaction is tests/test_late_write.py")
    mem: MemoryLockBackend = env.backend
    name = "unknown/late"
    s = await env.session()
    gate = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate)
    with pytest.raises(Unavailable):
        await env.acquire(name, s, wait=5, request_id="late-1")
    await env.core.drain_cleanups(3.0)
    gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await env.lock_keys(name) == []
    # Without the seal the same late write would have queued the entry: the guard is what refused it.
    gate2 = asyncio.Event()
    mem.fail("enqueue", applied=True, gate=gate2)
    with pytest.raises(Unavailable):
        await mem.enqueue(
            env.core.keyspace(TENANT).lock_prefix(name),
            env.core.keyspace(TENANT).entry_key(name, s),
            EntryValue("o", "late-2", 0.0),
            s,
            session_key=env.core.keyspace(TENANT).session_key(s),
            new_session_value=None,
            only_if_free=False,
            mark=env.core.keyspace(TENANT).mark(s).key,
        )
    gate2.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(await env.lock_keys(name)) == 1
