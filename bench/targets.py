"""What is measured: the targets (a server and the driver that loads it) and the plan of runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetSpec:
    name: str
    driver: str  # bench.agent DRIVERS key
    label: str
    server: str  # "broker", "echo" or "none" (the load goes straight to etcd)
    audit: bool = True
    audit_fsync: str = "always"
    traced: bool = False
    # OTEL_TRACES_SAMPLER[_ARG] for a traced broker, e.g. ("parentbased_traceidratio", "0.01");
    # None: the SDK default (every call sampled).
    sampler: tuple[str, str] | None = None
    replicas: int = 1
    workers: int = 1  # `serve --workers N`
    connections: int = 1  # connections per agent to each broker (several reach several workers)
    interpreter: str = "main"  # "aetcd": the agent runs in aetcd's own venv
    group_commit: bool = True  # the broker's etcd.group_commit
    event_loop: str = "asyncio"  # the broker's --event-loop (asyncio: the default, as deployed)


TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        TargetSpec("broker", "broker", "broker: audit to a file, tracing off (as deployed)", "broker"),
        TargetSpec(
            "broker-stream",
            "broker-stream",
            "broker over the Session stream (the Python client's default): audit to a file, tracing off",
            "broker",
        ),
        TargetSpec(
            "broker-traced", "broker", "broker: audit + tracing to an in-process exporter", "broker", traced=True
        ),
        TargetSpec(
            "broker-traced-1pct",
            "broker",
            "broker: audit + tracing, 1% of calls sampled (parentbased_traceidratio 0.01)",
            "broker",
            traced=True,
            sampler=("parentbased_traceidratio", "0.01"),
        ),
        TargetSpec("broker-noaudit", "broker", "broker: no audit, tracing off", "broker", audit=False),
        TargetSpec(
            "broker-auditlazy",
            "broker",
            "broker: audit to a file with fsync=interval (1 s), tracing off",
            "broker",
            audit_fsync="interval",
        ),
        TargetSpec(
            "broker-nobatch",
            "broker",
            "broker without group commit (every etcd write alone)",
            "broker",
            group_commit=False,
        ),
        TargetSpec("broker-2rep", "broker", "broker: 2 replicas on one etcd (audit, no tracing)", "broker", replicas=2),
        TargetSpec(
            "broker-2w",
            "broker",
            "broker: --workers 2 sharing one port (audit, no tracing), 4 connections per agent",
            "broker",
            workers=2,
            connections=4,
        ),
        TargetSpec(
            "broker-stream-2w",
            "broker-stream",
            "broker over the Session stream: --workers 2 sharing one port (audit, no tracing), 4 connections per agent",
            "broker",
            workers=2,
            connections=4,
        ),
        # Diagnostic variants of the stream path, run only when named in --targets (OPT_IN).
        TargetSpec(
            "broker-stream-noaudit", "broker-stream", "broker over the Session stream: no audit", "broker", audit=False
        ),
        TargetSpec(
            "broker-stream-nobatch",
            "broker-stream",
            "broker over the Session stream without group commit",
            "broker",
            group_commit=False,
        ),
        TargetSpec(
            "broker-stream-uvloop",
            "broker-stream",
            "broker over the Session stream on uvloop (--event-loop uvloop)",
            "broker",
            event_loop="uvloop",
        ),
        TargetSpec("broker-uvloop", "broker", "broker on uvloop (--event-loop uvloop)", "broker", event_loop="uvloop"),
        TargetSpec("etcd-lock", "etcd-lock", "etcd's Lock service (v3lockpb, lease per worker)", "none"),
        TargetSpec("etcd-txn", "etcd-txn", "least etcd work: Txn put-if-absent + DeleteRange", "none"),
        TargetSpec("aetcd", "aetcd", "aetcd's client-side Lock recipe (no broker hop)", "none", interpreter="aetcd"),
        TargetSpec("echo", "echo", "trivial Python grpc.aio echo server, 2 RPCs per cycle", "echo"),
        # Issue 17: shared locks and semaphores (bench/drivers_prims.py).
        TargetSpec(
            "broker-client",
            "broker-client",
            "broker through the Python client (Client, default transport: the Session stream), a session per worker",
            "broker",
        ),
        TargetSpec(
            "etcd-rwmutex",
            "etcd-rwmutex",
            "etcd contrib/recipes' RWMutex (written in bench/ from its docs), lease per worker",
            "none",
        ),
        TargetSpec(
            "etcd-semaphore",
            "etcd-semaphore",
            "a semaphore recipe on etcd: lease-bound keys, the first N by create revision hold",
            "none",
        ),
    )
}

PEERS = ("etcd-lock", "etcd-txn", "aetcd", "echo")
BROKER_VARIANTS = ("broker-traced", "broker-traced-1pct", "broker-noaudit", "broker-auditlazy", "broker-nobatch")
# Not in a run unless named in --targets; then in every uncontended point.
OPT_IN = ("broker-stream-noaudit", "broker-stream-nobatch", "broker-stream-uvloop", "broker-uvloop")
SCALE = ("broker-2rep", "broker-2w", "broker-stream-2w")  # more than one broker process


@dataclass
class Sizes:
    cs: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    # One worker on "one contended lock" is the uncontended C=1 run again: not repeated.
    contended_cs: list[int] = field(default_factory=lambda: [16, 64, 256])
    variant_cs: list[int] = field(default_factory=lambda: [64])  # tracing / audit variants
    scale_cs: list[int] = field(default_factory=lambda: [64, 256])  # two replicas
    runs: int = 3
    warmup: float = 0.75
    duration: float = 2.5
    held: int = 100_000
    held_parallel: int = 64
    probes: int = 200
    waiters: int = 10_000
    waiter_locks: int = 100
    profile_duration: float = 10.0
    # Issue 19: C workers of one process on one session vs on a lease per acquire.
    shared_cs: list[int] = field(default_factory=lambda: [64])
    # Issue 17: the permits of the semaphore workload's one semaphore (its C comes from `cs`).
    semaphore_limit: int = 4


def quick_sizes() -> Sizes:
    return Sizes(
        cs=[8],
        contended_cs=[8],
        variant_cs=[8],
        scale_cs=[8],
        runs=1,
        warmup=0.5,
        duration=1.0,
        held=200,
        held_parallel=16,
        probes=20,
        waiters=200,
        waiter_locks=20,
        profile_duration=2.0,
        shared_cs=[8],
    )


@dataclass(frozen=True)
class Point:
    workload: str  # uncontended, contended, held, waiters, shared-session(-contended), shared-read, semaphore
    param: int  # C, N or W
    targets: tuple[str, ...]

    @property
    def key(self) -> str:
        unit = {"held": "N", "waiters": "W"}.get(self.workload, "C")
        return f"{self.workload} {unit}={self.param:,}"


def plan(
    sizes: Sizes, workloads: list[str], enabled: set[str], *, quick: bool = False, scale_peers: bool = False
) -> list[Point]:
    """Points in the order they run; each point's targets run interleaved, run by run.

    `quick` (the CI smoke run) still runs every target once, in the uncontended point, but each
    other workload only for the broker and etcd's Lock service. `scale_peers` adds etcd's Lock
    service to the held and waiters workloads (minutes more at the full sizes).
    """

    def only(*names: str) -> tuple[str, ...]:
        return tuple(n for n in names if n in enabled)

    points: list[Point] = []
    if "uncontended" in workloads:
        for c in sizes.cs:
            variants = BROKER_VARIANTS if c in sizes.variant_cs else ()
            scale = SCALE if c in sizes.scale_cs else ()
            points.append(Point("uncontended", c, only("broker", "broker-stream", *OPT_IN, *variants, *scale, *PEERS)))
    if "contended" in workloads:
        for c in sizes.contended_cs:
            scale = SCALE if c in sizes.scale_cs and not quick else ()
            peers = ("etcd-lock",) if quick else ("etcd-lock", "etcd-txn", "aetcd")
            nobatch = ("broker-nobatch",) if c in sizes.variant_cs and not quick else ()
            points.append(Point("contended", c, only("broker", "broker-stream", *nobatch, *scale, *peers)))
    big_peers = ("etcd-lock",) if scale_peers or quick else ()
    if "held" in workloads:
        points.append(Point("held", sizes.held, only("broker", *big_peers)))
    if "waiters" in workloads:
        # broker-stream when named: there a waiter is a message on a stream, not a call of its own.
        points.append(Point("waiters", sizes.waiters, only("broker", "broker-stream", *big_peers)))
    # The ways of one process to take locks (bench/measure.py run_shared) all run inside each run
    # of the broker target: each worker on its own lock, or all on one lock.
    for shared in ("shared-session", "shared-session-contended"):
        if shared in workloads:
            points.extend(Point(shared, c, only("broker")) for c in sizes.shared_cs)
    # Issue 17: C readers of one shared lock, and C workers on one semaphore of N permits (C > N,
    # else no one waits), the broker through its Python client against an etcd recipe each.
    if "shared-read" in workloads:
        points.extend(Point("shared-read", c, only("broker-client", "etcd-rwmutex")) for c in sizes.cs)
    if "semaphore" in workloads:
        points.extend(
            Point("semaphore", c, only("broker-client", "etcd-semaphore"))
            for c in sizes.cs
            if c > sizes.semaphore_limit
        )
    return [p for p in points if p.targets]
