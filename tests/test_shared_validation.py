"""Bad modes, limits and AcquireMany lists are INVALID_ARGUMENT naming the field, and touch nothing
(issue 17 item 5), on the real broker and etcd (the pattern of tests/test_validation.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe
from tests.lockutil import Tracker, assert_untouched, dur, rich, snapshot
from tests.test_validation import SID, Case, call

SHARED = lock_pb2.LOCK_MODE_SHARED


def _acq(**kw: Any) -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(**{"name": "ok/name", "session_id": SID, **kw})


def _many(*names: str, **kw: Any) -> lock_pb2.AcquireManyRequest:
    claims = [lock_pb2.LockClaim(name=n) for n in names]
    return lock_pb2.AcquireManyRequest(**{"locks": claims, "session_id": SID, **kw})


def _cases() -> list[Any]:
    cases = [
        ("unknown-mode", Case("Acquire", _acq(mode=7), "mode")),
        ("unknown-mode-sessionless", Case("Acquire", _acq(session_id="", ttl=dur(10), mode=3), "mode")),
        ("negative-limit", Case("Acquire", _acq(limit=-1), "limit")),
        ("huge-limit", Case("Acquire", _acq(limit=10_001), "limit")),
        ("max-int-limit", Case("Acquire", _acq(limit=2**31 - 1), "limit")),
        ("limit-with-shared", Case("Acquire", _acq(limit=3, mode=SHARED), "mode")),
        ("shared-reentrant", Case("Acquire", _acq(mode=SHARED, reentrant=True, reentrant_owner="t"), "reentrant")),
        ("permit-reentrant", Case("Acquire", _acq(limit=2, reentrant=True, reentrant_owner="t"), "reentrant")),
        ("no-locks", Case("AcquireMany", _many(), "locks")),
        ("too-many-locks", Case("AcquireMany", _many(*(f"l{i}" for i in range(17))), "locks")),
        ("duplicate-name", Case("AcquireMany", _many("a", "b", "a"), "locks[2].name")),
        ("bad-name", Case("AcquireMany", _many("a", "b\n"), "locks[1].name")),
        ("no-session", Case("AcquireMany", _many("a", session_id=""), "session_id")),
        ("bad-wait", Case("AcquireMany", _many("a", wait_timeout=dur(-1)), "wait_timeout")),
        ("bad-owner", Case("AcquireMany", _many("a", owner="x\n"), "owner")),
        ("bad-request-id", Case("AcquireMany", _many("a", request_id="no spaces"), "request_id")),
    ]
    bad_mode = _many("a", "b")
    bad_mode.locks[1].mode = 9  # type: ignore[assignment]
    cases.append(("unknown-mode", Case("AcquireMany", bad_mode, "locks[1].mode")))
    return [pytest.param(c, id=f"{c.rpc}-{k}") for k, c in cases]


@pytest.mark.parametrize("case", _cases())
async def test_bad_mode_limit_or_lock_list_is_invalid_argument_and_touches_nothing(
    stub: Any, probe: EtcdProbe, track: Tracker, case: Case
) -> None:
    s = await track.session()
    await stub.Acquire(lock_pb2.AcquireRequest(name="ok/name", session_id=s, mode=SHARED))
    before = await snapshot(probe)
    with pytest.raises(aio.AioRpcError) as ei:
        resp = await call(stub, case)
        raise AssertionError(f"accepted: {resp}")
    r = rich(ei.value)
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT, str(r)
    assert r.reason == "INVALID_ARGUMENT", str(r)
    assert r.fields == [case.field], str(r)
    assert r.bad_request is not None and all(v.description for v in r.bad_request.field_violations)
    await assert_untouched(probe, before)


async def test_limits_at_the_bounds_are_accepted(stub: Any, track: Tracker) -> None:
    s = await track.session()
    for limit in (1, 10_000):
        resp = await stub.Acquire(lock_pb2.AcquireRequest(name=f"sem/{limit}", session_id=s, limit=limit))
        assert resp.grant.limit == limit
    resp = await stub.AcquireMany(_many(*(f"many/{i}" for i in range(16)), session_id=s))
    assert [g.name for g in resp.grants] == [f"many/{i}" for i in range(16)]


async def test_limit_mismatch_is_failed_precondition_with_details(stub: Any, probe: EtcdProbe, track: Tracker) -> None:
    a, b = await track.session(), await track.session()
    await stub.Acquire(lock_pb2.AcquireRequest(name="sem/x", session_id=a, limit=2))
    locks = await probe.keys("/t/default/l/")
    with pytest.raises(aio.AioRpcError) as ei:
        await stub.Acquire(lock_pb2.AcquireRequest(name="sem/x", session_id=b, limit=3, wait_timeout=dur(1)))
    r = rich(ei.value)
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION, str(r)
    assert r.reason == "LIMIT_MISMATCH"
    assert r.info is not None and dict(r.info.metadata) == {"lock": "sem/x", "limit": "2", "requested": "3"}
    assert await probe.keys("/t/default/l/") == locks  # the refused claim is gone
