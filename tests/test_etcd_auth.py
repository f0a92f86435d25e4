"""The broker against an etcd with authentication on: username/password, token on every call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.rpcstatus import error_reason
from lockbroker.server.app import Broker
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd import rpc_pb2_grpc as pb_grpc
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config


async def _enable_auth(endpoint: str, password: str) -> None:
    async with aio.insecure_channel(endpoint.removeprefix("http://")) as ch:
        auth = pb_grpc.AuthStub(ch)
        await auth.RoleAdd(pb.AuthRoleAddRequest(name="root"))
        await auth.UserAdd(pb.AuthUserAddRequest(name="root", password=password))
        await auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.AuthEnable(pb.AuthEnableRequest())


async def test_broker_authenticates_to_etcd(tmp_path: Path, key_root: str) -> None:
    etcd = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd"))
    await etcd.start()
    try:
        await _enable_auth(etcd.endpoint, "s3cret")
        base = broker_config(etcd.endpoint, key_root)
        good = dataclasses.replace(base, etcd=dataclasses.replace(base.etcd, username="root", password="s3cret"))
        broker = Broker(good)
        await broker.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
                stub = lock_pb2_grpc.LockServiceStub(ch)
                s = await stub.CreateSession(lock_pb2.CreateSessionRequest())
                g = await stub.Acquire(lock_pb2.AcquireRequest(name="auth/x", session_id=s.session_id))
                assert g.grant.fencing_token > 0
                rel = await stub.Release(lock_pb2.ReleaseRequest(name="auth/x", fencing_token=g.grant.fencing_token))
                assert rel.released
        finally:
            await broker.stop(grace=1.0)

        # Wrong credentials are the operator's problem: callers see UNAVAILABLE, never a credential detail.
        bad = dataclasses.replace(base, etcd=dataclasses.replace(base.etcd, username="root", password="wrong"))
        broker = Broker(bad)
        await broker.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
                stub = lock_pb2_grpc.LockServiceStub(ch)
                with pytest.raises(aio.AioRpcError) as ei:
                    await stub.CreateSession(lock_pb2.CreateSessionRequest())
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(ei.value.trailing_metadata()) == "BACKEND_UNAVAILABLE"
                assert "wrong" not in (ei.value.details() or "")
        finally:
            await broker.stop(grace=1.0)
    finally:
        await etcd.stop()
