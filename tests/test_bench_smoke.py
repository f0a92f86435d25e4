"""The benchmark's smoke run (`python -m bench --quick`): it runs end to end on a real etcd, every
target produces numbers, and the outputs parse. Never a timing: speed is for the benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from bench import micro, micro_queue
from bench.drivers_prims import EtcdRWMutexDriver, EtcdSemaphoreDriver
from bench.report_failures import MAX_ERROR_KINDS, top_errors
from bench.targets import OPT_IN, TARGETS
from tests.procutil import REPO, clean_env

# What a run without --targets runs: every target but the diagnostic ones named only on request.
DEFAULT_TARGETS = [t for t in TARGETS if t not in OPT_IN]

SHARED_RETRY = "the session's locks kept changing while queueing"


def _problems(r: dict[str, Any]) -> list[str]:
    """What is wrong with one run's record (CPU is not checked: in a window under a second the
    kernel's tick accounting may charge a light process nothing)."""
    out = []
    # A session's claims cycling at once can exhaust the broker's enqueue retries against the
    # session's release mark (UNAVAILABLE, retryable; bench/README.md, issue 19's section): the
    # benchmark counts these, the smoke run must not fail on the server's known limit.
    errors = {k: v for k, v in r["errors"].items() if not k.startswith(f"shared: UNAVAILABLE: {SHARED_RETRY}")}
    if errors:
        out.append(f"errors {errors}")
    if r["workload"] in ("uncontended", "contended", "shared-read", "semaphore"):
        if not (r.get("completed", 0) > 0 and (r.get("rate") or 0) > 0):
            out.append("no cycle completed")
        elif not 0 < r["p50_ms"] <= r["p99_ms"]:
            out.append(f"latencies p50 {r['p50_ms']} p99 {r['p99_ms']}")
        if "loadgen" not in r.get("cpu_us_per_op", {}) or "etcd" not in r.get("rss_mb", {}):
            out.append(f"no CPU or RSS figures: {r.get('cpu_us_per_op')} {r.get('rss_mb')}")
        if r["target"].startswith("broker"):
            if not r.get("rss_mb", {}).get("broker"):
                out.append("no broker RSS")
            audited = r["target"] != "broker-noaudit"
            if (r.get("audit_bytes", 0) > 0) != audited:
                out.append(f"audit log bytes {r.get('audit_bytes')}")
        if r["workload"] in ("contended", "semaphore") and not 0 < (r.get("jain") or 0) <= 1:
            out.append(f"jain {r.get('jain')}")
    if r["workload"] == "held":
        if r.get("held") != r.get("n") or not r.get("idle_p50_ms") or not r.get("held_p50_ms"):
            out.append(f"held {r.get('held')} of {r.get('n')}, p50 {r.get('idle_p50_ms')} / {r.get('held_p50_ms')}")
        if r["target"] == "broker" and not r.get("rss_held_mb", {}).get("broker"):
            out.append("no broker RSS while held")
    if r["workload"].startswith("shared-session"):
        # One session with a claim per Acquire, a lease per acquire, a session per worker: each
        # a cycles run of its own, and the ratio of the first two.
        for mode in ("shared", "lease", "worker"):
            run = r.get(mode) or {}
            if not (run.get("completed", 0) > 0 and (run.get("rate") or 0) > 0):
                out.append(f"{mode}: no cycle completed")
            elif not 0 < run["p50_ms"] <= run["p99_ms"]:
                out.append(f"{mode}: latencies p50 {run['p50_ms']} p99 {run['p99_ms']}")
        if not (r.get("ratio") or 0) > 0:
            out.append(f"ratio {r.get('ratio')}")
    if r["workload"] == "waiters" and not (r.get("granted") == r.get("w") and r.get("fifo_violations") == 0):
        # Every waiter granted exactly once, each lock's grants in queue order.
        out.append(f"granted {r.get('granted')} of {r.get('w')}, FIFO violations {r.get('fifo_violations')}")
    return out


@pytest.mark.timeout(300)
def test_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        # Every target once: the brokers (the 2-worker one is three processes) start together, which
        # on a loaded 2-core machine took over 110 s.
        timeout=280,
        check=False,
    )
    results = out / "results.jsonl"
    assert results.exists(), proc.stderr[-4000:]
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    failed = [(r["workload"], r["target"], r.get("error")) for r in records if not r.get("ok")]
    assert not failed, (failed, proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["target"] for r in records} == set(DEFAULT_TARGETS), "every target runs (aetcd in its own venv)"
    assert {r["workload"] for r in records} == {
        "uncontended",
        "contended",
        "held",
        "waiters",
        "shared-session",
        "shared-session-contended",
        "shared-read",
        "semaphore",
    }
    # Issue 17: the broker (through its Python client) and the etcd recipe, each with a row.
    prims = {(r["workload"], r["target"]) for r in records if r["workload"] in ("shared-read", "semaphore")}
    assert prims == {
        ("shared-read", "broker-client"),
        ("shared-read", "etcd-rwmutex"),
        ("semaphore", "broker-client"),
        ("semaphore", "etcd-semaphore"),
    }, prims
    assert all(r["limit"] == 4 for r in records if r["workload"] == "semaphore")

    problems = [(r["workload"], r["target"], p) for r in records for p in _problems(r)]
    assert not problems, problems

    meta = json.loads((out / "meta.json").read_text())
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["grpcio"]
    assert meta["unavailable"] == {}
    spans = meta["spans_exported"]
    assert spans and all(n is not None for n in spans.values()), spans
    # Tracing really was on where it samples everything; at 1% a short run may sample no trace at all.
    always = {k: n for k, n in spans.items() if "1pct" not in k}
    assert always and all(n > 0 for n in always.values()), spans

    summary = (out / "summary.md").read_text()
    assert "## Goals" in summary
    assert "## One session per process against a lease per acquire (issue 19)" in summary
    assert "## Shared locks and semaphores (issue 17)" in summary
    assert "| **broker-client / etcd-rwmutex** |" in summary
    assert "| **broker-client / etcd-semaphore** |" in summary
    for name in DEFAULT_TARGETS:
        assert f"| {name} |" in summary, name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_micro_benchmarks_run(capsys: Any) -> None:
    """`python -m bench.micro`: each wrapper runs its loop and reports CPU per call (never judged)."""
    for argv in (["retry"], ["audit", "memory"], ["audit", "always"], ["tracing"]):
        micro.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "bare handler",
        "edge-wrapped (rpc, retry)",
        "bare handler",
        "audit to memory",
        "bare handler",
        "audit to always",
        "bare handler",
        "tracing, 1% sampled",
        "tracing, every call",
    ]
    assert all("µs CPU per call" in line for line in lines)


async def _overlaps(drivers: list[Any], name: str, sessions: list[Any]) -> tuple[int, int, int]:
    """Worker i cycles through one recipe lock with drivers[i] and a short hold: (most holders at
    once, most holders at once while a writer held, cycles done)."""
    holders: set[int] = set()
    writing: set[int] = set()
    most = [0, 0, 0]

    async def worker(i: int, session: Any) -> None:
        driver = drivers[i]
        for _ in range(8):
            _token, handle = await driver.acquire(session, name, 30.0)
            holders.add(i)
            if not driver.shared:
                writing.add(i)
            most[0] = max(most[0], len(holders))
            if writing:
                most[1] = max(most[1], len(holders))
            await asyncio.sleep(0.005)
            holders.discard(i)
            writing.discard(i)
            await driver.release(session, name, handle)
            most[2] += 1

    await asyncio.gather(*(worker(i, s) for i, s in enumerate(sessions)))
    return most[0], most[1], most[2]


async def test_etcd_recipes_exclude(etcd: Any, key_root: str) -> None:
    """The issue 17 peers are real locks: the semaphore recipe never has more than N holders, and
    the RWMutex recipe never lets a writer hold with anyone else (so the ratios compare like with
    like). One event loop drives every worker, so "at once" is exact."""
    job = {"etcd": etcd.endpoint.removeprefix("http://"), "limit": 2}
    sem, reader, writer = EtcdSemaphoreDriver(), EtcdRWMutexDriver(), EtcdRWMutexDriver()
    await sem.open(job)
    await reader.open({**job, "shared": True})
    await writer.open(job)
    try:
        sessions = [await sem.session() for _ in range(6)]  # leases: any driver on this etcd can use them
        most, _, done = await _overlaps([sem] * 6, f"{key_root}/sem", sessions)
        assert done == 6 * 8
        assert 1 <= most <= 2, most
        # Two writers and four readers.
        most, with_writer, done = await _overlaps([writer] * 2 + [reader] * 4, f"{key_root}/rw", sessions)
        assert done == 6 * 8
        assert with_writer == 1, with_writer  # a writer holds alone
        assert most >= 1
        for s in sessions:
            await sem.end_session(s)
    finally:
        for d in (sem, reader, writer):
            await d.close()


def test_micro_queue_runs(capsys: Any) -> None:
    """`python -m bench.micro_queue`: an enqueue-shaped Txn timed at each queue depth, sorted and
    unsorted reads, on its own embedded etcd (never judged)."""
    asyncio.run(micro_queue.main(argparse.Namespace(depths="0,20", txns=2)))
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [int(r[0].replace(",", "")) for r in rows] == [0, 20]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_a_collapsed_runs_errors_are_summarized_not_listed() -> None:
    errors = {f"NOT_FOUND: session {i:04x} expired": i + 1 for i in range(MAX_ERROR_KINDS + 30)}
    text = top_errors(errors)
    assert text.count("NOT_FOUND") == MAX_ERROR_KINDS
    assert f"NOT_FOUND: session {MAX_ERROR_KINDS + 29:04x} expired" in text  # the commonest first
    assert "and 30 other kinds" in text
