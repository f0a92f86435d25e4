"""Broker replicas as child processes (`lockbroker serve`), so one can be killed with -9 mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path

from lockbroker.server.embedded import _with_parent_death_signal
from tests.procutil import REPO, clean_env, lockbroker_command, stop_process


class BrokerError(RuntimeError):
    pass


class BrokerProcess:
    """One `lockbroker serve` replica on 127.0.0.1, pointed at every member of the cluster.

    The first start listens on a free port (read back from the broker's "serving" log line); a
    restart listens on the same port, so clients that know this replica find it again.
    """

    def __init__(
        self,
        name: str,
        endpoints: list[str],
        key_root: str,
        log_file: Path,
        *,
        request_timeout: float = 2.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        self.key_root = key_root
        self.log_file = log_file
        self.request_timeout = request_timeout
        self.extra_args = extra_args
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _argv(self) -> list[str]:
        return [
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--etcd-endpoints",
            ",".join(self.endpoints),
            "--etcd-key-root",
            self.key_root,
            "--etcd-request-timeout",
            str(self.request_timeout),
            "--health-interval",
            "0.2",
            "--grace-period",
            "1",
            "--log-level",
            "info",
            *self.extra_args,
        ]

    async def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise BrokerError(f"broker {self.name} is already running")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            offset = log.tell()
            self.proc = await asyncio.create_subprocess_exec(
                *_with_parent_death_signal(self._argv()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                env=clean_env(),
                cwd=REPO,
            )
        self.paused = False
        deadline = time.monotonic() + timeout
        while True:
            port = self._serving_port(offset)
            if port is not None:
                self.port = port
                return
            if self.proc.returncode is not None:
                raise BrokerError(f"broker {self.name} exited with {self.proc.returncode}: {self.tail(offset)}")
            if time.monotonic() > deadline:
                await self.stop()
                raise BrokerError(f"broker {self.name} did not serve within {timeout:g}s: {self.tail(offset)}")
            await asyncio.sleep(0.05)

    def _serving_port(self, offset: int) -> int | None:
        with self.log_file.open("rb") as f:
            f.seek(offset)
            for line in f.read().splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict) and doc.get("msg") == "lockbroker serving":
                        return int(doc["port"])
        return None

    def tail(self, offset: int = 0, lines: int = 15) -> str:
        with self.log_file.open("rb") as f:
            f.seek(offset)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL this replica, as a crash would."""
        if self.proc is None or self.proc.returncode is not None:
            raise BrokerError(f"broker {self.name} is not running")
        self.proc.send_signal(signal.SIGKILL)
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    async def reap(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.paused = False
        await stop_process(self.proc, grace=5.0)

    def records(self, level: str = "error", since: int = 0) -> list[dict[str, object]]:
        """The broker's log records at `level` (or above), from byte offset `since` of its log."""
        levels = ["debug", "info", "warning", "error", "critical"]
        wanted = set(levels[levels.index(level) :])
        found: list[dict[str, object]] = []
        if not self.log_file.exists():
            return found
        with self.log_file.open("rb") as f:
            f.seek(since)
            text = f.read()
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("level") in wanted:
                    found.append(doc)
        return found

    def log_size(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def incidents(self, since: int = 0) -> list[dict[str, object]]:
        """Calls that ended INTERNAL: the broker logs each as "unhandled error in <method>"."""
        return [r for r in self.records("error", since) if str(r.get("msg", "")).startswith("unhandled error")]


__all__ = ["BrokerError", "BrokerProcess"]
