"""Any input to any RPC gets OK or a documented status, and a refused call leaves nothing behind.

Hypothesis draws every field and the metadata of each RPC: names (valid, unicode, huge, separators),
durations (negative, nanos out of range, huge seconds), session ids (random text, valid-looking hex,
closed sessions, another tenant's), fencing tokens, page tokens, owners, request ids, API keys and
custom metadata within gRPC's rules. Each example sets up only what it refers to (a live session,
a closed one, a held lock), makes the one call under test, and checks:

- the answer against an oracle written from the README and lock.proto (not from the server's
  validation code): the exact status and ErrorInfo reason, and for INVALID_ARGUMENT the fields the
  BadRequest names;
- etcd: a refused call wrote nothing under the key root and granted no lease; a call that worked is
  undone inside the example, so every example ends with exactly the module's own keys and leases;
- health still answers SERVING.

One broker with two tenants ("acme" acts, "globex" owns the foreign ids) serves the whole module:
hypothesis runs many examples per test, and function-scoped fixtures would be shared among them.

Profiles: `ci` (default) and a larger `soak` (HYPOTHESIS_PROFILE=soak).

Invalid UTF-8 in a string field cannot be sent through the generated stubs (protobuf will not
serialize it), so it is tested at the end with hand-encoded bodies.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from lockbroker.client.errors import rich_status
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.etcd import rpc_pb2 as epb
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import assert_untouched, snapshot


def _profile(examples: int, *, shrink: bool) -> settings:
    # No deadline: an example is a few RPCs and etcd calls, and the machine may be busy. CI does not
    # shrink: shrinking reruns a failing example hundreds of times, which no per-test timeout can
    # stop (hypothesis would take the timeout for one more failure), so CI reports the example as
    # found; the soak profile shrinks it.
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples,
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )


PROFILES = {"ci": _profile(40, shrink=False), "soak": _profile(600, shrink=True)}
_profile_name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
assert _profile_name in PROFILES, f"HYPOTHESIS_PROFILE={_profile_name!r}: known profiles are {sorted(PROFILES)}"
PROFILE = PROFILES[_profile_name]

T = TypeVar("T")
R = TypeVar("R")
Code = grpc.StatusCode
OK = Code.OK
SERVING = health_pb2.HealthCheckResponse.SERVING
ACME, GLOBEX = "acme", "globex"
API_KEY = "x-api-key"
CALL_TIMEOUT = 15.0  # generous: a loaded 2-core machine; never a timing assertion
WAIT_TIMEOUT = 1.0  # the RPC deadline of an Acquire that queues behind a held lock

# The README's error table: every status a caller can get, with its ErrorInfo reasons.
DOCUMENTED: dict[grpc.StatusCode, frozenset[str]] = {
    Code.ABORTED: frozenset({"LOCK_HELD", "WAIT_EXPIRED"}),
    Code.DEADLINE_EXCEEDED: frozenset({"DEADLINE_EXCEEDED"}),
    Code.NOT_FOUND: frozenset({"SESSION_NOT_FOUND", "SESSION_LOST", "REVOKED"}),
    Code.FAILED_PRECONDITION: frozenset({"ALREADY_QUEUED", "REQUEST_ID_REUSED"}),
    Code.INVALID_ARGUMENT: frozenset({"INVALID_ARGUMENT"}),
    Code.RESOURCE_EXHAUSTED: frozenset({"QUOTA_EXCEEDED", "RATE_LIMITED"}),
    Code.UNAUTHENTICATED: frozenset({"UNAUTHENTICATED"}),
    Code.PERMISSION_DENIED: frozenset({"PERMISSION_DENIED", "NOT_OWNER"}),
    Code.UNAVAILABLE: frozenset({"BACKEND_UNAVAILABLE", "SHUTTING_DOWN", "AUDIT_UNAVAILABLE"}),
}

# -- the oracle: what the README and lock.proto promise ------------------------------------------------

NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+=,~%"
_NAME_SET = frozenset(NAME_CHARS)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
SESSION_ID = re.compile(r"[0-9a-f]{16}")


def name_ok(name: str, *, prefix: bool = False) -> bool:
    """README: any UTF-8 text of 1-1024 bytes without control characters (U+0000-U+001F, U+007F-U+009F).

    A List prefix may also be empty."""
    if not name:
        return prefix
    if len(name.encode("utf-8", "surrogatepass")) > 1024:
        return False
    return not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or 0xD800 <= ord(ch) <= 0xDFFF for ch in name)


def owner_ok(owner: str) -> bool:
    return len(owner.encode()) <= 128 and owner.isprintable()


def request_id_ok(request_id: str) -> bool:
    return request_id == "" or REQUEST_ID.fullmatch(request_id) is not None


def duration_value(d: duration_pb2.Duration) -> Fraction | None:
    """The value of a google.protobuf.Duration, or None if it is not a valid one (its own rules)."""
    if abs(d.nanos) >= 10**9 or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
        return None
    return Fraction(d.seconds) + Fraction(d.nanos, 10**9)


def ttl_ok(ttl: duration_pb2.Duration | None) -> bool:
    """Unset (the default TTL), or whole seconds from 2 to 3600."""
    if ttl is None:
        return True
    value = duration_value(ttl)
    return value is not None and ttl.nanos == 0 and 2 <= value <= 3600


def wait_value(wait: duration_pb2.Duration | None) -> Fraction | None:
    """The wait in seconds (unset: 0, a try-lock), or None if it is out of range (negative, above 300 s)."""
    if wait is None:
        return Fraction(0)
    value = duration_value(wait)
    return value if value is not None and 0 <= value <= 300 else None


@dataclass
class Oracle:
    """What one call must answer. `must`/`may`: fields a BadRequest must / may name.

    With `must` empty and `may` not, the server may refuse the call naming only `may` fields, or
    treat it as well-formed and answer one of `then` (e.g. an all-zero session id: malformed, or a
    session that does not exist; both are honest answers).
    """

    authed: bool
    must: set[str] = field(default_factory=set)
    may: set[str] = field(default_factory=set)
    then: set[tuple[grpc.StatusCode, str | None]] = field(default_factory=lambda: {(OK, None)})

    def bad(self, name: str, problem: bool) -> None:
        if problem:
            self.must.add(name)


@dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str | None = None
    fields: frozenset[str] = frozenset()
    retry: bool = False
    response: Any = None
    message: str = ""

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} fields={sorted(self.fields)} {self.message!r}"


def from_error(err: aio.AioRpcError) -> Outcome:
    rich = rich_status(err, strict=True)  # raises if the details disagree with the call's status
    out = Outcome(err.code(), message=err.details() or "")
    if rich is None:
        return out
    for detail in rich.details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            assert detail.domain == "lockbroker", f"ErrorInfo of domain {detail.domain!r}"
            out.reason = detail.reason
        elif isinstance(detail, error_details_pb2.BadRequest):
            out.fields = frozenset(v.field for v in detail.field_violations)
        elif isinstance(detail, error_details_pb2.RetryInfo):
            out.retry = True
    return out


async def outcome(call: Awaitable[Any]) -> Outcome:
    try:
        response = await call
    except aio.AioRpcError as err:
        return from_error(err)
    return Outcome(OK, response=response)


def assert_documented(o: Outcome) -> None:
    """OK, or a status of the README's table with one of its reasons; never INTERNAL or UNKNOWN."""
    if o.code == OK:
        return
    assert o.code in DOCUMENTED, f"undocumented status: {o}"
    if o.code == Code.DEADLINE_EXCEEDED and o.reason is None:
        return  # the client's own deadline fired first (a slow machine): gRPC's status, no details
    assert o.reason in DOCUMENTED[o.code], f"{o.code.name} without a documented ErrorInfo reason: {o}"
    if o.code == Code.UNAVAILABLE:
        assert o.retry, f"UNAVAILABLE without RetryInfo: {o}"


def check(o: Outcome, want: Oracle) -> None:
    event(f"{o.code.name} {o.reason or ''}".strip())  # --hypothesis-show-statistics shows the mix
    assert_documented(o)
    if not want.authed:
        assert (o.code, o.reason) == (Code.UNAUTHENTICATED, "UNAUTHENTICATED"), str(o)
        return
    if want.must:
        assert o.code == Code.INVALID_ARGUMENT, f"expected INVALID_ARGUMENT naming {sorted(want.must)}, got {o}"
        assert want.must <= o.fields <= want.must | want.may, f"expected fields {sorted(want.must)}: {o}"
        return
    if o.code == Code.INVALID_ARGUMENT and want.may:
        assert o.fields and o.fields <= want.may, f"only {sorted(want.may)} may be refused: {o}"
        return
    if (o.code, o.reason) == (Code.UNAVAILABLE, "BACKEND_UNAVAILABLE"):
        return  # etcd slow on a loaded machine: documented and retryable
    assert (o.code, o.reason) in want.then, f"expected one of {sorted((c.name, r) for c, r in want.then)}: {o}"


# -- strategies ----------------------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[T], other: st.SearchStrategy[T], weight: int = 5) -> st.SearchStrategy[T]:
    """`usual` about weight/(weight+1) of the time. Each field is mostly well-formed, so that many
    examples get past validation and reach the lock core, where the interesting answers are."""
    # one_of() would merge identical branches, so the weight is an index into a list.
    return st.sampled_from([True] * weight + [False]).flatmap(lambda u: usual if u else other)


utf8_text = st.text(st.characters(codec="utf-8"), max_size=40)
segments = st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
# Names of the alphabet from before issue 19 (they keep their etcd keys), and any text since.
printable_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=24)
valid_names = st.one_of(
    st.lists(segments, min_size=1, max_size=4).map("/".join),
    segments.map(lambda s: (s * 256)[:256].lstrip(".") or "x"),  # at the old 256-byte limit
    printable_text,
    st.lists(st.one_of(segments, st.sampled_from(["#", "$", " ", "!", "$23", "/", "é", "💥"])), min_size=1).map(
        "".join
    ),
    printable_text.map(lambda s: (s * 1024).encode()[:1024].decode(errors="ignore")),  # at the 1 KiB limit
)
SEPARATORS = ["/", "//", "#", ".", "..", "\x00", "\n", " ", "\t", "\\", "\u2028", "\ufeff", "é", "💥", "%2F", "?"]
weird_names = st.lists(st.one_of(segments, st.sampled_from(SEPARATORS)), min_size=1, max_size=6).map("".join)
huge_names = st.sampled_from([257, 1_024, 1_025, 70_000]).map(lambda n: "n" * n)
names = mostly(valid_names, st.one_of(utf8_text, weird_names, huge_names), 3)

owners = mostly(
    st.one_of(st.just(""), st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), max_size=30)),
    st.one_of(
        utf8_text,
        st.text(st.characters(codec="utf-8"), min_size=100, max_size=200),
        st.sampled_from(["é" * 64, "é" * 64 + "x", "o" * 128, "o" * 129, "tab\there", "nul\x00", "\u200b"]),
    ),
)
request_ids = mostly(
    st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:\-]{1,40}", fullmatch=True)),
    st.one_of(utf8_text, st.sampled_from(["r" * 128, "r" * 129, "a b", "a/b", "ü"])),
)
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


NANOS = [0, 0, 0, 1, -1, 500_000_000, 999_999_999, -999_999_999, 10**9, -(10**9)]
BOUNDARIES = [(0, 0), (0, 1), (1, 999_999_999), (2, 0), (3600, 0), (3601, 0), (300, 0), (300, 1), (-1, 0), (0, -1)]
odd_durations = st.one_of(
    st.builds(_duration, st.integers(-3, 4000), st.sampled_from(NANOS)),
    st.builds(_duration, INT64, INT32),
    st.sampled_from(BOUNDARIES).map(lambda b: _duration(*b)),
)
ttls = mostly(st.one_of(st.none(), st.builds(_duration, st.integers(2, 3600), st.just(0))), odd_durations, 3)
# Waits that may queue behind a held lock stay short: the call's deadline is WAIT_TIMEOUT.
waits = mostly(
    st.one_of(st.none(), st.builds(_duration, st.just(0), st.integers(0, 200_000_000))),
    st.one_of(st.builds(_duration, st.integers(-3, 400), st.sampled_from(NANOS)), odd_durations),
    3,
)

# Session references: markers resolved per example, or raw strings.
MINE, CLOSED, FOREIGN, HOLDER, MINE_UPPER = "<mine>", "<closed>", "<foreign>", "<holder>", "<MINE>"
odd_session_ids = st.one_of(
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
    st.sampled_from(["0000000000000000", "ffffffffffffffff", "8000000000000000", "7fffffffffffffff", MINE_UPPER]),
    st.from_regex(r"[0-9a-f]{1,15}|[0-9a-f]{17,24}|[0-9A-F]{16}", fullmatch=True),
    utf8_text,
)
session_ids = mostly(st.just(MINE), st.one_of(st.sampled_from([CLOSED, FOREIGN, ""]), odd_session_ids), 2)

# Credentials: mostly acme's own key, then every way a key can be wrong.
BAD_CREDS = [GLOBEX, "none", "unknown-id", "wrong-secret", "twice", "x-tenant-only"]
GARBAGE = "garbage:"  # followed by the x-api-key value to send
creds = mostly(
    st.just(ACME),
    st.one_of(
        st.sampled_from(BAD_CREDS),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(GARBAGE.__add__),
        st.from_regex(r"lbk_[a-z0-9]{4,32}_[A-Za-z0-9_\-]{32,64}", fullmatch=True).map(GARBAGE.__add__),
    ),
    4,
)
_META_KEY = r"[a-z0-9][a-z0-9_.\-]{0,20}"
meta_keys = st.one_of(
    st.from_regex(_META_KEY, fullmatch=True).filter(lambda k: k != API_KEY and not k.endswith("-bin")),
    # Names gRPC reserves or that mean something elsewhere: the client drops or sends them; neither may matter.
    st.sampled_from(["x-tenant", "authorization", "grpc-foo", "te", "user-agent", "content-type", "traceparent"]),
)
ascii_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
custom_metadata = st.lists(
    st.one_of(
        st.tuples(meta_keys, ascii_values),
        st.tuples(st.from_regex(_META_KEY, fullmatch=True).map(lambda k: k + "-bin"), st.binary(max_size=200)),
    ),
    max_size=4,
)


# -- the world: one broker, two tenants -----------------------------------------------------------------


@dataclass
class World:
    broker: Broker
    stub: Any
    health: Any
    probe: EtcdProbe
    keys: dict[str, str]
    base_keys: list[bytes]
    base_leases: set[int]

    def md(self, tenant: str = ACME) -> tuple[tuple[str, str], ...]:
        return ((API_KEY, self.keys[tenant]),)

    def metadata(self, cred: str, extra: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        key = self.keys[ACME]
        key_id, secret = key.removeprefix("lbk_").split("_", 1)
        if cred.startswith(GARBAGE):
            return [(API_KEY, cred.removeprefix(GARBAGE))] + [(k, v) for k, v in extra if k != API_KEY]
        md: list[tuple[str, Any]] = {
            ACME: [(API_KEY, key)],
            GLOBEX: [(API_KEY, self.keys[GLOBEX])],
            "none": [],
            "unknown-id": [(API_KEY, f"lbk_zz{key_id}_{secret}")],
            "wrong-secret": [(API_KEY, f"lbk_{key_id}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}")],
            "twice": [(API_KEY, key), (API_KEY, key)],
            "x-tenant-only": [("x-tenant", ACME)],
        }[cred]
        return md + [(k, v) for k, v in extra if k != API_KEY]


def actor(cred: str) -> str | None:
    return cred if cred in (ACME, GLOBEX) else None


@pytest.fixture(scope="module")
async def world(etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    path = Path(tmp_path_factory.mktemp("properties")) / "tenants.toml"
    keys = {t: tenants.add_tenant(path, t) for t in (ACME, GLOBEX)}
    key_root = f"/lbprop/{uuid.uuid4().hex[:10]}"
    cfg = dataclasses.replace(broker_config(etcd.endpoint, key_root), auth=AuthConfig(str(path)))
    broker = Broker(cfg)
    await broker.start()
    probe = EtcdProbe(etcd.endpoint, key_root)
    channel = aio.insecure_channel(f"127.0.0.1:{broker.port}")
    try:
        base = await snapshot(probe)
        stub = lock_pb2_grpc.LockServiceStub(channel)
        yield World(broker, stub, health_pb2_grpc.HealthStub(channel), probe, keys, base.keys, base.leases)
    finally:
        await channel.close()
        await broker.stop(grace=1.0)
        await probe.close()


class Setup:
    """What one example refers to, made on demand and undone at the end of the example.

    Sessions of acme: MINE, HOLDER (holds the example's lock) and CLOSED; of globex: FOREIGN.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.made: dict[str, str] = {}
        self.leases: list[int] = []

    async def session(self, tenant: str = ACME, ttl: int = 60) -> str:
        req = lock_pb2.CreateSessionRequest(ttl=_duration(ttl, 0), owner=tenant, request_id=uuid.uuid4().hex)
        resp = await retrying(
            lambda: self.world.stub.CreateSession(req, metadata=self.world.md(tenant), timeout=CALL_TIMEOUT)
        )
        self.leases.append(int(resp.session_id, 16))
        return str(resp.session_id)

    async def resolve(self, ref: str) -> str:
        if ref == MINE_UPPER:
            return (await self.resolve(MINE)).upper()
        if ref not in (MINE, CLOSED, HOLDER, FOREIGN):
            return ref
        if ref not in self.made:
            sid = await self.session(GLOBEX if ref == FOREIGN else ACME)
            if ref == CLOSED:
                close = lock_pb2.CloseSessionRequest(session_id=sid)
                await retrying(
                    lambda: self.world.stub.CloseSession(close, metadata=self.world.md(), timeout=CALL_TIMEOUT)
                )
            self.made[ref] = sid
        return self.made[ref]

    def live(self, sid: str, tenant: str | None) -> bool:
        """Is `sid` a live session of `tenant` (the caller)?"""
        if tenant == GLOBEX:
            return sid == self.made.get(FOREIGN)
        return tenant == ACME and sid in (self.made.get(MINE), self.made.get(HOLDER))

    async def alive(self, ref: str) -> bool:
        return await self.world.probe.lease_ttl(int(self.made[ref], 16)) > 0

    async def hold(self, name: str) -> int:
        """Make the holder session hold `name`; its fencing token."""
        sid = await self.resolve(HOLDER)
        req = lock_pb2.AcquireRequest(name=name, session_id=sid, owner="holder", request_id=uuid.uuid4().hex)
        resp = await retrying(lambda: self.world.stub.Acquire(req, metadata=self.world.md(), timeout=CALL_TIMEOUT))
        return int(resp.grant.fencing_token)


async def retrying(call: Callable[[], Awaitable[R]], attempts: int = 6) -> R:
    """A setup call (not the call under test), retried with its request id while etcd is slow:
    other test runs may load this machine, and an example must not fail on its own scaffolding."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except aio.AioRpcError as err:
            if err.code() != Code.UNAVAILABLE or attempt == attempts:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def revoke_quietly(probe: EtcdProbe, lease: int) -> None:
    try:
        await probe.revoke(lease)
    except aio.AioRpcError as err:
        assert err.code() == Code.NOT_FOUND, f"revoking lease {lease:x}: {err.code().name}"


async def settle(world: World, setup: Setup) -> None:
    """End of an example: undo its setup, then exactly the module's own keys and leases are left,
    and health still answers. Stray state fails the example, and is removed first so that one
    failure does not fail every later example too."""
    for lease in setup.leases:
        await revoke_quietly(world.probe, lease)
    keys: list[bytes] = []
    new_leases: set[int] = set()
    for _ in range(100):  # a cancelled wait cleans up in the background: allow it a few seconds
        keys = await world.probe.keys()
        new_leases = await world.probe.leases() - world.base_leases
        if keys == world.base_keys and not new_leases:
            break
        await asyncio.sleep(0.1)
    stray = sorted(set(keys) - set(world.base_keys))
    if stray or new_leases:
        for lease in new_leases:
            await revoke_quietly(world.probe, lease)
        for key in stray:
            await world.probe.kv.DeleteRange(epb.DeleteRangeRequest(key=key))
    assert not stray, f"stray keys: {stray}"
    assert not new_leases, f"stray leases: {sorted(new_leases)}"
    health = await world.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert health.status == SERVING


def session_oracle(want: Oracle, field_name: str, sid: str, *, required: bool) -> str:
    """Classify a session id field: "empty", "malformed" (must be refused), "odd" (16 hex digits that
    name no possible session: refused or not found), or "wellformed"."""
    if sid == "":
        want.bad(field_name, required)
        return "empty"
    if not SESSION_ID.fullmatch(sid):
        if re.fullmatch(r"[0-9a-fA-F]{16}", sid):
            want.may.add(field_name)
            return "odd"
        want.must.add(field_name)
        return "malformed"
    if int(sid, 16) == 0 or int(sid, 16) >= 2**63:
        want.may.add(field_name)
        return "odd"
    return "wellformed"


NOT_FOUND = (Code.NOT_FOUND, "SESSION_NOT_FOUND")

# -- sessions ------------------------------------------------------------------------------------------


@PROFILE
@given(ttl=ttls, owner=owners, request_id=request_ids, cred=creds, extra=custom_metadata)
async def test_create_session_any_input(
    world: World,
    *,
    ttl: duration_pb2.Duration | None,
    owner: str,
    request_id: str,
    cred: str,
    extra: list[tuple[str, Any]],
) -> None:
    setup = Setup(world)
    try:
        req = lock_pb2.CreateSessionRequest(owner=owner, request_id=request_id)
        if ttl is not None:
            req.ttl.CopyFrom(ttl)
        want = Oracle(actor(cred) is not None)
        want.bad("ttl", not ttl_ok(ttl))
        want.bad("owner", not owner_ok(owner))
        want.bad("request_id", not request_id_ok(request_id))
        before = await snapshot(world.probe)
        o = await outcome(world.stub.CreateSession(req, metadata=world.metadata(cred, extra), timeout=CALL_TIMEOUT))
        if o.code == OK:
            setup.leases.append(int(o.response.session_id, 16))  # undone even if the check below fails
        check(o, want)
        if o.code == OK:
            tenant = actor(cred)
            assert tenant is not None
            sid = o.response.session_id
            assert SESSION_ID.fullmatch(sid), sid
            assert o.response.ttl.seconds == (ttl.seconds if ttl is not None else 10)
            closed = await world.stub.CloseSession(
                lock_pb2.CloseSessionRequest(session_id=sid), metadata=world.md(tenant), timeout=CALL_TIMEOUT
            )
            assert closed.closed
        else:
            await assert_untouched(world.probe, before)
    finally:
        await settle(world, setup)


@PROFILE
@given(ref=session_ids, cred=creds, extra=custom_metadata)
async def test_refresh_any_input(world: World, ref: str, cred: str, extra: list[tuple[str, Any]]) -> None:
    setup = Setup(world)
    try:
        sid = await setup.resolve(ref)
        tenant = actor(cred)
        want = Oracle(tenant is not None)
        kind = session_oracle(want, "session_id", sid, required=True)
        want.then = {(OK, None)} if kind == "wellformed" and setup.live(sid, tenant) else {NOT_FOUND}
        before = await snapshot(world.probe)
        o = await outcome(
            world.stub.Refresh(
                lock_pb2.RefreshRequest(session_id=sid), metadata=world.metadata(cred, extra), timeout=CALL_TIMEOUT
            )
        )
        check(o, want)
        if o.code == OK:
            assert 0 < o.response.ttl.seconds <= 60
        # A refresh writes no key, whatever its answer; and a closed session is never revived.
        await assert_untouched(world.probe, before)
        if ref == CLOSED:
            assert await world.probe.lease_ttl(int(sid, 16)) == -1, "a refresh revived a closed session"
    finally:
        await settle(world, setup)


@PROFILE
@given(ref=session_ids, cred=creds, extra=custom_metadata)
async def test_close_session_any_input(world: World, ref: str, cred: str, extra: list[tuple[str, Any]]) -> None:
    setup = Setup(world)
    try:
        sid = await setup.resolve(ref)
        tenant = actor(cred)
        want = Oracle(tenant is not None)
        kind = session_oracle(want, "session_id", sid, required=True)
        mine = kind == "wellformed" and setup.live(sid, tenant)
        before = await snapshot(world.probe)
        o = await outcome(
            world.stub.CloseSession(
                lock_pb2.CloseSessionRequest(session_id=sid), metadata=world.metadata(cred, extra), timeout=CALL_TIMEOUT
            )
        )
        check(o, want)
        closed = o.code == OK and o.response.closed
        if o.code == OK:
            assert closed == mine, f"closed={closed} for {ref!r} as {tenant}"
        if not closed:
            await assert_untouched(world.probe, before)
        # Nothing but the caller's own session named in the call ends, whoever sends what.
        for other in (MINE, HOLDER, FOREIGN, CLOSED):
            if other in setup.made:
                ends = other == CLOSED or (closed and setup.made[other] == sid)
                assert await setup.alive(other) != ends, f"{other} {'survived' if ends else 'ended'}"
    finally:
        await settle(world, setup)


@PROFILE
@given(refs=st.lists(session_ids, min_size=1, max_size=6), cred=creds, extra=custom_metadata)
async def test_keepalive_stream_any_input(
    world: World, refs: list[str], cred: str, extra: list[tuple[str, Any]]
) -> None:
    setup = Setup(world)
    try:
        sids = [await setup.resolve(r) for r in refs]
        tenant = actor(cred)
        before = await snapshot(world.probe)
        call = world.stub.KeepAlive(metadata=world.metadata(cred, extra), timeout=CALL_TIMEOUT)
        answers: list[lock_pb2.KeepAliveResponse] = []
        try:
            for sid in sids:
                await call.write(lock_pb2.KeepAliveRequest(session_id=sid))
                answers.append(await call.read())
            await call.done_writing()
            assert await call.read() == aio.EOF
        except Exception as err:
            if tenant is not None:
                raise AssertionError(f"the stream of {tenant} failed: {err!r}") from err
        code = await call.code()
        event(code.name)
        event(f"expired answers: {sum(a.expired for a in answers)}/{len(answers)}")
        if tenant is None:
            assert code == Code.UNAUTHENTICATED, code
            assert answers == []
        else:
            assert code == OK, f"{code.name}: {await call.details()}"
            assert len(answers) == len(sids)
            for sid, answer in zip(sids, answers, strict=True):
                assert answer.session_id == sid
                live = SESSION_ID.fullmatch(sid) is not None and setup.live(sid, tenant)
                assert answer.expired != live, f"{sid!r} as {tenant}: {answer}"
                if live:
                    assert 0 < answer.ttl.seconds <= 3600
        await assert_untouched(world.probe, before)
        if CLOSED in refs:
            assert await world.probe.lease_ttl(int(setup.made[CLOSED], 16)) == -1, "KeepAlive revived a session"
    finally:
        await settle(world, setup)


# -- locks ---------------------------------------------------------------------------------------------


@PROFILE
@given(
    name=names,
    ref=st.one_of(st.just(""), st.just(HOLDER), session_ids),
    ttl=ttls,
    wait=waits,
    owner=owners,
    request_id=request_ids,
    held=st.booleans(),
    cred=creds,
    extra=custom_metadata,
)
async def test_acquire_any_input(
    world: World,
    *,
    name: str,
    ref: str,
    ttl: duration_pb2.Duration | None,
    wait: duration_pb2.Duration | None,
    owner: str,
    request_id: str,
    held: bool,
    cred: str,
    extra: list[tuple[str, Any]],
) -> None:
    setup = Setup(world)
    try:
        tenant = actor(cred)
        held = held and name_ok(name)
        if held:
            await setup.hold(name)
        sid = await setup.resolve(ref)
        req = lock_pb2.AcquireRequest(name=name, session_id=sid, owner=owner, request_id=request_id)
        if ttl is not None:
            req.ttl.CopyFrom(ttl)
        if wait is not None:
            req.wait_timeout.CopyFrom(wait)

        want = Oracle(tenant is not None)
        want.bad("name", not name_ok(name))
        kind = session_oracle(want, "session_id", sid, required=False)
        want.bad("ttl", (sid != "" and ttl is not None) or not ttl_ok(ttl))
        wait_s = wait_value(wait)
        want.bad("wait_timeout", wait_s is None)
        want.bad("owner", not owner_ok(owner))
        want.bad("request_id", not request_id_ok(request_id))
        contended = held and tenant == ACME  # acme's lock is invisible to globex
        if kind != "empty" and not (kind == "wellformed" and setup.live(sid, tenant)):
            want.then = {NOT_FOUND}
        elif contended and sid == setup.made.get(HOLDER):
            want.then = {(Code.FAILED_PRECONDITION, "ALREADY_QUEUED")}
        elif contended and not wait_s:
            want.then = {(Code.ABORTED, "LOCK_HELD")}
        elif contended:
            want.then = {(Code.ABORTED, "WAIT_EXPIRED"), (Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")}
            want.then.add((Code.DEADLINE_EXCEEDED, None))

        before = await snapshot(world.probe)
        timeout = WAIT_TIMEOUT if contended and wait_s else CALL_TIMEOUT
        o = await outcome(world.stub.Acquire(req, metadata=world.metadata(cred, extra), timeout=timeout))
        if o.code == OK:
            setup.leases.append(int(o.response.grant.session_id, 16))  # undone even if the check below fails
        check(o, want)
        if o.code == OK:
            assert tenant is not None
            g = o.response.grant
            assert (g.name, g.owner) == (name, owner)
            assert g.fencing_token > 0
            assert g.session_id == sid if sid else SESSION_ID.fullmatch(g.session_id)
            assert g.request_id == request_id or not request_id
            released = await world.stub.Release(
                lock_pb2.ReleaseRequest(name=name, fencing_token=g.fencing_token, session_id=g.session_id),
                metadata=world.md(tenant),
                timeout=CALL_TIMEOUT,
            )
            assert released.released
        elif o.code in (Code.ABORTED, Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE) and o.reason != "LOCK_HELD":
            pass  # it queued and then gave up: settle() checks that the entry went away again
        else:
            await assert_untouched(world.probe, before)
    finally:
        await settle(world, setup)


TOKENS = ["<real>", "<real>", "<real+1>", "<real-1>"]


@PROFILE
@given(
    name=names,
    token=mostly(st.sampled_from(TOKENS), st.one_of(st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63)]), INT64), 2),
    ref=st.one_of(st.just(""), st.just(HOLDER), session_ids),
    request_id=request_ids,
    held=mostly(st.just(True), st.just(False), 2),
    cred=creds,
    extra=custom_metadata,
)
async def test_release_any_input(
    world: World,
    *,
    name: str,
    token: int | str,
    ref: str,
    request_id: str,
    held: bool,
    cred: str,
    extra: list[tuple[str, Any]],
) -> None:
    setup = Setup(world)
    try:
        tenant = actor(cred)
        held = held and name_ok(name)
        real = await setup.hold(name) if held else 1_000_000
        value = {"<real>": real, "<real+1>": real + 1, "<real-1>": real - 1}.get(str(token), token)
        assert isinstance(value, int)
        sid = await setup.resolve(ref)

        want = Oracle(tenant is not None)
        want.bad("name", not name_ok(name))
        if value <= 0:
            want.may.add("fencing_token")  # no grant has such a token: refused, or nothing to release
        kind = session_oracle(want, "session_id", sid, required=False)
        want.bad("request_id", not request_id_ok(request_id))
        frees = (
            held
            and tenant == ACME
            and value == real
            and (kind == "empty" or (kind == "wellformed" and sid == setup.made.get(HOLDER)))
        )
        other = kind in ("wellformed", "odd") and sid != setup.made.get(HOLDER)
        if held and tenant == ACME and value == real and other:
            # Another session naming the current grant: refused, never released (issue 15).
            want.then = {(Code.PERMISSION_DENIED, "NOT_OWNER")}
        before = await snapshot(world.probe)
        o = await outcome(
            world.stub.Release(
                lock_pb2.ReleaseRequest(name=name, fencing_token=value, session_id=sid, request_id=request_id),
                metadata=world.metadata(cred, extra),
                timeout=CALL_TIMEOUT,
            )
        )
        check(o, want)
        if o.code == OK:
            assert o.response.released == frees, f"released={o.response.released} for token {value} of {real}"
        if not (o.code == OK and o.response.released):
            await assert_untouched(world.probe, before)  # and so the holder's grant is untouched
        if held:
            d = await world.stub.Describe(
                lock_pb2.DescribeRequest(name=name), metadata=world.md(), timeout=CALL_TIMEOUT
            )
            still = d.HasField("holder")
            assert still != (o.code == OK and o.response.released)
            if still:
                assert d.holder.fencing_token == real
    finally:
        await settle(world, setup)


@PROFILE
@given(name=names, held=st.booleans(), cred=creds, extra=custom_metadata)
async def test_describe_any_input(world: World, name: str, held: bool, cred: str, extra: list[tuple[str, Any]]) -> None:
    setup = Setup(world)
    try:
        tenant = actor(cred)
        held = held and name_ok(name)
        token = await setup.hold(name) if held else 0
        want = Oracle(tenant is not None)
        want.bad("name", not name_ok(name))
        before = await snapshot(world.probe)
        o = await outcome(
            world.stub.Describe(
                lock_pb2.DescribeRequest(name=name), metadata=world.metadata(cred, extra), timeout=CALL_TIMEOUT
            )
        )
        check(o, want)
        if o.code == OK:
            assert o.response.name == name
            assert list(o.response.waiters) == []
            visible = held and tenant == ACME
            assert o.response.HasField("holder") == visible
            if visible:
                assert o.response.holder.fencing_token == token
        await assert_untouched(world.probe, before)
    finally:
        await settle(world, setup)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


page_tokens = mostly(
    # "<after-prefix>": a token of a valid name under the prefix, like those List hands out
    st.sampled_from(["", "<after-prefix>"]),
    st.one_of(
        utf8_text,
        utf8_text.map(_b64),
        valid_names.map(_b64),
        st.sampled_from(["=", "a", "YQ", "YQ=", "****", _b64("a#b"), _b64("../x"), _b64("é")]),
    ),
    2,
)


@PROFILE
@given(
    prefix=mostly(st.one_of(st.just(""), st.sampled_from(NAME_CHARS), valid_names.map(lambda n: n + "/")), names, 2),
    page_size=mostly(st.sampled_from([0, 1, 2, 1000]), st.one_of(st.sampled_from([1001, -1]), INT32), 3),
    page_token=page_tokens,
    held=st.lists(valid_names, max_size=3, unique=True),
    cred=creds,
    extra=custom_metadata,
)
async def test_list_any_input(
    world: World,
    *,
    prefix: str,
    page_size: int,
    page_token: str,
    held: list[str],
    cred: str,
    extra: list[tuple[str, Any]],
) -> None:
    setup = Setup(world)
    try:
        tenant = actor(cred)
        for name in held:
            await setup.hold(name)
        prefix_ok = name_ok(prefix, prefix=True)
        if page_token == "<after-prefix>":
            page_token = _b64(prefix + "a") if prefix_ok and name_ok(prefix + "a") else _b64("a")
        want = Oracle(tenant is not None)
        want.bad("prefix", not prefix_ok)
        want.bad("page_size", not 0 <= page_size <= 1000)
        after = ""
        if page_token:
            decoded = _decoded(page_token)
            if decoded is not None and name_ok(decoded) and decoded.startswith(prefix) and prefix_ok:
                after = decoded  # a token List could have handed out: it must be accepted
            else:
                want.may.add("page_token")
        before = await snapshot(world.probe)
        o = await outcome(
            world.stub.List(
                lock_pb2.ListRequest(prefix=prefix, page_size=page_size, page_token=page_token),
                metadata=world.metadata(cred, extra),
                timeout=CALL_TIMEOUT,
            )
        )
        check(o, want)
        if o.code == OK:
            listed = [lock.name for lock in o.response.locks]
            visible = sorted(n for n in held if n.startswith(prefix) and tenant == ACME)
            assert listed == sorted(listed)
            assert set(listed) <= set(visible), f"{listed} are not acme's locks under {prefix!r}"
            if not page_token:
                size = page_size or 100
                assert listed == visible[:size]
                assert bool(o.response.next_page_token) == (len(visible) > size)
            elif after:
                assert all(n > after for n in listed), f"{listed} not after {after!r}"
        await assert_untouched(world.probe, before)
    finally:
        await settle(world, setup)


def _decoded(token: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None


# -- invalid UTF-8 ---------------------------------------------------------------------------------------
#
# proto3 string fields must hold valid UTF-8, and protobuf refuses to parse a message with invalid
# UTF-8 in one. grpcio parses the request before any handler runs and would answer UNKNOWN without
# details; the broker registers a deserializer that hands the parse error to the handler instead
# (service.Malformed), so the caller gets INVALID_ARGUMENT with a BadRequest naming the request.

_SERVICE = lock_pb2.DESCRIPTOR.services_by_name["LockService"]
STRING_FIELDS = [
    (method.name, f)
    for method in _SERVICE.methods
    if not method.client_streaming
    for f in method.input_type.fields
    if f.type == FieldDescriptor.TYPE_STRING
]
BAD_UTF8 = [b"a\xffb", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]  # stray byte, cut, surrogate, 5-byte form


def raw_string_field(number: int, value: bytes) -> bytes:
    """The wire encoding of one length-delimited field (tag, varint length, bytes)."""
    out = bytearray([(number << 3) | 2])
    n = len(value)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + value


def _identity(b: bytes) -> bytes:
    return b


@pytest.mark.parametrize(("method", "fd"), STRING_FIELDS, ids=[f"{m}.{f.name}" for m, f in STRING_FIELDS])
async def test_invalid_utf8_in_a_unary_request_is_refused_cleanly(
    world: World, method: str, fd: FieldDescriptor
) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{world.broker.port}") as channel:
        rpc = channel.unary_unary(
            f"/lockbroker.v1.LockService/{method}", request_serializer=_identity, response_deserializer=_identity
        )
        for bad in BAD_UTF8:
            before = await snapshot(world.probe)
            o = await outcome(rpc(raw_string_field(fd.number, bad), metadata=world.md(), timeout=CALL_TIMEOUT))
            assert o.code == Code.INVALID_ARGUMENT, f"{method}.{fd.name}={bad!r}: {o}"
            assert (o.reason, o.fields) == ("INVALID_ARGUMENT", frozenset({"request"})), str(o)
            await assert_untouched(world.probe, before)
    await settle(world, Setup(world))


async def test_invalid_utf8_on_the_keepalive_stream_is_not_internal(world: World) -> None:
    setup = Setup(world)
    try:
        sid = await setup.resolve(MINE)
        async with aio.insecure_channel(f"127.0.0.1:{world.broker.port}") as channel:
            rpc = channel.stream_stream(
                "/lockbroker.v1.LockService/KeepAlive",
                request_serializer=_identity,
                response_deserializer=lock_pb2.KeepAliveResponse.FromString,
            )
            call = rpc(metadata=world.md(), timeout=CALL_TIMEOUT)
            await call.write(lock_pb2.KeepAliveRequest(session_id=sid).SerializeToString())
            first = await call.read()
            assert isinstance(first, lock_pb2.KeepAliveResponse) and not first.expired
            await call.write(raw_string_field(1, b"a\xffb"))
            try:
                await call.read()
            except aio.AioRpcError as err:
                o = from_error(err)
            else:
                o = Outcome(await call.code(), message=await call.details())
            assert o.code == Code.INVALID_ARGUMENT, str(o)
    finally:
        await settle(world, setup)
