"""One target's servers: its broker replicas (`lockbroker serve` subprocesses) or the echo server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.env import log
from bench.procs import BrokerProcess, EchoProcess
from bench.targets import TargetSpec


class Target:
    def __init__(self, spec: TargetSpec, etcd_endpoint: str, workdir: Path, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.brokers: list[BrokerProcess] = []
        self.echo: EchoProcess | None = None
        if spec.server == "broker":
            # Replicas of one target share a key root: the same locks, served by either.
            self.brokers = [
                BrokerProcess(
                    f"{spec.name}-{i}",
                    etcd_endpoint,
                    f"/bench/{spec.name}",
                    workdir,
                    audit=spec.audit,
                    audit_fsync=spec.audit_fsync,
                    traced=spec.traced,
                    group_commit=spec.group_commit,
                    event_loop=spec.event_loop,
                    sampler=spec.sampler,
                    workers=spec.workers,
                )
                for i in range(spec.replicas)
            ]
        elif spec.server == "echo":
            self.echo = EchoProcess()
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        await asyncio.gather(*(b.start(self.log_dir) for b in self.brokers))
        if self.echo is not None:
            await self.echo.start(self.log_dir)

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.brokers))
        if self.echo is not None:
            await self.echo.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()
        self.restarts += 1

    async def ensure_running(self) -> None:
        procs = [b.proc for b in self.brokers] + ([self.echo.proc] if self.echo else [])
        if any(p is None or p.returncode is not None for p in procs):
            log(f"  {self.name}: a server process had exited; restarting it")
            await self.restart()

    @property
    def server_pids(self) -> list[int]:
        if self.echo is not None:
            return [self.echo.pid]
        return [pid for b in self.brokers for pid in b.pids]

    @property
    def addresses(self) -> list[str]:
        if self.echo is not None:
            return [self.echo.address]
        # The same address twice: the driver opens a connection for each (SO_REUSEPORT workers).
        return [b.address for b in self.brokers for _ in range(self.spec.connections)]

    def truncate_audit(self) -> int:
        return sum(b.truncate_audit() for b in self.brokers)
