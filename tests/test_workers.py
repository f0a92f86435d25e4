"""`lockbroker serve --workers 2` as a real process on its embedded etcd (issue 14, item 6).

Which worker serves a connection is the kernel's choice (SO_REUSEPORT hashes each new
connection), so the tests open channels until both workers hold some, and learn which worker
holds which connection from /proc: the server end of each connection is a socket inode in
exactly one worker's fd table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lockbroker.server import workers as workers_mod
from lockbroker.server.config import Config, ServerConfig
from lockbroker.server.embedded import free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.procutil import children_of, is_gone, stop_process, wait_until
from tests.test_cli import FAST_RECONNECT, GRACE, Served, run_cli, start_serve

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net/tcp: Linux only")


# -- which worker holds which connection ----------------------------------------------------


def _conns(pid: int, port: int) -> set[int]:
    """Remote ports of the established connections to `port` whose server end `pid` holds."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], f[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                found.add(int(remote.rsplit(":", 1)[1], 16))
    return found


# Channels to one target share one connection unless each has its own subchannel pool.
OWN_CONNECTION = [*FAST_RECONNECT, ("grpc.use_local_subchannel_pool", 1)]


def ttl(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class Workers:
    def __init__(self, served: Served, pids: list[int]) -> None:
        self.served = served
        self.pids = pids
        self.channels: list[aio.Channel] = []

    @property
    def port(self) -> int:
        return self.served.port

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.served.log().splitlines() if ln.startswith("{")]

    async def channel_on(self) -> tuple[aio.Channel, int]:
        """A new connected channel and the pid of the worker that holds its connection."""
        before = {pid: _conns(pid, self.port) for pid in self.pids}
        ch = aio.insecure_channel(f"127.0.0.1:{self.port}", OWN_CONNECTION)
        self.channels.append(ch)
        await lock_pb2_grpc.LockServiceStub(ch).CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(30)), timeout=10)
        new = [pid for pid in self.pids if _conns(pid, self.port) - before[pid]]
        assert len(new) == 1, (new, before)
        return ch, new[0]

    async def spread(self, per_worker: int) -> dict[int, list[aio.Channel]]:
        """At least `per_worker` channels on every worker (each new connection lands on either)."""
        on: dict[int, list[aio.Channel]] = {pid: [] for pid in self.pids}
        for _ in range(60):
            if all(len(chs) >= per_worker for chs in on.values()):
                return on
            ch, pid = await self.channel_on()
            on[pid].append(ch)
        raise AssertionError(f"60 connections did not reach every worker: { {p: len(c) for p, c in on.items()} }")

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


async def parent_serving(served: Served, timeout: float = 60) -> dict[str, Any]:
    """The parent's "lockbroker serving" line: every worker serves."""

    def line() -> dict[str, Any] | None:
        for ln in served.log().splitlines():
            if ln.startswith("{"):
                rec: dict[str, Any] = json.loads(ln)
                if rec.get("msg") == "lockbroker serving" and rec.get("worker") == "parent":
                    return rec
        return None

    async def seen() -> bool:
        if served.proc.returncode is not None:
            raise AssertionError(f"lockbroker exited with {served.proc.returncode}:\n{served.log()}")
        return line() is not None

    await wait_until(seen, timeout, "every worker to serve", interval=0.1)
    rec = line()
    assert rec is not None
    return rec


@contextlib.asynccontextmanager
async def workers(tmp: Path, *extra: str) -> AsyncIterator[Workers]:
    served = await start_serve(tmp, tmp / "state", "--workers", "2", *extra)
    w: Workers | None = None
    try:
        rec = await parent_serving(served)
        assert len(rec["pids"]) == 2
        w = Workers(served, rec["pids"])
        yield w
    finally:
        if w is not None:
            await w.close()
        await stop_process(served.proc, grace=GRACE + 15)


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _completed_create(record: dict[str, Any]) -> bool:
    return str(record.get("method", "")).endswith("CreateSession") and record.get("stage") == "ResponseComplete"


# -- tests ----------------------------------------------------------------------------------


async def test_both_workers_serve_metrics_and_audit_count_every_call(tmp_path: Path) -> None:
    metrics_port = free_port()
    audit = tmp_path / "audit.jsonl"
    async with workers(tmp_path, "--metrics-listen", f"127.0.0.1:{metrics_port}", "--audit-file", str(audit)) as w:
        on = await w.spread(per_worker=3)  # one CreateSession per channel
        calls = sum(len(chs) for chs in on.values())
        assert all(len(chs) >= 3 for chs in on.values())
        assert {r.get("worker") for r in w.records() if r.get("msg") == "lockbroker serving"} == {0, 1, "parent"}

        # One scrape of the parent counts the calls of both workers.
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
        served = metric_sum(body, "grpc_server_handled_total", grpc_method="CreateSession", grpc_code="OK")
        assert served == calls, body
        assert "lockbroker_state_up 1.0" in body  # the parent's etcd read

        # Both workers append to one audit file: whole lines, one per call.
        async def audited() -> bool:
            lines = audit.read_bytes().splitlines() if audit.exists() else []
            done = [json.loads(ln) for ln in lines]
            return sum(_completed_create(r) for r in done) >= calls

        await wait_until(audited, 10, f"{calls} CreateSession audit records")
        records = [json.loads(ln) for ln in audit.read_bytes().splitlines()]  # every line parses
        # One ResponseComplete record per call (each also has a RequestReceived one: docs/audit.md).
        assert sum(_completed_create(r) for r in records) == calls

        # A second broker on the same port is refused, with one worker or with several.
        for extra in ((), ("--workers", "2")):
            code, out = await run_cli(
                tmp_path,
                "serve",
                "--listen",
                f"127.0.0.1:{w.port}",
                "--embedded-state-dir",
                str(tmp_path / f"other{len(extra)}"),
                *extra,
                timeout=60,
            )
            assert code == 2, out
            assert f"cannot listen on 127.0.0.1:{w.port}" in out, out


async def test_a_port_in_use_stops_workers_before_they_start(tmp_path: Path) -> None:
    with socket.socket() as other:  # any program listening there, not only a broker
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, out = await run_cli(
            tmp_path,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--embedded-state-dir",
            str(tmp_path / "s"),
            timeout=60,
        )
    assert code == 2, out
    assert f"--listen: cannot listen on 127.0.0.1:{port}: address already in use" in out, out
    assert "worker started" not in out


async def test_locks_are_exclusive_and_fifo_across_workers(tmp_path: Path) -> None:
    async with workers(tmp_path) as w:
        on = await w.spread(per_worker=2)
        a, b = (lock_pb2_grpc.LockServiceStub(chs[0]) for chs in on.values())
        a2, b2 = (lock_pb2_grpc.LockServiceStub(chs[1]) for chs in on.values())

        async def session(stub: Any) -> str:
            resp = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(60)), timeout=10)
            return str(resp.session_id)

        holder = await session(a)
        first = await a.Acquire(lock_pb2.AcquireRequest(name="fifo", session_id=holder), timeout=10)
        # A try-lock from the other worker is refused while it is held.
        other = await session(b)
        with pytest.raises(grpc.RpcError):
            await b.Acquire(lock_pb2.AcquireRequest(name="fifo", session_id=other, wait_timeout=ttl(0.2)), timeout=10)

        # Waiters queue from alternating workers; each is queued before the next asks.
        order: list[tuple[str, int]] = []
        waits: list[asyncio.Task[None]] = []
        for i, stub in enumerate((b, a2, b2)):
            sid = await session(stub)

            async def wait(stub: Any = stub, sid: str = sid, i: int = i) -> None:
                req = lock_pb2.AcquireRequest(name="fifo", session_id=sid, wait_timeout=ttl(40))
                g = await stub.Acquire(req, timeout=45)
                order.append((f"w{i}", g.grant.fencing_token))
                rel = lock_pb2.ReleaseRequest(name="fifo", session_id=sid, fencing_token=g.grant.fencing_token)
                await stub.Release(rel, timeout=10)

            waits.append(asyncio.create_task(wait()))

            async def queued(n: int = i + 1) -> bool:
                d = await a.Describe(lock_pb2.DescribeRequest(name="fifo"), timeout=5)
                return len(d.waiters) == n

            await wait_until(queued, 20, f"{i + 1} waiters queued")
        rel = lock_pb2.ReleaseRequest(name="fifo", session_id=holder, fencing_token=first.grant.fencing_token)
        await a.Release(rel, timeout=10)
        await asyncio.wait_for(asyncio.gather(*waits), 60)
        assert [name for name, _ in order] == ["w0", "w1", "w2"]
        tokens = [first.grant.fencing_token] + [t for _, t in order]
        assert tokens == sorted(tokens) and len(set(tokens)) == 4, tokens


async def test_the_acquire_rate_holds_in_total_across_workers(tmp_path: Path) -> None:
    # Burst 4 in total, almost no refill: 2 per worker. Without the split each worker would admit 4.
    async with workers(tmp_path, "--quota-acquire-rate", "0.001", "--quota-acquire-burst", "4") as w:
        on = await w.spread(per_worker=5)
        granted = refused = 0
        for pid, chs in on.items():
            for i, ch in enumerate(chs):
                stub = lock_pb2_grpc.LockServiceStub(ch)
                s = await stub.CreateSession(lock_pb2.CreateSessionRequest(ttl=ttl(30)), timeout=10)
                try:
                    req = lock_pb2.AcquireRequest(name=f"rate/{pid}/{i}", session_id=s.session_id)
                    await stub.Acquire(req, timeout=10)
                    granted += 1
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    assert "shared by 2 workers" in (e.details() or "")
                    refused += 1
        assert granted == 4, (granted, refused)


async def test_a_dead_worker_is_restarted_sighup_reaches_all_sigterm_drains(tmp_path: Path) -> None:
    health_port = free_port()
    async with workers(tmp_path, "--health-listen", f"127.0.0.1:{health_port}") as w:
        async with aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:  # both workers share it too
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        parent = w.served.proc.pid
        victim, survivor = w.pids
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            return any(r.get("msg") == "worker restarted" for r in w.records())

        await wait_until(replaced, 60, "the parent to restart the killed worker")
        live = {pid for pid, _ in children_of(parent)}
        assert survivor in live and victim not in live
        restarted = next(r for r in w.records() if r.get("msg") == "worker restarted")
        assert restarted["pid"] in live
        w.pids = [survivor, restarted["pid"]]
        await w.spread(per_worker=1)  # the new worker serves calls

        os.kill(parent, signal.SIGHUP)

        async def reloaded() -> bool:
            return {r.get("worker") for r in w.records() if r.get("msg") == "reloaded on SIGHUP"} >= {0, 1}

        await wait_until(reloaded, 20, "every worker to reload")

        os.kill(parent, signal.SIGTERM)
        assert await asyncio.wait_for(w.served.proc.wait(), GRACE + 15) == 0, w.served.log()
        drained = {r.get("worker") for r in w.records() if r.get("msg") == "stopped"}
        assert drained == {0, 1, "parent"}, drained
        assert all(is_gone(pid) for pid in w.pids)


async def test_a_worker_that_cannot_start_stops_the_broker_with_its_status(tmp_path: Path) -> None:
    # Only a worker finds out (its broker opens the audit log): the parent exits with its status.
    code, out = await run_cli(
        tmp_path,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--embedded-state-dir",
        str(tmp_path / "state"),
        "--audit-file",
        str(tmp_path / "missing" / "audit.jsonl"),
        timeout=90,
    )
    assert code == 2, out
    assert "the audit log cannot be written" in out, out
    assert "a worker did not start; stopping the others" in out, out


class _DeadProc:
    pid = 4242
    returncode = 1

    async def wait(self) -> int:
        return 1


async def test_a_worker_that_keeps_dying_ends_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_mod, "WORKER_RESTART_BASE", 0.001)
    parent = workers_mod.Parent([], Config(server=ServerConfig(workers=2)), reload=Config)
    slot = parent.slots[0]
    slot.proc = _DeadProc()  # type: ignore[assignment]
    starts: list[int] = []

    async def start_fails(s: Any, etcd: str | None) -> int:
        starts.append(s.index)
        return 1

    monkeypatch.setattr(parent, "_start", start_fails)
    await asyncio.wait_for(parent._watch(slot, None), 10)
    assert starts == [0] * workers_mod.WORKER_RESTART_ATTEMPTS
    assert parent._fatal and "exited 5 times in a row" in str(parent._fatal[0])
    assert parent._stop.is_set()
