from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.v1 import lock_pb2
from tests.etcdutil import EtcdProbe


async def test_session_acquire_release(stub, probe: EtcdProbe) -> None:
    s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=10)))
    r = await stub.Acquire(lock_pb2.AcquireRequest(name="orders/42", session_id=s.session_id, owner="t1"))
    assert r.grant.fencing_token > 0
    assert len(await probe.keys("/t/default/l/")) == 1
    with pytest.raises(aio.AioRpcError) as ei:
        s2 = await stub.CreateSession(lock_pb2.CreateSessionRequest())
        await stub.Acquire(lock_pb2.AcquireRequest(name="orders/42", session_id=s2.session_id))
    assert ei.value.code() == grpc.StatusCode.ABORTED
    rel = await stub.Release(lock_pb2.ReleaseRequest(name="orders/42", fencing_token=r.grant.fencing_token))
    assert rel.released
    assert await probe.keys("/t/default/l/") == []
