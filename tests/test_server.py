"""The broker as a server: health, reflection, graceful shutdown, and a client process that dies.

All against real etcd. The outage tests get a private etcd (never the shared one), since they kill it.
The broker under test runs on this test's event loop, so every blocking client call here goes
through asyncio.to_thread or a child process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lockbroker.server.app import Broker
from lockbroker.server.config import ConfigError, RetryConfig
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig, EtcdStartError
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.procutil import (
    LossyProxy,
    assert_unavailable,
    clean_env,
    rich_error,
    stop_process,
    wait_until,
)

SERVICE = "lockbroker.v1.LockService"
HEALTH = "grpc.health.v1.Health"
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
LOCK_METHODS = {
    "CreateSession",
    "KeepAlive",
    "Refresh",
    "CloseSession",
    "Acquire",
    "AcquireMany",
    "Release",
    "Describe",
    "List",
    "CheckFence",
    "Session",
    "Watch",
}


def secs(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n)


async def check(channel: aio.Channel, service: str) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


class HealthWatch:
    """A grpc.health.v1 Watch stream, read in the background into `statuses`."""

    def __init__(self, channel: aio.Channel, service: str) -> None:
        self.statuses: list[int] = []
        self.call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
            async for resp in self.call:
                self.statuses.append(int(resp.status))

    async def saw(self, *sequence: int, timeout: float) -> None:
        """Wait until `sequence` appears in order (not necessarily adjacent) among the statuses seen."""

        async def seen() -> bool:
            want = iter(sequence)
            nxt: int | None = next(want)
            for s in self.statuses:
                if s == nxt:
                    nxt = next(want, None)
                    if nxt is None:
                        return True
            return False

        await wait_until(seen, timeout, f"health Watch to show {sequence} (saw {self.statuses})")

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- health -----------------------------------------------------------------------------------


async def test_health_check_serving(channel: aio.Channel) -> None:
    assert await check(channel, "") == SERVING
    assert await check(channel, SERVICE) == SERVING
    with pytest.raises(aio.AioRpcError) as ei:
        await check(channel, "no.such.Service")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def private_etcd(tmp_path: Path) -> AsyncIterator[EmbeddedEtcd]:
    """An etcd of this test alone: the outage tests kill, stop and freeze it."""
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()  # also continues a paused etcd and reaps a killed one


@pytest.fixture
async def private_broker(private_etcd: EmbeddedEtcd, key_root: str) -> AsyncIterator[Broker]:
    b = Broker(broker_config(private_etcd.endpoint, key_root))
    await b.start()
    try:
        yield b
    finally:
        await b.stop(grace=1.0)


@pytest.mark.parametrize("outage", ["kill", "stop", "pause"])
async def test_health_follows_etcd_outage_and_recovery(
    outage: str, private_etcd: EmbeddedEtcd, private_broker: Broker
) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{private_broker.port}") as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)
        assert await check(ch, "") == SERVING
        assert await check(ch, SERVICE) == SERVING
        watches = [HealthWatch(ch, ""), HealthWatch(ch, SERVICE)]
        try:
            for w in watches:
                await w.saw(SERVING, timeout=5)
            held = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(60), owner="held"), timeout=10)
            first = await stub.Acquire(
                lock_pb2.AcquireRequest(name="outage/lock", session_id=held.session_id), timeout=10
            )

            # -- etcd goes away
            if outage == "kill":
                private_etcd.kill()
            elif outage == "stop":
                await private_etcd.stop()
            else:
                private_etcd.pause()

            async def not_serving() -> bool:
                return await check(ch, "") == NOT_SERVING and await check(ch, SERVICE) == NOT_SERVING

            await wait_until(not_serving, 10, "health Check to say NOT_SERVING after the etcd outage")
            for w in watches:
                await w.saw(SERVING, NOT_SERVING, timeout=5)

            with pytest.raises(aio.AioRpcError) as ei:
                await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(10)), timeout=15)
            assert_unavailable(ei.value, "BACKEND_UNAVAILABLE")
            with pytest.raises(aio.AioRpcError) as ei:
                # No session given: the broker must create one in etcd, which is down.
                await stub.Acquire(lock_pb2.AcquireRequest(name="outage/other", ttl=secs(10)), timeout=15)
            assert_unavailable(ei.value, "BACKEND_UNAVAILABLE")

            # -- etcd comes back on the same port and data dir
            if outage == "kill":
                await private_etcd.restart()
            elif outage == "stop":
                await private_etcd.start()
            else:
                private_etcd.resume()

            async def serving() -> bool:
                return await check(ch, "") == SERVING and await check(ch, SERVICE) == SERVING

            await wait_until(serving, 15, "health Check to say SERVING again after etcd came back")
            for w in watches:
                await w.saw(SERVING, NOT_SERVING, SERVING, timeout=5)
        finally:
            for w in watches:
                await w.close()

        # Calls work again, and what was held before the outage still is.
        await stub.Refresh(lock_pb2.RefreshRequest(session_id=held.session_id), timeout=10)
        d = await stub.Describe(lock_pb2.DescribeRequest(name="outage/lock"), timeout=10)
        assert d.holder.session_id == held.session_id
        assert d.holder.fencing_token == first.grant.fencing_token
        # A blocking Acquire needs etcd's watch stream, which the outage broke: hand the lock over.
        other = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(30)), timeout=10)
        waiter = asyncio.ensure_future(
            stub.Acquire(
                lock_pb2.AcquireRequest(name="outage/lock", session_id=other.session_id, wait_timeout=secs(15)),
                timeout=30,
            )
        )
        try:

            async def queued() -> bool:
                desc = await stub.Describe(lock_pb2.DescribeRequest(name="outage/lock"), timeout=10)
                return len(desc.waiters) == 1

            await wait_until(queued, 10, "the second Acquire to queue")
            rel = await stub.Release(
                lock_pb2.ReleaseRequest(name="outage/lock", fencing_token=first.grant.fencing_token), timeout=10
            )
            assert rel.released
            second = await asyncio.wait_for(waiter, 10)
        finally:
            waiter.cancel()
        assert second.grant.session_id == other.session_id
        assert second.grant.fencing_token > first.grant.fencing_token


async def test_waiter_cut_off_by_etcd_outage_leaves_nothing_queued(
    private_etcd: EmbeddedEtcd, private_broker: Broker, key_root: str
) -> None:
    """lock.proto: "A failed, timed-out or cancelled Acquire leaves nothing queued behind it."

    A waiter answered UNAVAILABLE because etcd died must not stay queued once etcd is back: else the
    holder's next Release hands the lock to a session whose owner was told it did not get it.
    """
    async with aio.insecure_channel(f"127.0.0.1:{private_broker.port}") as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)
        holder = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(60)), timeout=10)
        other = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(60)), timeout=10)
        grant = await stub.Acquire(lock_pb2.AcquireRequest(name="outage/q", session_id=holder.session_id), timeout=10)
        waiter = asyncio.ensure_future(
            stub.Acquire(
                lock_pb2.AcquireRequest(
                    name="outage/q", session_id=other.session_id, wait_timeout=secs(30), request_id="waiter-1"
                ),
                timeout=60,
            )
        )
        try:

            async def queued() -> bool:
                d = await stub.Describe(lock_pb2.DescribeRequest(name="outage/q"), timeout=10)
                return len(d.waiters) == 1

            await wait_until(queued, 10, "the waiter to queue")
            private_etcd.kill()
            with pytest.raises(aio.AioRpcError) as ei:
                await asyncio.wait_for(waiter, 20)
            assert_unavailable(ei.value, "BACKEND_UNAVAILABLE")
        finally:
            waiter.cancel()
        await private_etcd.restart()

        async def serving() -> bool:
            return await check(ch, SERVICE) == SERVING

        await wait_until(serving, 15, "SERVING after etcd came back")
        # The other session stays alive, as a client holding other locks would keep it.
        await stub.Refresh(lock_pb2.RefreshRequest(session_id=other.session_id), timeout=10)
        probe = EtcdProbe(private_etcd.endpoint, key_root)
        try:
            holder_key = f"{key_root}/t/default/l/outage/q#{holder.session_id}".encode()

            async def only_holder_queued() -> bool:
                return await probe.keys("/t/default/l/") == [holder_key]

            await wait_until(
                only_holder_queued,
                10,
                "the failed waiter's queue entry to be removed after etcd recovered (it is still queued, so "
                "the holder's Release would grant the lock to a session that was told UNAVAILABLE)",
                interval=0.2,
            )
        finally:
            await probe.close()
        await stub.Release(
            lock_pb2.ReleaseRequest(name="outage/q", fencing_token=grant.grant.fencing_token), timeout=10
        )
        d = await stub.Describe(lock_pb2.DescribeRequest(name="outage/q"), timeout=10)
        assert not d.HasField("holder"), f"lock granted to {d.holder.session_id} after its Acquire failed"


async def test_retry_on_another_replica_keeps_its_grant_after_the_first_recovers(
    etcd: EmbeddedEtcd, key_root: str, broker: Broker, probe: EtcdProbe
) -> None:
    """lock.proto: retrying Acquire with the same request_id on another replica "returns the same grant
    ... it never yields a second grant".

    Replica B1 loses etcd's replies (a partition): its Acquire is applied in etcd but B1 cannot know,
    answers UNAVAILABLE and keeps trying to clean up in the background. The client retries on replica
    B2 with the same request_id and gets the grant. When B1 reaches etcd again its clean-up must not
    delete that grant: else the lock is free while the client holds it, and a second caller gets it.
    """
    proxy = LossyProxy("127.0.0.1", etcd.client_port)
    await proxy.start()
    cfg = broker_config(proxy.endpoint, key_root)
    b1 = Broker(dataclasses.replace(cfg, retry=RetryConfig(max_attempts=1)))
    await b1.start()
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{b1.port}") as ch1,
            aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch2,
        ):
            b1_stub = lock_pb2_grpc.LockServiceStub(ch1)
            b2_stub = lock_pb2_grpc.LockServiceStub(ch2)
            mine = await b2_stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(60), owner="w"), timeout=10)
            await b1_stub.Describe(lock_pb2.DescribeRequest(name="split/lock"), timeout=10)  # B1 <-> etcd is up
            req = lock_pb2.AcquireRequest(
                name="split/lock", session_id=mine.session_id, request_id="split-1", wait_timeout=secs(10), owner="w"
            )

            proxy.drop_replies = True
            with pytest.raises(aio.AioRpcError) as ei:
                await b1_stub.Acquire(req, timeout=30)
            assert_unavailable(ei.value, "BACKEND_UNAVAILABLE")
            entries = await probe.kvs("/t/default/l/")
            assert len(entries) == 1, "the premise: B1's Acquire reached etcd although B1 got no reply"

            granted = await b2_stub.Acquire(req, timeout=30)  # the documented retry, on another replica
            assert granted.grant.fencing_token == entries[0].create_revision

            proxy.drop_replies = False
            proxy.cut()

            async def b1_back() -> bool:
                return await check(ch1, SERVICE) == SERVING

            await wait_until(b1_back, 15, "B1 to reach etcd again")
            # Give B1's background clean-up several of its retry intervals (at most 2 s each).
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                assert await probe.keys("/t/default/l/") == [entries[0].key], (
                    "B1's clean-up deleted the grant that the retry on B2 returned: the lock is free while "
                    "its holder believes it holds it"
                )
                await asyncio.sleep(0.2)

            other = await b2_stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(30), owner="x"), timeout=10)
            with pytest.raises(aio.AioRpcError) as ei:
                second = await b2_stub.Acquire(
                    lock_pb2.AcquireRequest(name="split/lock", session_id=other.session_id), timeout=10
                )
                raise AssertionError(
                    f"a second grant (token {second.grant.fencing_token}) while token "
                    f"{granted.grant.fencing_token} is held"
                )
            assert ei.value.code() == grpc.StatusCode.ABORTED
            rel = await b2_stub.Release(
                lock_pb2.ReleaseRequest(name="split/lock", fencing_token=granted.grant.fencing_token), timeout=10
            )
            assert rel.released
    finally:
        await b1.stop(grace=0.5)
        await proxy.close()


# -- reflection ------------------------------------------------------------------------------


def _reflect(target: str) -> tuple[list[str], dict[str, tuple[str, str, bool, bool]]]:
    with grpc.insecure_channel(target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = list(db.get_services())
        svc = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE)
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in svc.methods
        }
    return services, methods


async def test_reflection_lists_and_describes(broker: Broker) -> None:
    services, methods = await asyncio.to_thread(_reflect, f"127.0.0.1:{broker.port}")
    assert SERVICE in services
    assert HEALTH in services
    assert set(methods) == LOCK_METHODS
    assert len(methods) == len(LOCK_METHODS) == 12
    assert methods["AcquireMany"] == (
        "lockbroker.v1.AcquireManyRequest",
        "lockbroker.v1.AcquireManyResponse",
        False,
        False,
    )
    assert "lockbroker.v1.AdminService" in services
    assert methods["Acquire"] == ("lockbroker.v1.AcquireRequest", "lockbroker.v1.AcquireResponse", False, False)
    assert methods["KeepAlive"] == ("lockbroker.v1.KeepAliveRequest", "lockbroker.v1.KeepAliveResponse", True, True)
    assert methods["Session"] == ("lockbroker.v1.SessionRequest", "lockbroker.v1.SessionResponse", True, True)


# -- graceful shutdown -----------------------------------------------------------------------


async def test_graceful_shutdown_ends_waiters_and_keeps_holders(
    etcd: EmbeddedEtcd, key_root: str, probe: EtcdProbe
) -> None:
    grace = 2.0
    b = Broker(broker_config(etcd.endpoint, key_root))
    await b.start()
    stopped = False
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            holder = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(30), owner="holder"), timeout=10)
            grant = await stub.Acquire(
                lock_pb2.AcquireRequest(name="drain/lock", session_id=holder.session_id), timeout=10
            )
            sessions = [
                await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(30), owner=f"w{i}"), timeout=10)
                for i in range(3)
            ]
            waiters = [
                asyncio.ensure_future(
                    stub.Acquire(
                        lock_pb2.AcquireRequest(
                            name="drain/lock", session_id=s.session_id, wait_timeout=secs(30), owner=f"w{i}"
                        ),
                        timeout=60,
                    )
                )
                for i, s in enumerate(sessions)
            ]

            async def all_queued() -> bool:
                return len(await probe.keys("/t/default/l/drain/lock#")) == 4

            await wait_until(all_queued, 10, "the holder and 3 waiters in etcd")
            watch = HealthWatch(ch, "")
            await watch.saw(SERVING, timeout=5)

            t0 = time.monotonic()
            stop_task = asyncio.create_task(b.stop(grace=grace))
            results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), grace + 5)
            waiters_done = time.monotonic() - t0
            await asyncio.wait_for(stop_task, grace + 5)
            stopped = True
            stop_took = time.monotonic() - t0
            await watch.close()

        for r in results:
            assert_unavailable(r, "SHUTTING_DOWN")  # answered by the broker, not cut off by the server
        assert waiters_done < grace + 1, f"waiters answered after {waiters_done:.2f}s"
        assert stop_took <= grace + 2, f"stop took {stop_took:.2f}s with grace {grace}"
        assert NOT_SERVING in watch.statuses, watch.statuses

        # The waiters' queue entries are gone; the holder's grant and every client session remain.
        assert await probe.keys("/t/default/l/") == [f"{key_root}/t/default/l/drain/lock#{holder.session_id}".encode()]
        session_keys = await probe.keys("/t/default/s/")
        assert len(session_keys) == 4, session_keys
    finally:
        if not stopped:
            await b.stop(grace=0.5)

    # A new broker on the same etcd sees the same holder, and the lock still works.
    b2 = Broker(broker_config(etcd.endpoint, key_root))
    await b2.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b2.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            d = await stub.Describe(lock_pb2.DescribeRequest(name="drain/lock"), timeout=10)
            assert d.holder.session_id == holder.session_id
            assert d.holder.fencing_token == grant.grant.fencing_token
            assert list(d.waiters) == []
            with pytest.raises(aio.AioRpcError) as ei:
                await stub.Acquire(
                    lock_pb2.AcquireRequest(name="drain/lock", session_id=sessions[0].session_id), timeout=10
                )
            assert ei.value.code() == grpc.StatusCode.ABORTED
            rich = rich_error(ei.value)
            assert rich.error_info is not None and rich.error_info.reason == "LOCK_HELD"
            rel = await stub.Release(
                lock_pb2.ReleaseRequest(name="drain/lock", fencing_token=grant.grant.fencing_token), timeout=10
            )
            assert rel.released
            assert await probe.keys("/t/default/l/") == []
    finally:
        await b2.stop(grace=1.0)


async def test_graceful_shutdown_ends_keepalive_streams(etcd: EmbeddedEtcd, key_root: str, probe: EtcdProbe) -> None:
    """A client's KeepAlive stream is told SHUTTING_DOWN at once; it does not hold stop() for the grace period.

    lock.proto: every error carries an ErrorInfo, and a draining broker answers SHUTTING_DOWN with a
    RetryInfo. A stream the server merely cancels at the end of the grace period gets neither.
    """
    grace = 5.0
    b = Broker(broker_config(etcd.endpoint, key_root))
    await b.start()
    stopped = False
    try:
        async with aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(30)), timeout=10)
            stream = stub.KeepAlive()
            await stream.write(lock_pb2.KeepAliveRequest(session_id=s.session_id))
            first = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(first, lock_pb2.KeepAliveResponse)
            assert first.session_id == s.session_id and not first.expired

            t0 = time.monotonic()
            stop_task = asyncio.create_task(b.stop(grace=grace))
            with pytest.raises(aio.AioRpcError) as ei:
                await asyncio.wait_for(stream.read(), grace + 5)
            ended = time.monotonic() - t0
            await asyncio.wait_for(stop_task, grace + 5)
            stopped = True
            stop_took = time.monotonic() - t0
        assert_unavailable(ei.value, "SHUTTING_DOWN")
        assert ended < grace - 1, f"the KeepAlive stream was only ended by the grace period ({ended:.2f}s)"
        assert stop_took < grace - 1, f"stop() waited {stop_took:.2f}s of a {grace}s grace for an idle stream"
        assert await probe.keys("/t/default/s/") == [f"{key_root}/t/default/s/{s.session_id}".encode()]
    finally:
        if not stopped:
            await b.stop(grace=0.5)


async def test_second_broker_cannot_bind_a_port_in_use(etcd: EmbeddedEtcd, key_root: str) -> None:
    """Two brokers must never share one listen address: with SO_REUSEPORT the kernel would split
    clients between them, and two embedded-etcd brokers would each grant the same lock."""
    cfg = broker_config(etcd.endpoint, key_root)
    first = Broker(cfg)
    await first.start()
    taken = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen=f"127.0.0.1:{first.port}"))
    second = Broker(taken)
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await second.start()
            raise AssertionError(
                f"a second broker started on 127.0.0.1:{first.port}, which the first broker is serving"
            )
        async with aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            assert await check(ch, SERVICE) == SERVING
    finally:
        await second.stop(grace=0.5)
        await first.stop(grace=0.5)


# -- a client process that dies --------------------------------------------------------------

HOLDER_SCRIPT = r"""
import sys, time
import grpc
from google.protobuf import duration_pb2
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

stub = lock_pb2_grpc.LockServiceStub(grpc.insecure_channel(sys.argv[1]))
s = stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=3), owner="doomed"), timeout=10)
g = stub.Acquire(lock_pb2.AcquireRequest(name="jobs/x", session_id=s.session_id, owner="doomed"), timeout=10)
print(g.grant.fencing_token, s.session_id, flush=True)
print("HELD", flush=True)
while True:
    time.sleep(1)
    stub.Refresh(lock_pb2.RefreshRequest(session_id=s.session_id), timeout=5)
"""


async def test_killed_client_process_frees_its_lock(broker: Broker, stub, probe: EtcdProbe, tmp_path: Path) -> None:
    ttl = 3
    with (tmp_path / "client.err").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLDER_SCRIPT,
            f"127.0.0.1:{broker.port}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=clean_env(),
        )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(30):
                while "HELD" not in lines:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    lines.append(line.decode().strip())
        except TimeoutError:
            pass
        assert "HELD" in lines, f"client never held the lock: {lines} {(tmp_path / 'client.err').read_text()}"
        token_text, session_id = lines[0].split()
        token = int(token_text)
        d = await stub.Describe(lock_pb2.DescribeRequest(name="jobs/x"))
        assert (d.holder.session_id, d.holder.fencing_token) == (session_id, token)
        # Outlive a few of its refreshes, so it is the refreshing that stops, not the first TTL.
        await asyncio.sleep(ttl + 0.5)
        assert (await stub.Describe(lock_pb2.DescribeRequest(name="jobs/x"))).holder.session_id == session_id

        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await proc.wait()
    finally:
        await stop_process(proc)

    mine = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=secs(10), owner="survivor"))
    got = await stub.Acquire(
        lock_pb2.AcquireRequest(name="jobs/x", session_id=mine.session_id, wait_timeout=secs(15), owner="survivor"),
        timeout=30,
    )
    after = time.monotonic() - killed_at
    assert after <= ttl + 4, f"the dead client's lock was freed {after:.1f}s after the kill (TTL {ttl}s)"
    assert got.grant.session_id == mine.session_id
    assert got.grant.fencing_token > token
    assert await probe.keys("/t/default/l/") == [f"{probe.root.decode()}/t/default/l/jobs/x#{mine.session_id}".encode()]
    with pytest.raises(aio.AioRpcError) as ei:
        await stub.Refresh(lock_pb2.RefreshRequest(session_id=session_id))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    rich = rich_error(ei.value)
    assert rich.error_info is not None and rich.error_info.reason == "SESSION_NOT_FOUND"


# -- the embedded etcd, spawned from a process busy with gRPC ---------------------------------


async def test_embedded_etcd_child_reaches_exec_while_grpc_is_busy(broker: Broker, stub, tmp_path: Path) -> None:
    """EmbeddedEtcd must get its child to exec() even while this process is busy with gRPC.

    That is the situation of every test that restarts an etcd under a running broker. Python code run
    between fork() and exec() (a preexec_fn) in a process whose gRPC threads are working makes the child
    die now and then (SIGSEGV/SIGABRT) before it ever runs etcd. A stand-in binary that only records
    that it ran makes each attempt cheap; the count of records must equal the count of spawns.
    """
    spawns = 120
    mark = tmp_path / "spawned"
    fake = tmp_path / "fake-etcd"
    fake.write_text(f'#!/bin/sh\necho ran >> "{mark}"\n')
    fake.chmod(0o755)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            with contextlib.suppress(aio.AioRpcError):
                await stub.Describe(lock_pb2.DescribeRequest(name="busy/lock"), timeout=5)

    load = [asyncio.create_task(busy()) for _ in range(4)]
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", binary=str(fake), start_timeout=5))
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(spawns):
            with pytest.raises(EtcdStartError) as ei:
                await server.start()  # the stand-in exits at once: "exited with status 0"
            outcomes[str(ei.value).split(" before", 1)[0]] += 1
    finally:
        stop.set()
        await asyncio.gather(*load)
        await server.stop()
    ran = len(mark.read_text().splitlines()) if mark.exists() else 0
    assert ran == spawns, f"{spawns - ran} of {spawns} children died before exec: {dict(outcomes)}"
