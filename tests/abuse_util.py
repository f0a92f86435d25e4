"""A broker in this process, on the memory backend, with authentication and chosen limits: for the
abuse tests of issue 18 (items 9, 10, 12), which need no etcd."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuditConfig, AuthConfig, Config, LockLimits, ServerConfig
from lockbroker.server.core.quota import TenantQuota
from lockbroker.v1 import lock_pb2_grpc
from tests.overload_util import Refusal, refusal


@dataclass
class Served:
    broker: Broker
    keys: dict[str, str]
    channel: aio.Channel
    stub: Any

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def md(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.keys[tenant]),)


@asynccontextmanager
async def served(
    tmp: Path,
    names: tuple[str, ...] = ("flood", "calm"),
    quota: TenantQuota | None = None,
    audit: AuditConfig | None = None,
    **limits: Any,
) -> AsyncIterator[Served]:
    path = tmp / "tenants.toml"
    keys = {name: tenants.add_tenant(path, name) for name in names}
    cfg = Config(
        server=ServerConfig(listen="127.0.0.1:0", grace_period=1.0, backend="memory"),
        auth=AuthConfig(tenants_file=str(path)),
        limits=dataclasses.replace(LockLimits(), **limits),
        quota=quota or TenantQuota(),
        audit=audit or AuditConfig(),
    )
    broker = Broker(cfg)
    await broker.start()
    channel = aio.insecure_channel(f"127.0.0.1:{broker.port}")
    try:
        yield Served(broker, keys, channel, lock_pb2_grpc.LockServiceStub(channel))
    finally:
        await channel.close()
        await broker.stop(grace=1.0)


async def outcome(call: Any) -> Refusal | None:
    """None if the call succeeded, else what refused it."""
    try:
        await call
    except aio.AioRpcError as err:
        return refusal(err)
    return None
