"""Signals to a real `lockbroker serve` (issue 16, item 2).

The broker runs in a session of its own, so a signal to its process group is what a Ctrl-C at
its terminal would send: the broker and everything in its group, but not the embedded etcd,
which leads a group of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from lockbroker.server.auth import tenants
from lockbroker.server.embedded import free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.procutil import (
    assert_unavailable,
    children_of,
    clean_env,
    is_gone,
    lockbroker_command,
    stop_process,
    wait_until,
)
from tests.test_cli import FAST_RECONNECT, GRACE, Served, wait_serving


@dataclass
class Broker:
    served: Served
    channel: aio.Channel

    @property
    def stub(self) -> Any:
        return lock_pb2_grpc.LockServiceStub(self.channel)

    @property
    def pid(self) -> int:
        return self.served.proc.pid

    def log(self) -> str:
        return self.served.log()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.log().splitlines() if ln.startswith("{")]

    async def logged(self, msg: str, timeout: float = 20) -> dict[str, Any]:
        async def seen() -> bool:
            return any(r.get("msg") == msg for r in self.records())

        await wait_until(seen, timeout, f"log line {msg!r}", interval=0.1)
        return next(r for r in reversed(self.records()) if r.get("msg") == msg)

    def etcd_pid(self) -> int:
        etcds = [p for p, name in children_of(self.pid) if name.startswith("etcd")]
        assert len(etcds) == 1, etcds
        return etcds[0]


async def serve_in_own_session(
    tmp: Path, state: Path, *extra: str, name: str = "serve", env: dict[str, str] | None = None
) -> Served:
    port = free_port()
    err_path = tmp / f"{name}.stderr"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--embedded-state-dir",
            str(state),
            "--grace-period",
            str(GRACE),
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=err,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(**(env or {})),
            cwd=tmp,
            start_new_session=True,  # its own group: killpg(pid) is a terminal's Ctrl-C
        )
    return Served(proc, port, state, err_path)


@contextlib.asynccontextmanager
async def started(served: Served) -> AsyncIterator[Broker]:
    try:
        async with aio.insecure_channel(f"127.0.0.1:{served.port}", FAST_RECONNECT) as ch:
            await wait_serving(served, ch)
            yield Broker(served, ch)
    finally:
        await stop_process(served.proc, grace=GRACE + 5)


def ttl(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


async def hold_with_waiter(stub: Any, name: str, md: Any = None) -> tuple[Any, asyncio.Future[Any]]:
    holder = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(60)), timeout=10, metadata=md)
    g = await stub.Acquire(lock_pb2.AcquireRequest(name=name, session_id=holder.session_id), timeout=10, metadata=md)
    other = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(60)), timeout=10, metadata=md)
    waiter = asyncio.ensure_future(
        stub.Acquire(
            lock_pb2.AcquireRequest(name=name, session_id=other.session_id, wait_timeout=ttl(50)),
            timeout=55,
            metadata=md,
        )
    )

    async def queued() -> bool:
        d = await stub.Describe(lock_pb2.DescribeRequest(name=name), timeout=10, metadata=md)
        return len(d.waiters) == 1

    await wait_until(queued, 15, "the waiter to queue")
    return g, waiter


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    async with started(await serve_in_own_session(tmp_path, tmp_path / "state")) as b:
        yield b


async def test_ctrl_c_to_the_group_drains_waiters_and_leaves_no_queue_entry(broker: Broker, tmp_path: Path) -> None:
    etcd_pid = broker.etcd_pid()
    assert os.getpgid(etcd_pid) != os.getpgid(broker.pid), "the embedded etcd must lead its own process group"
    g, waiter = await hold_with_waiter(broker.stub, "sig/x")
    try:
        os.killpg(broker.pid, signal.SIGINT)  # what Ctrl-C at the broker's terminal sends
        with pytest.raises(aio.AioRpcError) as ei:
            await asyncio.wait_for(waiter, GRACE + 10)
        assert_unavailable(ei.value, "SHUTTING_DOWN")  # answered by the drain, not SESSION_LOST
        rc = await asyncio.wait_for(broker.served.proc.wait(), GRACE + 10)
    finally:
        waiter.cancel()
    assert rc == 0, broker.log()
    assert "Traceback" not in broker.log()
    await broker.logged("signal received; draining")

    async def etcd_gone() -> bool:
        return is_gone(etcd_pid)

    await wait_until(etcd_gone, 15, "the embedded etcd to be stopped after the drain")

    # The next start on the same data: the holder is still there, the waiter's entry is not.
    async with started(await serve_in_own_session(tmp_path, tmp_path / "state", name="again")) as again:
        d = await again.stub.Describe(lock_pb2.DescribeRequest(name="sig/x"), timeout=10)
        assert d.holder.fencing_token == g.grant.fencing_token
        assert list(d.waiters) == []


async def test_a_second_sigint_exits_at_once(broker: Broker) -> None:
    etcd_pid = broker.etcd_pid()
    _, waiter = await hold_with_waiter(broker.stub, "sig/y")
    os.kill(etcd_pid, signal.SIGSTOP)  # the drain cannot finish: it needs etcd to remove the entry
    try:
        os.kill(broker.pid, signal.SIGINT)
        await broker.logged("signal received; draining")
        os.kill(broker.pid, signal.SIGINT)
        rc = await asyncio.wait_for(broker.served.proc.wait(), GRACE)
        assert rc == 128 + signal.SIGINT, broker.log()
        assert (await broker.logged("second signal; exiting without draining"))["signal"] == "SIGINT"
    finally:
        waiter.cancel()
        os.kill(etcd_pid, signal.SIGCONT)  # it was sent SIGTERM on the way out; let it act on it

    async def etcd_gone() -> bool:
        return is_gone(etcd_pid)

    await wait_until(etcd_gone, 15, "the embedded etcd to stop")


async def test_sighup_reloads_tenants_and_log_level_without_dropping_calls(tmp_path: Path) -> None:
    tenants_file = tmp_path / "tenants.toml"
    acme_key = tenants.add_tenant(tenants_file, "acme")
    conf = tmp_path / "lockbroker.toml"
    conf.write_text(f'[server]\nlog_level = "info"\n[auth]\ntenants_file = "{tenants_file}"\n')
    served = await serve_in_own_session(tmp_path, tmp_path / "state", "--config", str(conf))
    acme = (("x-api-key", acme_key),)
    async with aio.insecure_channel(f"127.0.0.1:{served.port}", FAST_RECONNECT) as ch:
        stub = lock_pb2_grpc.LockServiceStub(ch)

        async def serving() -> bool:
            if served.proc.returncode is not None:
                raise AssertionError(served.log())
            try:
                await stub.Describe(lock_pb2.DescribeRequest(name="hup/x"), timeout=2, metadata=acme)
            except aio.AioRpcError:
                return False
            return True

        try:
            await wait_until(serving, 30, "the broker to serve acme", interval=0.1)
            b = Broker(served, ch)
            beta_key = tenants.add_tenant(tenants_file, "beta")
            beta = (("x-api-key", beta_key),)
            with pytest.raises(aio.AioRpcError) as ei:
                await stub.Describe(lock_pb2.DescribeRequest(name="hup/x"), timeout=10, metadata=beta)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED

            g, waiter = await hold_with_waiter(stub, "hup/x", acme)  # in flight across the reload
            conf.write_text(conf.read_text().replace('"info"', '"debug"'))
            os.kill(served.proc.pid, signal.SIGHUP)
            line = await b.logged("reloaded on SIGHUP")
            assert line["reloaded"] == ["log_level", "tenants", "tenants_file"], line
            assert line["log_level"] == "debug" and line["tenants"] == 2, line

            d = await stub.Describe(lock_pb2.DescribeRequest(name="hup/x"), timeout=10, metadata=beta)
            assert not d.HasField("holder")  # beta's own namespace: its key works without a restart

            # The waiter queued before the reload is still waiting, and gets the lock.
            assert not waiter.done()
            await stub.Release(
                lock_pb2.ReleaseRequest(name="hup/x", fencing_token=g.grant.fencing_token), timeout=10, metadata=acme
            )
            got = await asyncio.wait_for(waiter, 20)
            assert got.grant.fencing_token > g.grant.fencing_token

            # A broken tenants file on reload keeps the old one.
            tenants_file.write_text("this is [ not toml")
            os.kill(served.proc.pid, signal.SIGHUP)
            bad = await b.logged("reload: keeping the previous tenants file")
            assert str(tenants_file) in bad["error"], bad
            await stub.Describe(lock_pb2.DescribeRequest(name="hup/x"), timeout=10, metadata=beta)
            assert served.proc.returncode is None
            assert "Traceback" not in served.log()
        finally:
            await stop_process(served.proc, grace=GRACE + 5)
