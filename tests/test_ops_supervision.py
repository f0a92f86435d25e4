"""The broker supervises its embedded etcd; liveness and readiness are separate (issue 16, item 3).

A real `lockbroker serve` whose etcd child is killed with SIGKILL from outside.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from lockbroker.server.embedded import find_etcd_binary, free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.procutil import wait_until
from tests.test_cli import FAST_RECONNECT
from tests.test_ops_signals import serve_in_own_session, started, ttl
from tests.test_server import HealthWatch, check

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "lockbroker.liveness"
READINESS = "lockbroker.readiness"


async def take_lock(stub: Any, name: str) -> int:
    s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(30)), timeout=10)
    g = await stub.Acquire(lock_pb2.AcquireRequest(name=name, session_id=s.session_id), timeout=10)
    return int(g.grant.fencing_token)


async def test_killed_etcd_is_restarted_and_health_follows(tmp_path: Path) -> None:
    health_port = free_port()
    served = await serve_in_own_session(tmp_path, tmp_path / "state", "--health-listen", f"127.0.0.1:{health_port}")
    async with started(served) as b:
        stub = lock_pb2_grpc.LockServiceStub(b.channel)
        first = await take_lock(stub, "sup/a")
        async with aio.insecure_channel(f"127.0.0.1:{health_port}", FAST_RECONNECT) as hch:
            # The plaintext health-only port answers health, and nothing else.
            for name in ("", LIVENESS, READINESS, "lockbroker.v1.LockService"):
                assert await check(b.channel, name) == SERVING, name
                assert await check(hch, name) == SERVING, name
            with pytest.raises(aio.AioRpcError) as ei:
                await lock_pb2_grpc.LockServiceStub(hch).Describe(lock_pb2.DescribeRequest(name="x"), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED

            ready = HealthWatch(hch, READINESS)
            try:
                await ready.saw(SERVING, timeout=10)
                etcd_pid = b.etcd_pid()
                os.kill(etcd_pid, signal.SIGKILL)
                await ready.saw(SERVING, NOT_SERVING, timeout=15)
                # Liveness: the process can still serve; restarting it would not bring etcd back sooner.
                assert await check(hch, LIVENESS) == SERVING
                await ready.saw(SERVING, NOT_SERVING, SERVING, timeout=30)
            finally:
                await ready.close()
        exited = await b.logged("embedded etcd exited; restarting it")
        assert exited["exit_status"] == -signal.SIGKILL and exited["signal"] == "SIGKILL", exited
        await b.logged("embedded etcd restarted")
        assert b.etcd_pid() != etcd_pid
        assert await take_lock(stub, "sup/b") > first  # same data: revisions go on


async def test_broker_exits_non_zero_when_etcd_cannot_come_back(tmp_path: Path) -> None:
    # An etcd that runs once: every later start fails, as a lost disk or a broken binary would.
    marker = tmp_path / "ran-once"
    wrapper = tmp_path / "etcd-once"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{marker}" ] && exit 3\ntouch "{marker}"\nexec {find_etcd_binary()} "$@"\n')
    wrapper.chmod(0o755)
    served = await serve_in_own_session(tmp_path, tmp_path / "state", "--embedded-binary", str(wrapper))
    async with started(served) as b:
        os.kill(b.etcd_pid(), signal.SIGKILL)
        rc = await asyncio.wait_for(served.proc.wait(), 60)
        assert rc == 69, b.log()
        gave_up = [r for r in b.records() if r.get("level") == "critical"]
        assert gave_up and "did not start again after 5 attempts" in gave_up[0]["msg"], b.log()
        failures = [r for r in b.records() if r.get("msg") == "embedded etcd did not start again"]
        assert [r["attempt"] for r in failures] == [1, 2, 3, 4, 5], b.log()
        assert "lockbroker: the embedded etcd exited" in b.log()
        assert "Traceback" not in b.log()


async def test_liveness_and_readiness_while_etcd_is_frozen(tmp_path: Path) -> None:
    async with started(await serve_in_own_session(tmp_path, tmp_path / "state", "--health-interval", "200ms")) as b:
        etcd_pid = b.etcd_pid()
        os.kill(etcd_pid, signal.SIGSTOP)
        try:

            async def not_ready() -> bool:
                return bool(await check(b.channel, READINESS) == NOT_SERVING)

            await wait_until(not_ready, 20, "readiness NOT_SERVING while etcd does not answer")
            assert await check(b.channel, "") == NOT_SERVING
            assert await check(b.channel, LIVENESS) == SERVING
        finally:
            os.kill(etcd_pid, signal.SIGCONT)

        async def ready() -> bool:
            return bool(await check(b.channel, READINESS) == SERVING)

        await wait_until(ready, 20, "readiness SERVING again")
