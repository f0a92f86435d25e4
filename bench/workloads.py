"""The workloads, run inside a load agent against any driver (stdlib only).

Each takes a driver, the job's parameters and a `barrier` coroutine: at a barrier the agent tells
the orchestrator where it is and waits for its answer, so the orchestrator can sample CPU and RSS
of every process at the same moment, and start several agents together. Times are
time.monotonic(), which is one clock for every process on the machine (CLOCK_MONOTONIC), so the
orchestrator can hand out absolute window bounds.

Every loop is bounded both in count and in time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

Barrier = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
Job = dict[str, Any]
Result = dict[str, Any]

MAX_ERRORS_PER_WORKER = 50
DRAIN_GRACE = 2.0
ERROR_PAUSE = 0.02


class Driver(Protocol):
    """One way to take and give back a lock: the broker, etcd's Lock service, a bare Txn, aetcd..."""

    async def open(self, job: Job) -> None: ...
    async def close(self) -> None: ...
    async def session(self) -> Any: ...
    async def end_session(self, session: Any) -> None: ...
    async def acquire(self, session: Any, name: str, wait: float) -> tuple[int, Any]:
        """Block until granted (at most `wait` seconds); (fencing token or revision, handle)."""

    async def release(self, session: Any, name: str, handle: Any) -> None: ...
    async def waiting(self, names: list[str]) -> int:
        """How many waiters (not holders) are queued on these locks right now."""

    def error_kind(self, exc: BaseException) -> str: ...


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


async def _sessions(driver: Driver, n: int, parallel: int = 64) -> list[Any]:
    sem = asyncio.Semaphore(parallel)

    async def one() -> Any:
        async with sem:
            return await driver.session()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _end_sessions(driver: Driver, sessions: list[Any], parallel: int = 64) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(s: Any) -> None:
        async with sem:
            await driver.end_session(s)

    await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)


class Errors:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.counts: Counter[str] = Counter()

    def note(self, exc: BaseException) -> str:
        kind = self.driver.error_kind(exc)
        self.counts[kind] += 1
        return kind

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class _Cycles:
    """The state a cycles run's workers share: the window bounds and what was counted in it."""

    def __init__(self, driver: Driver, job: Job, t1: float, t2: float) -> None:
        self.driver = driver
        self.contended: bool = job["contended"]
        # Every worker on one name: a contended lock, or issue 17's shared lock or semaphore.
        self.one_lock: bool = job.get("one_lock", self.contended)
        self.prefix: str = job["prefix"]
        self.wait: float = job["wait"]
        self.max_cycles: int = job["max_cycles"]
        self.t1 = t1
        self.t2 = t2  # read by every worker on every turn: the adaptive barrier sets it while they run
        self.errors = Errors(driver)
        self.cycle_us: list[int] = []
        self.acquire_us: list[int] = []
        self.grants: dict[int, int] = dict.fromkeys(job["workers"], 0)
        self.early = 0  # grants before t1
        self.cut = 0  # waits cut short after the window
        self.drained_at = 0.0

    async def worker(self, wid: int, session: Any) -> None:
        name = f"{self.prefix}/c" if self.one_lock else f"{self.prefix}/u{wid}"
        failures = 0
        for _ in range(self.max_cycles):
            start = time.monotonic()
            if start >= self.t2 or failures >= MAX_ERRORS_PER_WORKER:
                break
            # Past the window nothing is counted: a wait still going DRAIN_GRACE after it is
            # cut short (a starving herd would otherwise hold the run for its whole wait).
            this_wait = min(self.wait, max(0.2, self.t2 + DRAIN_GRACE - start))
            try:
                _token, handle = await self.driver.acquire(session, name, this_wait)
                got = time.monotonic()
                try:
                    await self.driver.release(session, name, handle)
                finally:
                    done = time.monotonic()
            except Exception as exc:
                if this_wait < self.wait and time.monotonic() > self.t2:
                    self.cut += 1
                    break
                self.errors.note(exc)
                failures += 1
                await asyncio.sleep(ERROR_PAUSE)
                continue
            # Contended: a handoff is counted when granted inside the window; uncontended: a
            # cycle when it completes inside the window (throughput = completions per second).
            mark = got if self.contended else done
            if mark < self.t1:
                self.early += 1
            elif mark <= self.t2:
                self.grants[wid] += 1
                self.cycle_us.append(_us(done - start))
                self.acquire_us.append(_us(got - start))
        self.drained_at = max(self.drained_at, time.monotonic())

    async def window_end(self, barrier: Barrier, tasks: list[asyncio.Task[None]]) -> None:
        """At t1, tell the orchestrator how many grants the warm-up saw; it answers with t2."""
        await asyncio.sleep(max(0.0, self.t1 - time.monotonic()))
        try:
            answer = await barrier("warm", {"early": self.early})
            self.t2 = float(answer["t2"])
        except BaseException:
            self.t2 = time.monotonic()  # stop the workers, then let the error through
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def cycles(driver: Driver, job: Job, barrier: Barrier) -> Result:
    """Acquire + release in a loop, `workers` coroutines, each on its own lock (uncontended) or
    all on one lock (contended). Counts what completes inside [t1, t2] given at the barriers.

    With "adaptive" at the first barrier, t2 comes at a second one ("warm", at t1, with the
    grants seen so far) while the workers keep going: the orchestrator sizes the window so that
    the queue of a contended lock turns over several times in it.
    """
    workers: list[int] = job["workers"]  # global worker ids: several agents share one run
    sessions = await _sessions(driver, len(workers))
    go = await barrier("ready", {"workers": len(workers)})
    run = _Cycles(driver, job, go["t1"], math.inf if go.get("adaptive") else float(go["t2"]))
    tasks = [asyncio.ensure_future(run.worker(w, s)) for w, s in zip(workers, sessions, strict=True)]
    if math.isinf(run.t2):
        await run.window_end(barrier, tasks)
    await asyncio.gather(*tasks)
    await _end_sessions(driver, sessions)
    return {
        "window": run.t2 - run.t1,
        "completed": sum(run.grants.values()),
        "grants": [run.grants[w] for w in workers],
        "cycle_us": run.cycle_us,
        "acquire_us": run.acquire_us,
        "errors": run.errors.as_dict(),
        "drain_s": max(0.0, run.drained_at - run.t2),
        "cut_after_window": run.cut,
    }


async def _probe(driver: Driver, session: Any, name: str, n: int, errors: Errors) -> list[int]:
    """`n` sequential cycles on one lock, the first tenth discarded as warm-up: one more cycle's latency."""
    out: list[int] = []
    warm = max(1, n // 10)
    for i in range(n + warm):
        start = time.monotonic()
        try:
            _token, handle = await driver.acquire(session, name, 10.0)
            await driver.release(session, name, handle)
        except Exception as exc:
            errors.note(exc)
            continue
        if i >= warm:
            out.append(_us(time.monotonic() - start))
    return out


async def held(driver: Driver, job: Job, barrier: Barrier) -> Result:
    """Take N distinct locks and keep them; one more cycle's latency idle vs while they are held."""
    n: int = job["n"]
    parallel: int = job["parallel"]
    prefix: str = job["prefix"]
    probes: int = job["probes"]
    deadline = time.monotonic() + job["phase_timeout"]
    errors = Errors(driver)
    sessions = await _sessions(driver, parallel)
    probe_session = await driver.session()
    idle_us = await _probe(driver, probe_session, f"{prefix}/probe", probes, errors)
    await barrier("idle", {})

    handles: list[tuple[int, str, Any]] = []
    counter = itertools.count()

    async def take(session: Any) -> None:
        failures = 0
        while time.monotonic() < deadline and failures < MAX_ERRORS_PER_WORKER:
            i = next(counter)
            if i >= n:
                return
            name = f"{prefix}/h{i:07d}"
            try:
                _token, handle = await driver.acquire(session, name, 10.0)
            except Exception as exc:
                errors.note(exc)
                failures += 1
                continue
            handles.append((i, name, (session, handle)))

    start = time.monotonic()
    await asyncio.gather(*(take(s) for s in sessions))
    acquire_s = time.monotonic() - start
    await barrier("held", {"held": len(handles)})
    held_us = await _probe(driver, probe_session, f"{prefix}/probe", probes, errors)
    await barrier("probed", {})

    queue = iter(handles)

    async def give() -> None:
        failures = 0
        for _i, name, (session, handle) in queue:
            if time.monotonic() >= deadline or failures >= MAX_ERRORS_PER_WORKER:
                return
            try:
                await driver.release(session, name, handle)
            except Exception as exc:
                errors.note(exc)
                failures += 1

    start = time.monotonic()
    await asyncio.gather(*(give() for _ in range(parallel)))
    release_s = time.monotonic() - start
    await barrier("released", {})
    await _end_sessions(driver, [*sessions, probe_session])
    return {
        "n": n,
        "held": len(handles),
        "acquire_s": acquire_s,
        "release_s": release_s,
        "idle_us": idle_us,
        "held_us": held_us,
        "errors": errors.as_dict(),
    }


FULL_RECHECK = 8  # polls between two counts of the queues already full (see _until_queued)


async def _until_queued(
    driver: Driver, names: list[str], *, w: int, tasks: Sequence[asyncio.Future[None]], deadline: float, errors: Errors
) -> int:
    """Poll the queues until all `w` waiters are in them (or every waiter has already ended).

    A Describe reads its lock's whole queue, so a poll of every lock costs the broker (and etcd)
    the sum of all queues: at 100,000 waiters more than a second of broker CPU per poll, four
    polls a second, while the broker was still queueing. A lock whose queue is full (waiter i
    waits on lock i % L) is left out of the next polls, and every lock is counted again every
    FULL_RECHECK polls, so a queue that lost waiters (a session lapsed) is not counted as full."""
    counts = dict.fromkeys(names, 0)
    want = {name: len(range(j, w, len(names))) for j, name in enumerate(names)}
    for round_ in range(100_000):
        if time.monotonic() >= deadline:
            break
        todo = [n for n in names if counts[n] < want[n] or round_ % FULL_RECHECK == 0]
        try:
            for n, c in zip(todo, await _waiting_each(driver, todo), strict=True):
                counts[n] = c
        except Exception as exc:
            errors.note(exc)
        if sum(counts.values()) >= w or all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.25)
    return sum(counts.values())


async def _waiting_each(driver: Driver, names: list[str]) -> list[int]:
    """Waiters on each of `names`, 16 locks at a time."""
    sem = asyncio.Semaphore(16)

    async def one(name: str) -> int:
        async with sem:
            return await driver.waiting([name])

    return list(await asyncio.gather(*(one(n) for n in names)))


async def waiters(driver: Driver, job: Job, barrier: Barrier) -> Result:
    """W blocking waiters on L held locks; then release them all and check every waiter was
    granted once, in queue order (fencing tokens rise in the order grants arrive, per lock)."""
    w: int = job["w"]
    n_locks: int = job["locks"]
    prefix: str = job["prefix"]
    wait: float = job["wait"]
    deadline = time.monotonic() + job["phase_timeout"]
    errors = Errors(driver)
    names = [f"{prefix}/w{j:03d}" for j in range(n_locks)]
    holder = await driver.session()
    # A session can wait on many locks at once but only once on each: waiter i uses session
    # i // L on lock i % L, so W waiters need W / L sessions.
    waiter_sessions = await _sessions(driver, -(-w // n_locks))
    holds = [await driver.acquire(holder, name, 10.0) for name in names]
    await barrier("ready", {})

    order: dict[int, list[int]] = {j: [] for j in range(n_locks)}
    granted = [0]
    release_errors = [0]
    launched = time.monotonic()

    async def waiter(i: int) -> None:
        j = i % n_locks
        session = waiter_sessions[i // n_locks]
        try:
            token, handle = await driver.acquire(session, names[j], wait)
        except Exception as exc:
            errors.note(exc)
            return
        order[j].append(token)  # appended as the grant arrives: grants of one lock are serial
        granted[0] += 1
        try:
            await driver.release(session, names[j], handle)
        except Exception as exc:
            errors.note(exc)
            release_errors[0] += 1

    tasks = [asyncio.ensure_future(waiter(i)) for i in range(w)]
    queued = await _until_queued(driver, names, w=w, tasks=tasks, deadline=deadline, errors=errors)
    queue_s = time.monotonic() - launched
    await barrier("queued", {"queued": queued})

    start = time.monotonic()
    for name, (_token, handle) in zip(names, holds, strict=True):
        try:
            await driver.release(holder, name, handle)
        except Exception as exc:
            errors.note(exc)
    _done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    drain_s = time.monotonic() - start
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    violations = sum(1 for tokens in order.values() for a, b in itertools.pairwise(tokens) if b <= a)
    await barrier("drained", {})
    await _end_sessions(driver, [holder, *waiter_sessions])
    return {
        "w": w,
        "locks": n_locks,
        "queued": queued,
        "granted": granted[0],
        "lost": w - granted[0],
        "timed_out": len(pending),
        "fifo_violations": violations,
        "queue_s": queue_s,
        "drain_s": drain_s,
        "errors": errors.as_dict(),
    }


WORKLOADS: dict[str, Callable[[Driver, Job, Barrier], Awaitable[Result]]] = {
    "cycles": cycles,
    "held": held,
    "waiters": waiters,
}
