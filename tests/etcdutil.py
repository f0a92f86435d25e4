"""Direct etcd access for tests: see exactly which keys and leases a call left behind."""

from __future__ import annotations

from grpc import aio

from lockbroker.server.core.names import prefix_end
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd import rpc_pb2_grpc as pb_grpc


class EtcdProbe:
    def __init__(self, endpoint: str, key_root: str) -> None:
        self.root = key_root.encode()
        self.channel = aio.insecure_channel(endpoint.removeprefix("http://"))
        self.kv = pb_grpc.KVStub(self.channel)
        self.lease = pb_grpc.LeaseStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def keys(self, sub: str = "") -> list[bytes]:
        start = self.root + sub.encode()
        resp = await self.kv.Range(pb.RangeRequest(key=start, range_end=prefix_end(start), keys_only=True))
        return [kv.key for kv in resp.kvs]

    async def kvs(self, sub: str = "") -> list[pb.KeyValue]:
        start = self.root + sub.encode()
        resp = await self.kv.Range(pb.RangeRequest(key=start, range_end=prefix_end(start)))
        return list(resp.kvs)

    async def lease_ttl(self, lease_id: int) -> int:
        resp = await self.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id))
        return resp.TTL

    async def revoke(self, lease_id: int) -> None:
        await self.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id))

    async def revision(self) -> int:
        resp = await self.kv.Range(pb.RangeRequest(key=b"\0", count_only=True))
        return resp.header.revision

    async def leases(self) -> set[int]:
        resp = await self.lease.LeaseLeases(pb.LeaseLeasesRequest())
        return {ls.ID for ls in resp.leases}
