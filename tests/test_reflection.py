"""The API driven purely through server reflection, as grpcurl does, but in Python.

No lockbroker.v1 generated code is used here: every descriptor comes from the broker's reflection
service (grpc_reflection's ProtoReflectionDescriptorDatabase) into a private DescriptorPool, and the
message classes are built from it. A client in any language with a reflection client can do the
same. (tests/test_grpcurl.py drives the grpcurl binary; this one proves the descriptors themselves
are complete enough to build working message classes, including the imported well-known types.)
A refusal's trailer is read with lockbroker.client's status decoder, but its lockbroker.v1 detail
is unpacked with a class built from reflection.

The reflection client is synchronous, so every call runs in a worker thread: the broker under test
serves on this test's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lockbroker.client.errors import rich_status
from lockbroker.server.app import Broker
from tests.etcdutil import EtcdProbe

SERVICE = "lockbroker.v1.LockService"


class ReflectedService:
    """LockService as a reflection client sees it: descriptors fetched from the server, JSON in and out."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        self.service = self.pool.FindServiceByName(SERVICE)

    def close(self) -> None:
        self.channel.close()

    def method(self, name: str) -> MethodDescriptor:
        return self.service.methods_by_name[name]

    def message(self, full_name: str) -> type[Message]:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def call(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        method = self.method(name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict(body, request_class(), descriptor_pool=self.pool)
        rpc = self.channel.unary_unary(
            f"/{self.service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = rpc(request, timeout=15)
        return json_format.MessageToDict(response, preserving_proto_field_name=True, descriptor_pool=self.pool)


async def test_reflection_alone_drives_a_session_and_a_lock(broker: Broker, probe: EtcdProbe) -> None:
    svc = await asyncio.to_thread(ReflectedService, f"127.0.0.1:{broker.port}")
    try:
        services = await asyncio.to_thread(svc.db.get_services)
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services

        # The descriptors live in our own pool, not in the default pool that the generated code
        # (imported elsewhere in this process) registers into.
        create_session = svc.method("CreateSession")
        assert svc.pool is not descriptor_pool.Default()
        assert create_session.input_type.file.pool is svc.pool
        assert create_session.input_type.file.name == "lockbroker/v1/lock.proto"
        keep_alive = svc.method("KeepAlive")
        assert keep_alive.client_streaming and keep_alive.server_streaming
        assert set(svc.service.methods_by_name) == {
            "CreateSession",
            "KeepAlive",
            "Refresh",
            "CloseSession",
            "Acquire",
            "AcquireMany",
            "Release",
            "Describe",
            "List",
            "Session",
            "CheckFence",
            "Watch",
        }
        # The idempotency levels travel with the descriptors, for clients that decide retries by them.
        levels = {m.name: m.GetOptions().idempotency_level for m in svc.service.methods}
        assert {name for name, level in levels.items() if level} == {
            "Refresh",
            "CloseSession",
            "Describe",
            "List",
            "CheckFence",
            "Watch",
        }
        assert (
            levels["Describe"] == levels["List"] == levels["CheckFence"] == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
        )
        assert levels["Refresh"] == levels["CloseSession"] == descriptor_pb2.MethodOptions.IDEMPOTENT

        # Durations and timestamps: the well-known types came over reflection too, and JSON maps them.
        session = await asyncio.to_thread(svc.call, "CreateSession", {"ttl": "10s", "owner": "reflection"})
        session_id = session["session_id"]
        assert len(session_id) == 16
        assert session["ttl"] == "10s"
        assert session["expires_at"].endswith("Z")
        other = await asyncio.to_thread(svc.call, "CreateSession", {"ttl": "10s", "owner": "other"})

        name = "reflection/job"
        acquired = await asyncio.to_thread(
            svc.call, "Acquire", {"name": name, "session_id": session_id, "owner": "reflection", "request_id": "r-1"}
        )
        grant = acquired["grant"]
        token = int(grant["fencing_token"])
        assert grant["session_id"] == session_id
        kvs = await probe.kvs("/t/default/l/")
        assert [kv.key for kv in kvs] == [f"{probe.root.decode()}/t/default/l/{name}#{session_id}".encode()]
        assert token == kvs[0].create_revision, "the fencing token is the grant key's create revision"

        described = await asyncio.to_thread(svc.call, "Describe", {"name": name})
        assert described["holder"]["session_id"] == session_id
        assert int(described["holder"]["fencing_token"]) == token
        assert described["holder"]["owner"] == "reflection"

        # The refusal's NotAcquired detail is unpacked with a class built from reflection as well.
        refused = await asyncio.to_thread(_refused, svc, {"name": name, "session_id": other["session_id"]})
        assert refused.code() == grpc.StatusCode.ABORTED
        rich = rich_status(refused, strict=True)
        assert rich is not None
        # The status as sent, details still packed: unpacked here with reflection's classes.
        by_type = {detail.TypeName(): detail for detail in rich.status.details}
        info = error_details_pb2.ErrorInfo()
        assert by_type["google.rpc.ErrorInfo"].Unpack(info)
        assert info.reason == "LOCK_HELD"
        not_acquired = svc.message("lockbroker.v1.NotAcquired")()
        assert by_type["lockbroker.v1.NotAcquired"].Unpack(not_acquired)
        detail = json_format.MessageToDict(not_acquired, preserving_proto_field_name=True)
        assert detail["name"] == name
        assert int(detail["holder"]["fencing_token"]) == token

        released = await asyncio.to_thread(
            svc.call, "Release", {"name": name, "fencing_token": str(token), "session_id": session_id}
        )
        assert released == {"released": True}
        assert await probe.keys("/t/default/l/") == []

        for sid in (session_id, other["session_id"]):
            closed = await asyncio.to_thread(svc.call, "CloseSession", {"session_id": sid})
            assert closed == {"closed": True}
        assert await probe.keys() == []
    finally:
        await asyncio.to_thread(svc.close)


def _refused(svc: ReflectedService, body: dict[str, Any]) -> grpc.Call:
    try:
        answer = svc.call("Acquire", body)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return err
    raise AssertionError(f"a try-lock on a held lock succeeded: {answer}")
