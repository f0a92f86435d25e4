"""Issue 18, item 9: every RPC is rate limited per tenant (Acquire, reads, session calls each with
its own bucket), and calls failing authentication per peer address, all with RetryInfo.

Outcomes only, never times: each rate is tiny (0.01/s) so a flood longer than the burst is refused
however slow this machine is.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from lockbroker.interceptors.quota import BUCKETS, peer_address
from lockbroker.server.core.quota import TenantQuota
from lockbroker.server.session_stream import BATCH_METADATA
from lockbroker.v1 import election_pb2, lock_pb2
from tests.abuse_util import outcome, served
from tests.test_session_stream import detail

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
SLOW = 0.01  # tokens per second: none comes back during a test
TTL = duration_pb2.Duration(seconds=30)


def test_every_lockservice_method_spends_from_a_bucket() -> None:
    service = lock_pb2.DESCRIPTOR.services_by_name["LockService"]
    methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
    # ElectionService's methods too: a Campaign is charged as an Acquire.
    election = election_pb2.DESCRIPTOR.services_by_name["ElectionService"]
    methods |= {f"/{election.full_name}/{m.name}" for m in election.methods}
    # Plus the Session stream's Acquire and AcquireMany messages, charged to the acquire bucket like
    # the unary calls, and its Open messages, charged to the session bucket as CreateSession is.
    messages = {f"/{service.full_name}/Session/{m}" for m in ("Acquire", "AcquireMany", "Open")}
    assert methods | messages == set(BUCKETS)
    assert BUCKETS[f"/{service.full_name}/Session/Open"] == "session"
    assert BUCKETS[f"/{service.full_name}/Session/Acquire"] == "acquire"
    assert BUCKETS[f"/{service.full_name}/Session/AcquireMany"] == "acquire"
    assert BUCKETS[f"/{election.full_name}/Campaign"] == "acquire"


def test_peer_address_is_the_host_not_the_connection() -> None:
    assert peer_address("ipv4:10.0.0.7:5123") == "10.0.0.7"
    assert peer_address("ipv6:[::1]:5123") == "::1"
    assert peer_address("unix:/run/s") == "unix:/run/s"


async def test_a_tenants_describe_flood_is_rate_limited_while_another_tenant_is_served(tmp_path: Path) -> None:
    quota = TenantQuota(read_rate=SLOW, read_burst=5)
    async with served(tmp_path, quota=quota) as s:
        flood = [
            await outcome(s.stub.Describe(lock_pb2.DescribeRequest(name=f"a/{i}"), metadata=s.md("flood"), timeout=10))
            for i in range(30)
        ]
        refused = [r for r in flood if r is not None]
        assert len(refused) >= 20, refused  # burst 5, and almost no refill
        for r in refused:
            assert (r.code, r.reason, r.quota_ids) == (EXHAUSTED, "RATE_LIMITED", ["read_rate"]), r
            assert r.retry_after is not None and r.retry_after > 0, r
            assert "flood" in r.message and "calm" not in r.message
        # The other tenant's bucket is its own: all of its calls pass.
        calm = [
            await outcome(s.stub.Describe(lock_pb2.DescribeRequest(name="b"), metadata=s.md("calm"), timeout=10))
            for _ in range(4)
        ]
        assert calm == [None] * 4
        calm_list = await outcome(s.stub.List(lock_pb2.ListRequest(), metadata=s.md("calm"), timeout=10))
        assert calm_list is None
        # The flooding tenant's other buckets are untouched: reads do not starve its Acquire.
        g = await outcome(s.stub.Acquire(lock_pb2.AcquireRequest(name="a/x", ttl=TTL), metadata=s.md("flood")))
        assert g is None


async def test_session_churn_is_rate_limited_per_tenant(tmp_path: Path) -> None:
    quota = TenantQuota(session_rate=SLOW, session_burst=6)
    async with served(tmp_path, quota=quota) as s:
        outcomes: Counter[str] = Counter()
        for _ in range(20):
            try:
                made = await s.stub.CreateSession(
                    lock_pb2.CreateSessionRequest(ttl=TTL), metadata=s.md("flood"), timeout=10
                )
            except grpc.aio.AioRpcError as err:
                r = await outcome(_raise(err))
                assert r is not None and r.quota_ids == ["session_rate"] and r.retry_after, r
                outcomes["refused"] += 1
                continue
            outcomes["created"] += 1
            closed = await outcome(
                s.stub.CloseSession(
                    lock_pb2.CloseSessionRequest(session_id=made.session_id), metadata=s.md("flood"), timeout=10
                )
            )
            outcomes["closed" if closed is None else "close refused"] += 1
        assert outcomes["created"] + outcomes["closed"] + outcomes["close refused"] <= 6 + 1, outcomes
        assert outcomes["refused"] >= 10, outcomes
        # A KeepAlive stream opened by the flooding tenant is refused too (one token per stream).
        call = s.stub.KeepAlive(metadata=s.md("flood"))
        try:
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as err:
            r = await outcome(_raise(err))
            assert r is not None and r.quota_ids == ["session_rate"], r
        else:
            raise AssertionError("a KeepAlive stream over the session rate was not refused")
        calm = await outcome(s.stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=TTL), metadata=s.md("calm")))
        assert calm is None


async def test_a_batch_of_session_opens_on_the_stream_spends_the_session_rate(tmp_path: Path) -> None:
    """One Session-stream message may hold 1,024 opens, each an etcd lease: they spend the
    tenant's session tokens as CreateSession calls do. Those over the rate are refused
    RATE_LIMITED with RetryInfo under their own ids and create nothing; the stream and the
    sessions it did open go on, and another tenant is not held back."""
    # Four tokens: one for opening the stream itself (as a KeepAlive stream), three for opens.
    async with served(tmp_path, quota=TenantQuota(session_rate=SLOW, session_burst=4)) as s:
        backend = s.broker.backend
        assert backend is not None
        leases_before = backend.lease_ids()  # type: ignore[union-attr]  # the memory backend's
        call = s.stub.Session(metadata=(*s.md("flood"), BATCH_METADATA))
        opens = [
            lock_pb2.SessionRequest(id=i, open=lock_pb2.OpenSession(create=lock_pb2.CreateSessionRequest(ttl=TTL)))
            for i in range(1, 9)
        ]
        await call.write(lock_pb2.SessionRequest(batch=lock_pb2.SessionRequests(requests=opens)))
        answers: dict[int, lock_pb2.SessionResponse] = {}
        while len(answers) < len(opens):
            msg = await asyncio.wait_for(call.read(), 10)
            assert msg is not grpc.aio.EOF
            for one in msg.batch.responses if msg.WhichOneof("kind") == "batch" else [msg]:
                answers[one.id] = one
        opened = [a.open.session_id for a in answers.values() if a.WhichOneof("kind") == "open"]
        refused = [a.error for a in answers.values() if a.WhichOneof("kind") == "error"]
        assert len(opened) == 3 and len(refused) == 5, answers
        for status in refused:
            assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], status
            assert detail(status, error_details_pb2.ErrorInfo).reason == "RATE_LIMITED", status
            failure = detail(status, error_details_pb2.QuotaFailure)
            assert [v.quota_id for v in failure.violations] == ["session_rate"], status
            assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds() > 0
        # Only the three opened sessions hold a lease: the refused opens made none.
        assert len(backend.lease_ids() - leases_before) == 3  # type: ignore[union-attr]
        # The stream still serves: a refused open ends only its own message.
        await call.write(lock_pb2.SessionRequest(id=20, close=lock_pb2.CloseSessionRequest(session_id=opened[0])))
        msg = await asyncio.wait_for(call.read(), 10)
        closed = msg.batch.responses[0] if msg.WhichOneof("kind") == "batch" else msg
        assert closed.id == 20 and closed.WhichOneof("kind") == "close", closed
        call.cancel()
        calm = await outcome(s.stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=TTL), metadata=s.md("calm")))
        assert calm is None


async def _raise(err: grpc.aio.AioRpcError) -> None:
    raise err


async def test_calls_failing_authentication_are_limited_per_peer(tmp_path: Path) -> None:
    async with served(tmp_path, unauthenticated_rate=SLOW, unauthenticated_burst=8) as s:
        registry = s.broker.registry
        assert registry is not None
        checks = 0
        real = registry.authenticate_key

        async def counted(key: str, alive: object = None) -> object:
            nonlocal checks
            checks += 1
            return await real(key, alive)  # type: ignore[arg-type]

        registry.authenticate_key = counted  # type: ignore[method-assign,assignment]
        bad = (("x-api-key", s.keys["flood"][:-4] + "AAAA"),)
        results = [
            await outcome(s.stub.Describe(lock_pb2.DescribeRequest(name="x"), metadata=bad, timeout=10))
            for _ in range(40)
        ]
        codes = Counter(r.code if r is not None else None for r in results)
        assert codes[grpc.StatusCode.UNAUTHENTICATED] <= 8 + 1, codes
        assert codes[EXHAUSTED] >= 30, codes
        refused = [r for r in results if r is not None and r.code == EXHAUSTED]
        assert all(
            r.reason == "RATE_LIMITED" and r.retry_after and r.quota_ids == ["unauthenticated_rate"] for r in refused
        )
        # Once the address is refused, its keys are no longer checked: the flood costs no key checks.
        assert checks <= 8 + 1, checks
        # Without credentials at all, the same.
        r = await outcome(s.stub.Describe(lock_pb2.DescribeRequest(name="x"), timeout=10))
        assert r is not None and r.code == EXHAUSTED
