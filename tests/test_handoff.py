"""Direct handoff on a real etcd: the release Txn reads the head of the queue at its own revision,
and a waiter of this replica at the head holds the lock from that answer, with no Range, no
position read and no watch event. Across replicas the watch path stays."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.model import Grant
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.client import EtcdClient
from tests.etcdutil import EtcdProbe

TENANT = "default"


@dataclass
class Replica:
    core: LockCore
    backend: EtcdLockBackend
    client: EtcdClient
    calls: list[str] = field(default_factory=list)  # etcd unary calls, by method, from the observer
    mute: bool = False  # drop watch events (a handoff must not need them)

    async def session(self) -> int:
        return int((await self.core.create_session(TENANT, 30, "", "")).session_id, 16)

    def acquire(self, name: str, lease: int, wait: float = 10.0) -> asyncio.Future[Grant]:
        return asyncio.ensure_future(
            self.core.acquire(TENANT, AcquireParams(name, lease, 30, wait, "", uuid.uuid4().hex))
        )

    async def waiting(self, n: int) -> None:
        for _ in range(500):
            if self.backend.watches.active == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{n} waiter(s) not registered")


@pytest.fixture
async def replicas(etcd: EmbeddedEtcd) -> AsyncIterator[tuple[Replica, Replica, EtcdProbe]]:
    root = f"/lbtest/{uuid.uuid4().hex[:10]}"
    made: list[Replica] = []
    for _ in range(2):
        calls: list[str] = []
        client = EtcdClient(
            EtcdConfig(endpoints=(etcd.endpoint,), key_root=root, request_timeout=5.0),
            observer=lambda method, _s, _c, calls=calls: calls.append(method),  # type: ignore[misc]
        )
        backend = EtcdLockBackend(client)
        replica = Replica(LockCore(backend, root), backend, client, calls)
        hub = backend.watches
        real = hub._on_response

        def on_response(resp: pb.WatchResponse, replica: Replica = replica, real: object = real) -> None:
            if replica.mute and resp.events:
                return
            real(resp)  # type: ignore[operator]

        hub._on_response = on_response  # type: ignore[method-assign]
        made.append(replica)
    probe = EtcdProbe(etcd.endpoint, root)
    try:
        yield made[0], made[1], probe
    finally:
        for lease in await probe.leases():
            await probe.revoke(lease)
        for r in made:
            await r.core.drain_cleanups(1.0)
            await r.backend.close()
            await r.client.close()
        await probe.close()


async def test_a_handoff_on_one_replica_makes_no_read_and_needs_no_watch_event(
    replicas: tuple[Replica, Replica, EtcdProbe],
) -> None:
    one, _, probe = replicas
    a, b, c = await one.session(), await one.session(), await one.session()
    held = await one.core.acquire(TENANT, AcquireParams("ho", a, 30, 0.0, "", "first"))
    tb = one.acquire("ho", b)
    await one.waiting(1)
    tc = one.acquire("ho", c)
    await one.waiting(2)
    one.mute = True  # from here no watch event reaches the waiters: only a handoff can grant
    one.calls.clear()

    assert await one.core.release(TENANT, "ho", held.fencing_token, a)
    gb = await asyncio.wait_for(tb, 5)
    assert one.calls == ["Txn"], f"etcd calls for a release and a handoff: {one.calls}"
    assert gb.fencing_token > held.fencing_token and gb.session_id == f"{b:016x}"
    assert not tc.done()

    one.calls.clear()
    assert await one.core.release(TENANT, "ho", gb.fencing_token, b)
    gc = await asyncio.wait_for(tc, 5)
    assert one.calls == ["Txn"], one.calls
    assert gc.fencing_token > gb.fencing_token, "FIFO and strictly increasing tokens"
    assert one.backend.watches.handoffs == 2
    # The token is the entry's create revision in etcd, and it is the head of the queue.
    kvs = await probe.kvs(f"/t/{TENANT}/l/ho#")
    assert [kv.create_revision for kv in kvs] == [gc.fencing_token]
    assert await one.core.release(TENANT, "ho", gc.fencing_token, c)


async def test_across_replicas_the_watch_path_stays(replicas: tuple[Replica, Replica, EtcdProbe]) -> None:
    one, two, _ = replicas
    a, b = await one.session(), await two.session()
    held = await one.core.acquire(TENANT, AcquireParams("x", a, 30, 0.0, "", "first"))
    tb = two.acquire("x", b)
    await two.waiting(1)
    two.calls.clear()
    assert await one.core.release(TENANT, "x", held.fencing_token, a)
    gb = await asyncio.wait_for(tb, 5)
    assert gb.fencing_token > held.fencing_token
    # Replica two learnt it from the watch, then read its position (a Txn of reads).
    assert one.backend.watches.handoffs == 0 and two.backend.watches.handoffs == 0
    assert two.calls == ["Txn"], two.calls
    assert await two.core.release(TENANT, "x", gb.fencing_token, b)


async def test_a_muted_watch_without_a_handoff_leaves_the_waiter_waiting(
    replicas: tuple[Replica, Replica, EtcdProbe],
) -> None:
    """The control for the first test: with watch events muted, a release on another replica (no
    handoff here) does not wake the waiter, so the first test's grant came from the handoff."""
    one, two, _ = replicas
    a, b = await one.session(), await two.session()
    held = await one.core.acquire(TENANT, AcquireParams("m", a, 30, 0.0, "", "first"))
    tb = two.acquire("m", b, wait=1.5)
    await two.waiting(1)
    two.mute = True
    assert await one.core.release(TENANT, "m", held.fencing_token, a)
    await asyncio.sleep(0.5)
    assert not tb.done(), "woken without a watch event or a handoff"
    two.mute = False
    tb.cancel()
    await asyncio.gather(tb, return_exceptions=True)
