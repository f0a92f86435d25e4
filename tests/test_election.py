"""ElectionService over a real etcd and a real broker (issue 17 item 3): one leader at a time, FIFO
among candidates, Proclaim seen by observers, Resign and session expiry hand over, Observe resumes
from a revision, bad input is refused with details, and nothing is left in etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.server.core.election import Campaign as ElectionCampaign
from lockbroker.server.core.election import ElectionCore, NoLeader, NotLeader
from lockbroker.server.core.locks import LockCore
from lockbroker.server.core.memory import MemoryLockBackend
from lockbroker.server.core.model import EntryValue
from lockbroker.server.core.quota import UNLIMITED
from lockbroker.v1 import election_pb2, election_pb2_grpc, lock_pb2
from lockbroker.v1.reasons import ErrorReason
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker, dur, eventually, expect_error

Campaign = election_pb2.CampaignRequest


@pytest.fixture
def elect(channel: aio.Channel) -> Any:
    return election_pb2_grpc.ElectionServiceStub(channel)


async def candidate_keys(probe: EtcdProbe) -> list[bytes]:
    """The candidates' keys (t/<tenant>/e/...), not the quota slots they hold."""
    return [k for k in await probe.keys() if b"/e/" in k and b"/q/" not in k]


async def election_keys(probe: EtcdProbe) -> list[bytes]:
    """Every key an election made: candidates and their quota slots (t/<tenant>/q/v/...)."""
    return [k for k in await probe.keys() if b"/q/v/" in k or (b"/e/" in k and b"/q/" not in k)]


async def wait_candidates(probe: EtcdProbe, n: int) -> None:
    async def check() -> bool:
        return len(await candidate_keys(probe)) == n

    await eventually(check, 5.0, f"{n} candidate keys")


class Observer:
    """An Observe stream read in the background into a list."""

    def __init__(self, elect: Any, name: str, after: int = 0) -> None:
        self.seen: list[election_pb2.ObserveResponse] = []
        self.call = elect.Observe(election_pb2.ObserveRequest(name=name, after_revision=after))
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.call:
            self.seen.append(msg)

    def values(self) -> list[bytes | None]:
        return [m.leader.value if m.HasField("leader") else None for m in self.seen]

    async def until(self, n: int) -> list[election_pb2.ObserveResponse]:
        async def check() -> bool:
            return len(self.seen) >= n

        await eventually(check, 5.0, f"{n} observed states, saw {self.values()}")
        return self.seen

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
            await self.task


@pytest.fixture
async def observers() -> AsyncIterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for o in made:
        await o.close()


async def test_fifo_one_leader_at_a_time(elect: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = [await track.session(owner=f"c{i}") for i in range(3)]
    first = await elect.Campaign(Campaign(name="e", session_id=s[0], value=b"zero", owner="c0"))
    assert first.grant.name == "e" and first.grant.session_id == s[0]
    waiting = []
    for i in (1, 2):  # queued one after the other: the order of their campaigns
        waiting.append(asyncio.ensure_future(elect.Campaign(Campaign(name="e", session_id=s[i], value=b"%d" % i))))
        await wait_candidates(probe, i + 1)
    await asyncio.sleep(0.2)
    assert not any(t.done() for t in waiting)  # one leader at a time
    leader = await elect.Leader(election_pb2.LeaderRequest(name="e"))
    assert (leader.leader.session_id, leader.leader.value, leader.leader.owner) == (s[0], b"zero", "c0")

    assert (
        await elect.Resign(
            election_pb2.ResignRequest(name="e", session_id=s[0], fencing_token=first.grant.fencing_token)
        )
    ).resigned
    second = await asyncio.wait_for(waiting[0], 5)
    assert second.grant.session_id == s[1]
    assert second.grant.fencing_token > first.grant.fencing_token
    await asyncio.sleep(0.2)
    assert not waiting[1].done()
    again = await elect.Resign(
        election_pb2.ResignRequest(name="e", session_id=s[0], fencing_token=first.grant.fencing_token)
    )
    assert not again.resigned  # already gone: idempotent
    await elect.Resign(election_pb2.ResignRequest(name="e", session_id=s[1], fencing_token=second.grant.fencing_token))
    third = await asyncio.wait_for(waiting[1], 5)
    assert third.grant.session_id == s[2] and third.grant.fencing_token > second.grant.fencing_token
    await elect.Resign(election_pb2.ResignRequest(name="e", session_id=s[2], fencing_token=third.grant.fencing_token))
    assert await election_keys(probe) == []
    await expect_error(
        elect.Leader(election_pb2.LeaderRequest(name="e")), grpc.StatusCode.NOT_FOUND, ErrorReason.NO_LEADER
    )


async def test_proclaim_is_observed_and_only_by_the_leader(
    elect: Any, track: Tracker, probe: EtcdProbe, observers: list[Observer]
) -> None:
    a, b = await track.session(), await track.session()
    watcher = Observer(elect, "p")
    observers.append(watcher)
    await watcher.until(1)
    assert watcher.values() == [None]  # nobody leads yet
    won = await elect.Campaign(Campaign(name="p", session_id=a, value=b"v1"))
    await watcher.until(2)
    token = won.grant.fencing_token
    proclaimed = await elect.Proclaim(
        election_pb2.ProclaimRequest(name="p", session_id=a, fencing_token=token, value=b"v2")
    )
    assert proclaimed.revision > watcher.seen[1].revision
    await watcher.until(3)
    assert watcher.values() == [None, b"v1", b"v2"]
    assert [m.leader.fencing_token for m in watcher.seen[1:]] == [token, token]
    assert (await elect.Leader(election_pb2.LeaderRequest(name="p"))).leader.value == b"v2"

    # A candidate that does not lead cannot proclaim; nor can a made-up token of the leader's session.
    waiting = asyncio.ensure_future(elect.Campaign(Campaign(name="p", session_id=b, value=b"b")))
    await wait_candidates(probe, 2)
    keys = await candidate_keys(probe)
    kvs = {kv.key: kv for kv in await probe.kvs()}
    b_token = next(kvs[k].create_revision for k in keys if k.endswith(b.encode()))
    for session, tok in ((b, b_token), (a, token + 1000)):
        r = await expect_error(
            elect.Proclaim(election_pb2.ProclaimRequest(name="p", session_id=session, fencing_token=tok, value=b"x")),
            grpc.StatusCode.FAILED_PRECONDITION,
            ErrorReason.NOT_LEADER,
        )
        assert r.info is not None and r.info.metadata["election"] == "p"
    assert (await elect.Leader(election_pb2.LeaderRequest(name="p"))).leader.value == b"v2"  # nothing changed
    # Resign hands over; the observer sees the new leader with its own value.
    await elect.Resign(election_pb2.ResignRequest(name="p", session_id=a, fencing_token=token))
    got = await asyncio.wait_for(waiting, 5)
    await watcher.until(4)
    assert watcher.seen[3].leader.session_id == b and watcher.seen[3].leader.value == b"b"
    # The old leadership is gone: proclaiming with it is refused.
    await expect_error(
        elect.Proclaim(election_pb2.ProclaimRequest(name="p", session_id=a, fencing_token=token, value=b"late")),
        grpc.StatusCode.FAILED_PRECONDITION,
        ErrorReason.NOT_LEADER,
    )
    await elect.Resign(election_pb2.ResignRequest(name="p", session_id=b, fencing_token=got.grant.fencing_token))
    await watcher.until(5)
    assert watcher.values()[-1] is None


async def test_session_expiry_hands_over(elect: Any, stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    short = await track.session(ttl=2)
    other = await track.session(ttl=10)
    first = await elect.Campaign(Campaign(name="x", session_id=short, value=b"short"))
    waiting = asyncio.ensure_future(elect.Campaign(Campaign(name="x", session_id=other, value=b"other")))
    # Nobody refreshes `short`: its lease lapses within its TTL and the next candidate leads.
    second = await asyncio.wait_for(waiting, 8)
    assert second.grant.session_id == other and second.grant.fencing_token > first.grant.fencing_token
    assert (await elect.Leader(election_pb2.LeaderRequest(name="x"))).leader.value == b"other"
    # Closing the leader's session hands over just the same; then nothing is left.
    await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=other))
    await expect_error(
        elect.Leader(election_pb2.LeaderRequest(name="x")), grpc.StatusCode.NOT_FOUND, ErrorReason.NO_LEADER
    )
    assert await election_keys(probe) == []


async def test_observe_resumes_from_a_revision(
    elect: Any, track: Tracker, probe: EtcdProbe, observers: list[Observer]
) -> None:
    a, b = await track.session(), await track.session()
    live = Observer(elect, "r")
    observers.append(live)
    await live.until(1)
    ga = await elect.Campaign(Campaign(name="r", session_id=a, value=b"a1"))
    await elect.Proclaim(
        election_pb2.ProclaimRequest(name="r", session_id=a, fencing_token=ga.grant.fencing_token, value=b"a2")
    )
    waiting = asyncio.ensure_future(elect.Campaign(Campaign(name="r", session_id=b, value=b"b1")))
    await live.until(3)
    await wait_candidates(probe, 2)  # b waits in line: the resignation hands over to it directly
    await elect.Resign(election_pb2.ResignRequest(name="r", session_id=a, fencing_token=ga.grant.fencing_token))
    await asyncio.wait_for(waiting, 5)
    states = await live.until(4)
    assert live.values() == [None, b"a1", b"a2", b"b1"]
    revisions = [m.revision for m in states]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4
    # Resuming after the second state replays exactly the states after it, and nothing before.
    resumed = Observer(elect, "r", after=revisions[1])
    observers.append(resumed)
    await resumed.until(2)
    await asyncio.sleep(0.2)
    assert [(m.revision, m.leader.value) for m in resumed.seen] == [(m.revision, m.leader.value) for m in states[2:]]


async def test_waiting_candidates_leave_nothing_behind(elect: Any, track: Tracker, probe: EtcdProbe) -> None:
    a, b, c = await track.session(), await track.session(), await track.session()
    ga = await elect.Campaign(Campaign(name="w", session_id=a))
    # A wait that times out: WAIT_EXPIRED, and its key is gone at once.
    await expect_error(
        elect.Campaign(Campaign(name="w", session_id=b, wait_timeout=dur(0.3))),
        grpc.StatusCode.ABORTED,
        ErrorReason.WAIT_EXPIRED,
    )
    # No wait at all: LOCK_HELD.
    await expect_error(
        elect.Campaign(Campaign(name="w", session_id=b, wait_timeout=dur(0))),
        grpc.StatusCode.ABORTED,
        ErrorReason.LOCK_HELD,
    )
    assert len(await candidate_keys(probe)) == 1
    # A cancelled wait (the caller went away): gone after the resume window.
    call = elect.Campaign(Campaign(name="w", session_id=c))
    await wait_candidates(probe, 2)
    call.cancel()
    await wait_candidates(probe, 1)
    await elect.Resign(election_pb2.ResignRequest(name="w", session_id=a, fencing_token=ga.grant.fencing_token))
    assert await election_keys(probe) == []


async def test_bad_input_is_refused_with_details(elect: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = await track.session()
    before = await probe.keys()
    bad = grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.INVALID_ARGUMENT
    r = await expect_error(elect.Campaign(Campaign(name="", session_id="nope", value=b"x" * 5000)), *bad)
    assert set(r.fields) == {"name", "session_id", "value"}
    r = await expect_error(elect.Campaign(Campaign(name="ok")), *bad)
    assert r.fields == ["session_id"]
    r = await expect_error(
        elect.Campaign(Campaign(name="a\x01b", session_id=s, request_id="no spaces"), timeout=5), *bad
    )
    assert set(r.fields) == {"name", "request_id"}
    r = await expect_error(elect.Proclaim(election_pb2.ProclaimRequest(name="ok", session_id=s)), *bad)
    assert r.fields == ["fencing_token"]
    r = await expect_error(elect.Resign(election_pb2.ResignRequest(name="", session_id="", fencing_token=-1)), *bad)
    assert set(r.fields) == {"name", "session_id", "fencing_token"}
    r = await expect_error(elect.Leader(election_pb2.LeaderRequest(name="")), *bad)
    assert r.fields == ["name"]
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in elect.Observe(election_pb2.ObserveRequest(name="ok", after_revision=-1)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Unknown session: SESSION_NOT_FOUND, and nothing written.
    await expect_error(
        elect.Campaign(Campaign(name="ok", session_id="00000000000000ab")),
        grpc.StatusCode.NOT_FOUND,
        ErrorReason.SESSION_NOT_FOUND,
    )
    assert await probe.keys() == before


async def test_election_and_lock_of_one_name_are_unrelated(elect: Any, stub: Any, track: Tracker) -> None:
    s = await track.session()
    await elect.Campaign(Campaign(name="same", session_id=s))
    got = await stub.Acquire(lock_pb2.AcquireRequest(name="same", session_id=s))
    assert got.grant.name == "same"
    assert not (await stub.Describe(lock_pb2.DescribeRequest(name="same"))).waiters


async def test_elections_on_the_memory_backend() -> None:
    """The core needs nothing etcd-only for Campaign, Proclaim, Leader and Resign (serve --backend
    memory): the candidate's value travels in the entry like the rest of it."""
    backend = MemoryLockBackend()
    core = LockCore(backend, "/m")
    elections = ElectionCore(
        backend, "/m", quotas=lambda _t: UNLIMITED, leases=core.leases, owners=core.owners, closing=lambda: core.closing
    )
    a = int((await core.create_session("t", 10, "a", "")).session_id, 16)
    b = int((await core.create_session("t", 10, "b", "")).session_id, 16)
    won = await elections.campaign("t", ElectionCampaign("m", a, b"va", 0.0, "a", "", ""))
    assert (await elections.leader("t", "m")).value.data == b"va"
    await elections.proclaim("t", "m", lease_id=a, token=won.fencing_token, value=b"vb", principal="")
    assert (await elections.leader("t", "m")).value.data == b"vb"
    with pytest.raises(NotLeader):
        await elections.proclaim("t", "m", lease_id=b, token=won.fencing_token, value=b"x", principal="")
    assert await elections.resign("t", "m", a, won.fencing_token, "")
    with pytest.raises(NoLeader):
        await elections.leader("t", "m")


def test_entry_values_without_data_encode_as_before() -> None:
    # Lock entries carry no "v": replicas without elections read them unchanged.
    plain = EntryValue("o", "r", 1.5)
    assert b'"v"' not in plain.encode() and EntryValue.decode(plain.encode()) == plain
    with_data = plain.with_data(b"\x00\xffvalue")
    assert EntryValue.decode(with_data.encode()).data == b"\x00\xffvalue"


_ELECTIONS = election_pb2.DESCRIPTOR.services_by_name["ElectionService"]
_STRING_FIELDS = [
    (m, f) for m in _ELECTIONS.methods for f in m.input_type.fields if f.type == f.TYPE_STRING and f.name != "value"
]


@pytest.mark.parametrize(("method", "fd"), _STRING_FIELDS, ids=[f"{m.name}.{f.name}" for m, f in _STRING_FIELDS])
async def test_invalid_utf8_in_any_election_request_is_invalid_argument(
    channel: aio.Channel, probe: EtcdProbe, method: Any, fd: Any
) -> None:
    """protobuf refuses to parse a string field that is not UTF-8, before any handler runs; grpcio
    would then answer UNKNOWN without details (Observe did). Every method answers INVALID_ARGUMENT
    naming the request, as LockService's do (tests/test_properties.py), and writes nothing."""
    raw = bytes([(fd.number << 3) | 2, 3]) + b"a\xffb"  # one length-delimited field: tag, length, bytes
    path = f"/{_ELECTIONS.full_name}/{method.name}"
    before = await probe.keys()
    if method.server_streaming:
        call: Any = channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)(raw, timeout=10)
        result = call.read()
    else:
        result = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(raw, timeout=10)
    r = await expect_error(result, grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.INVALID_ARGUMENT)
    assert r.fields == ["request"], str(r)
    assert await probe.keys() == before
