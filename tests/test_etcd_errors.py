"""What a caller is told when etcd cannot serve (issue 18, items 11 and 13), through a real broker
on its own etcd, and how the embedded etcd bounds its growth."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from lockbroker.server.app import Broker
from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.backend import WatchInterrupted
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd import rpc_pb2_grpc as pb_grpc
from lockbroker.server.etcd.client import EtcdClient
from lockbroker.server.etcd.streams import WatchHub
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.lockutil import dur, rich

QUOTA = 4 * 1024 * 1024  # far below etcd's 2 GiB default: filled in a second


@pytest.fixture
async def own_etcd(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[EmbeddedEtcd]:
    extra: tuple[str, ...] = getattr(request, "param", ())
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", start_timeout=10.0, extra_args=extra))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def broker_on(own_etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Broker]:
    config = broker_config(own_etcd.endpoint, key_root)
    b = Broker(dataclasses.replace(config, etcd=dataclasses.replace(config.etcd, request_timeout=1.0)))
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


def _everything_sent(err: aio.AioRpcError) -> str:
    """The message and every trailer the broker sent, details decoded (not the client's own
    debug_error_string, which names the broker it dialled)."""
    parts = [err.details() or ""]
    for key, value in err.trailing_metadata() or ():
        parts.append(f"{key}={value!r}")
    r = rich(err)
    parts += [r.info.reason if r.info else "", *(f"{k}={v}" for k, v in (r.info.metadata if r.info else {}).items())]
    return "\n".join(parts)


# -- item 13 ----------------------------------------------------------------------------------------


async def test_unavailable_tells_the_caller_nothing_about_etcds_address(
    own_etcd: EmbeddedEtcd, broker_on: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lockbroker.etcd")
    await own_etcd.stop()
    async with aio.insecure_channel(f"127.0.0.1:{broker_on.port}") as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.Acquire(lock_pb2.AcquireRequest(name="x", ttl=dur(5)), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    sent = _everything_sent(err)
    assert "etcd is unavailable" in (err.details() or "") or "etcd did not answer" in (err.details() or "")
    for leak in (
        str(own_etcd.client_port),
        "127.0.0.1",
        "ipv4:",
        "debug_error_string",
        "AioRpcError",
        "StatusCode.",
        "Connection refused",
        "failed to connect",
    ):
        assert leak not in sent, f"{leak!r} reached the caller: {sent}"
    # The detail is not lost: the broker's log has it.
    assert any(f"127.0.0.1:{own_etcd.client_port}" in r.getMessage() for r in caplog.records)


# -- item 11 ----------------------------------------------------------------------------------------


async def _fill(endpoint: str) -> None:
    """Put big values under a key the broker does not use until etcd raises its NOSPACE alarm."""
    async with aio.insecure_channel(endpoint.removeprefix("http://")) as ch:
        kv = pb_grpc.KVStub(ch)
        value = b"x" * (512 * 1024)
        for i in range(4 * QUOTA // len(value)):  # bounded: the quota is reached long before
            try:
                await kv.Put(pb.PutRequest(key=b"/filler/%d" % i, value=value), timeout=5)
            except aio.AioRpcError as e:
                assert "database space exceeded" in (e.details() or ""), e.details()
                return
        raise AssertionError("etcd never reported NOSPACE")


@pytest.mark.parametrize("own_etcd", [(f"--quota-backend-bytes={QUOTA}",)], indirect=True)
async def test_an_etcd_out_of_space_is_a_clear_status(own_etcd: EmbeddedEtcd, broker_on: Broker) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{broker_on.port}") as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)
        session = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=dur(30)), timeout=5)
        held = await stub.Acquire(lock_pb2.AcquireRequest(name="held", session_id=session.session_id), timeout=5)
        await _fill(own_etcd.endpoint)
        for request in (
            lock_pb2.AcquireRequest(name="x", session_id=session.session_id),  # a queue entry
            lock_pb2.AcquireRequest(name="y", ttl=dur(5)),  # a new session (a lease grant)
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.Acquire(request, timeout=5)
            err = caught.value
            r = rich(err)
            assert (err.code(), r.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_NO_SPACE"), str(r)
            assert "out of space" in (err.details() or "")
            assert r.retry is not None and r.retry.retry_delay.seconds >= 10
        # Refreshing a session writes nothing etcd counts: sessions outlive the alarm.
        refreshed = await stub.Refresh(lock_pb2.RefreshRequest(session_id=session.session_id), timeout=5)
        assert refreshed.ttl.seconds > 0
        # Release writes (it moves the session's release mark): refused the same way ...
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.Release(
                lock_pb2.ReleaseRequest(
                    name="held", session_id=session.session_id, fencing_token=held.grant.fencing_token
                ),
                timeout=5,
            )
        assert rich(caught.value).reason == "BACKEND_NO_SPACE"
        # ... but closing the session revokes its lease, which etcd allows: its locks are freed.
        closed = await stub.CloseSession(lock_pb2.CloseSessionRequest(session_id=session.session_id), timeout=5)
        assert closed.closed
        state = await stub.Describe(lock_pb2.DescribeRequest(name="held"), timeout=5)
        assert not state.HasField("holder")


async def test_the_embedded_etcd_compacts_and_has_a_quota(own_etcd: EmbeddedEtcd) -> None:
    assert own_etcd.pid is not None
    raw = await asyncio.to_thread(Path(f"/proc/{own_etcd.pid}/cmdline").read_bytes)
    argv = raw.decode().split("\0")
    assert "--auto-compaction-mode=revision" in argv
    retention = [a for a in argv if a.startswith("--auto-compaction-retention=")]
    assert retention and int(retention[-1].split("=", 1)[1]) >= 1000
    assert any(a.startswith("--quota-backend-bytes=") for a in argv)


async def test_a_watch_from_a_compacted_revision_asks_for_a_re_read(own_etcd: EmbeddedEtcd) -> None:
    """What compaction can do to the broker: a waiter whose revision was compacted away before its
    watch started is told to read the queue again (WatchInterrupted), not failed."""
    client = EtcdClient(EtcdConfig(endpoints=(own_etcd.endpoint,)))
    hub = WatchHub(client)
    try:
        first = (await client.put(pb.PutRequest(key=b"/q/a#1", value=b"v"))).header.revision
        for _ in range(3):
            latest = (await client.put(pb.PutRequest(key=b"/other", value=b"v"))).header.revision
        # Through etcd's JSON gateway: the broker's etcd API subset has no Compact.
        body = json.dumps({"revision": str(latest), "physical": True}).encode()
        req = urllib.request.Request(f"{own_etcd.endpoint}/v3/kv/compaction", data=body, method="POST")
        await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5).read())
        with pytest.raises(WatchInterrupted, match="compact"):
            await hub.wait_deleted(b"/q/a#", (b"/q/a#1",), first)
    finally:
        await hub.close()
        await client.close()
