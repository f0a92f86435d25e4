"""`python -m bench`: the broker and its peers on one etcd, interleaved run by run.

One etcd (EmbeddedEtcd, free loopback ports, a temporary data dir) serves every target. The
brokers run as `lockbroker serve` subprocesses; load comes from agent processes (bench.agent).
For each point (workload and size) every target runs once, then every target again, and so on:
drift on this shared machine spreads over all targets instead of landing on one.

Output in bench/results/<timestamp>/ (or --out): results.jsonl (one line per run), summary.md,
chart.png, meta.json, logs/, and with --profile the broker's py-spy profile.

The modules: run (this: arguments and the whole run), runner (the run loop), measure (what each
workload measures), servers (a target's processes), env (machine facts, subprocesses),
profile_run (--profile), report (summary.md and the chart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from bench import profile_run, report
from bench.env import log
from bench.procs import REPO
from bench.runner import Bench, estimate
from bench.targets import OPT_IN, TARGETS, Sizes, plan, quick_sizes

WORKLOADS = (
    "uncontended",
    "contended",
    "held",
    "waiters",
    "shared-session",
    "shared-session-contended",
    "shared-read",
    "semaphore",
)


def _csv_ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


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
        "--shared-c",
        type=_csv_ints,
        help="workers of the one process in the shared-session workloads (default 64)",
    )
    p.add_argument(
        "--semaphore-limit",
        type=int,
        help="permits of the semaphore workload's semaphore (default 4; C from --c, points with C <= N skipped)",
    )
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
    if args.shared_c:
        s.shared_cs = args.shared_c
    if args.semaphore_limit:
        s.semaphore_limit = args.semaphore_limit
    return s


async def amain(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    out: Path = args.out or REPO / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    wanted = [t.strip() for t in args.targets.split(",")] if args.targets else [t for t in TARGETS if t not in OPT_IN]
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
            bench.meta["profile"] = await profile_run.profile(bench)
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
