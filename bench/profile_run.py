"""`--profile`: py-spy on a broker through one uncontended run, summed by bench/profiling.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import profiling
from bench.env import _exec, log
from bench.measure import run_cycles
from bench.procs import VENV_BIN, cpu_seconds, thread_cpu
from bench.servers import Target
from bench.targets import Point

if TYPE_CHECKING:
    from bench.runner import Bench


async def profile(bench: Bench) -> list[dict[str, Any]]:
    """py-spy on each profiled broker through one uncontended run (not counted in the results)."""
    py_spy = VENV_BIN / "py-spy"
    if not py_spy.exists():
        return [{"error": f"{py_spy} is missing (uv sync installs py-spy with the dev group)"}]
    cs = bench.args.profile_c or [bench.sizes.cs[0] if bench.args.quick else 64]
    out: list[dict[str, Any]] = []
    md: list[str] = []
    for name in bench.args.profile_targets.split(","):
        target = bench.targets.get(name.strip())
        if target is None or not target.brokers:
            out.append({"target": name, "error": "not a broker target of this run"})
            continue
        for c in cs:
            prof, text = await profile_one(bench, py_spy, target, c)
            out.append(prof)
            md.append(text)
    (bench.out / "profile.md").write_text("\n".join(md))
    (bench.out / "profile.json").write_text(json.dumps(out, indent=1))
    log(f"profile: {bench.out / 'profile.md'}")
    return out


async def profile_one(bench: Bench, py_spy: Path, target: Target, c: int) -> tuple[dict[str, Any], str]:
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
            path = bench.out / f"{stem}-{mode}.txt"
            seconds = max(1, int((t2 - time.monotonic()) / 2))
            code, text = await _exec(
                str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                "--format", "raw", "--output", str(path), *flags, timeout=seconds + 60,
            )  # fmt: skip
            (bench.logs / f"py-spy-{target.name}-c{c}-{mode}.log").write_text(text)
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

    bench.seq += 1
    saved = bench.sizes.duration
    bench.sizes.duration = bench.sizes.profile_duration
    try:
        rec = await run_cycles(bench, target, point, on_window=during)
    finally:
        bench.sizes.duration = saved
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
        summary = profiling.summarize(bench.out / name)
        prof[mode] = summary
        md.append(profiling.markdown(summary, f"py-spy --{'gil' if mode == 'gil' else 'gil --native'} ({name})"))
    for mode, err in prof.get("errors", {}).items():
        md.append(f"py-spy {mode} failed: {err}\n")
    return prof, "\n".join(md)
