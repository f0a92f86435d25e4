"""Tenant identity through the real broker: API keys map to tenants, tenants are isolated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lockbroker.interceptors.rpcstatus import error_reason
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig, ConfigError, ServerConfig
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe


@pytest.fixture
async def keyed(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[tuple[Broker, dict[str, str]]]:
    path = tmp_path / "tenants.toml"
    keys = {name: tenants.add_tenant(path, name) for name in ("acme", "globex")}
    cfg = broker_config(etcd.endpoint, key_root)
    b = Broker(type(cfg)(server=cfg.server, etcd=cfg.etcd, limits=cfg.limits, auth=AuthConfig(str(path))))
    await b.start()
    try:
        yield b, keys
    finally:
        await b.stop(grace=1.0)


def _stub(ch: aio.Channel) -> Any:
    return lock_pb2_grpc.LockServiceStub(ch)


async def test_api_keys_map_to_tenant_namespaces(keyed: tuple[Broker, dict[str, str]], probe: EtcdProbe) -> None:
    broker, keys = keyed
    async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        stub = _stub(ch)
        md = {t: (("x-api-key", k),) for t, k in keys.items()}
        s = await stub.CreateSession(lock_pb2.CreateSessionRequest(), metadata=md["acme"])
        req = lock_pb2.AcquireRequest(name="shared/name", session_id=s.session_id)
        g = await stub.Acquire(req, metadata=md["acme"])
        # The session record and the entry, with the quota slots they hold: all under acme's prefix.
        tenants_of_keys = [k.decode().split("/t/")[1].split("/")[0] for k in await probe.keys("/t/")]
        assert tenants_of_keys == ["acme"] * 5
        assert len([k for k in await probe.keys("/t/") if b"/q/" not in k]) == 2

        # The other tenant neither sees nor can release acme's lock, and uses its own namespace.
        d = await stub.Describe(lock_pb2.DescribeRequest(name="shared/name"), metadata=md["globex"])
        assert not d.HasField("holder")
        listed = await stub.List(lock_pb2.ListRequest(), metadata=md["globex"])
        assert list(listed.locks) == []
        rel = await stub.Release(
            lock_pb2.ReleaseRequest(name="shared/name", fencing_token=g.grant.fencing_token), metadata=md["globex"]
        )
        assert not rel.released
        with pytest.raises(aio.AioRpcError) as ei:  # acme's session is not globex's to use
            await stub.Acquire(lock_pb2.AcquireRequest(name="x", session_id=s.session_id), metadata=md["globex"])
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        closed = await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=s.session_id), metadata=md["globex"])
        assert not closed.closed
        g2 = await stub.Acquire(
            lock_pb2.AcquireRequest(name="shared/name", ttl=duration_pb2.Duration(seconds=5)), metadata=md["globex"]
        )
        assert g2.grant.fencing_token > g.grant.fencing_token  # a separate lock: granted at once
        d = await stub.Describe(lock_pb2.DescribeRequest(name="shared/name"), metadata=md["acme"])
        assert d.holder.fencing_token == g.grant.fencing_token


async def test_missing_or_wrong_key_is_unauthenticated_and_health_is_open(
    keyed: tuple[Broker, dict[str, str]], probe: EtcdProbe
) -> None:
    broker, keys = keyed
    wrong = keys["acme"][:-4] + ("AAAA" if not keys["acme"].endswith("AAAA") else "BBBB")
    async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        stub = _stub(ch)
        for md in ((), (("x-api-key", wrong),), (("x-api-key", "garbage"),), (("x-tenant", "acme"),)):
            with pytest.raises(aio.AioRpcError) as ei:
                await stub.CreateSession(lock_pb2.CreateSessionRequest(), metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_reason(ei.value.trailing_metadata()) == "UNAUTHENTICATED"
            assert "acme" not in (ei.value.details() or "")
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert await probe.keys() == []


async def test_remote_listen_needs_authentication_and_tls(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    tenants.add_tenant(path, "acme")
    cfg = broker_config(etcd.endpoint, key_root)
    for auth in (AuthConfig(), AuthConfig(str(path))):
        remote = type(cfg)(server=ServerConfig(listen="0.0.0.0:0"), etcd=cfg.etcd, auth=auth)
        with pytest.raises(ConfigError, match="authentication" if auth.tenants_file is None else "TLS"):
            await Broker(remote).start()
