"""Helpers for the lock-semantics suites: rich error details, polling, etcd snapshots, session tracking.

Everything here talks to the real broker (through its gRPC stub) or to the real etcd (through
EtcdProbe and a raw Watch); nothing is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from lockbroker.client.errors import rich_status
from lockbroker.server.core.names import key_name
from lockbroker.server.etcd import rpc_pb2 as epb
from lockbroker.server.etcd import rpc_pb2_grpc as epb_grpc
from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe

T = TypeVar("T")

LOCKS = "/t/default/l/"
SESSIONS = "/t/default/s/"
DOMAIN = "lockbroker"


def dur(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def secs(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def lease_of(session_id: str) -> int:
    return int(session_id, 16)


# -- rich errors ------------------------------------------------------------------------------


@dataclass
class Rich:
    """An RPC error with its google.rpc.Status details unpacked."""

    error: aio.AioRpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    retry: error_details_pb2.RetryInfo | None = None
    quota: error_details_pb2.QuotaFailure | None = None
    not_acquired: lock_pb2.NotAcquired | None = None
    others: list[str] = field(default_factory=list)

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code()

    @property
    def reason(self) -> str | None:
        return self.info.reason if self.info is not None else None

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.error.details()!r} fields={self.fields}"


_KNOWN = frozenset(
    kind.DESCRIPTOR.full_name
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.QuotaFailure,
        lock_pb2.NotAcquired,
    )
)


def _type_name(detail: Message) -> str:
    return detail.TypeName() if isinstance(detail, any_pb2.Any) else detail.DESCRIPTOR.full_name


def rich(err: aio.AioRpcError) -> Rich:
    rs = rich_status(err, strict=True)  # raises if the trailer disagrees with the call's own status
    assert rs is not None, f"no grpc-status-details-bin on {err.code().name}: {err.details()!r}"
    out = Rich(
        err,
        rs.status,
        info=rs.info,
        bad_request=rs.detail(error_details_pb2.BadRequest),
        retry=rs.detail(error_details_pb2.RetryInfo),
        quota=rs.detail(error_details_pb2.QuotaFailure),
        not_acquired=rs.detail(lock_pb2.NotAcquired),
    )
    out.others = [name for d in rs.details if (name := _type_name(d)) not in _KNOWN]
    assert out.info is not None, f"{err.code().name} without an ErrorInfo detail of domain {DOMAIN!r}"
    assert out.info.domain == DOMAIN
    return out


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> Rich:
    """Await `call`, which must fail with `code` and an ErrorInfo with `reason`."""
    try:
        resp = await call
    except aio.AioRpcError as err:
        r = rich(err)
        assert r.code != grpc.StatusCode.INTERNAL, str(r)
        assert (r.code, r.reason) == (code, reason), str(r)
        return r
    raise AssertionError(f"expected {code.name} {reason}, got a response: {resp}")


# -- polling ----------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T = await check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(interval)
        last = await check()
    return last


async def wait_waiters(stub: Any, name: str, n: int, timeout: float = 5.0) -> lock_pb2.DescribeResponse:
    """Wait until Describe shows exactly `n` waiters on `name`."""

    async def check() -> lock_pb2.DescribeResponse | None:
        d = await stub.Describe(lock_pb2.DescribeRequest(name=name))
        return d if len(d.waiters) == n else None

    found = await eventually(check, timeout, f"{n} waiter(s) on {name!r}")
    assert found is not None
    return found


# -- etcd state -------------------------------------------------------------------------------


@dataclass
class Snapshot:
    keys: list[bytes]
    leases: set[int]
    revision: int


async def snapshot(probe: EtcdProbe) -> Snapshot:
    return Snapshot(await probe.keys(), await probe.leases(), await probe.revision())


async def writes_between(probe: EtcdProbe, after: int, upto: int) -> list[epb.Event]:
    """Every etcd event with after < revision <= upto, over the whole keyspace (no compaction here)."""
    if upto <= after:
        return []
    watch = epb_grpc.WatchStub(probe.channel)
    call = watch.Watch()
    events: list[epb.Event] = []
    try:
        await call.write(
            epb.WatchRequest(
                create_request=epb.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=after + 1)
            )
        )
        async with asyncio.timeout(5):
            while not any(ev.kv.mod_revision >= upto for ev in events):
                resp = await call.read()
                assert isinstance(resp, epb.WatchResponse), "watch ended early"
                events.extend(ev for ev in resp.events if ev.kv.mod_revision <= upto)
    finally:
        call.cancel()
    return events


async def assert_untouched(probe: EtcdProbe, before: Snapshot) -> None:
    """Nothing under this test's key root was written since `before`, and no lease was granted.

    The revision must not have moved; if it did, every write since `before` must be outside this
    test's key root (another test's session lapsing on the shared etcd), so a put-then-delete of
    ours can never hide behind an unchanged key list.
    """
    after = await snapshot(probe)
    assert after.keys == before.keys
    assert after.leases - before.leases == set(), "a lease was granted"
    if after.revision != before.revision:
        ours = [
            ev.kv.key
            for ev in await writes_between(probe, before.revision, after.revision)
            if ev.kv.key.startswith(probe.root)
        ]
        assert ours == [], f"revision moved {before.revision} -> {after.revision} by writes {ours}"


def active_watches(broker: Any) -> int:
    """How many Acquire calls wait on this broker for a deletion (their predecessor's or their own)."""
    return int(broker.core._backend.watches.active)


async def lock_keys(probe: EtcdProbe, name: str | None = None) -> list[bytes]:
    return await probe.keys(LOCKS + (f"{key_name(name).decode()}#" if name is not None else ""))


# -- sessions ---------------------------------------------------------------------------------


class Tracker:
    """Creates sessions and closes whatever a test left behind, so no lease lapses in a later test."""

    def __init__(self, stub: Any, probe: EtcdProbe) -> None:
        self.stub = stub
        self.probe = probe
        self.leases: set[int] = set()

    async def session(self, ttl: int | None = 10, owner: str = "", request_id: str = "") -> str:
        req = lock_pb2.CreateSessionRequest(owner=owner, request_id=request_id)
        if ttl is not None:
            req.ttl.CopyFrom(dur(ttl))
        resp = await self.stub.CreateSession(req)
        self.leases.add(lease_of(resp.session_id))
        return str(resp.session_id)

    def adopt(self, session_id: str) -> str:
        self.leases.add(lease_of(session_id))
        return session_id

    async def cleanup(self) -> None:
        for lease in self.leases:
            with contextlib.suppress(aio.AioRpcError):
                await self.probe.revoke(lease)


async def acquire(
    stub: Any,
    name: str,
    session_id: str = "",
    *,
    wait: float | None = None,
    owner: str = "",
    request_id: str = "",
    ttl: int | None = None,
    timeout: float | None = None,
) -> lock_pb2.AcquireResponse:
    req = lock_pb2.AcquireRequest(name=name, session_id=session_id, owner=owner, request_id=request_id)
    if wait is not None:
        req.wait_timeout.CopyFrom(dur(wait))
    if ttl is not None:
        req.ttl.CopyFrom(dur(ttl))
    resp: lock_pb2.AcquireResponse = await stub.Acquire(req, timeout=timeout)
    return resp


async def release(stub: Any, name: str, token: int, session_id: str = "") -> bool:
    resp = await stub.Release(lock_pb2.ReleaseRequest(name=name, fencing_token=token, session_id=session_id))
    return bool(resp.released)


__all__ = [
    "LOCKS",
    "SESSIONS",
    "Rich",
    "Snapshot",
    "Tracker",
    "acquire",
    "active_watches",
    "assert_untouched",
    "dur",
    "eventually",
    "expect_error",
    "lease_of",
    "lock_keys",
    "release",
    "rich",
    "secs",
    "snapshot",
    "wait_waiters",
    "writes_between",
]
