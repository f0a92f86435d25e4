"""Issue 15 over a real etcd, a real broker and a real channel: CheckFence, ownership, AdminService.

Tenants: "ops" has the admin role (a cluster admin), "acme" has two API keys (two principals of
one tenant). Every call is audited to a file the tests read back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.client import Client, PermissionDenied
from lockbroker.server.admin_service import FORCE_RELEASED_METHOD
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuditConfig, AuthConfig, Config
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from lockbroker.v1.reasons import ErrorReason
from tests.conftest import broker_config
from tests.lockutil import expect_error, wait_waiters
from tests.test_grpcurl import field, grpcurl


def _with(cfg: Config, **sections: Any) -> Config:
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **sections})


class Env:
    def __init__(self, broker: Broker, audit: Path, keys: dict[str, str], channel: aio.Channel) -> None:
        self.broker = broker
        self.audit = audit
        self.keys = keys
        self.channel = channel
        self.lock: Any = lock_pb2_grpc.LockServiceStub(channel)
        self.admin: Any = lock_pb2_grpc.AdminServiceStub(channel)

    def md(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.keys[who]),)

    def records(self, method: str) -> list[dict[str, Any]]:
        lines = self.audit.read_text().splitlines() if self.audit.exists() else []
        # One record per call: the ResponseComplete stage (mutating calls also have a RequestReceived one).
        return [
            r
            for r in map(json.loads, lines)
            if r["method"].endswith("/" + method) and r.get("stage") != "RequestReceived"
        ]

    async def session(self, who: str, ttl: int = 10) -> str:
        req = lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=ttl), owner=who)
        return str((await self.lock.CreateSession(req, metadata=self.md(who))).session_id)

    async def acquire(self, who: str, name: str, session_id: str, wait: float = 0) -> lock_pb2.Grant:
        req = lock_pb2.AcquireRequest(name=name, session_id=session_id)
        if wait:
            req.wait_timeout.FromSeconds(int(wait))
        grant: lock_pb2.Grant = (await self.lock.Acquire(req, metadata=self.md(who))).grant
        return grant


@pytest.fixture
async def env(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[Env]:
    tfile = tmp_path / "tenants.toml"
    keys = {"ops": tenants.add_tenant(tfile, "ops", admin=True), "acme": tenants.add_tenant(tfile, "acme")}
    keys["acme2"] = tenants.add_key(tfile, "acme")  # a second principal of the same tenant
    audit = tmp_path / "audit.jsonl"
    cfg = _with(broker_config(etcd.endpoint, key_root), auth=AuthConfig(str(tfile)), audit=AuditConfig(file=str(audit)))
    b = Broker(cfg)
    await b.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            yield Env(b, audit, keys, ch)
    finally:
        await b.stop(grace=1.0)


# -- CheckFence ----------------------------------------------------------------------------------


async def test_check_fence_current_then_stale(env: Env) -> None:
    s1, s2 = await env.session("acme"), await env.session("acme")
    g1 = await env.acquire("acme", "fence/a", s1)
    md = env.md("acme")
    check = env.lock.CheckFence
    r = await check(lock_pb2.CheckFenceRequest(name="fence/a", fencing_token=g1.fencing_token), metadata=md)
    assert (r.status, r.current_fencing_token) == (lock_pb2.FENCE_STATUS_CURRENT, g1.fencing_token)
    rel = lock_pb2.ReleaseRequest(name="fence/a", fencing_token=g1.fencing_token, session_id=s1)
    await env.lock.Release(rel, metadata=md)
    g2 = await env.acquire("acme", "fence/a", s2)
    r = await check(lock_pb2.CheckFenceRequest(name="fence/a", fencing_token=g1.fencing_token), metadata=md)
    assert (r.status, r.current_fencing_token) == (lock_pb2.FENCE_STATUS_STALE, g2.fencing_token)
    # Another tenant's namespace holds no such lock: its answer is about its own "fence/a".
    r = await check(lock_pb2.CheckFenceRequest(name="fence/a", fencing_token=g2.fencing_token), metadata=env.md("ops"))
    assert (r.status, r.current_fencing_token) == (lock_pb2.FENCE_STATUS_STALE, 0)
    bad = await expect_error(
        check(lock_pb2.CheckFenceRequest(name="fence/a"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorReason.INVALID_ARGUMENT,
    )
    assert [v.field for v in bad.bad_request.field_violations] == ["fencing_token"]  # type: ignore[union-attr]


async def test_python_client_check_fence(env: Env) -> None:
    async with Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["acme"]) as client:
        async with client.lock("fence/py", ttl=10, wait=1) as held:
            fence = await client.check_fence("fence/py", held.fencing_token)
            assert fence.current and fence.current_fencing_token == held.fencing_token
        after = await client.check_fence("fence/py", held.fencing_token)
        assert not after.current and after.current_fencing_token == 0


# -- ownership -------------------------------------------------------------------------------------


async def test_cross_session_release_is_refused_and_audited(env: Env) -> None:
    mine, other = await env.session("acme"), await env.session("acme")
    g = await env.acquire("acme", "own/a", mine)
    md = env.md("acme")
    r = await expect_error(
        env.lock.Release(
            lock_pb2.ReleaseRequest(name="own/a", fencing_token=g.fencing_token, session_id=other), metadata=md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        ErrorReason.NOT_OWNER,
    )
    assert dict(r.info.metadata) == {"lock": "own/a"}  # type: ignore[union-attr]
    # Without a session id, another principal of the same tenant cannot release it either.
    await expect_error(
        env.lock.Release(
            lock_pb2.ReleaseRequest(name="own/a", fencing_token=g.fencing_token), metadata=env.md("acme2")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        ErrorReason.NOT_OWNER,
    )
    d = await env.lock.Describe(lock_pb2.DescribeRequest(name="own/a"), metadata=md)
    assert d.holder.fencing_token == g.fencing_token, "a refused release released nothing"
    # The principal that made the grant may still omit the session id (older clients).
    ok = await env.lock.Release(lock_pb2.ReleaseRequest(name="own/a", fencing_token=g.fencing_token), metadata=md)
    assert ok.released
    refused = [r for r in env.records("Release") if r["outcome"]["code"] == "PERMISSION_DENIED"]
    assert [r["outcome"]["reason"] for r in refused] == ["NOT_OWNER", "NOT_OWNER"]
    assert {r["principal"]["id"] for r in refused} == {_key_id(env.keys["acme"]), _key_id(env.keys["acme2"])}


async def test_session_calls_of_another_principal_are_refused(env: Env) -> None:
    s = await env.session("acme")
    other = env.md("acme2")
    await expect_error(
        env.lock.Refresh(lock_pb2.RefreshRequest(session_id=s), metadata=other),
        grpc.StatusCode.PERMISSION_DENIED,
        ErrorReason.NOT_OWNER,
    )
    await expect_error(
        env.lock.CloseSession(lock_pb2.CloseSessionRequest(session_id=s), metadata=other),
        grpc.StatusCode.PERMISSION_DENIED,
        ErrorReason.NOT_OWNER,
    )
    stream = env.lock.KeepAlive(metadata=other)
    try:
        await stream.write(lock_pb2.KeepAliveRequest(session_id=s))
        assert (await stream.read()).expired, "another principal's session is never refreshed for it"
    finally:
        stream.cancel()
    assert (await env.lock.Refresh(lock_pb2.RefreshRequest(session_id=s), metadata=env.md("acme"))).ttl.seconds > 0


# -- AdminService --------------------------------------------------------------------------------


async def test_admin_calls_need_the_admin_role(env: Env) -> None:
    s = await env.session("acme")
    await env.acquire("acme", "adm/x", s)
    md = env.md("acme")
    for call in (
        env.admin.ForceRelease(lock_pb2.ForceReleaseRequest(name="adm/x", reason="r"), metadata=md),
        env.admin.RevokeSession(lock_pb2.RevokeSessionRequest(session_id=s, reason="r"), metadata=md),
        env.admin.ListSessions(lock_pb2.ListSessionsRequest(), metadata=md),
    ):
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, ErrorReason.PERMISSION_DENIED)
    d = await env.lock.Describe(lock_pb2.DescribeRequest(name="adm/x"), metadata=md)
    assert d.holder.session_id == s, "a refused admin call changed nothing"
    async with Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["acme"]) as client:
        with pytest.raises(PermissionDenied):
            await client.admin.force_release("adm/x", reason="not mine to take")


async def test_force_release_revokes_the_holder_within_one_keepalive(env: Env) -> None:
    ttl = 3  # keepalive every ttl/3 = 1 s
    async with (
        Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["acme"]) as holder,
        Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["ops"]) as ops,
        holder.lock("adm/force", ttl=ttl, wait=1) as held,
    ):
        waiter_session = await env.session("acme", ttl=10)
        waiting = asyncio.create_task(env.acquire("acme", "adm/force", waiter_session, wait=20))
        await wait_waiters(_Tenant(env.lock, env.md("acme")), "adm/force", 1)
        t0 = time.monotonic()
        out = await ops.admin.force_release("adm/force", reason="wedged, INC-42", tenant="acme")
        assert out.released and out.fencing_token == held.fencing_token and out.session_id == held.session_id
        await asyncio.wait_for(held.lost.wait(), timeout=ttl / 3 + 2)
        assert time.monotonic() - t0 <= ttl / 3 + 2
        assert held.lost_cause == ErrorReason.REVOKED
        assert "wedged, INC-42" in (held.lost_reason or "")
        assert not held.session.lost.is_set(), "only the grant was revoked, not the session"
        nxt = await asyncio.wait_for(waiting, 10)
        assert nxt.fencing_token > held.fencing_token, "the next grant is fenced above the revoked one"
        fence = await holder.check_fence("adm/force", held.fencing_token)
        assert not fence.current and fence.current_fencing_token == nxt.fencing_token
    [rec] = [r for r in env.records("ForceRelease") if r["outcome"]["code"] == "OK"]
    assert rec["tenant"] == "ops" and rec["principal"]["kind"] == "api-key"
    assert rec["adminReason"] == "wedged, INC-42" and rec["lock"] == "adm/force"


async def test_revoke_session_tells_the_client_revoked(env: Env) -> None:
    async with (
        Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["acme"]) as holder,
        Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["ops"]) as ops,
        holder.session(ttl=3) as session,
        holder.lock("adm/rs", session=session, wait=1) as held,
    ):
        assert await ops.admin.revoke_session(session.session_id, reason="runaway", tenant="acme")
        await asyncio.wait_for(held.lost.wait(), timeout=3)
        assert session.lost_cause == ErrorReason.REVOKED and held.lost_cause == ErrorReason.REVOKED
        assert "runaway" in (session.lost_reason or "")
        assert not await ops.admin.revoke_session(session.session_id, reason="again", tenant="acme")
    await expect_error(
        env.lock.Refresh(lock_pb2.RefreshRequest(session_id=session.session_id), metadata=env.md("acme")),
        grpc.StatusCode.NOT_FOUND,
        ErrorReason.REVOKED,
    )
    rec = [r for r in env.records("RevokeSession") if r["outcome"]["code"] == "OK"]
    assert [r["adminReason"] for r in rec] == ["runaway", "again"]


async def test_list_sessions_pages_with_locks(env: Env) -> None:
    a, b = await env.session("acme"), await env.session("acme2")
    g = await env.acquire("acme", "ls/one", a)
    md = env.md("ops")
    page = await env.admin.ListSessions(lock_pb2.ListSessionsRequest(tenant="acme"), metadata=md)
    by_id = {s.session_id: s for s in page.sessions}
    assert set(by_id) == {a, b} and page.next_page_token == ""
    assert [(h.name, h.fencing_token) for h in by_id[a].held] == [("ls/one", g.fencing_token)]
    assert by_id[a].owner == "acme" and by_id[a].ttl.seconds == 10
    assert by_id[a].principal.startswith("api-key:") and by_id[a].principal != by_id[b].principal
    assert by_id[a].last_keepalive.seconds <= by_id[a].expires_at.seconds
    own = await env.admin.ListSessions(lock_pb2.ListSessionsRequest(), metadata=md)
    assert list(own.sessions) == [], "unset tenant: the admin's own (ops has none)"
    async with Client(f"127.0.0.1:{env.broker.port}", api_key=env.keys["ops"]) as ops:
        listed = [s async for s in ops.admin.list_sessions("acme", page_size=1)]
    assert sorted(s.session_id for s in listed) == sorted([a, b])
    await expect_error(
        env.admin.ListSessions(lock_pb2.ListSessionsRequest(tenant="Bad Tenant"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorReason.INVALID_ARGUMENT,
    )
    await expect_error(
        env.admin.ForceRelease(lock_pb2.ForceReleaseRequest(name="ls/one", tenant="acme"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorReason.INVALID_ARGUMENT,
    )


def _key_id(key: str) -> str:
    parsed = tenants.parse_key(key)
    assert parsed is not None
    return parsed[0]


class _Tenant:
    """A LockService stub that sends one tenant's key (for the helpers that take a bare stub)."""

    def __init__(self, stub: Any, md: tuple[tuple[str, str], ...]) -> None:
        self._stub, self._md = stub, md

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda req, **kw: method(req, metadata=self._md, **kw)


async def test_grpcurl_calls_every_admin_rpc(env: Env) -> None:
    s = await env.session("acme")
    g = await env.acquire("acme", "curl/x", s)
    target = f"127.0.0.1:{env.broker.port}"
    admin = ("-plaintext", "-H", f"x-api-key: {env.keys['ops']}")
    listed = json.loads(
        await grpcurl(*admin, "-d", '{"tenant": "acme"}', target, "lockbroker.v1.AdminService/ListSessions")
    )
    assert [field(x, "session_id") for x in listed["sessions"]] == [s]
    body = json.dumps({"name": "curl/x", "tenant": "acme", "reason": "INC-9"})
    forced = json.loads(await grpcurl(*admin, "-d", body, target, "lockbroker.v1.AdminService/ForceRelease"))
    assert forced["released"] is True and field(forced, "fencing_token") == str(g.fencing_token)
    fence = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            f"x-api-key: {env.keys['acme']}",
            "-d",
            json.dumps({"name": "curl/x", "fencing_token": str(g.fencing_token)}),
            target,
            "lockbroker.v1.LockService/CheckFence",
        )
    )
    assert fence["status"] == "FENCE_STATUS_STALE"
    body = json.dumps({"session_id": s, "tenant": "acme", "reason": "INC-9"})
    revoked = json.loads(await grpcurl(*admin, "-d", body, target, "lockbroker.v1.AdminService/RevokeSession"))
    assert revoked == {"revoked": True}


async def test_force_release_of_a_semaphore_revokes_every_permit_and_audits_each(env: Env) -> None:
    """Every permit holder holds: ForceRelease takes them all, each client sees REVOKED, and each
    grant taken has its own audit record (the RPC's record names only the oldest)."""
    ttl, name = 3, "adm/sem"
    target = f"127.0.0.1:{env.broker.port}"
    async with (
        Client(target, api_key=env.keys["acme"]) as c1,
        Client(target, api_key=env.keys["acme"]) as c2,
        Client(target, api_key=env.keys["ops"]) as ops,
        c1.lock(name, ttl=ttl, wait=1, limit=2) as h1,
        c2.lock(name, ttl=ttl, wait=1, limit=2) as h2,
    ):
        waiter_session = await env.session("acme", ttl=10)
        req = lock_pb2.AcquireRequest(name=name, session_id=waiter_session, limit=2)
        req.wait_timeout.FromSeconds(20)
        waiting = asyncio.ensure_future(env.lock.Acquire(req, metadata=env.md("acme")))
        await wait_waiters(_Tenant(env.lock, env.md("acme")), name, 1)
        out = await ops.admin.force_release(name, reason="stuck workers, INC-7", tenant="acme")
        assert out.released and (out.fencing_token, out.session_id) == (h1.fencing_token, h1.session_id)
        for held in (h1, h2):
            await asyncio.wait_for(held.lost.wait(), timeout=ttl / 3 + 2)
            assert held.lost_cause == ErrorReason.REVOKED and "stuck workers, INC-7" in (held.lost_reason or "")
            assert not (await c1.check_fence(name, held.fencing_token)).current
        nxt = (await asyncio.wait_for(waiting, 10)).grant
        assert nxt.fencing_token > h2.fencing_token
        d = await env.lock.Describe(lock_pb2.DescribeRequest(name=name), metadata=env.md("acme"))
        assert [h.fencing_token for h in d.holders] == [nxt.fencing_token]

    def taken() -> list[dict[str, Any]]:
        lines = env.audit.read_text().splitlines() if env.audit.exists() else []
        return [r for r in map(json.loads, lines) if r["method"] == FORCE_RELEASED_METHOD]

    for _ in range(50):  # written in the background, after the answer
        if len(taken()) >= 2:
            break
        await asyncio.sleep(0.1)
    recs = sorted(taken(), key=lambda r: int(r["fencingToken"]))
    assert [(r["fencingToken"], r["session"]) for r in recs] == [
        (str(h1.fencing_token), h1.session_id),
        (str(h2.fencing_token), h2.session_id),
    ]
    for r in recs:
        assert r["tenant"] == "acme" and r["lock"] == name and r["adminReason"] == "stuck workers, INC-7"
        assert r["principal"]["kind"] == "api-key" and r["outcome"]["reason"] == ErrorReason.REVOKED
    [rpc] = [r for r in env.records("ForceRelease") if r["outcome"]["code"] == "OK"]
    assert rpc["tenant"] == "ops" and rpc["lock"] == name
