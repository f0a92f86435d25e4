"""What each workload measures, on the orchestrator's side: the jobs sent to the load agents, the
samples taken around the measurement window, and the record of one run (rates, latencies, CPU,
RSS, etcd requests per operation). The agents' side is bench/workloads.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bench.procs import AgentError, Sample, peak_rss_mb, sample
from bench.servers import Target
from bench.stats import jain, percentile
from bench.targets import Point

if TYPE_CHECKING:
    from bench.runner import Bench

ROTATIONS = 5  # a contended window lasts until the queue has turned over this often...
CONTENDED_MAX_WINDOW = 12.0  # ...or this many seconds
MAX_CYCLES = 10_000_000


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000.0


def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, float]:
    """etcd requests (and raft proposals, fsyncs) per operation, those that moved."""
    if not ops:
        return {}
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    return {k: round(v / ops, 3) for k, v in sorted(moved.items()) if v > 0}


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


async def run_cycles(
    bench: Bench,
    target: Target,
    point: Point,
    on_window: Callable[[float, float], Awaitable[Any]] | None = None,
    *,
    contended: bool | None = None,
    driver: str | None = None,
    procs: int | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """One cycles run; `driver`, `procs` and `contended` override the target's driver, the load
    agents for C and the point's workload (shared-session runs two drivers in one agent)."""
    s = bench.sizes
    c = point.param
    # A semaphore's waiters take turns as a contended lock's do: handoffs, fairness, the window
    # stretched to turn the queue over. Shared readers all hold at once: cycles, as uncontended.
    contended = point.workload in ("contended", "semaphore") if contended is None else contended
    pool = bench.agents[target.spec.interpreter]
    procs = min(procs or bench.procs_for(c), len(pool), c)
    agents = pool[:procs]
    # A contended window is stretched until the queue turns over ROTATIONS times (up to
    # CONTENDED_MAX_WINDOW): a Jain index over a window in which most workers could not have
    # had a turn would measure slowness, not fairness.
    longest = max(s.duration, CONTENDED_MAX_WINDOW) if contended else s.duration
    jobs = cycles_jobs(bench, target, c, contended=contended, procs=procs, longest=longest, tag=tag)
    if point.workload in ("shared-read", "semaphore"):
        for job in jobs:
            job["one_lock"] = True  # every worker on one name
            job["shared"] = point.workload == "shared-read"
            job["limit"] = s.semaphore_limit if point.workload == "semaphore" else 0
    if driver is not None:
        for job in jobs:
            job["driver"] = driver
    w = CycleWindow(bench, bench.roles(target, agents), c, contended, on_window)
    try:
        results = await bench.drive(agents, jobs, w.on_barrier)
    finally:
        await w.close(longest + s.warmup + 5)
    if "s2" not in w.window:
        raise AgentError("the measurement window never closed")
    rec = cycles_record(results, w.window, c, contended)
    rec["loadgen_procs"] = procs
    if point.workload == "semaphore":
        rec["limit"] = s.semaphore_limit
    if "extra" in w.window:
        rec["window_extra"] = w.window["extra"]
    return rec


def cycles_jobs(
    bench: Bench, target: Target, c: int, *, contended: bool, procs: int, longest: float, tag: str = ""
) -> list[dict[str, Any]]:
    """One job per agent, the C workers dealt out round robin."""
    wait = (bench.sizes.warmup + longest + 10.0) if contended else 10.0
    base = bench.job_base(target, f"r{bench.seq}{tag}")
    return [
        {
            **base,
            "workload": "cycles",
            "contended": contended,
            "workers": list(range(k, c, procs)),
            "wait": wait,
            "max_cycles": MAX_CYCLES,
            "timeout": bench.sizes.warmup + longest + wait + 60.0,
        }
        for k in range(procs)
    ]


def cycles_record(results: list[dict[str, Any]], window: dict[str, Any], c: int, contended: bool) -> dict[str, Any]:
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
        **cpu_fields(s1, s2, completed),
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


def cpu_fields(s1: Sample, s2: Sample, ops: int) -> dict[str, Any]:
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


async def run_held(bench: Bench, target: Target, point: Point) -> dict[str, Any]:
    s = bench.sizes
    agents = bench.agents[target.spec.interpreter][:1]
    phase = max(120.0, point.param / 100.0)
    job = {
        **bench.job_base(target, f"r{bench.seq}"),
        "workload": "held",
        "n": point.param,
        "parallel": s.held_parallel,
        "probes": s.probes,
        "phase_timeout": phase,
        "timeout": 3 * phase + 60.0,
    }
    roles = bench.roles(target, agents)
    samples: dict[str, Sample] = {}

    counters: dict[str, dict[str, float]] = {}

    async def on_barrier(name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        samples[name] = sample(roles)
        counters[name] = await bench.etcd_counters()
        return {}

    (r,) = await bench.drive(agents, [job], on_barrier)
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
            **cpu_fields(samples["idle"], samples["held"], held),
            "etcd_per_op": per_op(counters["idle"], counters["held"], held),
        },
    }
    if target.brokers:
        rec["broker_peak_rss_mb"] = max((peak_rss_mb(b.pid) or 0.0) for b in target.brokers)
    return rec


async def run_waiters(bench: Bench, target: Target, point: Point) -> dict[str, Any]:
    s = bench.sizes
    agents = bench.agents[target.spec.interpreter][:1]
    phase = max(120.0, point.param / 50.0)
    job = {
        **bench.job_base(target, f"r{bench.seq}"),
        "workload": "waiters",
        "w": point.param,
        "locks": s.waiter_locks,
        "wait": 280.0,  # under the broker's default max_wait (300 s)
        "exact_tokens": True,
        "phase_timeout": phase,
        "timeout": 3 * phase + 60.0,
    }
    roles = bench.roles(target, agents)
    samples: dict[str, Sample] = {}

    async def on_barrier(name: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        samples[name] = sample(roles)
        return {}

    (r,) = await bench.drive(agents, [job], on_barrier)
    rec: dict[str, Any] = {
        **{k: r[k] for k in ("w", "locks", "queued", "granted", "lost", "timed_out", "fifo_violations")},
        "queue_s": r["queue_s"],
        "drain_s": r["drain_s"],
        "handoff_rate": r["granted"] / r["drain_s"] if r["drain_s"] > 0 else None,
        "errors": r["errors"],
        "rss_ready_mb": {k: round(v, 1) for k, v in samples["ready"].rss.items() if not k.startswith("agent")},
        "rss_queued_mb": {k: round(v, 1) for k, v in samples["queued"].rss.items() if not k.startswith("agent")},
        "queue_phase": cpu_fields(samples["ready"], samples["queued"], max(1, r["queued"])),
        "drain_phase": cpu_fields(samples["queued"], samples["drained"], max(1, r["granted"])),
    }
    if target.brokers:
        rec["broker_peak_rss_mb"] = max((peak_rss_mb(b.pid) or 0.0) for b in target.brokers)
    return rec


# mode: bench.agent driver. "worker" (a session per worker, the uncontended/contended workloads'
# driver) is the reference: what the same cycles cost without claims and without a session each.
SHARED_MODES = {"shared": "broker-shared", "lease": "broker-lease", "worker": "broker"}


async def run_shared(bench: Bench, target: Target, point: Point, rep: int) -> dict[str, Any]:
    """Issue 19: C workers in ONE load agent process on one shared session with a claim per
    Acquire ("shared"), on a lease per acquire (session-less Acquire, Release ends that session:
    "lease"), and, for reference, on a session per worker ("worker"); the order rotates run by run
    (ABC, BCA, CAB) so drift does not land on one mode. Each worker on its own lock
    (shared-session), or all on one lock (shared-session-contended)."""
    contended = point.workload.endswith("-contended")
    shift = rep % len(SHARED_MODES)
    modes = list(SHARED_MODES)[shift:] + list(SHARED_MODES)[:shift]
    rec: dict[str, Any] = {"order": modes}
    for mode in modes:
        one = await run_cycles(
            bench, target, point, contended=contended, driver=SHARED_MODES[mode], procs=1, tag=f"-{mode}"
        )
        if bench.args.quick and not one["completed"]:
            # As for the cycles runs: a one-second window on a busy machine can fall into a stall.
            one = await run_cycles(
                bench, target, point, contended=contended, driver=SHARED_MODES[mode], procs=1, tag=f"-{mode}2"
            )
            one["retried"] = True
        rec[mode] = one
        await asyncio.sleep(0.2)  # as between runs: one mode's tail is not the next one's start
    shared, lease = rec["shared"]["rate"], rec["lease"]["rate"]
    rec["ratio"] = shared / lease if shared is not None and lease else None
    errors: dict[str, int] = {}
    for mode in modes:
        for k, v in rec[mode]["errors"].items():
            errors[f"{mode}: {k}"] = errors.get(f"{mode}: {k}", 0) + v
    rec["errors"] = errors
    return rec
