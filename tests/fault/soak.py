"""Soak: random faults, round after round, with the same recorder and checker as the fault suite.

    uv run python -m tests.fault.soak --minutes 10 [--seed 7] [--clients 6] [--dir /tmp/soak]

Not part of CI. Each round runs the clients on both replicas, injects one to three random faults
(each healed before the next), lets the clients go on for a while, then checks the round's history
and that etcd is left empty. Histories of rounds with violations are kept for a post-mortem. Exit
status 1 if any round violated an invariant or left state behind.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.fault.checker import Report
from tests.fault.harness import Harness

Fault = Callable[[Harness, random.Random], Awaitable[str]]


async def kill_member(h: Harness, rng: random.Random) -> str:
    victim = rng.randrange(h.cluster.size)
    await h.kill_member(victim)
    await asyncio.sleep(rng.uniform(0.5, 4.0))
    await h.restart_member(victim)
    return f"kill -9 member {victim}, restart"


async def kill_leader(h: Harness, rng: random.Random) -> str:
    old = await h.leader()
    await h.kill_member(old)
    await h.cluster.wait_leader(not_=old)
    await asyncio.sleep(rng.uniform(0.5, 3.0))
    await h.restart_member(old)
    return f"kill -9 leader {old}, restart"


async def pause_member(h: Harness, rng: random.Random) -> str:
    leader = await h.leader()
    victim = leader if rng.random() < 0.6 else rng.randrange(h.cluster.size)
    h.pause_member(victim)
    await asyncio.sleep(rng.uniform(0.5, 4.0))
    h.resume_member(victim)
    return f"SIGSTOP member {victim} (leader {leader}), SIGCONT"


async def partition(h: Harness, rng: random.Random) -> str:
    if not h.cluster.partitions:
        return await pause_member(h, rng)
    leader = await h.leader()
    victim = leader if rng.random() < 0.5 else rng.randrange(h.cluster.size)
    how = rng.choice(["peers", "isolate"])
    if how == "peers":
        await h.cut_peers(victim)
    else:
        await h.isolate(victim)
    await asyncio.sleep(rng.uniform(1.0, 5.0))
    await h.heal(victim)
    return f"partition ({how}) member {victim} (leader {leader}), heal"


async def quorum_loss(h: Harness, rng: random.Random) -> str:
    stopped = await h.lose_quorum()
    await asyncio.sleep(rng.uniform(1.0, 5.0))
    h.restore_quorum(stopped)
    return f"quorum loss (SIGSTOP {stopped}), restore"


async def kill_broker(h: Harness, rng: random.Random) -> str:
    victim = rng.randrange(len(h.brokers))
    h.kill_broker(victim)
    await asyncio.sleep(rng.uniform(0.5, 3.0))
    await h.restart_broker(victim)
    return f"kill -9 broker r{victim}, restart"


FAULTS: list[Fault] = [kill_member, kill_leader, pause_member, partition, partition, quorum_loss, kill_broker]


async def soak(minutes: float, seed: int, clients: int, base: Path) -> int:
    rng = random.Random(seed)
    h = Harness(base / "rig", ttl=3, seed=seed)
    await h.start()
    bad = 0
    rounds = 0
    end = time.monotonic() + minutes * 60
    try:
        while time.monotonic() < end:
            rounds += 1
            where = base / f"round-{rounds:03d}"
            await h.repair()
            h.begin(where)
            done: list[str] = []

            async def faults(where: Path = where, done: list[str] = done) -> None:
                for _ in range(rng.randint(1, 3)):
                    done.append(await rng.choice(FAULTS)(h, rng))
                    await h.settle()
                    await asyncio.sleep(rng.uniform(0.5, 2.0))

            cs = h.make_clients(clients, call_timeout=rng.choice([1.5, 3.0]))
            problem = ""
            try:
                await h.workload(cs, ["a", "b", "c/d"], fault=faults, before=2.0, after=3.0, timeout=240)
                await h.finish(cs)
            except AssertionError as e:
                problem = f"etcd not left empty: {e}"
            report: Report = h.check()
            incidents = h.incidents()
            ok = not report.violations and not incidents and not problem
            bad += not ok
            status = "ok" if ok else f"VIOLATIONS (history kept in {where})"
            print(f"round {rounds}: {'; '.join(done)}: {status}", flush=True)
            print("  " + report.summary().replace("\n", "\n  "), flush=True)
            for inc in incidents[:5]:
                print(f"  INTERNAL: {inc.get('msg')}", flush=True)
            if problem:
                print(f"  {problem}", flush=True)
    finally:
        await h.close()
    print(f"{rounds} rounds, {bad} with violations", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fault.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--dir", type=Path, default=None, help="where histories go (default: a new temp dir)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    base = args.dir or Path(tempfile.mkdtemp(prefix="lockbroker-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.minutes:g} min, seed {seed}, histories in {base}", flush=True)
    return asyncio.run(soak(args.minutes, seed, args.clients, base))


if __name__ == "__main__":
    sys.exit(main())
