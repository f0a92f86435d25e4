"""summary.md's section for issue 17: shared-lock reads and semaphore handoffs, the broker (through
its Python client) against an etcd recipe each, in the same run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.stats import spread

if TYPE_CHECKING:
    from bench.report import Results

BROKER = "broker-client"
# workload: (heading, unit, the recipe it is compared with)
WORKLOADS = {
    "shared-read": ("C readers of one shared lock: acquire shared, release", "cycles/s", "etcd-rwmutex"),
    "semaphore": ("C workers on one semaphore of N permits: acquire a permit, release", "handoffs/s", "etcd-semaphore"),
}
ETCD_KEYS = ("KV.Put", "KV.Txn", "KV.Range", "KV.DeleteRange", "Watch.Watch", "raft proposals", "WAL fsyncs")


def per_run_ratios(res: Results, workload: str, c: int, peer: str) -> list[float]:
    """broker ÷ recipe for each run number: the two ran next to each other (interleaved)."""
    peer_rates = {r["run"]: r.get("rate") for r in res.runs(workload, c, peer)}
    out = []
    for r in res.runs(workload, c, BROKER):
        p = peer_rates.get(r["run"])
        if r.get("rate") is not None and p:
            out.append(r["rate"] / p)
    return out


def _workload(res: Results, workload: str) -> list[str]:
    from bench.report import _ratio, fmt, fmt_spread, table  # noqa: PLC0415 (bench.report imports us)

    heading, unit, peer = WORKLOADS[workload]
    one = unit.removesuffix("s/s")  # "cycle", "handoff"
    cs = res.params(workload)
    targets = [t for t in (BROKER, peer) if any(res.runs(workload, c, t) for c in cs)]
    if not targets:
        return []
    limit = next((r.get("limit") for c in cs for r in res.runs(workload, c, targets[0]) if r.get("limit")), None)
    title = heading.replace("N permits", f"N = {limit} permits") if limit else heading
    col = [f"C={c}" for c in cs]
    out = [f"### {title}", "", f"{unit[0].upper()}{unit[1:]}, median (min-max):", ""]
    rows = [[t, *(fmt_spread(res.spread(workload, c, t, "rate")) for c in cs)] for t in targets]

    def rate(c: int, t: str) -> float | None:
        return res.median(workload, c, t, "rate")

    if len(targets) == 2:
        rows.append(
            [
                f"**{BROKER} / {peer}**",
                *(
                    f"**{fmt(_ratio(rate(c, BROKER), rate(c, peer)), 2)}x**"
                    f" (per run {fmt_spread(spread(per_run_ratios(res, workload, c, peer)), 2)})"
                    for c in cs
                ),
            ]
        )
    out += table(["target", *col], rows)

    def detail(c: int, t: str) -> str:
        m = res.m
        text = f"{m(workload, c, t, 'p50_ms', 1)} / {m(workload, c, t, 'p99_ms', 1)}"
        if workload == "semaphore":
            text += (
                f"; Jain {m(workload, c, t, 'jain', 3)}; starved {m(workload, c, t, 'starved')}; "
                f"rotations {m(workload, c, t, 'rotations', 1)}"
            )
        errors = sum(sum(r.get("errors", {}).values()) for r in res.runs(workload, c, t))
        server = res.median(workload, c, t, "cpu_us_per_op.broker")
        cpu = f"{fmt(server)} / " if server is not None else ""
        cpu += f"{res.m(workload, c, t, 'cpu_us_per_op.etcd')} / {res.m(workload, c, t, 'cpu_us_per_op.loadgen')}"
        return f"{text}; CPU µs {cpu}; errors {errors}"

    what = "cycle p50 / p99 ms" if workload == "shared-read" else "wait for a permit + release p50 / p99 ms"
    extra = "; Jain index, starved workers, turns of the whole queue" if workload == "semaphore" else ""
    out += [
        f"Per target: {what}{extra}; CPU per {one} µs (broker / etcd / load generator); errors, all runs:",
        "",
    ]
    out += table(["target", *col], [[t, *(detail(c, t) for c in cs)] for t in targets])
    c_mid = 64 if 64 in cs else cs[-1]
    out += [f"etcd's work per {one} at C={c_mid}:", ""]
    out += table(
        ["target", *ETCD_KEYS],
        [[t, *(res.m(workload, c_mid, t, f"etcd_per_op.{k}", 2) for k in ETCD_KEYS)] for t in targets],
    )
    return out


def section(res: Results) -> list[str]:
    body = [line for workload in WORKLOADS for line in _workload(res, workload)]
    if not body:
        return []
    return [
        "## Shared locks and semaphores (issue 17)",
        "",
        f"`{BROKER}`: the broker through `lockbroker.client.Client` (default transport, the Session "
        "stream), a session per worker, each cycle a `client.lock(name, session=s, shared=True)` or "
        "`limit=N` block. The recipes run on raw etcd stubs with a lease per worker "
        "(bench/drivers_prims.py). Every target on the same etcd, runs interleaved.",
        "",
        *body,
    ]
