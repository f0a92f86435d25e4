"""The memory backend keeps etcd's bookkeeping: the contract suite relies on revisions and leases
behaving as etcd's do, so they are checked here directly."""

from __future__ import annotations

import asyncio

import pytest

from lockbroker.server.core import memory_store
from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.memory import ManualClock, MemoryLockBackend
from lockbroker.server.core.model import EntryValue, ReleaseMark, Revocation


async def put_entry(b: MemoryLockBackend, name: bytes, lease: int, request_id: str = "r") -> int:
    await b.put_session(b"s/" + name, b"{}", lease)
    enq = await b.enqueue(
        b"l/x#",
        b"l/x#" + name,
        EntryValue("o", request_id, 0.0),
        lease,
        session_key=b"s/" + name,
        new_session_value=None,
        only_if_free=False,
    )
    assert enq.position.mine is not None
    return enq.position.mine.create_revision


async def test_one_revision_per_write_transaction_and_none_for_reads() -> None:
    b = MemoryLockBackend(ManualClock())
    lease = (await b.grant_lease(10)).lease_id
    r0 = b.revision
    rev = await put_entry(b, b"a", lease)
    assert rev == r0 + 2  # the session put, then the entry's txn (slots and entry at one revision)
    assert b.kv(b"l/x#a") == (EntryValue("o", "r", 0.0).encode(), rev, rev, lease)
    await b.position(b"l/x#", b"l/x#a", rev)
    await b.queue(b"l/x#")
    assert b.revision == rev
    # A delete of a key that is not there changes nothing, and moves nothing.
    assert await b.delete_entry(b"l/x#zz", 5) is None
    assert b.revision == rev


async def test_expiry_deletes_a_leases_keys_at_one_revision() -> None:
    clock = ManualClock()
    b = MemoryLockBackend(clock)
    lease = (await b.grant_lease(3)).lease_id
    await put_entry(b, b"a", lease)
    before = b.revision
    assert await b.lease_ttl(lease) == 3
    clock.advance(2.5)
    assert await b.lease_ttl(lease) == 0  # whole seconds, rounded down
    assert await b.keepalive(lease) == 3
    clock.advance(2.5)
    assert b.keys() != []
    clock.advance(1)
    assert b.keys() == []
    assert b.revision == before + 1
    assert await b.lease_ttl(lease) == -1
    assert await b.keepalive(lease) == 0  # never revived


async def test_a_put_on_a_gone_lease_applies_nothing() -> None:
    b = MemoryLockBackend(ManualClock())
    lease = (await b.grant_lease(10)).lease_id
    await b.revoke_lease(lease)
    rev = b.revision
    assert await b.seal_entry(b"l/x#a", ReleaseMark(b"m/a", lease)) is None
    assert b.revision == rev
    assert b.keys() == []


async def test_wait_deleted_is_served_from_the_revision_read(monkeypatch: pytest.MonkeyPatch) -> None:
    b = MemoryLockBackend(ManualClock())
    lease = (await b.grant_lease(10)).lease_id
    rev = await put_entry(b, b"a", lease)
    await b.delete_entry(b"l/x#a", rev)
    # Deleted after `rev`: a watch from there returns at once; one from later waits.
    await asyncio.wait_for(b.wait_deleted(b"l/x#", (b"l/x#a",), rev), 1)
    waiting = asyncio.create_task(b.wait_deleted(b"l/x#", (b"l/x#a",), b.revision))
    await asyncio.sleep(0)
    assert b.watches == 1
    rev2 = await put_entry(b, b"a", lease)
    assert not waiting.done()
    await b.delete_entry(b"l/x#a", rev2)
    await asyncio.wait_for(waiting, 1)
    assert b.watches == 0
    # Revisions older than the kept history are compacted: the caller must read again.
    monkeypatch.setattr(memory_store, "HISTORY", 1)  # the store keeps the deletion events
    rev3 = await put_entry(b, b"b", lease)
    await b.delete_entry(b"l/x#b", rev3)
    with pytest.raises(WatchInterrupted):
        await b.wait_deleted(b"l/x#", (b"l/x#a",), rev - 1)


async def test_fault_hooks() -> None:
    b = MemoryLockBackend(ManualClock())
    lease = (await b.grant_lease(10)).lease_id
    b.fail("put_session", applied=True)
    with pytest.raises(Unavailable) as ei:
        await b.put_session(b"s/a", b"{}", lease)
    assert ei.value.outcome_unknown
    assert b.keys() == [b"s/a"]
    b.fail("put_session", applied=False)
    with pytest.raises(Unavailable):
        await b.put_session(b"s/b", b"{}", lease)
    assert b.keys() == [b"s/a"]
    await b.put_session(b"s/b", b"{}", lease)  # one call only
    assert b.keys() == [b"s/a", b"s/b"]


def test_encoded_values_hold_only_their_own_bytes() -> None:
    """A blocked Acquire keeps its encoded entry until it is granted: orjson's result alone keeps
    the 4 KB buffer it wrote into, which made every queued waiter 4 KB heavier."""
    import tracemalloc  # noqa: PLC0415 - only this test traces

    values = [EntryValue("owner", f"req-{i}", 1733.5) for i in range(200)]
    revocation = Revocation("l/x", 7, "REVOKED", "maintenance", "admin")
    tracemalloc.start()
    try:
        encoded = [v.encode() for v in values] + [revocation.encode() for _ in range(200)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert EntryValue.decode(encoded[0]) == values[0]
    # 400 values of under 100 bytes each, and the list: far below one 4 KB buffer per value.
    assert held < 400 * 512, f"{held / 400:.0f} bytes per encoded value"
