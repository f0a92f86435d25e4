"""`python -m bench`: the broker and its peers on one etcd, interleaved run by run.

One etcd (EmbeddedEtcd, free loopback ports, a temporary data dir) serves every target. The
brokers run as `lockbroker serve` subprocesses; load comes from agent processes (bench.agent).
For each point (workload and size) every target runs once, then every target again, and so on:
drift on this shared machine spreads over all targets instead of landing on one.

Output in bench/results/<timestamp>/ (or --out): results.jsonl (one line per run), summary.md,
chart.png, meta.json, logs/, and with --profile the broker's py-spy profile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import google.protobuf
import grpc

from bench import profiling, report
from bench.procs import (
    REPO,
    VENV_BIN,
    Agent,
    AgentError,
    BrokerProcess,
    EchoProcess,
    Sample,
    cpu_seconds,
    etcd_counters,
    peak_rss_mb,
    sample,
    thread_cpu,
)
from bench.stats import jain, percentile
from bench.targets import TARGETS, Point, Sizes, TargetSpec, plan, quick_sizes
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig

AETCD_VENV = REPO / "bench" / ".venv-aetcd"
AETCD_REQUIREMENT = "aetcd==1.0.0"
WORKLOADS = ("uncontended", "contended", "held", "waiters")
SETTLE = 0.2
ROTATIONS = 5  # a contended window lasts until the queue has turned over this often...
CONTENDED_MAX_WINDOW = (
    12.0  # ...or this many seconds  # seconds between runs, so one run's tail is not the next one's start
)
MAX_CYCLES = 10_000_000


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"{time.monotonic() - _T0:6.1f}s {message}", file=sys.stderr, flush=True)


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000.0


def estimate(sizes: Sizes, point: Point) -> float:
    """Rough seconds for one run of one target at `point` (held and waiters at ~1,000 ops/s)."""
    return {
        "uncontended": sizes.warmup + sizes.duration + 2.0,
        "contended": sizes.warmup + sizes.duration + 3.0,
        "held": 5.0 + 2 * point.param / 1000.0,
        "waiters": 5.0 + 2 * point.param / 1000.0,
    }[point.workload]


def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, float]:
    """etcd requests (and raft proposals, fsyncs) per operation, those that moved."""
    if not ops:
        return {}
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    return {k: round(v / ops, 3) for k, v in sorted(moved.items()) if v > 0}


def _portable(args: dict[str, Any]) -> dict[str, Any]:
    """The command line as recorded in meta.json: paths relative to the repository (or just their
    name), so results name no directory of the machine they ran on."""
    out: dict[str, Any] = {}
    for k, v in args.items():
        if isinstance(v, Path):
            out[k] = str(v.relative_to(REPO)) if v.is_relative_to(REPO) else v.name
        else:
            out[k] = v
    return out


def _csv_ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


# -- environment ----------------------------------------------------------------------------


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "etcd": _run_text([shutil.which("etcd") or "/usr/bin/etcd", "--version"]).splitlines()[:1],
        "commit": _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(_run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "server", "interceptors"])),
        "loadavg_start": os.getloadavg(),
    }


async def _exec(*cmd: str, timeout: float = 300.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{cmd[0]} timed out after {timeout:g}s"
    return proc.returncode or 0, out.decode(errors="replace")


async def aetcd_python() -> tuple[str | None, str]:
    """aetcd's interpreter (a venv of its own under bench/, made on first use), or why there is none."""
    python = AETCD_VENV / "bin" / "python"
    if python.exists():
        code, out = await _exec(str(python), "-c", "import aetcd, grpc; print(grpc.__version__)")
        if code == 0:
            return str(python), f"aetcd venv {AETCD_VENV.relative_to(REPO)} (grpcio {out.strip()})"
    uv = shutil.which("uv")
    if uv is None:
        return None, "uv is not on PATH: cannot make aetcd's venv"
    code, out = await _exec(uv, "venv", "-q", "--allow-existing", "--python", sys.executable, str(AETCD_VENV))
    if code != 0:
        return None, f"uv venv failed: {out.strip()[-300:]}"
    code, out = await _exec(uv, "pip", "install", "-q", "--python", str(python), AETCD_REQUIREMENT)
    if code != 0:
        return None, f"uv pip install {AETCD_REQUIREMENT} failed: {out.strip()[-300:]}"
    code, out = await _exec(str(python), "-c", "import aetcd, grpc; print(grpc.__version__)")
    if code != 0:
        return None, f"aetcd does not import in its venv: {out.strip()[-300:]}"
    return str(python), f"aetcd venv {AETCD_VENV.relative_to(REPO)} (grpcio {out.strip()})"


# -- one target's servers -------------------------------------------------------------------


class Target:
    def __init__(self, spec: TargetSpec, etcd_endpoint: str, workdir: Path, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.brokers: list[BrokerProcess] = []
        self.echo: EchoProcess | None = None
        if spec.server == "broker":
            # Replicas of one target share a key root: the same locks, served by either.
            self.brokers = [
                BrokerProcess(
                    f"{spec.name}-{i}",
                    etcd_endpoint,
                    f"/bench/{spec.name}",
                    workdir,
                    audit=spec.audit,
                    audit_fsync=spec.audit_fsync,
                    traced=spec.traced,
                )
                for i in range(spec.replicas)
            ]
        elif spec.server == "echo":
            self.echo = EchoProcess()
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        await asyncio.gather(*(b.start(self.log_dir) for b in self.brokers))
        if self.echo is not None:
            await self.echo.start(self.log_dir)

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.brokers))
        if self.echo is not None:
            await self.echo.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()
        self.restarts += 1

    async def ensure_running(self) -> None:
        procs = [b.proc for b in self.brokers] + ([self.echo.proc] if self.echo else [])
        if any(p is None or p.returncode is not None for p in procs):
            log(f"  {self.name}: a server process had exited; restarting it")
            await self.restart()

    @property
    def server_pids(self) -> list[int]:
        if self.echo is not None:
            return [self.echo.pid]
        return [b.pid for b in self.brokers]

    @property
    def addresses(self) -> list[str]:
        if self.echo is not None:
            return [self.echo.address]
        return [b.address for b in self.brokers]

    def truncate_audit(self) -> int:
        return sum(b.truncate_audit() for b in self.brokers)


# -- the benchmark --------------------------------------------------------------------------


class CycleWindow:
    """The measurement window of one cycles run: its bounds, and samples taken at its edges.

    Uncontended, t2 = t1 + duration is known at the first barrier. Contended, t2 is chosen at
    t1 from the warm-up's handoff rate (see ROTATIONS)."""

    def __init__(
        self,
        bench: Bench,
        roles: dict[str, list[int]],
        c: int,
        contended: bool,
        on_window: Callable[[float, float], Awaitable[Any]] | None,
    ) -> None:
        self.bench = bench
        self.sizes = bench.sizes
        self.roles = roles
        self.c = c
        self.contended = contended
        self.on_window = on_window
        self.window: dict[str, Any] = {}
        self.end: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.tasks: list[asyncio.Task[None]] = []
        self.began = self.t1 = 0.0

    async def sampler(self) -> None:
        await asyncio.sleep(max(0.0, self.t1 - time.monotonic()))
        self.window["s1"] = sample(self.roles)
        self.window["m1"] = await self.bench.etcd_counters()
        t2 = await self.end
        extra = asyncio.ensure_future(self.on_window(self.t1, t2)) if self.on_window is not None else None
        await asyncio.sleep(max(0.0, t2 - time.monotonic()))
        self.window["s2"] = sample(self.roles)
        self.window["m2"] = await self.bench.etcd_counters()
        if extra is not None:
            self.window["extra"] = await extra

    async def on_barrier(self, name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.sizes
        if name == "ready":
            self.began = time.monotonic()
            self.t1 = self.began + 0.1 + s.warmup
            self.tasks.append(asyncio.ensure_future(self.sampler()))
            if self.contended:
                return {"t1": self.t1, "adaptive": True}
            self.end.set_result(self.t1 + s.duration)
            return {"t1": self.t1, "t2": self.t1 + s.duration}
        # "warm", at t1: how fast did the queue turn over during the warm-up?
        early = sum(e.get("early", 0) for e in events)
        rate = early / max(1e-3, self.t1 - self.began)
        needed = ROTATIONS * self.c / rate if rate > 0 else CONTENDED_MAX_WINDOW
        t2 = self.t1 + min(CONTENDED_MAX_WINDOW, max(s.duration, needed))
        if not self.end.done():
            self.end.set_result(t2)
        return {"t2": t2}

    async def close(self, timeout: float) -> None:
        if not self.end.done():
            self.end.set_result(time.monotonic())
        for t in self.tasks:
            if not t.done():
                await asyncio.wait({t}, timeout=timeout)


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, out: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"
        self.tmp = Path(tempfile.mkdtemp(prefix="lockbroker-bench-"))
        self.etcd = EmbeddedEtcd(
            EmbeddedEtcdConfig(
                data_dir=self.tmp / "etcd",
                log_file=self.logs / "etcd.log",
                # Hours of cycles would otherwise grow etcd's history without bound; clusters
                # in production compact too (Kubernetes every 5 minutes).
                extra_args=("--auto-compaction-mode=periodic", "--auto-compaction-retention=1m"),
            )
        )
        self.targets: dict[str, Target] = {}
        self.agents: dict[str, list[Agent]] = {}
        self.unavailable: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        self.seq = 0
        self.records: list[dict[str, Any]] = []

    # -- lifecycle --

    async def setup(self, wanted: list[str]) -> None:
        self.meta = {"machine": machine_info(), "sizes": asdict(self.sizes), "args": _portable(vars(self.args))}
        await self.etcd.start()
        log(f"etcd {self.etcd.endpoint} (pid {self.etcd.pid}), data in {self.tmp}")
        interpreters = {"main": sys.executable}
        if "aetcd" in wanted:
            python, why = await aetcd_python()
            log(f"aetcd: {why}")
            if python is None:
                self.unavailable["aetcd"] = why
            else:
                interpreters["aetcd"] = python
                self.meta["aetcd"] = why
        for name in wanted:
            if name in self.unavailable:
                continue
            self.targets[name] = Target(TARGETS[name], self.etcd.endpoint, self.tmp, self.logs)
        await asyncio.gather(*(t.start() for t in self.targets.values()))
        n_agents = max(self.procs_for(c) for c in [*self.sizes.cs, *self.sizes.contended_cs, *self.sizes.scale_cs])
        for kind, python in interpreters.items():
            if kind == "aetcd" and "aetcd" not in self.targets:
                continue
            self.agents[kind] = [Agent(python, f"{kind}{i}", self.logs) for i in range(n_agents)]
        await asyncio.gather(*(a.start() for pool in self.agents.values() for a in pool))
        self.meta["unavailable"] = self.unavailable
        log(f"targets: {', '.join(self.targets)}; {n_agents} load agent(s) per interpreter")

    async def teardown(self) -> None:
        await asyncio.gather(*(a.stop() for pool in self.agents.values() for a in pool), return_exceptions=True)
        await asyncio.gather(*(t.stop() for t in self.targets.values()), return_exceptions=True)
        # Written by the traced broker as it exits: proof that tracing was really on.
        self.meta["spans_exported"] = {b.name: b.spans() for t in self.targets.values() for b in t.brokers if b.traced}
        with contextlib.suppress(Exception):
            await self.etcd.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def procs_for(self, c: int) -> int:
        if self.args.loadgen_procs != "auto":
            return max(1, int(self.args.loadgen_procs))
        # One agent process keeps up up to a few dozen workers; past that a second one keeps the
        # load generator from being what is measured (bench/README.md has the numbers).
        return 1 if c < 64 else 2

    # -- driving agents --

    async def drive(
        self,
        agents: list[Agent],
        jobs: list[dict[str, Any]],
        on_barrier: Callable[[str, list[dict[str, Any]]], Awaitable[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        timeout = float(jobs[0]["timeout"]) + 30.0
        for agent, job in zip(agents, jobs, strict=True):
            await agent.send({"cmd": "job", "job": job})
        results: list[dict[str, Any] | None] = [None] * len(agents)
        failure: str | None = None
        for _ in range(1000):
            pending = [i for i, r in enumerate(results) if r is None]
            if not pending:
                break
            events = await asyncio.gather(*(agents[i].recv(timeout) for i in pending))
            at_barrier: list[tuple[int, dict[str, Any]]] = []
            for i, event in zip(pending, events, strict=True):
                if event["event"] == "result":
                    results[i] = event["data"]
                elif event["event"] == "barrier":
                    at_barrier.append((i, event))
                else:
                    failure = failure or f"{agents[i].name}: {event.get('message')}"
                    (self.logs / f"agent-{agents[i].name}.log").open("a").write(event.get("trace", "") + "\n")
                    results[i] = {}
            if not at_barrier:
                continue
            names = {e["name"] for _, e in at_barrier}
            if failure is not None or len(names) != 1:
                failure = failure or f"agents at different barriers: {names}"
                answer: dict[str, Any] = {"t1": 0.0, "t2": 0.0, "abort": True}
            else:
                answer = await on_barrier(names.pop(), [e for _, e in at_barrier])
            for i, _ in at_barrier:
                await agents[i].send({"cmd": "continue", **answer})
        if failure is not None:
            raise AgentError(failure)
        return [r or {} for r in results]

    async def etcd_counters(self) -> dict[str, float]:
        return await etcd_counters("127.0.0.1", self.etcd.client_port)

    def roles(self, target: Target, agents: list[Agent]) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {"etcd": [self.etcd.pid] if self.etcd.pid else []}
        if target.server_pids:
            roles["broker" if target.brokers else "server"] = target.server_pids
        roles["loadgen"] = [a.pid for a in agents]
        for i, a in enumerate(agents):
            roles[f"agent{i}"] = [a.pid]
        return roles

    def job_base(self, target: Target, run_prefix: str) -> dict[str, Any]:
        etcd_addr = self.etcd.endpoint.removeprefix("http://")
        prefix = run_prefix if target.spec.driver == "broker" else f"/bench/{target.name}/{run_prefix}"
        return {"driver": target.spec.driver, "addresses": target.addresses, "etcd": etcd_addr, "prefix": prefix}

    # -- workloads --

    async def run_cycles(
        self, target: Target, point: Point, on_window: Callable[[float, float], Awaitable[Any]] | None = None
    ) -> dict[str, Any]:
        s = self.sizes
        c = point.param
        contended = point.workload == "contended"
        pool = self.agents[target.spec.interpreter]
        procs = min(self.procs_for(c), len(pool), c)
        agents = pool[:procs]
        # A contended window is stretched until the queue turns over ROTATIONS times (up to
        # CONTENDED_MAX_WINDOW): a Jain index over a window in which most workers could not have
        # had a turn would measure slowness, not fairness.
        longest = max(s.duration, CONTENDED_MAX_WINDOW) if contended else s.duration
        jobs = self.cycles_jobs(target, c, contended, procs, longest)
        w = CycleWindow(self, self.roles(target, agents), c, contended, on_window)
        try:
            results = await self.drive(agents, jobs, w.on_barrier)
        finally:
            await w.close(longest + s.warmup + 5)
        if "s2" not in w.window:
            raise AgentError("the measurement window never closed")
        rec = self.cycles_record(results, w.window, c, contended)
        rec["loadgen_procs"] = procs
        if "extra" in w.window:
            rec["window_extra"] = w.window["extra"]
        return rec

    def cycles_jobs(self, target: Target, c: int, contended: bool, procs: int, longest: float) -> list[dict[str, Any]]:
        """One job per agent, the C workers dealt out round robin."""
        wait = (self.sizes.warmup + longest + 10.0) if contended else 10.0
        base = self.job_base(target, f"r{self.seq}")
        return [
            {
                **base,
                "workload": "cycles",
                "contended": contended,
                "workers": list(range(k, c, procs)),
                "wait": wait,
                "max_cycles": MAX_CYCLES,
                "timeout": self.sizes.warmup + longest + wait + 60.0,
            }
            for k in range(procs)
        ]

    def cycles_record(
        self, results: list[dict[str, Any]], window: dict[str, Any], c: int, contended: bool
    ) -> dict[str, Any]:
        s1: Sample = window["s1"]
        s2: Sample = window["s2"]
        span = s2.at - s1.at
        completed = sum(r["completed"] for r in results)
        cycle_us = [x for r in results for x in r["cycle_us"]]
        acquire_us = [x for r in results for x in r["acquire_us"]]
        grants = [g for r in results for g in r["grants"]]
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        rec: dict[str, Any] = {
            "rate": completed / span if span > 0 else None,
            "completed": completed,
            "window_s": span,
            "p50_ms": _ms(percentile(cycle_us, 50)),
            "p99_ms": _ms(percentile(cycle_us, 99)),
            "acquire_p50_ms": _ms(percentile(acquire_us, 50)),
            "acquire_p99_ms": _ms(percentile(acquire_us, 99)),
            "errors": errors,
            "drain_s": max((r.get("drain_s", 0.0) for r in results), default=0.0),
            **self.cpu_fields(s1, s2, completed),
            "etcd_per_op": per_op(window["m1"], window["m2"], completed),
        }
        if contended:
            rec.update(
                {
                    # Turns of the whole queue in the window: with fewer than a few, a fair lock
                    # still leaves workers without a grant and the Jain index below 1.
                    "rotations": completed / c,
                    "jain": jain(grants),
                    "starved": sum(1 for g in grants if g == 0),
                    "wait_max_ms": _ms(max(acquire_us, default=0)),
                }
            )
        return rec

    def cpu_fields(self, s1: Sample, s2: Sample, ops: int) -> dict[str, Any]:
        span = s2.at - s1.at
        cpu = {k: s2.cpu[k] - s1.cpu.get(k, 0.0) for k in s2.cpu}
        return {
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "cpu_cores": {k: round(v / span, 3) for k, v in cpu.items()} if span > 0 else {},
            "cpu_us_per_op": {k: round(v * 1e6 / ops, 1) for k, v in cpu.items() if not k.startswith("agent")}
            if ops
            else {},
            "rss_mb": {k: round(v, 1) for k, v in s2.rss.items() if not k.startswith("agent")},
        }

    async def run_held(self, target: Target, point: Point) -> dict[str, Any]:
        s = self.sizes
        agents = self.agents[target.spec.interpreter][:1]
        phase = max(120.0, point.param / 100.0)
        job = {
            **self.job_base(target, f"r{self.seq}"),
            "workload": "held",
            "n": point.param,
            "parallel": s.held_parallel,
            "probes": s.probes,
            "phase_timeout": phase,
            "timeout": 3 * phase + 60.0,
        }
        roles = self.roles(target, agents)
        samples: dict[str, Sample] = {}

        counters: dict[str, dict[str, float]] = {}

        async def on_barrier(name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
            samples[name] = sample(roles)
            counters[name] = await self.etcd_counters()
            return {}

        (r,) = await self.drive(agents, [job], on_barrier)
        idle_p50 = percentile(r["idle_us"], 50)
        held_p50 = percentile(r["held_us"], 50)
        held = r["held"]
        rec: dict[str, Any] = {
            "n": r["n"],
            "held": held,
            "acquire_rate": held / r["acquire_s"] if r["acquire_s"] > 0 else None,
            "release_rate": held / r["release_s"] if r["release_s"] > 0 else None,
            "idle_p50_ms": _ms(idle_p50),
            "idle_p99_ms": _ms(percentile(r["idle_us"], 99)),
            "held_p50_ms": _ms(held_p50),
            "held_p99_ms": _ms(percentile(r["held_us"], 99)),
            "held_vs_idle": held_p50 / idle_p50 if idle_p50 and held_p50 else None,
            "errors": r["errors"],
            "rss_idle_mb": {k: round(v, 1) for k, v in samples["idle"].rss.items() if not k.startswith("agent")},
            "rss_held_mb": {k: round(v, 1) for k, v in samples["held"].rss.items() if not k.startswith("agent")},
            "acquire_phase": {
                **self.cpu_fields(samples["idle"], samples["held"], held),
                "etcd_per_op": per_op(counters["idle"], counters["held"], held),
            },
        }
        if target.brokers:
            rec["broker_peak_rss_mb"] = max((peak_rss_mb(b.pid) or 0.0) for b in target.brokers)
        return rec

    async def run_waiters(self, target: Target, point: Point) -> dict[str, Any]:
        s = self.sizes
        agents = self.agents[target.spec.interpreter][:1]
        phase = max(120.0, point.param / 50.0)
        job = {
            **self.job_base(target, f"r{self.seq}"),
            "workload": "waiters",
            "w": point.param,
            "locks": s.waiter_locks,
            "wait": 280.0,  # under the broker's default max_wait (300 s)
            "exact_tokens": True,
            "phase_timeout": phase,
            "timeout": 3 * phase + 60.0,
        }
        roles = self.roles(target, agents)
        samples: dict[str, Sample] = {}

        async def on_barrier(name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
            samples[name] = sample(roles)
            return {}

        (r,) = await self.drive(agents, [job], on_barrier)
        rec: dict[str, Any] = {
            **{k: r[k] for k in ("w", "locks", "queued", "granted", "lost", "timed_out", "fifo_violations")},
            "queue_s": r["queue_s"],
            "drain_s": r["drain_s"],
            "handoff_rate": r["granted"] / r["drain_s"] if r["drain_s"] > 0 else None,
            "errors": r["errors"],
            "rss_ready_mb": {k: round(v, 1) for k, v in samples["ready"].rss.items() if not k.startswith("agent")},
            "rss_queued_mb": {k: round(v, 1) for k, v in samples["queued"].rss.items() if not k.startswith("agent")},
            "queue_phase": self.cpu_fields(samples["ready"], samples["queued"], max(1, r["queued"])),
            "drain_phase": self.cpu_fields(samples["queued"], samples["drained"], max(1, r["granted"])),
        }
        if target.brokers:
            rec["broker_peak_rss_mb"] = max((peak_rss_mb(b.pid) or 0.0) for b in target.brokers)
        return rec

    # -- one run --

    async def run_one(self, point: Point, target: Target, rep: int) -> dict[str, Any]:
        self.seq += 1
        await target.ensure_running()
        if point.workload in ("held", "waiters") and target.brokers and not self.args.quick:
            await target.restart()  # RSS from a fresh broker, not one grown by earlier runs
        target.truncate_audit()
        rec: dict[str, Any] = {
            "workload": point.workload,
            "param": point.param,
            "target": target.name,
            "run": rep + 1,
            "seq": self.seq,
            "loadavg": os.getloadavg()[0],
        }
        started = time.monotonic()
        try:
            if point.workload in ("uncontended", "contended"):
                rec.update(await self.run_cycles(target, point))
                if self.args.quick and not rec["completed"]:
                    # A one-second window on a busy machine can fall into a stall; the smoke run
                    # wants numbers from every target, not a verdict on one second.
                    rec.update(await self.run_cycles(target, point), retried=True)
            elif point.workload == "held":
                rec.update(await self.run_held(target, point))
            else:
                rec.update(await self.run_waiters(target, point))
            rec["ok"] = True
        except (AgentError, RuntimeError, OSError, TimeoutError) as e:
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["elapsed_s"] = time.monotonic() - started
        if target.brokers:
            rec["audit_bytes"] = target.truncate_audit()
        return rec

    def headline(self, rec: dict[str, Any]) -> str:
        if not rec.get("ok"):
            return f"FAILED {rec.get('error')}"

        def f(key: str, digits: int = 0) -> str:
            value = rec.get(key)
            return "n/a" if value is None else f"{value:,.{digits}f}"

        w = rec["workload"]
        err = f", errors {sum(rec['errors'].values())}" if rec.get("errors") else ""
        cores = rec.get("cpu_cores", {})
        cpu = " cpu " + "/".join(f"{k} {v:.2f}" for k, v in cores.items() if not k.startswith("agent"))
        if w == "uncontended":
            return f"{f('rate')} cycles/s p50 {f('p50_ms', 2)} ms p99 {f('p99_ms', 2)} ms{cpu}{err}"
        if w == "contended":
            return (
                f"{f('rate')} handoffs/s jain {f('jain', 3)} starved {f('starved')} rotations {f('rotations', 1)} "
                f"wait p99 {f('acquire_p99_ms', 1)} ms{cpu}{err}"
            )
        if w == "held":
            return (
                f"acquire {f('acquire_rate')}/s release {f('release_rate')}/s "
                f"p50 idle {f('idle_p50_ms', 2)} held {f('held_p50_ms', 2)} ms rss {rec.get('rss_held_mb')}{err}"
            )
        return (
            f"granted {rec.get('granted')}/{rec.get('w')} fifo violations {rec.get('fifo_violations')} "
            f"queued in {f('queue_s', 1)}s drained in {f('drain_s', 1)}s rss {rec.get('rss_queued_mb')}{err}"
        )

    async def run_plan(self, points: list[Point]) -> None:
        runs = [(p, n) for p in points for n in p.targets if n in self.targets for _ in range(self.sizes.runs)]
        total = len(runs)
        left = sum(estimate(self.sizes, p) for p, _ in runs)
        log(f"{total} runs, roughly {left / 60:.1f} min (held and waiters guessed at 1,000 ops/s)")
        done = 0
        spent = guessed = 0.0
        with self.results.open("a") as out:
            for point in points:
                names = [t for t in point.targets if t in self.targets]
                for rep in range(self.sizes.runs):
                    # ABC, BCA, CAB...: every target runs early and late in the point.
                    shift = rep % len(names)
                    for name in names[shift:] + names[:shift]:
                        done += 1
                        began = time.monotonic()
                        rec = await self.run_one(point, self.targets[name], rep)
                        spent += time.monotonic() - began
                        guessed += estimate(self.sizes, point)
                        left -= estimate(self.sizes, point)
                        self.records.append(rec)
                        out.write(json.dumps(rec, separators=(",", ":")) + "\n")
                        out.flush()
                        eta = left * spent / guessed / 60 if guessed else 0.0
                        log(
                            f"[{done}/{total} ~{eta:.0f} min left] {point.key:<22} {name:<15} "
                            f"run {rep + 1}: {self.headline(rec)}"
                        )
                        await asyncio.sleep(SETTLE)

    # -- profile --

    async def profile(self) -> list[dict[str, Any]]:
        """py-spy on each profiled broker through one uncontended run (not counted in the results)."""
        py_spy = VENV_BIN / "py-spy"
        if not py_spy.exists():
            return [{"error": f"{py_spy} is missing (uv sync installs py-spy with the dev group)"}]
        cs = self.args.profile_c or [self.sizes.cs[0] if self.args.quick else 64]
        out: list[dict[str, Any]] = []
        md: list[str] = []
        for name in self.args.profile_targets.split(","):
            target = self.targets.get(name.strip())
            if target is None or not target.brokers:
                out.append({"target": name, "error": "not a broker target of this run"})
                continue
            for c in cs:
                prof, text = await self.profile_one(py_spy, target, c)
                out.append(prof)
                md.append(text)
        (self.out / "profile.md").write_text("\n".join(md))
        (self.out / "profile.json").write_text(json.dumps(out, indent=1))
        log(f"profile: {self.out / 'profile.md'}")
        return out

    async def profile_one(self, py_spy: Path, target: Target, c: int) -> tuple[dict[str, Any], str]:
        point = Point("uncontended", c, (target.name,))
        await target.ensure_running()
        pid = target.brokers[0].pid
        stem = f"profile-{target.name}-c{c}"
        prof: dict[str, Any] = {"target": target.name, "c": c, "pid": pid}

        async def during(t1: float, t2: float) -> dict[str, Any]:
            threads0 = thread_cpu(pid)
            total0 = cpu_seconds(pid) or 0.0
            began = time.monotonic()
            files: dict[str, str] = {}
            # --gil: only the thread holding the GIL, i.e. where Python CPU goes (threads parked
            # on a queue or in epoll would otherwise fill the profile). --native adds grpc's
            # Cython/C frames, which plain Python stacks fold into asyncio's Handle._run.
            for mode, flags in (
                ("gil", ["--gil", "--full-filenames"]),
                ("native", ["--gil", "--native", "--full-filenames"]),
            ):
                path = self.out / f"{stem}-{mode}.txt"
                seconds = max(1, int((t2 - time.monotonic()) / 2))
                code, text = await _exec(
                    str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                    "--format", "raw", "--output", str(path), *flags, timeout=seconds + 60,
                )  # fmt: skip
                (self.logs / f"py-spy-{target.name}-c{c}-{mode}.log").write_text(text)
                if code == 0 and path.exists():
                    path.write_text(profiling.scrub(path.read_text(errors="replace")))
                    files[mode] = path.name
                else:
                    prof.setdefault("errors", {})[mode] = text.strip()[-300:]
            threads1 = thread_cpu(pid)
            total = (cpu_seconds(pid) or 0.0) - total0
            # grpc's event engine starts and ends threads as load changes: their CPU stays in the
            # process total but leaves /proc/<pid>/task with them.
            threads = {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads1.items()}
            threads["(threads that ended)"] = round(max(0.0, total - sum(threads.values())), 3)
            return {"files": files, "thread_cpu_s": threads, "span_s": time.monotonic() - began, "total_s": total}

        self.seq += 1
        saved = self.sizes.duration
        self.sizes.duration = self.sizes.profile_duration
        try:
            rec = await self.run_cycles(target, point, on_window=during)
        finally:
            self.sizes.duration = saved
        target.truncate_audit()
        extra = rec.pop("window_extra", {})
        threads: dict[str, float] = extra.get("thread_cpu_s", {})
        window = float(extra.get("span_s") or rec["window_s"])
        prof.update({"rate": rec["rate"], "cpu_cores": rec["cpu_cores"], "cpu_us_per_op": rec["cpu_us_per_op"]})
        prof["thread_cpu_s"] = threads
        md = [
            f"## Profile of `{target.name}`: uncontended C={c}, {rec['rate']:,.0f} cycles/s while sampled",
            "",
            "CPU per cycle (µs): " + ", ".join(f"{k} {v:,.0f}" for k, v in rec["cpu_us_per_op"].items()) + ".",
            "",
            f"The broker's CPU over the {window:.1f} s sampled: {extra.get('total_s', 0.0):.2f} s "
            f"({extra.get('total_s', 0.0) / window:.2f} cores), by thread in s (cores): "
            + ", ".join(f"{k} {v:.2f} ({v / window:.2f})" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]))
            + ". `main` is the asyncio loop; `event_engine`/`grpc_*` are grpc's C core; threads named "
            "like the process are Python worker threads (asyncio.to_thread).",
            "",
        ]
        for mode, name in extra.get("files", {}).items():
            summary = profiling.summarize(self.out / name)
            prof[mode] = summary
            md.append(profiling.markdown(summary, f"py-spy --{'gil' if mode == 'gil' else 'gil --native'} ({name})"))
        for mode, err in prof.get("errors", {}).items():
            md.append(f"py-spy {mode} failed: {err}\n")
        return prof, "\n".join(md)


# -- entry ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, one run (~30 s)")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/<timestamp>)")
    p.add_argument("--runs", type=int, help="runs per point and target (default 3)")
    p.add_argument("--c", type=_csv_ints, help="uncontended concurrencies (default 1,16,64,256)")
    p.add_argument("--contended-c", type=_csv_ints, help="contended concurrencies (default 16,64,256)")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 2.5)")
    p.add_argument("--warmup", type=float, help="seconds of load before the window opens (default 0.75)")
    p.add_argument("--held", type=int, help="N locks held at once (default 100,000)")
    p.add_argument("--waiters", type=int, help="W concurrent blocking waiters (default 10,000)")
    p.add_argument("--waiter-locks", type=int, help="locks the waiters queue on (default 100)")
    p.add_argument(
        "--scale-peers", action="store_true", help="also run etcd's Lock service in the held and waiters workloads"
    )
    p.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--loadgen-procs", default="auto", help="load agent processes per run (auto: 1 below C=64, else 2)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    p.add_argument("--profile", action="store_true", help="also profile the broker (py-spy) in one C=64 run")
    p.add_argument("--profile-only", action="store_true", help="only the profile run")
    p.add_argument("--profile-targets", default="broker", help="broker targets to profile (default broker)")
    p.add_argument("--profile-c", type=_csv_ints, help="concurrencies to profile at (default 64)")
    return p.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    s = quick_sizes() if args.quick else Sizes()
    if args.runs:
        s.runs = args.runs
    if args.c:
        s.cs = args.c
    if args.contended_c:
        s.contended_cs = args.contended_c
    if args.duration:
        s.duration = args.duration
    if args.warmup is not None:
        s.warmup = args.warmup
    if args.held:
        s.held = args.held
    if args.waiters:
        s.waiters = args.waiters
    if args.waiter_locks:
        s.waiter_locks = args.waiter_locks
    return s


async def amain(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    out: Path = args.out or REPO / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    wanted = [t.strip() for t in args.targets.split(",")] if args.targets else list(TARGETS)
    unknown = [t for t in wanted if t not in TARGETS]
    workloads = [w.strip() for w in args.workloads.split(",")] if args.workloads else list(WORKLOADS)
    bad = [w for w in workloads if w not in WORKLOADS]
    if unknown or bad:
        log(f"unknown targets {unknown} or workloads {bad}")
        return 2
    if args.profile_only:
        workloads = []
    points = plan(sizes, workloads, set(wanted), quick=args.quick, scale_peers=args.scale_peers)
    needed = {t for p in points for t in p.targets}
    if args.profile or args.profile_only:
        needed.update(t.strip() for t in args.profile_targets.split(",") if t.strip() in TARGETS)
    if args.dry_run:
        total = 0.0
        for p in points:
            seconds = estimate(sizes, p) * sizes.runs * len(p.targets)
            total += seconds
            print(f"{p.key:<24} {sizes.runs} x {', '.join(p.targets)}  ~{seconds / 60:.1f} min")
        print(f"~{total / 60:.1f} min in all (held and waiters guessed at 1,000 ops/s)")
        return 0
    os.makedirs(out, exist_ok=True)
    bench = Bench(args, sizes, out)
    log(f"results in {out}")
    began = time.monotonic()
    try:
        await bench.setup([t for t in TARGETS if t in needed])
        await bench.run_plan(points)
        if args.profile or args.profile_only:
            bench.meta["profile"] = await bench.profile()
    finally:
        await bench.teardown()
    bench.meta["machine"]["loadavg_end"] = os.getloadavg()
    bench.meta["wall_s"] = time.monotonic() - began
    (out / "meta.json").write_text(json.dumps(bench.meta, indent=1, default=str))
    report.write(out, bench.records, bench.meta)
    log(f"done in {bench.meta['wall_s'] / 60:.1f} min: {out / 'summary.md'}")
    return 0 if all(r.get("ok") for r in bench.records) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130
