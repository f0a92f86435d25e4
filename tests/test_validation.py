"""Every RPC refuses bad input with INVALID_ARGUMENT + BadRequest naming the field, and touches nothing.

"Touches nothing" is checked on the real etcd: no new key under the test's key root, no new lease,
and no write under the key root since the snapshot (the revision does not move because of us).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.server.core.names import key_name
from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe
from tests.lockutil import (
    LOCKS,
    Tracker,
    assert_untouched,
    dur,
    rich,
    snapshot,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SID = "00000000000000ab"  # well formed; validation runs before anything looks it up


@dataclass(frozen=True)
class Case:
    rpc: str
    request: Any  # the request message; never mutated
    field: str

    def __str__(self) -> str:
        return self.rpc


def d(seconds: int = 0, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


# Any UTF-8 text without control characters, up to 1 KiB, is a name (issue 19). What was refused
# before for its alphabet or its segments is in GOOD_NAMES below.
BAD_NAMES = {
    "empty": "",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "a\x1bb",
    "del": "a\x7fb",
    "c1-control": "a\x85b",
    "1025-bytes": "x" * 1025,
    "1024-bytes-multibyte": "é" * 512 + "x",  # 513 characters but 1025 bytes
    "1026-bytes-escaped": "#" * 1026,  # counted before escaping
}
BAD_PREFIXES = {
    "nul": "a\x00",
    "newline": "a\n",
    "1025-bytes": "x" * 1025,
}
BAD_TTLS = {
    "zero": d(0),
    "one-second": d(1),
    "fractional": d(1, 500_000_000),
    "fractional-above-min": d(2, 1),
    "above-max": d(3601),
    "negative": d(-5),
    "negative-fraction": d(0, -1),
    "mixed-signs": d(3, -1),
    "nanos-overflow": d(3, 1_000_000_000),
}
BAD_WAITS = {
    "negative": d(-1),
    "negative-fraction": d(0, -500_000_000),
    "above-max": d(301),
    "mixed-signs": d(1, -1),
}
BAD_SESSION_IDS = {
    "word": "xyz",
    "zero": "0000000000000000",
    "short": "1234",
    "upper-hex": "00000000000000AB",
    "17-digits": "00000000000000abc",
    "above-int63": "8000000000000000",
    "spaces": " 00000000000000ab",
}
BAD_REQUEST_IDS = {
    "space": "has space",
    "129-chars": "r" * 129,
    "slash": "a/b",
    "non-ascii": "é",
}
BAD_OWNERS = {
    "tab": "a\tb",
    "bell": "a\x07b",
    "newline": "host\npid",
    "del": "a\x7fb",
    "129-bytes": "o" * 129,
    "130-bytes-multibyte": "é" * 65,
}


def _acq(**kw: Any) -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(**{"name": "ok/name", **kw})


def _rel(**kw: Any) -> lock_pb2.ReleaseRequest:
    return lock_pb2.ReleaseRequest(**{"name": "ok/name", "fencing_token": 7, **kw})


def _cases() -> list[Any]:
    cases: list[Any] = []

    def add(case_id: str, case: Case) -> None:
        cases.append(pytest.param(case, id=f"{case.rpc}-{case.field}-{case_id}"))

    for k, name in BAD_NAMES.items():
        add(k, Case("Acquire", _acq(name=name, ttl=d(10)), "name"))  # session-less: no lease either
        add(k + "-session", Case("Acquire", _acq(name=name, session_id=SID), "name"))
        add(k, Case("Release", _rel(name=name), "name"))
        add(k, Case("Describe", lock_pb2.DescribeRequest(name=name), "name"))
    for k, prefix in BAD_PREFIXES.items():
        add(k, Case("List", lock_pb2.ListRequest(prefix=prefix), "prefix"))

    for k, ttl in BAD_TTLS.items():
        add(k, Case("CreateSession", lock_pb2.CreateSessionRequest(ttl=ttl), "ttl"))
        add(k, Case("Acquire", _acq(ttl=ttl), "ttl"))
    add("with-session", Case("Acquire", _acq(session_id=SID, ttl=d(10)), "ttl"))
    add("with-session-zero", Case("Acquire", _acq(session_id=SID, ttl=d(0)), "ttl"))

    for k, wait in BAD_WAITS.items():
        add(k, Case("Acquire", _acq(session_id=SID, wait_timeout=wait), "wait_timeout"))
        add(k + "-sessionless", Case("Acquire", _acq(ttl=d(10), wait_timeout=wait), "wait_timeout"))

    for k, sid in BAD_SESSION_IDS.items():
        add(k, Case("Acquire", _acq(session_id=sid), "session_id"))
        add(k, Case("Release", _rel(session_id=sid), "session_id"))
        add(k, Case("Refresh", lock_pb2.RefreshRequest(session_id=sid), "session_id"))
        add(k, Case("CloseSession", lock_pb2.CloseSessionRequest(session_id=sid), "session_id"))
    add("missing", Case("Refresh", lock_pb2.RefreshRequest(), "session_id"))
    add("missing", Case("CloseSession", lock_pb2.CloseSessionRequest(), "session_id"))

    for k, rid in BAD_REQUEST_IDS.items():
        add(k, Case("CreateSession", lock_pb2.CreateSessionRequest(request_id=rid), "request_id"))
        add(k, Case("Acquire", _acq(request_id=rid, ttl=d(10)), "request_id"))
        add(k, Case("Release", _rel(request_id=rid), "request_id"))

    for k, owner in BAD_OWNERS.items():
        add(k, Case("CreateSession", lock_pb2.CreateSessionRequest(owner=owner), "owner"))
        add(k, Case("Acquire", _acq(owner=owner, ttl=d(10)), "owner"))

    # Claims and reentrancy (issue 19) need a session, and a reentrant acquire needs its owner.
    add("sessionless", Case("Acquire", _acq(ttl=d(10), new_claim=True), "new_claim"))
    add("sessionless", Case("Acquire", _acq(ttl=d(10), reentrant=True, reentrant_owner="t1"), "reentrant"))
    add("missing", Case("Acquire", _acq(session_id=SID, reentrant=True), "reentrant_owner"))
    add("without-reentrant", Case("Acquire", _acq(session_id=SID, reentrant_owner="t1"), "reentrant_owner"))
    add("control", Case("Acquire", _acq(session_id=SID, reentrant=True, reentrant_owner="t\n1"), "reentrant_owner"))
    add(
        "129-bytes", Case("Acquire", _acq(session_id=SID, reentrant=True, reentrant_owner="o" * 129), "reentrant_owner")
    )

    for token in (0, -1, -(2**63)):
        add(str(token), Case("Release", _rel(fencing_token=token), "fencing_token"))

    for size in (1001, -1, 2**31 - 1):
        add(str(size), Case("List", lock_pb2.ListRequest(page_size=size), "page_size"))
    tokens = {"garbage": "not a token!", "bad-name": "YS8K", "not-utf8": "YS__", "other-prefix": "eC95"}
    for k, tok in tokens.items():
        # "YS8K" is "a/\n" (a control character); "YS__" is b"a/\xff" (not UTF-8); "eC95" is "x/y",
        # which does not start with the prefix "a/". ("YS8vYg==", "a//b", was the bad name before
        # issue 19 made it a name.)
        add(k, Case("List", lock_pb2.ListRequest(prefix="a/", page_token=tok), "page_token"))
    return cases


async def call(stub: Any, case: Case) -> Any:
    if case.rpc == "KeepAlive":
        stream = stub.KeepAlive()
        try:
            await stream.write(case.request)
            resp = await stream.read()
            return resp
        finally:
            stream.cancel()
    return await getattr(stub, case.rpc)(case.request)


@pytest.mark.parametrize("case", _cases())
async def test_bad_input_is_invalid_argument_and_touches_nothing(
    stub: Any, probe: EtcdProbe, track: Tracker, case: Case
) -> None:
    # Something to leave alone: a live session holding a lock.
    s = await track.session()
    await stub.Acquire(lock_pb2.AcquireRequest(name="ok/name", session_id=s))
    before = await snapshot(probe)
    with pytest.raises(aio.AioRpcError) as ei:
        resp = await call(stub, case)
        raise AssertionError(f"accepted: {resp}")
    r = rich(ei.value)
    assert r.code != grpc.StatusCode.INTERNAL, str(r)
    assert r.code == INVALID, str(r)
    assert r.reason == "INVALID_ARGUMENT", str(r)
    assert r.status.code == INVALID.value[0]
    assert r.fields == [case.field], str(r)
    assert r.bad_request is not None
    assert all(v.description for v in r.bad_request.field_violations)
    await assert_untouched(probe, before)


async def test_every_bad_field_is_named_at_once(stub: Any, probe: EtcdProbe) -> None:
    before = await snapshot(probe)
    with pytest.raises(aio.AioRpcError) as ei:
        await stub.Acquire(
            lock_pb2.AcquireRequest(name="a\nb", ttl=d(1), wait_timeout=d(-1), owner="\x07", request_id="no spaces")
        )
    r = rich(ei.value)
    assert r.code == INVALID
    assert sorted(r.fields) == ["name", "owner", "request_id", "ttl", "wait_timeout"]
    with pytest.raises(aio.AioRpcError) as ei:
        await stub.Release(lock_pb2.ReleaseRequest(name="", fencing_token=0, session_id="xyz"))
    r = rich(ei.value)
    assert sorted(r.fields) == ["fencing_token", "name", "session_id"]
    await assert_untouched(probe, before)


GOOD_NAMES = {
    "orders": "orders/42",
    "all-punctuation": "a.b/c-d_e:f@g+h=i,j~k%l",
    "colon": "billing:nightly-run",
    "256-bytes": "x" * 256,
    "dots-inside": "..a/b..",
    "leading-dot": ".a/a.",
    # Refused before issue 19, names now:
    "leading-slash": "/a",
    "trailing-slash": "a/",
    "empty-segment": "a//b",
    "dot-segment": "a/./b",
    "dotdot": "..",
    "dot": ".",
    "dotdot-segment": "a/../b",
    "hash": "a#b",
    "bang": "a!b",
    "space": "a b",
    "dollar": "a$b",
    "escape-lookalike": "a$23b",  # must not be taken for the escaped "a#b"
    "non-ascii": "é",
    "257-bytes": "x" * 257,
    "256-bytes-multibyte": "é" * 128 + "x",
    "1024-bytes": "x" * 1024,
    "1024-bytes-multibyte": "🔒" * 256,
    "1024-bytes-escaped": "#" * 1024,
    "quotes-and-backslash": "a\"b'c\\d",
    "zero-width-joiner": "a\u200db",
}


@pytest.mark.parametrize("name", list(GOOD_NAMES.values()), ids=list(GOOD_NAMES))
async def test_good_names_are_accepted(stub: Any, probe: EtcdProbe, track: Tracker, name: str) -> None:
    s = await track.session()
    got = await stub.Acquire(lock_pb2.AcquireRequest(name=name, session_id=s))
    assert got.grant.name == name
    assert len(await probe.keys(f"{LOCKS}{key_name(name).decode()}#")) == 1
    desc = await stub.Describe(lock_pb2.DescribeRequest(name=name))
    assert desc.holder.fencing_token == got.grant.fencing_token
    listed = await stub.List(lock_pb2.ListRequest(prefix=name))
    assert [lk.name for lk in listed.locks] == [name]
    rel = await stub.Release(lock_pb2.ReleaseRequest(name=name, fencing_token=got.grant.fencing_token, session_id=s))
    assert rel.released


async def test_values_at_the_limits_are_accepted(stub: Any, probe: EtcdProbe, track: Tracker) -> None:
    for ttl in (2, 3600):
        resp = await stub.CreateSession(
            lock_pb2.CreateSessionRequest(
                ttl=dur(ttl), owner="o" * 128, request_id="r" * 128 if ttl == 2 else "A.b_c:d-9"
            )
        )
        track.adopt(resp.session_id)
        assert resp.ttl.seconds == ttl
    s = await track.session(owner="é" * 64)  # 128 bytes
    got = await stub.Acquire(
        lock_pb2.AcquireRequest(
            name="limits/a", session_id=s, wait_timeout=d(300), owner="🔒 host-1 pid 42", request_id="x" * 128
        )
    )
    assert got.grant.owner == "🔒 host-1 pid 42"
    implicit = await stub.Acquire(lock_pb2.AcquireRequest(name="limits/b", ttl=d(2), wait_timeout=d(0)))
    track.adopt(implicit.grant.session_id)
    assert implicit.grant.session_id
    for size in (0, 1, 1000):  # 0 means the default
        listed = await stub.List(lock_pb2.ListRequest(prefix="limits/", page_size=size))
        assert len(listed.locks) == (1 if size == 1 else 2)
    assert (await stub.List(lock_pb2.ListRequest(prefix="limits/"))).next_page_token == ""
    assert (await stub.List(lock_pb2.ListRequest(prefix="limits/", page_size=1))).next_page_token != ""
    assert len(await probe.keys(LOCKS + "limits/")) == 2


async def test_keepalive_answers_a_bad_session_id_without_ending_the_stream(
    stub: Any, probe: EtcdProbe, track: Tracker
) -> None:
    # The stream is shared by every session of a client: one bad id must not end it for the others.
    good = await track.session()
    before = await snapshot(probe)
    stream = stub.KeepAlive()
    try:
        for sid in [*BAD_SESSION_IDS.values(), ""]:
            await stream.write(lock_pb2.KeepAliveRequest(session_id=sid))
            resp = await stream.read()
            assert resp.expired and resp.session_id == sid, resp
        await stream.write(lock_pb2.KeepAliveRequest(session_id=good))
        resp = await stream.read()
        assert not resp.expired and resp.ttl.seconds > 0, resp
    finally:
        stream.cancel()
    await assert_untouched(probe, before)
