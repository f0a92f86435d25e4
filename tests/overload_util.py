"""Helpers for the overload suite: a `lockbroker serve` process of our own, its memory and sockets,
and the status details of a refused call.

The broker runs as a separate process so that what is measured (its resident memory, its open
sockets) is the broker's alone, and so that the flooding client does not share its event loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lockbroker.client.errors import rich_status
from lockbroker.server.embedded import free_port
from tests.procutil import clean_env, lockbroker_command, stop_process, wait_until

SERVICE = "lockbroker.v1.LockService"


@dataclass
class Served:
    """A `lockbroker serve` child of this test process."""

    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def assert_running(self) -> None:
        assert self.proc.returncode is None, f"the broker exited with {self.proc.returncode}:\n{self.log()}"

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (VmRSS in /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.proc.pid}")

    def client_connections(self) -> int:
        """Client connections the broker holds open: TCP sockets on its listening port that are
        established, or that the client closed and the broker did not (CLOSE_WAIT)."""
        count = 0
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{self.proc.pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                count += local_port == self.port and fields[3] in (_ESTABLISHED, _CLOSE_WAIT)
        return count


_ESTABLISHED, _CLOSE_WAIT = "01", "08"  # socket states in /proc/net/tcp


async def serve(tmp: Path, *args: str) -> Served:
    """Start `lockbroker serve ARGS` on a free loopback port and wait until health says SERVING."""
    port = free_port()
    log_path = tmp / "broker.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(),
            cwd=tmp,
        )
    served = Served(proc, port, log_path)
    try:
        async with aio.insecure_channel(served.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                served.assert_running()
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                except aio.AioRpcError:
                    return False
                return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

            await wait_until(serving, 60, "lockbroker serve to report SERVING", interval=0.1)
    except BaseException:
        await stop_process(proc)
        raise
    return served


async def stop(served: Served) -> None:
    await stop_process(served.proc, grace=10.0)


@dataclass
class Refusal:
    """What a failed call said: its status, ErrorInfo reason, QuotaFailure and RetryInfo."""

    code: grpc.StatusCode
    reason: str | None = None
    quota_ids: list[str] = field(default_factory=list)
    quota_values: list[int] = field(default_factory=list)
    retry_after: float | None = None
    message: str = ""

    @property
    def key(self) -> tuple[str, str | None]:
        return self.code.name, self.reason

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} quota={self.quota_ids} retry={self.retry_after} {self.message!r}"


def refusal(err: aio.AioRpcError) -> Refusal:
    out = Refusal(err.code(), message=err.details() or "")
    rich = rich_status(err, strict=True)  # raises if the trailer disagrees with the call's own status
    if rich is None:
        return out
    if (info := rich.detail(error_details_pb2.ErrorInfo)) is not None:
        out.reason = info.reason
    if (failure := rich.detail(error_details_pb2.QuotaFailure)) is not None:
        out.quota_ids = [v.quota_id for v in failure.violations]
        out.quota_values = [v.quota_value for v in failure.violations]
    if (retry := rich.detail(error_details_pb2.RetryInfo)) is not None:
        out.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return out


# Every (status, reason) a caller may get (README's error table), plus OK.
DOCUMENTED = {
    ("OK", None),
    ("ABORTED", "LOCK_HELD"),
    ("ABORTED", "WAIT_EXPIRED"),
    ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
    ("NOT_FOUND", "SESSION_NOT_FOUND"),
    ("NOT_FOUND", "SESSION_LOST"),
    ("FAILED_PRECONDITION", "ALREADY_QUEUED"),
    ("FAILED_PRECONDITION", "REQUEST_ID_REUSED"),
    ("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
    ("RESOURCE_EXHAUSTED", "RATE_LIMITED"),
    ("UNAUTHENTICATED", "UNAUTHENTICATED"),
    ("PERMISSION_DENIED", "PERMISSION_DENIED"),
    ("UNAVAILABLE", "BACKEND_UNAVAILABLE"),
    ("UNAVAILABLE", "SHUTTING_DOWN"),
    ("UNAVAILABLE", "AUDIT_UNAVAILABLE"),
}


def undocumented(outcomes: Counter[tuple[str, str | None]]) -> dict[tuple[str, str | None], int]:
    return {k: n for k, n in outcomes.items() if k not in DOCUMENTED}


__all__ = ["DOCUMENTED", "Refusal", "Served", "refusal", "serve", "stop", "undocumented"]
