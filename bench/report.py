"""summary.md and chart.png from the records of a run (and from results.jsonl later: `python -m bench.report DIR`)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench import report_prims, report_shared
from bench.report_failures import failures
from bench.stats import spread
from bench.targets import TARGETS

Record = dict[str, Any]
ORDER = list(TARGETS)


def _get(rec: Record, path: str) -> Any:
    """rec["a"]["b.c"] for "a.b.c": at each level the longest key that matches (etcd's method
    names such as "KV.Txn" contain a dot)."""
    value: Any = rec
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(value, dict):
            return None
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in value:
                value = value[key]
                i = j
                break
        else:
            return None
    return value


class Results:
    def __init__(self, records: Iterable[Record]) -> None:
        self.by: dict[tuple[str, int, str], list[Record]] = defaultdict(list)
        self.failed: list[Record] = []
        for r in records:
            if r.get("ok"):
                self.by[(r["workload"], r["param"], r["target"])].append(r)
            else:
                self.failed.append(r)

    def params(self, workload: str) -> list[int]:
        return sorted({p for (w, p, _t) in self.by if w == workload})

    def targets(self, workload: str) -> list[str]:
        present = {t for (w, _p, t) in self.by if w == workload}
        return [t for t in ORDER if t in present]

    def spread(self, workload: str, param: int, target: str, path: str) -> dict[str, float] | None:
        return spread(_get(r, path) for r in self.by.get((workload, param, target), []))

    def median(self, workload: str, param: int, target: str, path: str) -> float | None:
        s = self.spread(workload, param, target, path)
        return None if s is None else s["median"]

    def runs(self, workload: str, param: int, target: str) -> list[Record]:
        return self.by.get((workload, param, target), [])

    def m(self, workload: str, param: int, target: str, path: str, digits: int = 0) -> str:
        """The median, formatted."""
        return fmt(self.median(workload, param, target, path), digits)

    def arrow(self, workload: str, param: int, target: str, before: str, after: str) -> str:
        return f"{self.m(workload, param, target, before)} → {self.m(workload, param, target, after)}"


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_spread(s: dict[str, float] | None, digits: int = 0) -> str:
    if s is None:
        return "n/a"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows), ""]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _tracing_goals(res: Results, c64: int, b: float | None, add: Callable[[str, str, bool | None], None]) -> None:
    """Tracing's cost: always on (every call sampled), and at 1% (parentbased_traceidratio 0.01)."""
    for target, label, limit in (
        ("broker-traced", "tracing costs", 0.15),
        ("broker-traced-1pct", "tracing at 1% sampling costs", 0.05),
    ):
        t = res.median("uncontended", c64, target, "rate")
        cost = None if t is None or not b else 1 - t / b
        add(
            f"{label} <= {limit:.0%} (C={c64})",
            f"{fmt(None if cost is None else cost * 100, 1)}%",
            None if cost is None else cost <= limit,
        )


def _audit_goals(res: Results, c: int, broker: float | None, add: Callable[[str, str, bool | None], None]) -> None:
    n = res.median("uncontended", c, "broker-noaudit", "rate")
    cost = None if n is None or broker is None or not n else 1 - broker / n
    add(
        f"audit log costs <= 10% (C={c})",
        f"{fmt(None if cost is None else cost * 100, 1)}%",
        None if cost is None else cost <= 0.10,
    )
    lazy = res.median("uncontended", c, "broker-auditlazy", "rate")
    if lazy is not None and n:
        # Not a goal of its own: what "every record on disk before the call is answered" costs.
        add(f"audit log with fsync=interval costs (C={c})", f"{fmt((1 - lazy / n) * 100, 1)}%", None)


def goals(res: Results, meta: dict[str, Any]) -> list[str]:
    """The targets of issue 6, each met or not, with the figure it was judged on."""
    rows: list[list[str]] = []

    def add(goal: str, measured: str, ok: bool | None) -> None:
        rows.append([goal, measured, "n/a" if ok is None else ("met" if ok else "**not met**")])

    ucs = res.params("uncontended")
    c64 = 64 if 64 in ucs else (ucs[-1] if ucs else None)
    if c64 is not None:
        b = res.median("uncontended", c64, "broker", "rate")
        add(f"uncontended C={c64}: broker >= 1,150 cycles/s", fmt(b), None if b is None else b >= 1150)
        a = res.median("uncontended", c64, "aetcd", "rate")
        r = _ratio(b, a)
        add(
            f"uncontended C={c64}: broker >= 0.9x aetcd",
            f"{fmt(r, 2)}x ({fmt(b)} vs {fmt(a)})",
            None if r is None else r >= 0.9,
        )
        _tracing_goals(res, c64, b, add)
        _audit_goals(res, c64, b, add)
    if 1 in ucs:
        b = res.median("uncontended", 1, "broker", "acquire_p50_ms")
        e = res.median("uncontended", 1, "etcd-lock", "acquire_p50_ms")
        r = _ratio(b, e)
        add(
            "C=1: acquire p50 <= 1.3x etcd's Lock",
            f"{fmt(r, 2)}x ({fmt(b, 2)} vs {fmt(e, 2)} ms)",
            None if r is None else r <= 1.3,
        )
    ccs = res.params("contended")
    cc = 64 if 64 in ccs else (ccs[-1] if ccs else None)
    if cc is not None:
        b = res.median("contended", cc, "broker", "rate")
        e = res.median("contended", cc, "etcd-lock", "rate")
        r = _ratio(b, e)
        add(
            f"contended C={cc}: broker >= 2x etcd's Lock",
            f"{fmt(r, 2)}x ({fmt(b)} vs {fmt(e)} handoffs/s)",
            None if r is None else r >= 2,
        )
        j = res.spread("contended", cc, "broker", "jain")
        add(f"contended C={cc}: Jain index >= 0.99", fmt_spread(j, 3), None if j is None else j["median"] >= 0.99)
        st = res.spread("contended", cc, "broker", "starved")
        add(f"contended C={cc}: no starved worker", fmt_spread(st), None if st is None else st["max"] == 0)
        p99 = res.spread("contended", cc, "broker", "acquire_p99_ms")
        add(f"contended C={cc}: p99 wait (ms) bounded, reported", fmt_spread(p99, 1), None)
    for n in res.params("held"):
        rss = res.spread("held", n, "broker", "rss_held_mb.broker")
        scale = f" (at N={n:,}; the goal is for 100,000)" if n != 100_000 else ""
        add(
            f"{n:,} held: broker RSS <= 300 MB{scale}",
            fmt_spread(rss, 0) + " MB",
            None if rss is None else rss["max"] <= 300,
        )
        ratio = res.spread("held", n, "broker", "held_vs_idle")
        add(
            f"{n:,} held: one more cycle <= 1.3x idle",
            fmt_spread(ratio, 2) + "x",
            None if ratio is None else ratio["median"] <= 1.3,
        )
    for w in res.params("waiters"):
        runs = res.runs("waiters", w, "broker")
        rss = res.spread("waiters", w, "broker", "rss_queued_mb.broker")
        scale = f" (at W={w:,}; the goal is for 10,000)" if w != 10_000 else ""
        add(
            f"{w:,} waiters: broker RSS <= 400 MB{scale}",
            fmt_spread(rss, 0) + " MB",
            None if rss is None else rss["max"] <= 400,
        )
        if runs:
            errors = sum(sum(r["errors"].values()) for r in runs)
            lost = sum(r["lost"] for r in runs)
            fifo = sum(r["fifo_violations"] for r in runs)
            add(
                f"{w:,} waiters: zero errors, none lost, FIFO kept",
                f"errors {errors}, lost {lost}, FIFO violations {fifo}",
                errors == 0 and lost == 0 and fifo == 0,
            )
    return table(["goal (issue 6)", "measured: median (min-max)", ""], rows)


ETCD_COLUMNS = ("KV.Txn", "KV.Range", "KV.Put", "KV.DeleteRange", "Lease.LeaseTimeToLive", "Watch.Watch")


def cycles_section(res: Results, workload: str) -> list[str]:
    cs = res.params(workload)
    targets = res.targets(workload)
    if not cs:
        return []
    col = [f"C={c}" for c in cs]

    def grid(render: Callable[[int, str], str]) -> list[list[str]]:
        return [[t, *(render(c, t) if res.runs(workload, c, t) else "n/a" for c in cs)] for t in targets]

    if workload == "uncontended":
        out = ["## Uncontended: each worker its own lock", "", "Cycles/s (acquire + release), median (min-max):", ""]
    else:
        out = [
            "## Contended: every worker on one lock",
            "",
            "Handoffs/s (grants inside the window), median (min-max):",
            "",
        ]
    out += table(["target", *col], grid(lambda c, t: fmt_spread(res.spread(workload, c, t, "rate"))))
    if "broker" in targets:
        rows = []
        for peer in ("etcd-lock", "etcd-txn", "aetcd", "echo"):
            if peer in targets:
                ratios = (
                    _ratio(res.median(workload, c, "broker", "rate"), res.median(workload, c, peer, "rate")) for c in cs
                )
                rows.append([f"broker / {peer}", *(fmt(r, 2) for r in ratios)])
        if rows:
            out += ["Ratio of medians, the broker to each peer (same run, interleaved):", ""]
            out += table(["", *col], rows)
    if workload == "uncontended":
        out += ["Latency of a cycle p50 / p99 ms; of the acquire alone p50 ms:", ""]
        out += table(
            ["target", *col],
            grid(
                lambda c, t: (
                    f"{res.m(workload, c, t, 'p50_ms', 2)} / {res.m(workload, c, t, 'p99_ms', 2)}; "
                    f"{res.m(workload, c, t, 'acquire_p50_ms', 2)}"
                )
            ),
        )
    else:
        out += [
            "Jain index; starved workers (no grant in the window); turns of the whole queue in the window "
            "(it stretches up to 12 s to get 5); wait p50 / p99 ms:",
            "",
        ]
        out += table(
            ["target", *col],
            grid(
                lambda c, t: (
                    f"{res.m(workload, c, t, 'jain', 3)}; {res.m(workload, c, t, 'starved')}; "
                    f"{res.m(workload, c, t, 'rotations', 1)}; "
                    f"{res.m(workload, c, t, 'acquire_p50_ms', 1)} / {res.m(workload, c, t, 'acquire_p99_ms', 1)}"
                )
            ),
        )

    def cpu(c: int, t: str) -> str:
        server = res.median(workload, c, t, "cpu_us_per_op.broker") or res.median(
            workload, c, t, "cpu_us_per_op.server"
        )
        etcd = res.median(workload, c, t, "cpu_us_per_op.etcd")
        load = res.median(workload, c, t, "cpu_us_per_op.loadgen")
        roles = ("broker", "server", "etcd", "loadgen")
        cores = sum(v for k in roles if (v := res.median(workload, c, t, f"cpu_cores.{k}")) is not None)
        return f"{fmt(server)} / {fmt(etcd)} / {fmt(load)}; {cores:.2f}"

    out += ["CPU per cycle, µs (broker or server / etcd / load generator); cores busy in all:", ""]
    out += table(["target", *col], grid(cpu))
    c_mid = 64 if 64 in cs else cs[-1]
    present = {k for t in targets for r in res.runs(workload, c_mid, t) for k in (r.get("etcd_per_op") or {})}
    if present:
        others = sorted(k for k in present if k not in ETCD_COLUMNS and "." in k)
        keys = [k for k in ETCD_COLUMNS if k in present] + others + ["raft proposals", "WAL fsyncs"]
        out += [f"etcd's work per cycle at C={c_mid} (gRPC requests by method, raft proposals, WAL fsyncs):", ""]
        out += table(
            ["target", *keys],
            [[t, *(res.m(workload, c_mid, t, f"etcd_per_op.{k}", 2) for k in keys)] for t in targets],
        )
    return out


def held_section(res: Results) -> list[str]:
    out: list[str] = []
    for n in res.params("held"):
        out += [f"## {n:,} locks held at once", ""]
        rows = []
        for t in res.targets("held"):
            server = (
                res.arrow("held", n, t, "rss_idle_mb.broker", "rss_held_mb.broker") if t.startswith("broker") else "n/a"
            )
            rows.append(
                [
                    t,
                    fmt_spread(res.spread("held", n, t, "acquire_rate")),
                    fmt_spread(res.spread("held", n, t, "release_rate")),
                    f"{res.m('held', n, t, 'idle_p50_ms', 2)} / {res.m('held', n, t, 'held_p50_ms', 2)}",
                    fmt_spread(res.spread("held", n, t, "held_vs_idle"), 2),
                    server,
                    res.arrow("held", n, t, "rss_idle_mb.etcd", "rss_held_mb.etcd"),
                ]
            )
        out += table(
            [
                "target",
                "acquire-all /s",
                "release-all /s",
                "one more cycle p50 ms: idle / held",
                "held ÷ idle",
                "broker RSS MB: idle → held",
                "etcd RSS MB: idle → held",
            ],
            rows,
        )
    return out


def waiters_section(res: Results) -> list[str]:
    out: list[str] = []
    for w in res.params("waiters"):
        locks = res.median("waiters", w, res.targets("waiters")[0], "locks")
        out += [f"## {w:,} blocking waiters on {fmt(locks)} locks", ""]
        rows = []
        for t in res.targets("waiters"):
            runs = res.runs("waiters", w, t)
            server = (
                res.arrow("waiters", w, t, "rss_ready_mb.broker", "rss_queued_mb.broker")
                if t.startswith("broker")
                else "n/a"
            )
            rows.append(
                [
                    t,
                    f"{sum(r['granted'] for r in runs):,} / {sum(r['w'] for r in runs):,}",
                    str(sum(r["fifo_violations"] for r in runs)),
                    str(sum(sum(r["errors"].values()) for r in runs)),
                    fmt_spread(res.spread("waiters", w, t, "queue_s"), 1),
                    fmt_spread(res.spread("waiters", w, t, "handoff_rate")),
                    server,
                    res.arrow("waiters", w, t, "rss_ready_mb.etcd", "rss_queued_mb.etcd"),
                ]
            )
        out += table(
            [
                "target",
                "granted (all runs)",
                "FIFO violations",
                "errors",
                "all queued after s",
                "handoffs/s draining",
                "server RSS MB: before → all queued",
                "etcd RSS MB",
            ],
            rows,
        )
    return out


def scale_section(res: Results) -> list[str]:
    rows = []
    for workload in ("uncontended", "contended"):
        for c in res.params(workload):
            one = res.median(workload, c, "broker", "rate")
            two = res.median(workload, c, "broker-2rep", "rate")
            if two is None:
                continue
            b1 = res.median(workload, c, "broker", "cpu_cores.broker")
            b2 = res.median(workload, c, "broker-2rep", "cpu_cores.broker")
            e1 = res.median(workload, c, "broker", "cpu_cores.etcd")
            e2 = res.median(workload, c, "broker-2rep", "cpu_cores.etcd")
            rows.append(
                [
                    f"{workload} C={c}",
                    fmt(one),
                    fmt(two),
                    fmt(_ratio(two, one), 2),
                    f"{fmt(b1, 2)} / {fmt(b2, 2)}",
                    f"{fmt(e1, 2)} / {fmt(e2, 2)}",
                ]
            )
    if not rows:
        return []
    return [
        "## Two broker replicas on one etcd",
        "",
        *table(["point", "1 replica /s", "2 replicas /s", "2 ÷ 1", "broker cores 1 / 2", "etcd cores 1 / 2"], rows),
    ]


def summary(records: list[Record], meta: dict[str, Any]) -> str:
    res = Results(records)
    m = meta.get("machine", {})
    s = meta.get("sizes", {})
    load0 = fmt((m.get("loadavg_start") or [None])[0], 2)
    load1 = fmt((m.get("loadavg_end") or [None])[0], 2)
    dirty = " (uncommitted changes in server/ or interceptors/)" if m.get("dirty") else ""
    lines = [
        "# lockbroker benchmark",
        "",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('memory_gb')} GB, "
        f"kernel {m.get('kernel')}; load average {load0} at start, {load1} at end. "
        f"Python {m.get('python')}, grpcio {m.get('grpcio')}, protobuf {m.get('protobuf')}, "
        f"{' '.join(m.get('etcd') or [])}; lockbroker {m.get('commit')}{dirty}.",
        "",
        f"{s.get('runs')} run(s) per point and target, interleaved; {s.get('warmup')} s warm-up, then a "
        f"{s.get('duration')} s window per cycles run. Every figure is the median (min-max) over runs. "
        f"Wall time {fmt((meta.get('wall_s') or 0) / 60, 1)} min.",
        "",
    ]
    for name, why in (meta.get("unavailable") or {}).items():
        lines += [f"**{name} not measured:** {why}", ""]
    lines += [
        "## Goals",
        "",
        "Judged on the median of the runs; starved workers, errors, losses and FIFO on every run.",
        "",
        *goals(res, meta),
    ]
    lines += cycles_section(res, "uncontended")
    lines += cycles_section(res, "contended")
    lines += held_section(res)
    lines += waiters_section(res)
    lines += scale_section(res)
    lines += report_shared.section(res)
    lines += report_prims.section(res)
    lines += failures(res, records)
    lines += ["Targets:", ""] + [f"- `{t.name}`: {t.label}" for t in TARGETS.values()] + [""]
    return "\n".join(lines)


def _lines(ax: Any, res: Results, workload: str, path: str, *, ylabel: str, title: str) -> None:
    cs = res.params(workload)
    for t in res.targets(workload):
        xs, ys, lo, hi = [], [], [], []
        for c in cs:
            s = res.spread(workload, c, t, path)
            if s is None:
                continue
            xs.append(c)
            ys.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        if xs:
            style = "-" if t.startswith("broker") else "--"
            ax.errorbar(xs, ys, yerr=[lo, hi], label=t, marker="o", capsize=3, linestyle=style)
    if cs:
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent workers C")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run of other workloads leaves this chart empty
        ax.legend(fontsize=7)


def _cpu_bars(ax: Any, res: Results) -> None:
    cs = res.params("uncontended")
    if not cs:
        return
    c = 64 if 64 in cs else cs[-1]
    targets = res.targets("uncontended")
    bottom = [0.0] * len(targets)
    for role, label in (("server", "broker / server"), ("etcd", "etcd"), ("loadgen", "load generator")):
        vals = []
        for t in targets:
            v = res.median("uncontended", c, t, f"cpu_us_per_op.{role}")
            if role == "server":
                v = res.median("uncontended", c, t, "cpu_us_per_op.broker") or v
            vals.append(v or 0.0)
        ax.bar(targets, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_title(f"uncontended C={c}: CPU per cycle")
    ax.set_ylabel("µs of CPU per cycle")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def chart(records: list[Record], path: Path) -> None:
    # Imported here: the summary must not need matplotlib, and the backend must be set first.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    res = Results(records)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle("lockbroker vs peers on one etcd (median; bars: min-max of runs)")
    _lines(axes[0][0], res, "uncontended", "rate", ylabel="cycles/s", title="uncontended: cycles/s (acquire + release)")
    _lines(axes[0][1], res, "contended", "rate", ylabel="handoffs/s", title="one contended lock: handoffs/s")
    _lines(axes[1][0], res, "uncontended", "p99_ms", ylabel="ms", title="uncontended: p99 latency of a cycle")
    _cpu_bars(axes[1][1], res)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, records: list[Record], meta: dict[str, Any]) -> None:
    text = summary(records, meta)
    if (out / "profile.md").exists():
        text += "\n" + (out / "profile.md").read_text()
    (out / "summary.md").write_text(text)
    chart(records, out / "chart.png")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    write(out, records, meta)
    print(out / "summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
