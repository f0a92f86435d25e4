"""summary.md's section for issue 19: one session per process against a lease per acquire."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.stats import spread

if TYPE_CHECKING:
    from bench.report import Results

WORKLOADS = {
    "shared-session": "each worker its own lock",
    "shared-session-contended": "every worker on one lock",
}
ETCD_KEYS = ("KV.Txn", "KV.Range", "Lease.LeaseGrant", "Lease.LeaseRevoke", "WAL fsyncs")
MODES = {"shared": "one session", "lease": "lease per acquire", "worker": "session per worker"}


def section(res: Results) -> list[str]:
    # Imported here: bench.report imports this module.
    from bench.report import _ratio, fmt, fmt_spread, table  # noqa: PLC0415

    rows: list[list[str]] = []
    etcd_rows: list[list[str]] = []
    for workload, label in WORKLOADS.items():
        for c in res.params(workload):
            runs = res.runs(workload, c, "broker")
            if not runs:
                continue
            shared = res.median(workload, c, "broker", "shared.rate")
            lease = res.median(workload, c, "broker", "lease.rate")
            per_run = spread(r.get("ratio") for r in runs)
            cpu = " / ".join(fmt(res.median(workload, c, "broker", f"{m}.cpu_us_per_op.broker")) for m in MODES)
            rows.append(
                [
                    f"{label}, C={c}",
                    fmt_spread(res.spread(workload, c, "broker", "shared.rate")),
                    fmt_spread(res.spread(workload, c, "broker", "lease.rate")),
                    f"**{fmt(_ratio(shared, lease), 2)}x**",
                    fmt_spread(per_run, 2),
                    fmt_spread(res.spread(workload, c, "broker", "worker.rate")),
                    cpu,
                    " / ".join(res.m(workload, c, "broker", f"{m}.p50_ms", 1) for m in MODES),
                    # Failed cycles are not counted in cycles/s: a mode that fails some is not "faster".
                    " / ".join(str(sum(sum(r.get(m, {}).get("errors", {}).values()) for r in runs)) for m in MODES),
                ]
            )
            for mode, name in MODES.items():
                etcd_rows.append(
                    [
                        f"{label}, C={c}, {name}",
                        *(res.m(workload, c, "broker", f"{mode}.etcd_per_op.{k}", 2) for k in ETCD_KEYS),
                    ]
                )
    if not rows:
        return []
    return [
        "## One session per process against a lease per acquire (issue 19)",
        "",
        "C workers (asyncio tasks on the raw stubs) in ONE load agent process. One session: a single "
        "CreateSession, then every cycle is Acquire with `new_claim` and a request_id, and Release by "
        "fencing token. Lease per acquire: every Acquire is session-less (the broker makes a session "
        "for that lock, TTL 60 s) and Release ends it. For reference, a session per worker (the "
        "uncontended and contended workloads' client). The three run in each run, order rotating. "
        "Cycles/s, median (min-max); the ratio is one session ÷ lease per acquire:",
        "",
        *table(
            [
                "point",
                "one session /s",
                "lease per acquire /s",
                "ratio of medians",
                "ratio per run",
                "session per worker /s",
                "broker µs CPU per cycle (one / lease / per worker)",
                "cycle p50 ms (one / lease / per worker)",
                "errors, all runs (one / lease / per worker)",
            ],
            rows,
        ),
        "etcd's work per cycle (gRPC requests by method, WAL fsyncs):",
        "",
        *table(["point, mode", *ETCD_KEYS], etcd_rows),
    ]
