"""`lockbroker serve` as a real process: embedded etcd, health, signals, refusals, bad flags."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

SERVICE = "lockbroker.v1.LockService"
GRACE = 5.0
# Poll a broker that is still starting without waiting out gRPC's default 1 s reconnect backoff.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
]


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    port: int
    state_dir: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


async def start_serve(tmp: Path, state_dir: Path, *extra: str, name: str = "serve") -> Served:
    port = free_port()
    err_path = tmp / f"{name}.stderr"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--embedded-state-dir",
            str(state_dir),
            "--grace-period",
            str(GRACE),
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=err,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(),
            cwd=tmp,  # a relative default state dir could only land in the test's own directory
        )
    return Served(proc, port, state_dir, err_path)


async def wait_serving(s: Served, channel: aio.Channel, timeout: float = 30) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    async def serving() -> bool:
        if s.proc.returncode is not None:
            raise AssertionError(f"lockbroker exited with {s.proc.returncode} before serving:\n{s.log()}")
        try:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
        except aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    await wait_until(serving, timeout, "lockbroker serve to report SERVING", interval=0.1)


def etcd_children(pid: int) -> list[int]:
    return [p for p, name in children_of(pid) if name.startswith("etcd")]


async def run_cli(tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run `lockbroker ARGS` to completion; (exit code, stderr+stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=clean_env(**(env or {})),
        cwd=tmp,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop_process(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    s = await start_serve(tmp_path, tmp_path / "state")
    try:
        yield s
    finally:
        await stop_process(s.proc, grace=GRACE + 5)


# -- the happy path ----------------------------------------------------------------------------


async def test_serve_embedded_round_trip_then_sigterm(served: Served) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{served.port}", FAST_RECONNECT) as ch:
        await wait_serving(served, ch)
        etcds = etcd_children(served.proc.pid)
        assert len(etcds) == 1, f"expected one embedded etcd child of {served.proc.pid}, found {etcds}"
        etcd_pid = etcds[0]
        assert (served.state_dir / "etcd").is_dir(), "the embedded etcd's data is not under --embedded-state-dir"

        stub = lock_pb2_grpc.LockServiceStub(ch)
        s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30)), timeout=10)
        g = await stub.Acquire(lock_pb2.AcquireRequest(name="cli/job", session_id=s.session_id), timeout=10)
        assert g.grant.fencing_token > 0
        rel = await stub.Release(
            lock_pb2.ReleaseRequest(name="cli/job", fencing_token=g.grant.fencing_token), timeout=10
        )
        assert rel.released

        # Hold the lock again with a waiter behind it: SIGTERM must answer the waiter, not cut it off.
        g2 = await stub.Acquire(lock_pb2.AcquireRequest(name="cli/job", session_id=s.session_id), timeout=10)
        assert g2.grant.fencing_token > g.grant.fencing_token
        other = await stub.CreateSession(
            lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=30)), timeout=10
        )
        waiter = asyncio.ensure_future(
            stub.Acquire(
                lock_pb2.AcquireRequest(
                    name="cli/job", session_id=other.session_id, wait_timeout=duration_pb2.Duration(seconds=30)
                ),
                timeout=60,
            )
        )
        try:

            async def queued() -> bool:
                d = await stub.Describe(lock_pb2.DescribeRequest(name="cli/job"), timeout=10)
                return len(d.waiters) == 1

            await wait_until(queued, 10, "the waiter to queue")

            os.kill(served.proc.pid, signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(aio.AioRpcError) as ei:
                await asyncio.wait_for(waiter, GRACE + 5)
            assert_unavailable(ei.value, "SHUTTING_DOWN")
            rc = await asyncio.wait_for(served.proc.wait(), GRACE + 5)
            took = time.monotonic() - t0
        finally:
            waiter.cancel()

    log = served.log()
    assert rc == 0, f"lockbroker exited {rc} on SIGTERM:\n{log}"
    assert took <= GRACE + 3, f"SIGTERM to exit took {took:.1f}s with a {GRACE}s grace period"
    assert is_gone(etcd_pid), f"the embedded etcd (pid {etcd_pid}) outlived its broker"
    assert "Traceback" not in log, log


async def test_serve_restart_on_same_state_dir_keeps_held_locks(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = await start_serve(tmp_path, state, name="first")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{first.port}", FAST_RECONNECT) as ch:
            await wait_serving(first, ch)
            stub = lock_pb2_grpc.LockServiceStub(ch)
            s = await stub.CreateSession(
                lock_pb2.CreateSessionRequest(ttl=duration_pb2.Duration(seconds=60)), timeout=10
            )
            g = await stub.Acquire(lock_pb2.AcquireRequest(name="cli/kept", session_id=s.session_id), timeout=10)
        os.kill(first.proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(first.proc.wait(), GRACE + 5) == 0, first.log()
    finally:
        await stop_process(first.proc, grace=GRACE + 5)

    second = await start_serve(tmp_path, state, name="second")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{second.port}", FAST_RECONNECT) as ch:
            await wait_serving(second, ch)
            stub = lock_pb2_grpc.LockServiceStub(ch)
            d = await stub.Describe(lock_pb2.DescribeRequest(name="cli/kept"), timeout=10)
            assert (d.holder.session_id, d.holder.fencing_token) == (s.session_id, g.grant.fencing_token)
            rel = await stub.Release(
                lock_pb2.ReleaseRequest(name="cli/kept", fencing_token=g.grant.fencing_token), timeout=10
            )
            assert rel.released
        os.kill(second.proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(second.proc.wait(), GRACE + 5) == 0, second.log()
    finally:
        await stop_process(second.proc, grace=GRACE + 5)


async def test_sigkilled_broker_takes_its_embedded_etcd_down(served: Served) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{served.port}", FAST_RECONNECT) as ch:
        await wait_serving(served, ch)
    etcds = etcd_children(served.proc.pid)
    assert len(etcds) == 1, etcds
    os.kill(served.proc.pid, signal.SIGKILL)
    await served.proc.wait()

    async def etcd_gone() -> bool:
        return is_gone(etcds[0])

    # PR_SET_PDEATHSIG: the orphan gets SIGTERM; etcd then shuts down on its own.
    await wait_until(etcd_gone, 15, f"the orphaned embedded etcd (pid {etcds[0]}) to exit")


# -- refusals ----------------------------------------------------------------------------------


async def test_serve_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    rc, out = await run_cli(
        tmp_path, "serve", "--listen", f"0.0.0.0:{free_port()}", "--embedded-state-dir", str(tmp_path / "state")
    )
    assert rc == 2, out
    assert "authentication" in out, out
    assert "0.0.0.0" in out, out
    assert "Traceback" not in out, out
    # Refused before anything was started: no etcd data was created.
    assert not (tmp_path / "state" / "etcd").exists()


async def test_serve_with_missing_etcd_binary_fails_clearly(tmp_path: Path) -> None:
    rc, out = await run_cli(
        tmp_path,
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--embedded-state-dir",
        str(tmp_path / "state"),
        "--embedded-binary",
        "/nonexistent",
    )
    assert rc != 0, out
    assert "/nonexistent" in out, out
    assert "does not exist" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--limits-max-ttl", "abc"], {}, "--limits-max-ttl"),
        (["--grace-period", "soon"], {}, "--grace-period"),
        ([], {"LOCKBROKER_LIMITS_DEFAULT_TTL": "ten"}, "LOCKBROKER_LIMITS_DEFAULT_TTL"),
        (["--limits-min-ttl", "1"], {}, "min_ttl"),
    ],
)
async def test_serve_rejects_bad_setting_with_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    rc, text = await run_cli(
        tmp_path,
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--embedded-state-dir",
        str(tmp_path / "state"),
        *args,
        env=env,
    )
    assert rc == 2, text
    assert named in text, text
    assert "Traceback" not in text, text
    assert not (tmp_path / "state" / "etcd").exists(), "a bad setting must be refused before etcd starts"


async def test_unknown_flag_is_a_usage_error(tmp_path: Path) -> None:
    rc, out = await run_cli(tmp_path, "serve", "--no-such-flag")
    assert rc == 2, out
    assert "--no-such-flag" in out, out
