"""Lock names are any UTF-8 text without control characters (issue 19), mapped to etcd keys reversibly.

The mapping is checked as a function (hypothesis: it round-trips, is injective, never lets one lock
see another's entries, keeps List's prefix filter and order) and against the mapping from before
issue 19, kept here verbatim: every name of the old alphabet must keep its old key, or deployed
brokers would lose their locks on upgrade. Then over a real etcd and broker: long non-ASCII names
round-trip, names that differ only in escaped characters never share a queue, and List pages
through them in name order.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st

from lockbroker.server.app import Broker
from lockbroker.server.config import ConfigError, LockLimits
from lockbroker.server.core.names import Keyspace, key_name, name_of_key, name_problem
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS, Tracker, dur, rich

ROOT = "/lockbroker/v1"

# -- the mapping before issue 19, verbatim ---------------------------------------------------------

_OLD_SEGMENT = re.compile(r"[A-Za-z0-9\-_.:@+=,~%]+")
OLD_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+=,~%"


def old_name_ok(name: str) -> bool:
    if not name or len(name.encode()) > 256:
        return False
    return all(seg not in ("", ".", "..") and _OLD_SEGMENT.fullmatch(seg) for seg in name.split("/"))


class OldKeyspace:
    def __init__(self, root: str, tenant: str) -> None:
        self.base = f"{root.rstrip('/')}/t/{tenant}/".encode()
        self.locks_root = self.base + b"l/"
        self.quota_root = self.base + b"q/"

    def lock_pool_prefix(self, name: str) -> bytes:
        return self.quota_root + b"l/" + name.encode() + b"#"

    def lock_prefix(self, name: str) -> bytes:
        return self.locks_root + name.encode() + b"#"

    def entry_key(self, name: str, lease_id: int) -> bytes:
        return self.lock_prefix(name) + f"{lease_id:016x}".encode()

    def name_of(self, key: bytes) -> str:
        return key[len(self.locks_root) : key.rindex(b"#")].decode()

    def list_start(self, prefix: str, after: str | None) -> bytes:
        return self.lock_prefix(after)[:-1] + b"$" if after is not None else self.locks_root + prefix.encode()


old_segments = st.text(OLD_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
old_names = st.lists(old_segments, min_size=1, max_size=5).map("/".join).filter(old_name_ok)
leases = st.integers(1, (1 << 63) - 1)
tenants = st.sampled_from(["default", "acme", "t-1"])


@given(name=old_names, after=old_names, lease=leases, tenant=tenants)
def test_every_old_name_keeps_its_old_keys(name: str, after: str, lease: int, tenant: str) -> None:
    new, old = Keyspace(ROOT, tenant), OldKeyspace(ROOT, tenant)
    assert name_problem(name) is None
    assert key_name(name) == name.encode()
    assert new.lock_prefix(name) == old.lock_prefix(name)
    assert new.entry_key(name, lease) == old.entry_key(name, lease)
    assert new.lock_pool(name, 10).prefix == old.lock_pool_prefix(name)
    assert new.name_of(old.entry_key(name, lease)) == old.name_of(old.entry_key(name, lease)) == name
    # List reads the same ranges as before, from the start and after a page token.
    assert new.names_prefix(name) == old.list_start(name, None)
    assert new.after_lock(after) == old.list_start("", after)


# -- the mapping of any name -------------------------------------------------------------------------

# Text over the characters that matter to the mapping, so that near-collisions are common: the
# escape "$", hex digits, the separator "#", bytes below it, multi-byte characters, "/".
risky = st.text(st.sampled_from(["$", "#", "2", "3", "4", "A", "a", "/", " ", "!", "%", "é", "💥", "\x00", "\x24"]))
any_text = st.text(st.characters(codec="utf-8"))
names = st.one_of(risky, any_text).filter(bool)


@given(name=names)
def test_key_name_round_trips_and_never_holds_the_separator(name: str) -> None:
    encoded = key_name(name)
    assert b"#" not in encoded
    assert name_of_key(encoded) == name
    encoded.decode()  # valid UTF-8: stored in entry values (quota slot keys) as JSON strings
    ks = Keyspace(ROOT, "default")
    assert ks.name_of(ks.entry_key(name, 0xAB)) == name


@given(a=names, b=names, lease_a=leases, lease_b=leases)
def test_key_names_are_injective_prefix_free_and_ordered(a: str, b: str, lease_a: int, lease_b: int) -> None:
    ks = Keyspace(ROOT, "default")
    assert (key_name(a) == key_name(b)) == (a == b)
    # Lock a sees exactly its own entries: its prefix covers no entry key of another lock.
    assert ks.entry_key(b, lease_b).startswith(ks.lock_prefix(a)) == (a == b)
    # List's prefix filter is one key range: name prefix <=> key prefix.
    assert key_name(b).startswith(key_name(a)) == b.startswith(a)
    assert ks.entry_key(b, lease_b).startswith(ks.names_prefix(a)) == b.startswith(a)
    # Key order is name order (code points = UTF-8 bytes), for whole entry keys too.
    if a != b:
        assert (ks.entry_key(a, lease_a) < ks.entry_key(b, lease_b)) == (a < b)
        # ... and a page after `a` starts past all of a's entries and before any later lock's.
        assert (ks.after_lock(a) <= ks.entry_key(b, lease_b)) == (a < b)


def test_escapes_are_the_documented_ones() -> None:
    assert key_name("a b") == b"a$20b"
    assert key_name("a#b") == b"a$23b"
    assert key_name("a$b") == b"a$24b"
    assert key_name("a$23b") == b"a$2423b"  # a literal "$" is escaped too: no look-alikes
    assert key_name("é/锁") == "é/锁".encode()  # bytes above "$" stay as they are
    assert name_of_key(b"%41") == "%41"  # "%" was always a name character: not an escape


def test_name_rules_say_which_rule_was_broken() -> None:
    assert name_problem("") == "must not be empty"
    assert name_problem("", prefix=True) is None
    assert "control character U+000A at index 1" in (name_problem("a\nb") or "")
    assert "control character U+0085" in (name_problem("a\x85") or "")
    assert "lone surrogate U+DCFF at index 1" in (name_problem("a\udcff") or "")
    assert name_problem("é" * 512 + "x") == "is 1025 bytes long in UTF-8; the limit is 1024 bytes"
    assert name_problem("x" * 300, max_bytes=299) == "is 300 bytes long in UTF-8; the limit is 299 bytes"
    for ok in ("é" * 512, "#" * 1024, "/", "..", "a//b", " ", "\u200b", "\ufeff"):
        assert name_problem(ok) is None, ok


def test_max_name_bytes_is_configurable_within_bounds() -> None:
    assert LockLimits().max_name_bytes == 1024
    assert LockLimits(max_name_bytes=4096).max_name_bytes == 4096
    for bad in (255, 0, 65537):
        with pytest.raises(ConfigError, match="max_name_bytes"):
            LockLimits(max_name_bytes=bad)


# -- over a real etcd and broker ---------------------------------------------------------------------

# 1024 bytes (73 x 14 + 2): non-ASCII characters of 2, 3 and 4 bytes, and every character escaped in keys.
KIB_NAME = "锁/é #$!🔒" * 73 + "xx"


async def test_a_1kib_non_ascii_name_round_trips(stub: Any, probe: EtcdProbe, track: Tracker) -> None:
    assert len(KIB_NAME.encode()) == 1024 and not KIB_NAME.isascii()
    s = await track.session()
    got = await stub.Acquire(lock_pb2.AcquireRequest(name=KIB_NAME, session_id=s, owner="kib"))
    assert got.grant.name == KIB_NAME
    keys = await probe.keys(LOCKS)
    assert keys == [probe.root + LOCKS.encode() + key_name(KIB_NAME) + b"#" + s.encode()]
    desc = await stub.Describe(lock_pb2.DescribeRequest(name=KIB_NAME))
    assert desc.name == KIB_NAME and desc.holder.fencing_token == got.grant.fencing_token
    for prefix in ("", "锁/é #", KIB_NAME):
        listed = await stub.List(lock_pb2.ListRequest(prefix=prefix))
        assert [lk.name for lk in listed.locks] == [KIB_NAME], prefix
    listed = await stub.List(lock_pb2.ListRequest(prefix="锁/é $"))
    assert list(listed.locks) == []
    rel = await stub.Release(lock_pb2.ReleaseRequest(name=KIB_NAME, fencing_token=got.grant.fencing_token))
    assert rel.released
    assert await probe.keys(LOCKS) == []


# Each pair differs only in a character that is escaped, or in an escape spelled out literally.
LOOKALIKES = [
    "a",
    "a#",
    "a#b",
    "a$23b",
    "a$",
    "a$b",
    "a$24b",
    "a b",
    "a$20b",
    "a!b",
    "a/b",
    "ab",
    "é",
    "$C3$A9",
    "a\u00a0b",
]


async def test_names_that_differ_only_in_escaped_characters_never_collide(
    stub: Any, probe: EtcdProbe, track: Tracker
) -> None:
    tokens: dict[str, tuple[str, int]] = {}
    for i, name in enumerate(LOOKALIKES):
        s = await track.session()
        # A try-lock: any shared queue would refuse the second name as held.
        got = await stub.Acquire(lock_pb2.AcquireRequest(name=name, session_id=s, owner=f"o{i}"))
        assert got.grant.name == name
        tokens[name] = (s, got.grant.fencing_token)
    assert len(await probe.keys(LOCKS)) == len(LOOKALIKES)
    for name, (s, fencing_token) in tokens.items():
        desc = await stub.Describe(lock_pb2.DescribeRequest(name=name))
        assert (desc.name, desc.holder.session_id, desc.holder.fencing_token) == (name, s, fencing_token)
        assert list(desc.waiters) == []

    # List walks them in name order, one page at a time and all at once, and filters by prefix.
    want = sorted(LOOKALIKES)
    paged: list[str] = []
    token = ""
    for _ in range(len(LOOKALIKES) + 1):
        page = await stub.List(lock_pb2.ListRequest(page_size=1, page_token=token))
        paged += [lk.name for lk in page.locks]
        token = page.next_page_token
        if not token:
            break
    assert paged == want
    whole = await stub.List(lock_pb2.ListRequest())
    assert [lk.name for lk in whole.locks] == want
    assert all(lk.holder.fencing_token == tokens[lk.name][1] for lk in whole.locks)
    for prefix in ("a", "a$", "a#", "a$2", "$", "é"):
        listed = await stub.List(lock_pb2.ListRequest(prefix=prefix))
        assert [lk.name for lk in listed.locks] == [n for n in want if n.startswith(prefix)], prefix
        two = await stub.List(lock_pb2.ListRequest(prefix=prefix, page_size=2))
        if len([n for n in want if n.startswith(prefix)]) > 2:
            rest = await stub.List(lock_pb2.ListRequest(prefix=prefix, page_token=two.next_page_token))
            assert [lk.name for lk in [*two.locks, *rest.locks]] == [n for n in want if n.startswith(prefix)]

    for name, (s, fencing_token) in tokens.items():
        rel = await stub.Release(lock_pb2.ReleaseRequest(name=name, fencing_token=fencing_token, session_id=s))
        assert rel.released, name
    assert await probe.keys(LOCKS) == []


async def test_the_name_limit_is_the_configured_one(etcd: EmbeddedEtcd, key_root: str, probe: EtcdProbe) -> None:
    broker = Broker(broker_config(etcd.endpoint, key_root, max_name_bytes=300))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            with pytest.raises(aio.AioRpcError) as ei:
                await stub.Acquire(lock_pb2.AcquireRequest(name="é" * 150 + "x", ttl=dur(10)))
            r = rich(ei.value)
            assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.fields == ["name"]
            assert r.bad_request is not None
            assert r.bad_request.field_violations[0].description == (
                "is 301 bytes long in UTF-8; the limit is 300 bytes"
            )
            # Release, Describe and List apply the same limit.
            for call in (
                stub.Release(lock_pb2.ReleaseRequest(name="x" * 301, fencing_token=1)),
                stub.Describe(lock_pb2.DescribeRequest(name="x" * 301)),
                stub.List(lock_pb2.ListRequest(prefix="x" * 301)),
            ):
                with pytest.raises(aio.AioRpcError) as ei:
                    await call
                assert rich(ei.value).code == grpc.StatusCode.INVALID_ARGUMENT
            got = await stub.Acquire(lock_pb2.AcquireRequest(name="é" * 150, ttl=dur(10)))
            assert got.grant.name == "é" * 150
            await stub.Release(lock_pb2.ReleaseRequest(name="é" * 150, fencing_token=got.grant.fencing_token))
    finally:
        await broker.stop(grace=1.0)
    assert await probe.keys(LOCKS) == []
