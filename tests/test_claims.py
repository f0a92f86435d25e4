"""Claims and reentrancy through the gRPC API (issue 19): the new AcquireRequest fields, what
Describe shows of each claim, and Release's holds_left. The semantics themselves are checked on
both backends in tests/core/test_claims.py."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS, Tracker, dur, expect_error, wait_waiters


async def test_claims_and_holds_over_grpc(stub: Any, track: Tracker, probe: EtcdProbe) -> None:
    s = await track.session()
    plain = await stub.Acquire(lock_pb2.AcquireRequest(name="g/a", session_id=s, request_id="plain"))
    assert plain.grant.hold_count == 1
    # Without new_claim: refused as before, and the message says what to send instead.
    r = await expect_error(
        stub.Acquire(lock_pb2.AcquireRequest(name="g/a", session_id=s, request_id="again")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_QUEUED",
    )
    assert "new_claim" in r.status.message
    claim = asyncio.ensure_future(
        stub.Acquire(
            lock_pb2.AcquireRequest(name="g/a", session_id=s, request_id="second", new_claim=True, wait_timeout=dur(20))
        )
    )
    try:
        d = await wait_waiters(stub, "g/a", 1)
        assert d.holder.request_id == "plain" and d.holder.hold_count == 1
        (w,) = d.waiters
        assert (w.session_id, w.request_id) == (s, "second") and w.fencing_token > plain.grant.fencing_token
        rel = await stub.Release(lock_pb2.ReleaseRequest(name="g/a", fencing_token=plain.grant.fencing_token))
        assert (rel.released, rel.holds_left) == (True, 0)
        got = await claim
    finally:
        claim.cancel()
    assert got.grant.fencing_token == w.fencing_token and got.grant.request_id == "second"

    def reentrant(request_id: str) -> lock_pb2.AcquireRequest:
        return lock_pb2.AcquireRequest(
            name="g/r", session_id=s, reentrant=True, reentrant_owner="worker-1", request_id=request_id
        )

    first = await stub.Acquire(reentrant("r1"))
    second = await stub.Acquire(reentrant("r2"))
    assert second.grant.fencing_token == first.grant.fencing_token and second.grant.hold_count == 2
    d = await stub.Describe(lock_pb2.DescribeRequest(name="g/r"))
    assert d.holder.hold_count == 2 and d.holder.request_id == "r1"
    token = first.grant.fencing_token
    rel = await stub.Release(lock_pb2.ReleaseRequest(name="g/r", fencing_token=token, session_id=s))
    assert (rel.released, rel.holds_left) == (True, 1)
    rel = await stub.Release(lock_pb2.ReleaseRequest(name="g/r", fencing_token=token, session_id=s))
    assert (rel.released, rel.holds_left) == (True, 0)
    rel = await stub.Release(lock_pb2.ReleaseRequest(name="g/r", fencing_token=token, session_id=s))
    assert (rel.released, rel.holds_left) == (False, 0)
    rel = await stub.Release(lock_pb2.ReleaseRequest(name="g/a", fencing_token=got.grant.fencing_token, session_id=s))
    assert rel.released
    assert await probe.keys(LOCKS) == []
