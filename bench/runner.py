"""The benchmark's run loop: etcd, the targets' servers and the load agents up and down, one run
of one target at one point, and the plan run through in rotating order into results.jsonl."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import measure
from bench.env import aetcd_python, log, machine_info
from bench.procs import REPO, Agent, AgentError, etcd_counters
from bench.servers import Target
from bench.targets import TARGETS, Point, Sizes
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig

SETTLE = 0.2  # seconds between runs, so one run's tail is not the next one's start


def estimate(sizes: Sizes, point: Point) -> float:
    """Rough seconds for one run of one target at `point` (held and waiters at ~1,000 ops/s)."""
    return {
        "uncontended": sizes.warmup + sizes.duration + 2.0,
        "contended": sizes.warmup + sizes.duration + 3.0,
        "held": 5.0 + 2 * point.param / 1000.0,
        "waiters": 5.0 + 2 * point.param / 1000.0,
        # Three cycles runs (one session, a lease per acquire, a session per worker).
        "shared-session": 3 * (sizes.warmup + sizes.duration + 2.0),
        "shared-session-contended": 3 * (sizes.warmup + sizes.duration + 3.0),
        "shared-read": sizes.warmup + sizes.duration + 2.0,
        "semaphore": sizes.warmup + sizes.duration + 3.0,
    }[point.workload]


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
        # Broker lock names are relative (the broker roots them in the tenant); etcd keys are absolute.
        prefix = run_prefix if target.spec.server == "broker" else f"/bench/{target.name}/{run_prefix}"
        return {"driver": target.spec.driver, "addresses": target.addresses, "etcd": etcd_addr, "prefix": prefix}

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
            if point.workload in ("uncontended", "contended", "shared-read", "semaphore"):
                rec.update(await measure.run_cycles(self, target, point))
                if self.args.quick and not rec["completed"]:
                    # A one-second window on a busy machine can fall into a stall; the smoke run
                    # wants numbers from every target, not a verdict on one second.
                    rec.update(await measure.run_cycles(self, target, point), retried=True)
            elif point.workload.startswith("shared-session"):
                rec.update(await measure.run_shared(self, target, point, rep))
            elif point.workload == "held":
                rec.update(await measure.run_held(self, target, point))
            else:
                rec.update(await measure.run_waiters(self, target, point))
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
        if w in ("uncontended", "shared-read"):
            return f"{f('rate')} cycles/s p50 {f('p50_ms', 2)} ms p99 {f('p99_ms', 2)} ms{cpu}{err}"
        if w in ("contended", "semaphore"):
            return (
                f"{f('rate')} handoffs/s jain {f('jain', 3)} starved {f('starved')} rotations {f('rotations', 1)} "
                f"wait p99 {f('acquire_p99_ms', 1)} ms{cpu}{err}"
            )
        if w.startswith("shared-session"):
            sh, le = rec["shared"], rec["lease"]
            return (
                f"one session {sh['rate'] or 0:,.0f} cycles/s, lease per acquire {le['rate'] or 0:,.0f} cycles/s: "
                f"ratio {f('ratio', 2)} (session per worker {rec['worker']['rate'] or 0:,.0f}){err}"
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
