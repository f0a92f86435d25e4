"""The processes of a run: brokers, the echo server, load agents; CPU and RSS read from /proc.

Only processes started here are ever signalled, always by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lockbroker.server.embedded import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT_LINE_LIMIT = 1 << 27
PORT_RACE_RETRIES = 2  # a result carries every latency sample of the run


# -- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of every thread of `pid` so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread: "main" (the asyncio loop: all Python work), other threads under
    their names (grpc's C core names its own: event_engine, grpc_global_tim...; Python's
    worker threads keep the process name), threads of one name summed."""
    out: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if task.name == str(pid):
                name = "main"
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float | None:
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


@dataclass
class Sample:
    at: float
    cpu: dict[str, float]  # role -> CPU seconds summed over its processes
    rss: dict[str, float]  # role -> MB summed over its processes


def sample(roles: dict[str, list[int]]) -> Sample:
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}
    for role, pids in roles.items():
        cpu[role] = sum(c for p in pids if (c := cpu_seconds(p)) is not None)
        rss[role] = sum(r for p in pids if (r := rss_mb(p)) is not None)
    return Sample(time.monotonic(), cpu, rss)


_METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$")
_COUNTERS = {
    "etcd_server_proposals_committed_total": "raft proposals",
    "etcd_disk_wal_fsync_duration_seconds_count": "WAL fsyncs",
    "etcd_disk_backend_commit_duration_seconds_count": "backend commits",
}


async def etcd_counters(host: str, port: int, timeout: float = 5.0) -> dict[str, float]:
    """etcd's request counters from its /metrics: gRPC messages received per method (a unary call
    is one; a Watch or LeaseKeepAlive stream counts each request on it), raft proposals, fsyncs."""
    out: dict[str, float] = {}
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            body = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return out
    for line in body.decode(errors="replace").splitlines():
        m = _METRIC.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        if name == "grpc_server_msg_received_total" and labels:
            tags = {k: v.strip('"') for k, v in (part.split("=", 1) for part in labels.split(","))}
            key = f"{tags['grpc_service'].rsplit('.', 1)[-1]}.{tags['grpc_method']}"
            out[key] = out.get(key, 0.0) + float(value)
        elif name in _COUNTERS:
            out[_COUNTERS[name]] = float(value)
    return out


def child_env(**extra: str) -> dict[str, str]:
    """Our environment minus anything that would configure lockbroker, etcd or OpenTelemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCKBROKER_", "ETCD_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM our child by its PID, SIGKILL it if it outlives `grace`, and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


# -- servers --------------------------------------------------------------------------------


@dataclass
class BrokerProcess:
    """`lockbroker serve` on the shared etcd, as deployed (or the traced launcher)."""

    name: str
    etcd_endpoint: str
    key_root: str
    workdir: Path
    audit: bool = True
    audit_fsync: str = "always"
    traced: bool = False
    group_commit: bool = True
    sampler: tuple[str, str] | None = None  # OTEL_TRACES_SAMPLER and its ARG, for a traced broker
    workers: int = 1
    event_loop: str = "asyncio"
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The broker's processes: with --workers, the parent and its workers."""
        if self.workers == 1:
            return [self.pid]
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.pid:
                    kids.append(int(stat.parent.name))
        return [self.pid, *kids]

    @property
    def audit_file(self) -> Path:
        return self.workdir / f"{self.name}.audit.jsonl"

    @property
    def span_count_file(self) -> Path:
        return self.workdir / f"{self.name}.spans"

    def command(self) -> list[str]:
        args = [
            "serve",
            "--listen",
            self.address,
            "--etcd-endpoints",
            self.etcd_endpoint,
            "--etcd-key-root",
            self.key_root,
            "--log-level",
            # info with workers: the parent's "lockbroker serving" line says every worker serves.
            "warning" if self.workers == 1 else "info",
            "--workers",
            str(self.workers),
            "--event-loop",
            self.event_loop,
            # The default quota guards a shared cluster against a runaway client; the benchmark is one
            # tenant that means it: 100,000 held locks and one more, 10,000 sessions waiting at once,
            # and acquires faster than the default per-replica rate on a bigger machine.
            "--quota-max-locks",
            "1000000",
            "--quota-max-sessions",
            "1000000",
            "--quota-max-waiters",
            "1000000",
            "--quota-acquire-rate",
            "0",
        ]
        if self.audit:
            args += ["--audit-file", str(self.audit_file), "--audit-fsync", self.audit_fsync]
        if self.traced:
            return [sys.executable, "-m", "bench.traced_broker", *args]
        return [str(VENV_BIN / "lockbroker"), *args]

    # 60 s: every target's brokers start at once, and with --workers a target is 3 processes.
    async def start(self, log_dir: Path, timeout: float = 60.0) -> None:
        self._log = (log_dir / f"{self.name}.log").open("ab")
        env = child_env(BENCH_SPAN_COUNT_FILE=str(self.span_count_file)) if self.traced else child_env()
        if not self.group_commit:
            env["LOCKBROKER_ETCD_GROUP_COMMIT"] = "false"
        if self.traced and self.sampler is not None:
            env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"] = self.sampler
        for attempt in range(PORT_RACE_RETRIES + 1):
            # A port free a moment ago may be taken by someone else's test before we bind it:
            # the broker then exits (it refuses SO_REUSEPORT) and another port is worth a try.
            self.port = free_port()
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env, cwd=REPO
            )
            offset = self._log.tell()
            try:
                await wait_serving(self.address, self.proc, timeout, self.name)
                if self.workers > 1:
                    await self._all_workers(log_dir / f"{self.name}.log", offset, timeout)
                return
            except RuntimeError:
                await stop_process(self.proc)
                if attempt == PORT_RACE_RETRIES:
                    raise

    async def _all_workers(self, path: Path, offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with path.open("rb") as f:
                f.seek(offset)
                if any(b'"lockbroker serving"' in ln and b'"worker": "parent"' in ln for ln in f):
                    return
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before serving")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name}: not every worker served within {timeout:g}s")

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def truncate_audit(self) -> int:
        """Empty the audit log between runs (the broker appends with O_APPEND); return its size."""
        try:
            size = self.audit_file.stat().st_size
            os.truncate(self.audit_file, 0)
        except FileNotFoundError:
            return 0
        return size

    def spans(self) -> int | None:
        try:
            return int(self.span_count_file.read_text())
        except (FileNotFoundError, ValueError):
            return None


async def wait_serving(address: str, proc: asyncio.subprocess.Process, timeout: float, what: str) -> None:
    """Until grpc.health.v1 answers SERVING; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode} before serving")
            try:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not serve on {address} within {timeout:g}s")


@dataclass
class EchoProcess:
    proc: asyncio.subprocess.Process | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, log_dir: Path, timeout: float = 30.0) -> None:
        with (log_dir / "echo.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.echo_server",
                "127.0.0.1:0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=child_env(),
                cwd=REPO,
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the echo server exited before serving")
        self.port = int(json.loads(line)["port"])

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)
            self.proc = None


# -- load agents ----------------------------------------------------------------------------


class AgentError(RuntimeError):
    pass


class Agent:
    """One load generator process (bench.agent) under a given interpreter."""

    def __init__(self, python: str, name: str, log_dir: Path) -> None:
        self.python = python
        self.name = name
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> None:
        with (self.log_dir / f"agent-{self.name}.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "bench.agent",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=child_env(),
                cwd=REPO,
                limit=AGENT_LINE_LIMIT,
            )
        hello = await self.recv(timeout)
        if hello.get("event") != "hello":
            raise AgentError(f"agent {self.name}: unexpected first message {hello}")

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AgentError(f"agent {self.name}: no answer within {timeout:g}s") from None
        if not line:
            raise AgentError(f"agent {self.name} exited (see agent-{self.name}.log)")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ConnectionError, AgentError, AssertionError):
            await self.send({"cmd": "exit"})
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:
            await stop_process(self.proc, grace=2.0)
        self.proc = None
