"""Group commit (etcd/batch.py) on a real etcd: concurrent write Txns share one etcd Txn when that
is safe, each caller gets its own answer, and a batch whose fate is unknown leaves no lost or
doubled grant once the callers retry by request id."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.backend import SessionMissing
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.model import Enqueued, EntryValue, Grant
from lockbroker.server.core.names import Keyspace
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.batch import QUEUED_TOO_LONG
from lockbroker.server.etcd.client import EtcdClient
from tests.etcdutil import EtcdProbe

TENANT = "default"


class Wire:
    """A double around the etcd KV stub's Txn: records every Txn sent, and can make the next batch
    (an outer Txn of nested Txns) be applied by etcd and then fail as if its answer was lost."""

    def __init__(self, client: EtcdClient) -> None:
        _, stubs = client.current()
        self.real = stubs.kv.Txn
        self.sent: list[pb.TxnRequest] = []
        self.lose_next_batch = False
        self.gate: asyncio.Event | None = None  # set: the next Txn waits for it before it is sent

        async def txn(request: pb.TxnRequest, **kwargs: Any) -> pb.TxnResponse:
            self.sent.append(request)
            gate, self.gate = self.gate, None
            if gate is not None:
                await gate.wait()
            resp: pb.TxnResponse = await self.real(request, **kwargs)
            if self.lose_next_batch and _is_batch(request):
                self.lose_next_batch = False
                raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connection reset")
            return resp

        stubs.kv.Txn = txn  # type: ignore[assignment]

    def batches(self) -> list[pb.TxnRequest]:
        return [r for r in self.sent if _is_batch(r)]


def _is_batch(request: pb.TxnRequest) -> bool:
    return bool(request.success) and all(op.HasField("request_txn") for op in request.success)


Stack = tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str]


@asynccontextmanager
async def _stack(etcd: EmbeddedEtcd, *, request_timeout: float = 5.0, **backend_options: Any) -> AsyncIterator[Stack]:
    """A core on an etcd backend whose Txns go through a Wire, under a key root of its own."""
    root = f"/lbtest/{uuid.uuid4().hex[:10]}"
    client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), key_root=root, request_timeout=request_timeout))
    backend = EtcdLockBackend(client, **backend_options)
    wire = Wire(client)
    probe = EtcdProbe(etcd.endpoint, root)
    core = LockCore(backend, root)
    try:
        yield core, backend, wire, probe, root
    finally:
        await core.drain_cleanups(1.0)
        for lease in await probe.leases():
            await probe.revoke(lease)
        await backend.close()
        await client.close()
        await probe.close()


@pytest.fixture
async def setup(etcd: EmbeddedEtcd) -> AsyncIterator[Stack]:
    async with _stack(etcd) as stack:
        yield stack


async def _sessions(core: LockCore, n: int) -> list[int]:
    return [int((await core.create_session(TENANT, 30, "", "")).session_id, 16) for _ in range(n)]


def _acquire(core: LockCore, name: str, lease: int, request_id: str, wait: float = 5.0) -> Any:
    return core.acquire(TENANT, AcquireParams(name, lease, 30, wait, "", request_id))


async def test_concurrent_acquires_of_distinct_locks_share_a_txn_and_each_gets_its_own_grant(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    core, backend, wire, probe, root = setup
    leases = await _sessions(core, 8)
    wire.sent.clear()
    grants = await asyncio.gather(*(_acquire(core, f"b/{i}", s, f"r-{i}") for i, s in enumerate(leases)))
    batches = wire.batches()
    assert batches, "no batch was sent"
    assert len(wire.sent) < len(leases), "every acquire went to etcd alone"
    # The first was sent at once (nothing in flight), the rest together.
    assert not _is_batch(wire.sent[0])
    # Each caller got its own entry, its own token (the entry's create revision in etcd).
    kvs = {kv.key: kv for kv in await probe.kvs(f"/t/{TENANT}/l/")}
    assert len(kvs) == len(leases)
    for i, (g, lease) in enumerate(zip(grants, leases, strict=True)):
        key = Keyspace(root, TENANT).entry_key(f"b/{i}", lease)
        assert kvs[key].create_revision == g.fencing_token
    # Members of one batch share its revision: their tokens tie across locks, never within one.
    assert len({g.fencing_token for g in grants}) < len(grants)
    assert backend.batch.batched >= 2


async def test_acquires_of_one_session_on_distinct_locks_share_a_txn(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """One session, many locks (issue 19's one session per process): its enqueues only compare its
    record, and each compares its own key's release mark, so they share a batch like those of
    distinct sessions (they did not while the record and one mark per session were conflict keys)."""
    core, _backend, wire, probe, root = setup
    (lease,) = await _sessions(core, 1)
    wire.sent.clear()
    grants = await asyncio.gather(*(_acquire(core, f"one/{i}", lease, f"o-{i}") for i in range(8)))
    assert wire.batches(), "no batch was sent"
    assert len(wire.sent) < len(grants), "every acquire of the session went to etcd alone"
    kvs = {kv.key: kv for kv in await probe.kvs(f"/t/{TENANT}/l/")}
    for i, g in enumerate(grants):
        assert kvs[Keyspace(root, TENANT).entry_key(f"one/{i}", lease)].create_revision == g.fencing_token


async def test_claims_of_one_session_with_tied_tokens_are_each_released_in_one_delete(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """new_claim claims of one session queued in one batch share a create revision, so their
    tokens tie across locks: the replica's memory of their keys (core.claims.ClaimKeys) tells
    them apart by lock, and each Release is one delete, with no read to find the claim."""
    core, backend, _wire, probe, _root = setup
    (lease,) = await _sessions(core, 1)
    names = [f"tied/{i}" for i in range(8)]
    grants = await asyncio.gather(
        *(core.acquire(TENANT, AcquireParams(n, lease, 30, 5.0, "", f"t-{i}", f"ct-{i}")) for i, n in enumerate(names))
    )
    assert len({g.fencing_token for g in grants}) < len(grants), "no two claims shared a batch"
    reads: list[bytes] = []
    real = backend.find_entry

    async def find_entry(prefix: bytes, create_revision: int) -> Any:
        reads.append(prefix)
        return await real(prefix, create_revision)

    backend.find_entry = find_entry  # type: ignore[method-assign]
    for n, g in zip(names, grants, strict=True):
        assert await core.release(TENANT, n, g.fencing_token, lease)
    assert reads == []
    assert await probe.kvs(f"/t/{TENANT}/l/") == []


async def test_entries_of_one_lock_never_share_a_txn(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """Entries queued while a commit is in flight go out together, but never two of one lock in one
    Txn: they would get the same create revision, the same fencing token."""
    core, _, wire, probe, _ = setup
    leases = await _sessions(core, 7)
    wire.sent.clear()
    gate = wire.gate = asyncio.Event()
    first = asyncio.ensure_future(_acquire(core, "other", leases[0], "r-0"))
    for _ in range(1000):
        if wire.sent:
            break  # the first commit is in flight, held at the gate
        await asyncio.sleep(0.001)
    wire.sent.clear()
    grants: list[Grant] = []

    async def take(i: int, lease: int) -> None:
        name = f"one/{i % 2}"
        g = await _acquire(core, name, lease, f"r-{i}")
        grants.append(g)
        await asyncio.sleep(0.01)
        assert await core.release(TENANT, name, g.fencing_token, lease)

    calls = [asyncio.ensure_future(take(i, s)) for i, s in enumerate(leases[1:])]
    await asyncio.sleep(0.05)
    assert not wire.sent, "a call was sent while a commit was in flight"
    gate.set()
    await first
    await asyncio.wait_for(asyncio.gather(*calls), 20)
    batches = wire.batches()
    assert batches, "nothing was batched"
    for batch in batches:
        # Each member's last op reads its lock's queue: an enqueue's "mine and the one before", a
        # release's new head. (Two releases in one batch once read as the same lock b"" here, when
        # the enqueue's holder read, success[-2], was taken for every member's.)
        prefixes = [op.request_txn.success[-1].request_range.key for op in batch.success]
        assert all(prefixes), f"a batch member without a read of its lock: {batch}"
        assert len(prefixes) == len(set(prefixes)), f"one lock twice in a batch: {prefixes}"
    for name in ("one/0", "one/1"):
        tokens = [g.fencing_token for g in grants if g.name == name]
        assert len(tokens) == 3 and tokens == sorted(set(tokens)), f"{name}: tokens {tokens} tie or go backwards"
    assert await probe.keys(f"/t/{TENANT}/l/one/") == []


async def test_mutual_exclusion_and_strictly_increasing_tokens_under_batching(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    core, backend, _, _, _ = setup
    leases = await _sessions(core, 12)
    grants: dict[str, list[int]] = {}
    holding: dict[str, int] = {}

    async def worker(i: int, lease: int) -> None:
        name = f"hot/{i % 3}"
        for n in range(3):
            g = await _acquire(core, name, lease, f"w{i}-{n}")
            assert name not in holding, f"{name} held by two callers"
            holding[name] = g.fencing_token
            grants.setdefault(name, []).append(g.fencing_token)
            await asyncio.sleep(0)
            del holding[name]
            assert await core.release(TENANT, name, g.fencing_token, lease)

    await asyncio.wait_for(asyncio.gather(*(worker(i, s) for i, s in enumerate(leases))), 60)
    for name, tokens in grants.items():
        assert len(tokens) == 12, name
        assert all(a < b for a, b in itertools.pairwise(tokens)), f"{name}: {tokens}"
    assert backend.batch.batches >= 1


async def test_a_batch_refused_as_a_whole_is_resent_member_by_member(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    core, backend, wire, probe, root = setup
    leases = await _sessions(core, 5)
    ks = Keyspace(root, TENANT)
    dead = leases[-1]
    await probe.revoke(dead)  # its put names a lease that is gone: etcd refuses the whole Txn
    wire.sent.clear()

    def enqueue(i: int, lease: int) -> Any:
        return backend.enqueue(
            ks.lock_prefix(f"r/{i}"),
            ks.entry_key(f"r/{i}", lease),
            EntryValue("", f"q-{i}", 0.0),
            lease,
            session_key=ks.session_key(lease),
            new_session_value=b"{}" if lease == dead else None,
            only_if_free=False,
        )

    results = await asyncio.gather(*(enqueue(i, s) for i, s in enumerate(leases)), return_exceptions=True)
    assert backend.batch.refused >= 1, "the batch was not refused (the test did not test anything)"
    assert isinstance(results[-1], SessionMissing)
    ok = [r for r in results[:-1] if isinstance(r, Enqueued)]
    assert len(ok) == len(leases) - 1 and all(r.created for r in ok), results
    assert len(await probe.keys(f"/t/{TENANT}/l/")) == len(leases) - 1


async def test_one_call_alone_is_never_batched(setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str]) -> None:
    core, backend, wire, _, _ = setup
    (lease,) = await _sessions(core, 1)
    for i in range(5):
        g = await _acquire(core, f"solo/{i}", lease, f"s-{i}")
        assert await core.release(TENANT, f"solo/{i}", g.fencing_token, lease)
    assert wire.batches() == [] and backend.batch.batches == 0


async def test_op_limit_splits_batches(setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str]) -> None:
    core, backend, wire, _, _ = setup
    backend.batch._max_ops = 30  # about two enqueues per batch
    leases = await _sessions(core, 10)
    wire.sent.clear()
    await asyncio.gather(*(_acquire(core, f"ops/{i}", s, f"o-{i}") for i, s in enumerate(leases)))
    for batch in wire.batches():
        ops = sum(
            1 + len(op.request_txn.compare) + len(op.request_txn.success) + len(op.request_txn.failure)
            for op in batch.success
        )
        assert ops <= 30
    assert len(wire.batches()) >= 2


# -- crash and retry --------------------------------------------------------------------------


async def test_a_lost_batch_answer_is_unknown_to_each_member_and_a_retry_adopts_its_entry(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """etcd applied the batch but its answer was lost: every member is told outcome_unknown (as a
    single write would be), and each caller's retry by request id adopts exactly its own entry."""
    core, backend, wire, probe, root = setup
    ks = Keyspace(root, TENANT)
    leases = await _sessions(core, 6)

    def enqueue(i: int, lease: int) -> Any:
        return backend.enqueue(
            ks.lock_prefix(f"c/{i}"),
            ks.entry_key(f"c/{i}", lease),
            EntryValue("", f"req-{i}", 0.0),
            lease,
            session_key=ks.session_key(lease),
            new_session_value=None,
            only_if_free=False,
        )

    wire.lose_next_batch = True
    first = await asyncio.gather(*(enqueue(i, s) for i, s in enumerate(leases)), return_exceptions=True)
    assert not wire.lose_next_batch, "no batch was sent"
    unknown = [i for i, r in enumerate(first) if isinstance(r, Unavailable) and r.outcome_unknown]
    assert len(unknown) >= 2, first
    assert all(isinstance(r, Enqueued) for i, r in enumerate(first) if i not in unknown)
    applied = {kv.key: kv.create_revision for kv in await probe.kvs(f"/t/{TENANT}/l/")}
    assert len(applied) == len(leases), "etcd applied the batch"

    again = await asyncio.gather(*(enqueue(i, leases[i]) for i in unknown))
    for i, r in zip(unknown, again, strict=True):
        assert not r.created, "a retry made a second entry"
        assert r.position.mine is not None
        assert r.position.mine.create_revision == applied[ks.entry_key(f"c/{i}", leases[i])]
        assert r.position.predecessor is None  # the holder: its lock has this one entry
    assert {kv.key: kv.create_revision for kv in await probe.kvs(f"/t/{TENANT}/l/")} == applied


async def test_crash_and_retry_through_the_core_loses_and_doubles_no_grant(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """Acquires whose batch was applied with its answer lost fail UNAVAILABLE; the callers retry by
    request id: each ends with exactly one grant whose token is its entry in etcd, one entry per
    lock, and once released nothing is left behind."""
    core, _, wire, probe, root = setup
    ks = Keyspace(root, TENANT)
    leases = await _sessions(core, 6)
    names = [f"cr/{i % 3}" for i in range(len(leases))]  # two callers per lock: FIFO across the retry
    wire.lose_next_batch = True

    async def caller(i: int) -> tuple[int, int]:
        for _attempt in range(5):
            try:
                g = await _acquire(core, names[i], leases[i], f"cr-{i}", wait=10.0)
            except Unavailable as e:
                assert e.retry_after >= 0
                continue
            return i, g.fencing_token
        raise AssertionError("no grant after 5 attempts")

    held: dict[str, int] = {}
    done: list[tuple[int, int]] = []

    async def holder(i: int) -> None:
        _, token = await caller(i)
        # Mutual exclusion: no other caller holds this lock now.
        assert names[i] not in held, f"{names[i]} granted twice at once"
        held[names[i]] = token
        entries = [kv for kv in await probe.kvs(f"/t/{TENANT}/l/{names[i]}#")]
        assert min(kv.create_revision for kv in entries) == token, "granted while not at the head"
        assert sum(1 for kv in entries if kv.key == ks.entry_key(names[i], leases[i])) == 1
        done.append((i, token))
        await asyncio.sleep(0.01)
        del held[names[i]]
        assert await core.release(TENANT, names[i], token, leases[i])

    await asyncio.wait_for(asyncio.gather(*(holder(i) for i in range(len(leases)))), 30)
    assert not wire.lose_next_batch, "no batch was lost (the test did not test anything)"
    assert sorted(i for i, _ in done) == list(range(len(leases))), "a grant was lost or doubled"
    per_lock: dict[str, list[int]] = {}
    for i, token in done:
        per_lock.setdefault(names[i], []).append(token)
    for tokens in per_lock.values():
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), "tokens not strictly increasing"
    await core.drain_cleanups(2.0)
    assert await probe.keys(f"/t/{TENANT}/l/") == [], "an entry was left behind"


async def test_a_release_someone_waits_on_is_not_held_behind_a_commit_in_flight(
    setup: tuple[LockCore, EtcdLockBackend, Wire, EtcdProbe, str],
) -> None:
    """A release that a waiter here waits on is urgent: it goes out at once, taking what queued
    along, even while another commit is held up. One nobody here waits on may share a batch."""
    core, backend, wire, _, _ = setup
    a, b, c, d = await _sessions(core, 4)
    held = await _acquire(core, "urgent", a, "u-1")
    waiter = asyncio.ensure_future(_acquire(core, "urgent", d, "u-4"))
    for _ in range(500):
        if backend.watches.active == 1:
            break
        await asyncio.sleep(0.01)
    wire.sent.clear()
    gate = wire.gate = asyncio.Event()
    stuck = asyncio.ensure_future(_acquire(core, "elsewhere", b, "u-2"))
    for _ in range(1000):
        if wire.sent:
            break
        await asyncio.sleep(0.001)
    queued = asyncio.ensure_future(_acquire(core, "third", c, "u-3"))
    await asyncio.sleep(0.02)
    assert len(wire.sent) == 1, "an acquire was not held behind the commit in flight"
    assert await asyncio.wait_for(core.release(TENANT, "urgent", held.fencing_token, a), 5)
    assert not stuck.done(), "the commit in flight was let through"
    # The release went out together with the acquire that had queued.
    assert len(wire.sent) == 2 and _is_batch(wire.sent[1]) and len(wire.sent[1].success) == 2
    assert (await asyncio.wait_for(queued, 5)).name == "third"
    granted = await asyncio.wait_for(waiter, 5)
    assert granted.fencing_token > held.fencing_token
    # Nobody waits on "third": its release waits behind the commit still held up.
    release = asyncio.ensure_future(core.release(TENANT, "third", (await queued).fencing_token, c))
    await asyncio.sleep(0.05)
    assert not release.done() and len(wire.sent) == 2, "a release nobody waits on was sent at once"
    gate.set()
    assert (await asyncio.wait_for(stuck, 5)).name == "elsewhere"
    assert await asyncio.wait_for(release, 5)


async def test_a_batch_starts_no_trace_of_its_own(etcd: EmbeddedEtcd) -> None:
    """The batch is sent from a task of no call: its etcd span would be a new root trace per batch."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    root = f"/lbtest/{uuid.uuid4().hex[:10]}"
    client = EtcdClient(EtcdConfig(endpoints=(etcd.endpoint,), key_root=root, request_timeout=5.0), tracer=tracer)
    backend = EtcdLockBackend(client)
    core = LockCore(backend, root)
    try:
        leases = await _sessions(core, 6)
        exporter.clear()  # the sessions' writes ran outside any call: root spans, as ever

        async def traced(i: int, lease: int) -> None:
            with tracer.start_as_current_span(f"call-{i}"):
                await _acquire(core, f"t/{i}", lease, f"t-{i}")

        await asyncio.gather(*(traced(i, s) for i, s in enumerate(leases)))
        assert backend.batch.batches >= 1
        txns = [s for s in exporter.get_finished_spans() if s.name == "/etcdserverpb.KV/Txn"]
        assert txns, "tracing was off"
        assert all(s.parent is not None for s in txns), "a batch started a trace of its own"
    finally:
        for lease in leases:
            await backend.revoke_lease(lease)
        await backend.close()
        await client.close()


async def test_a_write_that_waited_its_whole_budget_in_the_queue_says_it_was_never_sent(etcd: EmbeddedEtcd) -> None:
    """Behind a commit in flight a write waits for the next batch. If its budget runs out first,
    etcd never saw it: the caller hears that (outcome known: nothing applied), not "etcd did not
    answer in time", which reads as a write that may have landed and sent operators to etcd."""

    def put(key: bytes) -> pb.TxnRequest:
        return pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v"))])

    async with _stack(etcd, request_timeout=0.5) as (_, backend, wire, probe, root):
        a, b = f"{root}/a".encode(), f"{root}/b".encode()
        gate = wire.gate = asyncio.Event()  # the first commit is held up before it is sent
        first = asyncio.ensure_future(backend.batch.txn(put(a), [a]))
        for _ in range(1000):
            if wire.sent:
                break
            await asyncio.sleep(0.001)
        with pytest.raises(Unavailable) as err:
            await backend.batch.txn(put(b), [b])
        assert str(err.value) == QUEUED_TOO_LONG and not err.value.outcome_unknown
        assert len(wire.sent) == 1  # it was never sent
        gate.set()
        await asyncio.gather(first, return_exceptions=True)
        assert b not in await probe.keys()


async def test_a_burst_of_enqueues_waits_its_turn_before_building_anything(etcd: EmbeddedEtcd) -> None:
    """At most max_enqueues enqueues are in flight; the rest wait for a turn, in arrival order,
    having built no Txn. Once etcd answers, every one of them is queued and granted as usual."""
    async with _stack(etcd, max_enqueues=2) as (core, backend, wire, _, _):
        sessions = await _sessions(core, 5)
        wire.sent.clear()
        gate = wire.gate = asyncio.Event()  # the first enqueue's commit is held up
        burst = []
        for i, lease in enumerate(sessions):
            burst.append(asyncio.ensure_future(_acquire(core, f"burst-{i}", lease, f"b-{i}")))
            await asyncio.sleep(0.02)  # in this order
        # One commit in flight, one enqueue queued behind it; three wait for a turn.
        assert len(wire.sent) == 1
        assert len(backend.batch._queue) == 1
        assert backend.admission_waits == 3
        gate.set()
        grants = await asyncio.wait_for(asyncio.gather(*burst), 10)
        assert [g.name for g in grants] == [f"burst-{i}" for i in range(5)]
        # Admitted in arrival order: the later ones were written after (tokens are revisions).
        tokens = [g.fencing_token for g in grants]
        assert tokens[2:] == sorted(tokens[2:]) and min(tokens[2:]) > max(tokens[:2])
