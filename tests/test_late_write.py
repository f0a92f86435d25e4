"""A held-up enqueue that reaches etcd late must not queue its entry again (invariants 6 and 7).

The fault suite shows this with a real partition (tests/fault/test_faults.py::
test_enqueue_delayed_by_a_partition_is_not_applied_late), where etcd applies the late write only now
and then. Here the held-up write is made deterministic: replica A's etcd client keeps the enqueue
transaction instead of sending it (as a partitioned TCP queue does), the client retries on
replica B, is granted and releases, and then the kept transaction is delivered to etcd byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.names import derived_lease_id
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker, acquire, dur, lock_keys, release


class HeldUp:
    """Wraps a replica's etcd writes (every write Txn goes through the backend's group commit,
    etcd/batch.py): every enqueue of `name` is kept, not sent, and fails as a write whose outcome
    is unknown (the broker's retry interceptor tries again: those are kept too, as a partition
    would); every other transaction is sent and counted."""

    def __init__(self, broker: Broker, name: str) -> None:
        assert broker.client is not None
        assert isinstance(broker.backend, EtcdLockBackend)
        self.client = broker.client
        self.marker = f"/l/{name}#".encode()
        self.kept: list[pb.TxnRequest] = []
        self.sent: list[pb.TxnRequest] = []
        # Set: the replica is cut off from etcd after its enqueue (it died, or a partition):
        # nothing it sends to move a release mark (its clean-up's seal) reaches etcd.
        self.cut_off = False
        batch = broker.backend.batch
        self._txn = batch.txn

        async def txn(req: pb.TxnRequest, keys: Iterable[bytes], *, urgent: bool = False) -> pb.TxnResponse:
            puts = [op.request_put.key for op in req.success if op.HasField("request_put")]
            if any(self.marker in k for k in puts):
                self.kept.append(req)
                raise Unavailable("etcd: held up", retry_after=0.1, outcome_unknown=True)
            if self.cut_off and any(b"/m/" in k for k in puts):
                raise Unavailable("etcd: unreachable", retry_after=0.1)
            self.sent.append(req)
            return await self._txn(req, keys, urgent=urgent)

        batch.txn = txn  # type: ignore[method-assign,assignment]

    async def deliver(self, strip_guard: bool = False) -> list[bool]:
        """Send the kept transactions now, in order, as the network finally would; which applied."""
        assert self.kept, "no enqueue was held up"
        applied = []
        for kept in self.kept:
            req = pb.TxnRequest()
            req.CopyFrom(kept)
            if strip_guard:
                keep = [c for c in req.compare if c.target != pb.Compare.MOD]
                del req.compare[:]
                req.compare.extend(keep)
            resp: pb.TxnResponse = await self.client.call(lambda s: s.kv.Txn, req, write=True)
            applied.append(resp.succeeded)
        return applied


@pytest.fixture
async def replicas(etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[tuple[Broker, Broker]]:
    a, b = Broker(broker_config(etcd.endpoint, key_root)), Broker(broker_config(etcd.endpoint, key_root))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop(grace=0.5)
        await b.stop(grace=0.5)


@pytest.fixture
async def stubs(replicas: tuple[Broker, Broker]) -> AsyncIterator[tuple[Any, Any]]:
    a, b = replicas
    async with aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
        yield lock_pb2_grpc.LockServiceStub(ca), lock_pb2_grpc.LockServiceStub(cb)


async def acquire_claim(stub: Any, name: str, session_id: str, request_id: str, timeout: float) -> Any:
    """An Acquire with new_claim: a claim keyed by its request id, beside the session's plain one."""
    req = lock_pb2.AcquireRequest(name=name, session_id=session_id, request_id=request_id, new_claim=True)
    req.wait_timeout.CopyFrom(dur(5))
    return await stub.Acquire(req, timeout=timeout)


@pytest.mark.parametrize("cut_off", [False, True], ids=["a-sealed", "a-cut-off"])
@pytest.mark.parametrize("new_claim", [False, True], ids=["plain", "new-claim"])
@pytest.mark.parametrize("guarded", [True, False], ids=["release-mark", "without-the-mark"])
async def test_late_enqueue_after_retry_grant_and_release_is_refused(  # noqa: PLR0917 - fixtures and parameters
    replicas: tuple[Broker, Broker],
    stubs: tuple[Any, Any],
    probe: EtcdProbe,
    guarded: bool,
    new_claim: bool,
    cut_off: bool,
) -> None:
    """With A cut off, A's clean-up cannot seal its enqueue's mark: only the mark that B's release
    moves (the released claim's own, model.mark_key) refuses the late write."""
    a, _ = replicas
    stub_a, stub_b = stubs
    tracker = Tracker(stub_b, probe)
    held = HeldUp(a, "jobs/late")
    held.cut_off = cut_off
    try:
        session = await tracker.session(ttl=30)
        with pytest.raises(aio.AioRpcError) as failed:
            if new_claim:
                await acquire_claim(stub_a, "jobs/late", session, "late-1", timeout=3)
            else:
                await acquire(stub_a, "jobs/late", session, wait=5, request_id="late-1", timeout=3)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        if new_claim:
            granted = await acquire_claim(stub_b, "jobs/late", session, "late-1", timeout=5)
        else:
            granted = await acquire(stub_b, "jobs/late", session, wait=5, request_id="late-1", timeout=5)
        assert await release(stub_b, "jobs/late", granted.grant.fencing_token, session)
        assert await lock_keys(probe, "jobs/late") == []

        applied = await held.deliver(strip_guard=not guarded)
        left = await lock_keys(probe, "jobs/late")
        if guarded:
            assert not any(applied), "a late enqueue was applied"
            assert left == []
        else:
            # The same transaction without its guard is what the broker sent before the release
            # mark: etcd applies it, and the released request is queued again.
            assert applied[0] and len(left) == 1
    finally:
        await tracker.cleanup()


@pytest.mark.parametrize("implicit", [False, True], ids=["session", "session-less"])
async def test_late_enqueue_of_an_abandoned_acquire_is_refused(
    replicas: tuple[Broker, Broker], stubs: tuple[Any, Any], probe: EtcdProbe, implicit: bool
) -> None:
    """Nobody retries: the caller gave up. Replica A's clean-up cannot tell whether the held-up
    enqueue will still arrive, so it moves the release mark; the enqueue, when it arrives, is refused."""
    a, _ = replicas
    stub_a, stub_b = stubs
    tracker = Tracker(stub_b, probe)
    held = HeldUp(a, "jobs/gone")
    try:
        if implicit:
            # A retry of a session-less Acquire whose first attempt made the lease and then died:
            # A's call did not create the lease, so its clean-up cannot simply revoke it.
            lease = derived_lease_id("default", "acquire", "gone-1")
            await probe.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30, ID=lease))
            tracker.leases.add(lease)
            session = ""
        else:
            session = await tracker.session(ttl=30)
        with pytest.raises(aio.AioRpcError) as failed:
            await acquire(
                stub_a, "jobs/gone", session, wait=5, ttl=None if session else 30, request_id="gone-1", timeout=3
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert a.core is not None
        await a.core.drain_cleanups(5.0)
        applied = await held.deliver()
        assert applied and not any(applied), "the abandoned Acquire's enqueue was applied"
        assert await lock_keys(probe, "jobs/gone") == []
    finally:
        await tracker.cleanup()


@pytest.mark.parametrize("released", ["jobs/two", "jobs/one"], ids=["same-claim", "another-lock"])
async def test_acquire_after_a_release_elsewhere_in_the_same_session(
    replicas: tuple[Broker, Broker], stubs: tuple[Any, Any], probe: EtcdProbe, released: str
) -> None:
    """Replica A has not seen the release mark that replica B just moved: when B released the very
    claim A now queues, A's first enqueue is refused by the guard, and it tries once more at the
    revision etcd reported, instead of failing the call. A release of the session's claim on
    another lock moves another mark (model.mark_key), so A's enqueue goes through at once."""
    a, _ = replicas
    stub_a, stub_b = stubs
    tracker = Tracker(stub_b, probe)
    held = HeldUp(a, "never")  # only counts
    try:
        session = await tracker.session(ttl=30)
        lease = int(session, 16)
        assert a.core is not None
        ks = a.core.keyspace("default")
        if released != "jobs/two":
            # The session id is random and a mark is one of 256 buckets of the key: take a lock
            # whose plain claim's mark differs from jobs/two's (a fixed name collided 1 run in 256).
            two = ks.mark(lease).of(ks.entry_key("jobs/two", lease))
            released = next(
                n for n in (f"{released}-{i}" for i in range(64)) if ks.mark(lease).of(ks.entry_key(n, lease)) != two
            )
            marks = {ks.mark(lease).of(ks.entry_key(n, lease)) for n in (released, "jobs/two")}
            assert len(marks) == 2, "the two locks' plain claims must not share a mark for this test"
        await acquire(stub_a, "warm", session, wait=1)  # A has seen etcd now, before B's release below
        other = await acquire(stub_b, released, session, wait=1)
        assert await release(stub_b, released, other.grant.fencing_token, session)
        held.sent.clear()
        got = await acquire(stub_a, "jobs/two", session, wait=1, request_id="two")
        assert got.grant.fencing_token > other.grant.fencing_token
        enqueues = [r for r in held.sent if any(b"/l/jobs/two#" in op.request_put.key for op in r.success)]
        if released == "jobs/two":
            assert len(enqueues) == 2, "expected one refused try and one applied"
        else:
            assert len(enqueues) == 1, "a release of another lock of the session refused the enqueue"
        assert [k for k in await lock_keys(probe) if b"jobs/two" in k]
    finally:
        await tracker.cleanup()
