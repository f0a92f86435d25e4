"""CPU per lock cycle on the Session stream path, broker and load in one process, on a real etcd.

    uv run python -m bench.micro_stream [--c 64] [--seconds 5] [--audit never|always|off] [--repeat 3]
        [--loop asyncio|uvloop]

The full benchmark's figures swing by a third on the shared 2-core machine, which hides a change
worth 5% of a cycle. CPU seconds per cycle of one process (the broker and a stream load generator
sharing one asyncio loop, as bench/drivers_grpc.py's BrokerStreamDriver loads a broker) move far
less with the machine's load than cycles per second do. The load side is the same code before and
after a broker change, so a difference between two builds is the broker's. etcd runs as its own
process and is not counted. Prints µs of CPU per cycle (process, and the loop's thread alone).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
import uuid
from pathlib import Path

from grpc import aio

from bench.drivers_grpc import SESSION_TTL, _duration, _SessionMux
from lockbroker.server.app import Broker
from lockbroker.server.config import AuditConfig, Config, EtcdConfig, LockLimits, ServerConfig
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.v1 import lock_pb2, lock_pb2_grpc


async def measure(endpoint: str, tmp: Path, args: argparse.Namespace, run: int) -> tuple[float, float, int]:
    c, seconds, audit = args.c, args.seconds, args.audit
    audit_cfg = AuditConfig() if audit == "off" else AuditConfig(file=str(tmp / f"audit-{run}.jsonl"), fsync=audit)
    cfg = Config(
        server=ServerConfig(listen="127.0.0.1:0", grace_period=1.0),
        etcd=EtcdConfig(endpoints=(endpoint,), key_root=f"/micro-{run}-{uuid.uuid4().hex[:6]}"),
        limits=LockLimits(),
        audit=audit_cfg,
    )
    broker = Broker(cfg)
    await broker.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
            mux = _SessionMux(lock_pb2_grpc.LockServiceStub(ch))
            create = lock_pb2.CreateSessionRequest(ttl=_duration(SESSION_TTL), owner="micro")
            sessions = [(await mux.ask(open=lock_pb2.OpenSession(create=create))).open.session_id for _ in range(c)]
            stop = False
            cycles = 0

            async def worker(i: int, sid: str) -> None:
                nonlocal cycles
                for n in itertools.count():
                    if stop:
                        return
                    req = lock_pb2.AcquireRequest(
                        name=f"m/{i}", session_id=sid, wait_timeout=_duration(5), request_id=f"{sid}-{n}"
                    )
                    token = (await mux.ask(acquire=req)).acquire.grant.fencing_token
                    rel = lock_pb2.ReleaseRequest(name=f"m/{i}", fencing_token=token, session_id=sid)
                    await mux.ask(release=rel)
                    cycles += 1

            tasks = [asyncio.create_task(worker(i, sid)) for i, sid in enumerate(sessions)]
            await asyncio.sleep(min(1.0, seconds / 4))  # warm-up
            c0, t0, n0 = time.process_time(), time.thread_time(), cycles
            await asyncio.sleep(seconds)
            c1, t1, n1 = time.process_time(), time.thread_time(), cycles
            stop = True
            await asyncio.gather(*tasks, return_exceptions=True)
            await mux.close()
        done = n1 - n0
        return (c1 - c0) / max(done, 1) * 1e6, (t1 - t0) / max(done, 1) * 1e6, done
    finally:
        await broker.stop(grace=1.0)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="lockbroker-micro-") as d:
        tmp = Path(d)
        async with EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp / "etcd")) as etcd:
            results = []
            for run in range(args.repeat):
                proc, loop, done = await measure(etcd.endpoint, tmp, args, run)
                results.append((proc, loop))
                print(f"run {run + 1}: {done} cycles, {proc:,.0f} µs CPU per cycle ({loop:,.0f} on the loop's thread)")
            procs = sorted(p for p, _ in results)
            loops = sorted(lp for _, lp in results)
            mid = len(results) // 2
            print(
                f"median: {procs[mid]:,.0f} µs per cycle, loop thread {loops[mid]:,.0f} µs"
                f" (C={args.c}, audit {args.audit})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--c", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--audit", choices=("off", "never", "always"), default="never")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args))
