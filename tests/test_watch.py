"""LockService.Watch over a real etcd and a real broker (server/watch.py, client/_watch.py).

Tenants: "ops" (admin role), "acme" and "other". Each test drives a lock with plain RPCs and reads
the events a watcher got, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockbroker.client import Client, LockEvent, SyncClient
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuditConfig, AuthConfig, Config
from lockbroker.server.core.quota import TenantQuota
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.server.telemetry import tracing_for
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from lockbroker.v1.reasons import ErrorReason
from tests.abuse_util import served
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import eventually, expect_error, rich
from tests.procutil import clean_env, lockbroker_command, stop_process
from tests.test_grpcurl import grpcurl


def _with(cfg: Config, **sections: Any) -> Config:
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **sections})


class Env:
    def __init__(self, broker: Broker, keys: dict[str, str], channel: aio.Channel, etcd: EmbeddedEtcd) -> None:
        self.broker = broker
        self.keys = keys
        self.etcd = etcd
        self.lock: Any = lock_pb2_grpc.LockServiceStub(channel)
        self.admin: Any = lock_pb2_grpc.AdminServiceStub(channel)

    async def revision(self) -> int:
        """etcd's revision now: a watch from it gets every later event, however late it starts."""
        probe = EtcdProbe(self.etcd.endpoint, "")
        try:
            return await probe.revision()
        finally:
            await probe.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def md(self, who: str = "acme") -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.keys[who]),)

    async def session(self, who: str = "acme", owner: str = "") -> str:
        req = lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30), owner=owner)
        return str((await self.lock.CreateSession(req, metadata=self.md(who))).session_id)

    async def acquire(
        self, name: str, session_id: str, wait: float = 0, who: str = "acme", owner: str = ""
    ) -> lock_pb2.Grant:
        req = lock_pb2.AcquireRequest(name=name, session_id=session_id, owner=owner)
        if wait:
            req.wait_timeout.FromMilliseconds(int(wait * 1000))
        grant: lock_pb2.Grant = (await self.lock.Acquire(req, metadata=self.md(who))).grant
        return grant

    async def release(self, name: str, g: lock_pb2.Grant) -> None:
        req = lock_pb2.ReleaseRequest(name=name, fencing_token=g.fencing_token, session_id=g.session_id)
        assert (await self.lock.Release(req, metadata=self.md())).released


@pytest.fixture
async def env(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[Env]:
    tfile = tmp_path / "tenants.toml"
    keys = {
        "ops": tenants.add_tenant(tfile, "ops", admin=True),
        "acme": tenants.add_tenant(tfile, "acme"),
        "other": tenants.add_tenant(tfile, "other"),
    }
    b = Broker(_with(broker_config(etcd.endpoint, key_root), auth=AuthConfig(str(tfile))))
    await b.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            yield Env(b, keys, ch, etcd)
    finally:
        await b.stop(grace=1.0)


class Watcher:
    """Collects a Client.watch's events in the background."""

    def __init__(self, env: Env, name: str, who: str = "acme", **kw: Any) -> None:
        self.client = Client(env.target, api_key=env.keys[who])
        self.events: list[LockEvent] = []
        self._it = self.client.watch(name, **kw)
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for event in self._it:
            self.events.append(event)

    async def until(self, n: int, timeout: float = 10.0) -> list[LockEvent]:
        async def enough() -> list[LockEvent] | None:
            if self.task.done():
                self.task.result()  # raises what ended the watch
            return self.events if len(self.events) >= n else None

        found = await eventually(enough, timeout, f"{n} events (have {self.events})")
        assert found is not None
        return found

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


def _kinds(events: list[LockEvent]) -> list[tuple[str, str]]:
    return [(e.type, e.session_id) for e in events if not e.snapshot]


async def test_events_of_one_lock_in_order(env: Env) -> None:
    s1, s2, s3, s4 = [await env.session(owner=f"o{i}") for i in range(1, 5)]
    w = Watcher(env, "w/x", start_revision=await env.revision())
    try:
        g1 = await env.acquire("w/x", s1, owner="o1")
        second = asyncio.ensure_future(env.acquire("w/x", s2, wait=20))
        await w.until(2)
        with pytest.raises(aio.AioRpcError) as ei:
            await env.acquire("w/x", s3, wait=0.3)  # queues, then leaves
        assert rich(ei.value).reason == ErrorReason.WAIT_EXPIRED
        await env.release("w/x", g1)
        g2 = await asyncio.wait_for(second, 10)
        fr = lock_pb2.ForceReleaseRequest(name="w/x", reason="wedged", tenant="acme")
        await env.admin.ForceRelease(fr, metadata=env.md("ops"))
        g4 = await env.acquire("w/x", s4)
        await env.lock.CloseSession(lock_pb2.CloseSessionRequest(session_id=s4), metadata=env.md())
        events = await w.until(9)
    finally:
        await w.close()
    assert _kinds(events) == [
        ("GRANTED", s1),
        ("WAITER_QUEUED", s2),
        ("WAITER_QUEUED", s3),
        ("WAITER_LEFT", s3),
        ("RELEASED", s1),
        ("GRANTED", s2),
        ("REVOKED", s2),
        ("GRANTED", s4),
        ("EXPIRED", s4),
    ]
    by_type = {e.type: e for e in events}
    assert by_type["REVOKED"].reason == ErrorReason.REVOKED and by_type["REVOKED"].message == "wedged"
    assert [e.fencing_token for e in events if e.type == "GRANTED"] == [
        g1.fencing_token,
        g2.fencing_token,
        g4.fencing_token,
    ]
    assert events[0].owner == "o1" and all(e.name == "w/x" for e in events)
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and revisions[4] == revisions[5], "a release and its handoff: one revision"


async def test_a_snapshot_first_then_a_prefix_watch_sees_only_its_names(env: Env) -> None:
    s1, s2 = await env.session(), await env.session()
    await env.acquire("p/a", s1)
    w = Watcher(env, "p/", prefix=True)
    try:
        snap = await w.until(1)
        assert [(e.type, e.name, e.snapshot) for e in snap] == [("GRANTED", "p/a", True)]
        await env.acquire("q/a", s2)  # outside the prefix
        await env.acquire("p/b", s2)
        events = await w.until(2)
    finally:
        await w.close()
    assert [(e.type, e.name, e.snapshot) for e in events] == [("GRANTED", "p/a", True), ("GRANTED", "p/b", False)]


async def test_resuming_from_a_revision_repeats_and_skips_nothing(env: Env) -> None:
    sessions = [await env.session() for _ in range(3)]
    start = await env.revision()
    reference = Watcher(env, "r/x", start_revision=start)  # watches throughout
    first = Watcher(env, "r/x", start_revision=start)
    try:
        g = await env.acquire("r/x", sessions[0])
        await first.until(1)
        await first.close()
        seen = [e for e in first.events if not e.snapshot]
        await env.release("r/x", g)  # while nobody resumed: must come on resume
        g = await env.acquire("r/x", sessions[1])
        resumed = Watcher(env, "r/x", start_revision=seen[-1].revision)
        try:
            await env.release("r/x", g)
            g = await env.acquire("r/x", sessions[2])
            after = await resumed.until(4)
        finally:
            await resumed.close()
        whole = await reference.until(len(seen) + len(after))
    finally:
        await reference.close()
    assert not any(e.snapshot for e in seen + after), "a watch from a revision sends no snapshot"
    assert [(e.type, e.revision) for e in seen + after] == [(e.type, e.revision) for e in whole]
    assert [e.type for e in after] == ["RELEASED", "GRANTED", "RELEASED", "GRANTED"]


async def test_another_tenants_locks_are_invisible(env: Env) -> None:
    mine, theirs = await env.session("other"), await env.session("acme")
    await env.acquire("t/x", theirs)
    w = Watcher(env, "", who="other", prefix=True, start_revision=await env.revision())  # all of "other"
    try:
        await env.acquire("t/y", theirs)
        await env.acquire("t/x", mine, who="other")  # same name as acme's held lock: another lock
        events = await w.until(1)
        await asyncio.sleep(0.2)
    finally:
        await w.close()
    assert [(e.type, e.name, e.session_id) for e in w.events] == [("GRANTED", "t/x", mine)], events


async def _first(call: Any) -> Any:
    return await call.read()


async def test_bad_requests_are_invalid_argument_with_details(env: Env) -> None:
    for req, field in [
        (lock_pb2.WatchRequest(name="bad\x01name"), "name"),
        (lock_pb2.WatchRequest(name=""), "name"),
        (lock_pb2.WatchRequest(name="ok", start_revision=-1), "start_revision"),
    ]:
        r = await expect_error(
            _first(env.lock.Watch(req, metadata=env.md())), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        )
        assert r.bad_request is not None and [v.field for v in r.bad_request.field_violations] == [field]


def _etcd_watchers(endpoint: str) -> int:
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^etcd_debugging_mvcc_watcher_total (\d+)", text, re.M)
    assert m is not None, "etcd exposes its watcher count"
    return int(m.group(1))


async def test_cancelling_the_stream_releases_the_etcd_watch(env: Env) -> None:
    before = await asyncio.to_thread(_etcd_watchers, env.etcd.endpoint)
    call = env.lock.Watch(lock_pb2.WatchRequest(name="c/x"), metadata=env.md())
    assert (await call.read()).snapshot

    async def watchers(n: int) -> bool | None:
        return True if await asyncio.to_thread(_etcd_watchers, env.etcd.endpoint) == n else None

    await eventually(lambda: watchers(before + 1), 5, "the watch's etcd watcher")
    call.cancel()
    await eventually(lambda: watchers(before), 5, "the etcd watcher gone after the cancel")


async def test_a_compacted_start_revision_is_out_of_range_with_the_compact_revision(env: Env) -> None:
    s = await env.session()
    g = await env.acquire("k/x", s)
    await env.release("k/x", g)
    g = await env.acquire("k/x", s)
    # etcd's Compact, sent raw (the broker's etcd subset has no Compact): field 1 = revision.
    rev = g.fencing_token
    varint = bytearray()
    v = rev
    while True:
        byte, v = v & 0x7F, v >> 7
        varint.append(byte | (0x80 if v else 0))
        if not v:
            break
    async with aio.insecure_channel(env.etcd.endpoint.removeprefix("http://")) as ch:
        compact = ch.unary_unary("/etcdserverpb.KV/Compact", lambda b: b, lambda b: b)
        await compact(b"\x08" + bytes(varint), timeout=5)
    req = lock_pb2.WatchRequest(name="k/x", start_revision=rev - 2)
    r = await expect_error(
        _first(env.lock.Watch(req, metadata=env.md())), grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED"
    )
    assert r.info is not None and int(r.info.metadata["compact_revision"]) == rev


async def test_the_sync_client_iterates_events(env: Env) -> None:
    s = await env.session()
    start = await env.revision()
    await env.acquire("sync/x", s)
    seen: list[tuple[str, str]] = []

    def follow() -> None:
        with SyncClient(env.target, api_key=env.keys["acme"]) as client:
            for event in client.watch("sync/x", start_revision=start):
                seen.append((event.type, event.session_id))
                break  # leaving the loop closes the stream

    await asyncio.wait_for(asyncio.to_thread(follow), 20)
    assert seen == [("GRANTED", s)]


async def test_the_cli_prints_one_json_line_per_event(env: Env) -> None:
    s = await env.session()
    start = await env.revision()
    g = await env.acquire("cli/x", s)
    await env.release("cli/x", g)
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        "watch",
        "cli/x",
        "--start-revision",
        str(start),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(LOCKBROKER_TARGET=env.target, LOCKBROKER_API_KEY=env.keys["acme"]),
    )
    try:
        assert proc.stdout is not None
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(2)]
        os.kill(proc.pid, signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        await stop_process(proc)
    assert [(d["type"], d["name"], d["session_id"], d["fencing_token"]) for d in lines] == [
        ("GRANTED", "cli/x", s, str(g.fencing_token)),
        ("RELEASED", "cli/x", s, str(g.fencing_token)),
    ]


async def test_grpcurl_can_watch(env: Env) -> None:
    s = await env.session()
    start = await env.revision()
    await env.acquire("curl/x", s)
    body = json.dumps({"name": "curl/x", "start_revision": str(start)})
    # A watch never ends by itself: -max-time ends it, with DEADLINE_EXCEEDED (exit 64 + 4).
    out = await grpcurl(
        "-plaintext",
        "-H",
        f"x-api-key: {env.keys['acme']}",
        "-max-time",
        "3",
        "-d",
        body,
        env.target,
        "lockbroker.v1.LockService/Watch",
        expect_rc=68,
    )
    assert "LOCK_EVENT_TYPE_GRANTED" in out and s in out


async def test_one_span_and_one_audit_record_per_watch_not_per_event(
    etcd: EmbeddedEtcd, key_root: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    audit = tmp_path / "audit.jsonl"
    cfg = _with(broker_config(etcd.endpoint, key_root), audit=AuditConfig(file=str(audit)))
    broker = Broker(cfg, tracing=tracing_for(provider, {}))
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            sessions = []
            for _ in range(3):
                req = lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30))
                sessions.append((await stub.CreateSession(req)).session_id)
            call = stub.Watch(lock_pb2.WatchRequest(name="span/x"))
            assert (await call.read()).snapshot
            for s in sessions:  # three grants, two handoffs: each release is classified by reads
                g = (await stub.Acquire(lock_pb2.AcquireRequest(name="span/x", session_id=s))).grant
                await stub.Release(lock_pb2.ReleaseRequest(name="span/x", fencing_token=g.fencing_token, session_id=s))
            events: list[lock_pb2.LockEvent] = []
            while len(events) < 6:
                events.extend((await asyncio.wait_for(call.read(), 10)).events)
            call.cancel()
            await asyncio.sleep(0.3)
    finally:
        await broker.stop(grace=1.0)
    assert [lock_pb2.LockEventType.Name(e.type) for e in events] == [
        "LOCK_EVENT_TYPE_GRANTED",
        "LOCK_EVENT_TYPE_RELEASED",
    ] * 3
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.name.endswith("LockService/Watch")]
    inside = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert len(inside) <= 1, [s.name for s in inside]  # the first read; no span per event
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    watches = [r for r in records if r["method"].endswith("/Watch") and r.get("stage") != "RequestReceived"]
    assert len(watches) == 1 and watches[0]["lock"] == "span/x", watches


async def test_a_lapsed_ttl_is_expired_and_max_hold_is_revoked_with_its_reason(env: Env) -> None:
    start = await env.revision()
    short = str(
        (
            await env.lock.CreateSession(
                lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=2)), metadata=env.md()
            )
        ).session_id
    )
    await env.acquire("e/ttl", short)  # nobody refreshes it: it lapses
    held = await env.session()
    req = lock_pb2.AcquireRequest(name="e/hold", session_id=held, max_hold=duration_pb2.Duration(seconds=2))
    await env.lock.Acquire(req, metadata=env.md())
    w = Watcher(env, "e/", prefix=True, start_revision=start)
    try:
        events = await w.until(4, timeout=20)
    finally:
        await w.close()
    ended = {e.name: e for e in events if e.type != "GRANTED"}
    assert (ended["e/ttl"].type, ended["e/ttl"].session_id) == ("EXPIRED", short)
    assert (ended["e/hold"].type, ended["e/hold"].reason) == ("REVOKED", ErrorReason.MAX_HOLD_EXCEEDED)


async def test_watches_count_against_max_streams(etcd: EmbeddedEtcd, key_root: str) -> None:
    cfg = _with(broker_config(etcd.endpoint, key_root), quota=TenantQuota(max_streams=1))
    broker = Broker(cfg)
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            stub: Any = lock_pb2_grpc.LockServiceStub(ch)
            first = stub.Watch(lock_pb2.WatchRequest(name="m/x"))
            assert (await first.read()).snapshot
            r = await expect_error(
                _first(stub.Watch(lock_pb2.WatchRequest(name="m/y"))),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "QUOTA_EXCEEDED",
            )
            assert r.info is not None and r.info.metadata["limit"] == "max_streams"
            first.cancel()

            async def second_opens() -> bool:
                try:
                    return bool((await stub.Watch(lock_pb2.WatchRequest(name="m/y")).read()).snapshot)
                except aio.AioRpcError:
                    return False

            assert await eventually(second_opens, 5, "a watch once the first one ended")
    finally:
        await broker.stop(grace=1.0)


async def test_the_memory_backend_answers_unimplemented(tmp_path: Path) -> None:
    async with served(tmp_path, names=("acme",)) as s:
        with pytest.raises(aio.AioRpcError) as ei:
            await _first(s.stub.Watch(lock_pb2.WatchRequest(name="x"), metadata=s.md("acme")))
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
