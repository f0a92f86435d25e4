"""A Node.js client (tests/node/client.js, @grpc/grpc-js + @grpc/proto-loader) against a real broker.

Proof that lock.proto is the whole contract: the client knows nothing but the .proto, decodes the
rich error details itself, and leaves nothing behind in etcd. Under CI=true a missing node or
missing node_modules fails the run (scripts/bootstrap.sh installs both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig
from lockbroker.server.embedded import EmbeddedEtcd
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.lockutil import dur
from tests.procutil import REPO, clean_env, stop_process

NODE_DIR = REPO / "tests" / "node"


def node_binary(ci: bool) -> str:
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("node is not on PATH")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            missing.append(f"tests/node/node_modules/{package} is missing")
    if missing:
        why = "; ".join(missing) + " (run bash scripts/bootstrap.sh)"
        if ci:
            pytest.fail(why)
        pytest.skip(why)
    assert node is not None
    return node


async def run_client(node: str, *args: str, api_key: str | None = None) -> tuple[int, str, str]:
    env = clean_env()
    env.pop("LOCKBROKER_API_KEY", None)
    if api_key is not None:
        env["LOCKBROKER_API_KEY"] = api_key
    proc = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "client.js"),
        *args,
        cwd=NODE_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop_process(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_node_client_session_acquire_describe_refuse_release(broker: Broker, probe: EtcdProbe, ci: bool) -> None:
    node = node_binary(ci)
    name = "node/orders-42"
    revision_before = await probe.revision()
    leases_before = await probe.leases()

    rc, out, err = await run_client(node, f"127.0.0.1:{broker.port}", name)
    assert rc == 0, f"node client exited {rc}:\nstdout: {out}\nstderr: {err}"
    summary: dict[str, Any] = json.loads(out)

    session_a, session_b = summary["sessions"]
    token = summary["fencing_token"]
    assert isinstance(token, str), "int64 must reach JavaScript as a string (no precision loss)"
    # The token is the etcd create revision of the grant's key: written during this run.
    assert revision_before < int(token) <= await probe.revision()
    assert summary["name"] == name
    assert summary["describe_holder"] == {"session_id": session_a, "fencing_token": token}

    refused = summary["refused"]
    assert refused["code"] == "ABORTED"
    assert refused["reason"] == "LOCK_HELD"
    assert refused["domain"] == "lockbroker"
    assert refused["metadata"]["holder_fencing_token"] == token
    assert refused["metadata"]["holder_owner"] == "node-a"
    assert refused["not_acquired_holder_token"] == token

    # CheckFence from the .proto alone: the token is current while held, stale (lock free) after.
    assert summary["fence"] == {"status": "FENCE_STATUS_CURRENT", "current_fencing_token": token}
    assert summary["fence_after"] == {"status": "FENCE_STATUS_STALE", "current_fencing_token": "0"}

    assert summary["released"] is True
    assert summary["released_again"] is False
    # Issue 17: a shared lock held by both sessions at once, and a semaphore of one permit.
    readers = summary["shared"]["tokens"]
    assert summary["shared"]["holders"] == [[t, "LOCK_MODE_SHARED"] for t in readers]
    sem = summary["semaphore"]
    assert sem["limit"] == 1 and sem["described_limit"] == 1 and sem["holders"] == 1
    assert sem["busy"] == ["ABORTED", "LOCK_HELD"]
    assert sem["other"] == [
        "FAILED_PRECONDITION",
        "LIMIT_MISMATCH",
        {"lock": f"{name}/sem", "limit": "1", "requested": "2"},
    ]
    # Issue 14: a batch of three requests on the Session stream, granted by metadata; each
    # request answered once (alone or batched), both grants released with their tokens.
    stream = summary["stream"]
    assert stream["granted"] == "1"
    assert all(int(t) > 0 for t in stream["tokens"]) and len(set(stream["tokens"])) == 2
    assert stream["keepalive_ttl"] == "10"
    assert 1 <= stream["messages"] <= 3
    assert summary["closed"] == [True, True]

    # Nothing left behind: no lock, queue or session keys under this test's root, and both
    # sessions' leases are revoked (the ids are the lease ids in hex).
    assert await probe.keys() == []
    leases_after = await probe.leases()
    assert {int(session_a, 16), int(session_b, 16)}.isdisjoint(leases_after)
    assert int(session_a, 16) not in leases_before


async def test_node_client_fails_loudly_and_cleans_up(
    broker: Broker, stub: lock_pb2_grpc.LockServiceAsyncStub, probe: EtcdProbe, ci: bool
) -> None:
    """A lock held by someone else makes the client's own Acquire fail: it exits 1, names the
    status, and still closes the sessions it created (so a green run above means real checks ran)."""
    node = node_binary(ci)
    name = "node/taken"
    held = await stub.Acquire(lock_pb2.AcquireRequest(name=name, ttl=dur(10), owner="python"))
    keys_before = await probe.keys()

    rc, out, err = await run_client(node, f"127.0.0.1:{broker.port}", name)
    assert rc == 1, f"expected exit 1, got {rc}:\nstdout: {out}\nstderr: {err}"
    assert out == ""
    assert "10 ABORTED" in err, err
    # Only the Python holder's keys remain: the client's two sessions were closed on the way out.
    assert await probe.keys() == keys_before
    released = await stub.Release(
        lock_pb2.ReleaseRequest(name=name, fencing_token=held.grant.fencing_token, session_id=held.grant.session_id)
    )
    assert released.released
    assert await probe.keys() == []


async def test_node_client_sends_the_api_key(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path, ci: bool) -> None:
    """With authentication on, the client's LOCKBROKER_API_KEY goes out as x-api-key: the same run
    passes with the key, and fails UNAUTHENTICATED without it."""
    node = node_binary(ci)
    tenants_file = tmp_path / "tenants.toml"
    key = tenants.add_tenant(str(tenants_file), "acme")
    cfg = broker_config(etcd.endpoint, key_root)
    b = Broker(dataclasses.replace(cfg, auth=AuthConfig(tenants_file=str(tenants_file))))
    await b.start()
    try:
        target = f"127.0.0.1:{b.port}"
        rc, out, err = await run_client(node, target, "node/keyed")
        assert rc == 1, f"without a key: exit {rc}\nstdout: {out}\nstderr: {err}"
        assert "16 UNAUTHENTICATED" in err, err
        rc, out, err = await run_client(node, target, "node/keyed", api_key=key)
        assert rc == 0, f"with the key: exit {rc}\nstdout: {out}\nstderr: {err}"
        assert json.loads(out)["released"] is True
    finally:
        await b.stop(grace=1.0)
