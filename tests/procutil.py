"""Helpers for tests that run real processes and read rich gRPC errors.

Processes: only the ones a test started are ever signalled, always by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from lockbroker.client.errors import rich_status

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


# -- processes ------------------------------------------------------------------------------


def lockbroker_command() -> list[str]:
    """The installed `lockbroker` entry point of this venv (what `uv run lockbroker` runs)."""
    entry = VENV_BIN / "lockbroker"
    assert entry.is_file() and os.access(entry, os.X_OK), (
        f"{entry} is missing: the [project.scripts] entry point `lockbroker` is not installed in the venv "
        "(run `uv sync`)"
    )
    return [str(entry)]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours, minus anything that would configure lockbroker or etcd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCKBROKER_", "ETCD_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def proc_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped: it runs no more code."""
    return proc_state(pid) in (None, "Z", "X")


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, name) of every live process whose parent is `pid`, found by scanning /proc."""
    found: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(pid) and fields.get("State", "").strip()[:1] not in ("Z", "X"):
            found.append((int(entry.name), fields.get("Name", "").strip()))
    return found


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM our child by its PID, SIGKILL it if it outlives `grace`, and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `check` until it is true; return the seconds it took, or fail naming `what`."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


# -- rich errors ----------------------------------------------------------------------------


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    error_info: error_details_pb2.ErrorInfo | None
    retry_info: error_details_pb2.RetryInfo | None


def rich_error(err: grpc.RpcError) -> RichError:
    """The google.rpc.Status in grpc-status-details-bin, checked against the call's own status."""
    rich = rich_status(err, strict=True)  # raises ValueError if code/message disagree with the trailer
    assert rich is not None, f"no grpc-status-details-bin trailer on {err.code()}: {err.details()}"
    return RichError(
        err.code(),
        err.details() or "",
        rich.status,
        rich.detail(error_details_pb2.ErrorInfo),
        rich.detail(error_details_pb2.RetryInfo),
    )


def assert_unavailable(err: object, reason: str) -> RichError:
    """UNAVAILABLE with ErrorInfo(domain lockbroker, `reason`) and a RetryInfo, as lock.proto promises."""
    assert isinstance(err, grpc.RpcError), f"expected an RPC error, got {err!r}"
    rich = rich_error(err)
    assert rich.code == grpc.StatusCode.UNAVAILABLE, (rich.code, rich.message)
    assert rich.error_info is not None, f"no ErrorInfo in {rich.status}"
    assert rich.error_info.domain == "lockbroker"
    assert rich.error_info.reason == reason, (rich.error_info.reason, rich.message)
    assert rich.retry_info is not None, f"no RetryInfo in {rich.status}"
    delay = rich.retry_info.retry_delay
    assert delay.seconds >= 0 and delay.nanos >= 0
    return rich


# -- a TCP proxy that can lose replies ------------------------------------------------------


class LossyProxy:
    """A loopback TCP proxy to one upstream that can drop everything the upstream sends back.

    With `drop_replies` on, requests still reach the upstream (and etcd applies them) but no answer
    returns: the caller sees a write whose outcome is unknown, as on a real network partition.
    `cut()` closes every proxied connection, so the client reconnects afresh once replies flow again.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.drop_replies = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, up_w}
        for src, dst, replies in ((client_r, up_w, False), (up_r, client_w, True)):
            task = asyncio.create_task(self._pipe(src, dst, replies))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
        try:
            while data := await src.read(65536):
                if replies and self.drop_replies:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def cut(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
