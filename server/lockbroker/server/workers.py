"""`lockbroker serve --workers N`: N broker processes sharing the listen port.

One asyncio thread is one core, so a Python gRPC server uses more cores the way grpc's
`examples/python/multiprocessing` does: several processes bind the same port with SO_REUSEPORT
and the kernel spreads new connections over them. Each worker is a full broker on the same etcd;
everything they must agree on (locks, queues, sessions, held-state quotas) is in etcd already.

The parent process:
- guards the ports (ports.PortGuard): only its own workers may share them; a second
  `lockbroker serve` on the address fails to start.
- runs the embedded etcd when no endpoints are configured (holding the state dir's lock and
  restarting it as `lifecycle.EtcdSupervisor` does) and gives its endpoint to the workers.
- starts the workers by exec, not fork: the parent runs an event loop, the etcd supervisor and,
  with --metrics-listen, grpc; a forked child would inherit all of that mid-flight (grpc's fork
  caveat, grpc/grpc#16001). An exec'd worker is `lockbroker serve` with the same arguments plus
  `_LOCKBROKER_WORKER` (a JSON `WorkerSpec`) in its environment, so SIGHUP re-reads the same flags
  and file in each worker.
- forwards signals: SIGTERM/SIGINT drain every worker, then etcd stops (exit 0); a second one
  ends the workers at once and exits 128+signal; SIGHUP reloads every worker.
- restarts a worker that exits with backoff (0.5 s doubling); a worker slot that fails
  WORKER_RESTART_ATTEMPTS times in a row (a worker that served WORKER_STABLE_AFTER s resets the
  count) ends the broker with exit 69, for systemd or Kubernetes to take over.
- serves /metrics (metrics.WorkersMetrics): the workers' counters summed from prometheus
  multiprocess files, and the etcd state gauges once.

Workers live in process groups of their own (a Ctrl-C reaches only the parent, which drains them
in order) and ask the kernel for SIGTERM when the parent dies, even by SIGKILL, so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lockbroker.server import lifecycle, logs
from lockbroker.server.config import Config, ConfigError
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.ports import PortGuard, split
from lockbroker.server.statedir import StateDirLock

if TYPE_CHECKING:
    from lockbroker.server.etcd.client import EtcdClient
    from lockbroker.server.metrics import WorkersMetrics

log = logging.getLogger("lockbroker.server")

WORKER_ENV = "_LOCKBROKER_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_RESTART_ATTEMPTS = 5
WORKER_RESTART_BASE = 0.5
WORKER_STABLE_AFTER = 30.0  # a worker up this long has not "kept dying"
EXIT_UNAVAILABLE = 69
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells one worker, through its environment."""

    index: int
    parent: int
    ready_fd: int
    listen: str
    health_listen: str | None
    etcd: str | None  # the embedded etcd's endpoint; None: the configured endpoints

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSpec | None:
        raw = env.get(WORKER_ENV)
        return None if raw is None else cls(**json.loads(raw))

    def apply(self, cfg: Config) -> Config:
        """The configuration as this worker uses it: the parent's resolved ports and etcd."""
        server = dataclasses.replace(cfg.server, listen=self.listen, health_listen=self.health_listen)
        etcd = cfg.etcd if self.etcd is None else dataclasses.replace(cfg.etcd, endpoints=(self.etcd,))
        return dataclasses.replace(cfg, server=server, etcd=etcd)

    def become(self) -> None:
        """Die with the parent (SIGTERM: a drain), and name this worker in every log line."""
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.parent:  # the parent died before prctl: serve nothing
            raise SystemExit(EXIT_UNAVAILABLE)
        name_log_lines(self.index)

    def ready(self) -> None:
        """Tell the parent this worker serves (called once, from lifecycle.run_until_signal)."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)


class _WorkerField(logging.Filter):
    def __init__(self, worker: int | str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def name_log_lines(worker: int | str) -> None:
    """Every JSON log line from now on carries "worker": a worker's index, or "parent"."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(worker))


def _read_once(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)


# -- the parent -----------------------------------------------------------------------------


class WorkersGaveUpError(RuntimeError):
    """A worker kept dying."""


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready_at: float | None = None
    failures: int = 0


class Parent:
    def __init__(self, argv: Sequence[str], cfg: Config, reload: Callable[[], Config]) -> None:
        self.argv = list(argv)
        self.cfg = cfg
        self._reload = reload
        self.slots = [_Slot(i) for i in range(cfg.server.workers)]
        self.guard = PortGuard(
            [("--listen", cfg.server.listen)]
            + ([("--health-listen", cfg.server.health_listen)] if cfg.server.health_listen else [])
        )
        self.ports: dict[str, str] = {}
        self.embedded: EmbeddedEtcd | None = None
        self._state_lock: StateDirLock | None = None
        self._metrics_dir: str | None = None
        self._metrics: WorkersMetrics | None = None
        self._etcd_client: EtcdClient | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._received: list[str] = []
        self._fatal: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # The run ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.ports = self.guard.acquire()
        try:
            etcd = await self._start_etcd()
            await self._start_metrics(etcd)
            code = await self._start_workers(etcd)
            if code is not None:
                return code
            self.guard.release_ports()
            log.info(
                "lockbroker serving",
                extra={
                    "listen": self.cfg.server.listen,
                    "port": int(split(self.ports["--listen"])[1]),
                    "workers": len(self.slots),
                    "pids": [s.proc.pid for s in self.slots if s.proc is not None],
                },
            )
            for slot in self.slots:
                self._spawn_task(self._watch(slot, etcd))
            await self._stop.wait()
            if self._received:
                log.info(
                    "signal received; draining every worker",
                    extra={"signal": self._received[0], "grace_period": self.cfg.server.grace_period},
                )
        finally:
            await self._shutdown()
        if self._fatal:
            log.critical(str(self._fatal[0]))
            return EXIT_UNAVAILABLE
        log.info("stopped")
        return 0

    async def _start_etcd(self) -> str | None:
        if self.cfg.etcd.endpoints:
            return None
        state = self.cfg.embedded.resolved_state_dir()
        self._state_lock = StateDirLock(state)
        self._state_lock.acquire()
        self.embedded = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=state / "etcd", binary=self.cfg.embedded.binary))
        await self.embedded.start()
        log.info("started embedded etcd", extra={"endpoint": self.embedded.endpoint, "data_dir": str(state)})

        async def nothing() -> None:  # the workers probe etcd for their own health
            return None

        supervisor = lifecycle.EtcdSupervisor(self.embedded, nothing, self._give_up)
        self._spawn_task(supervisor.run())
        return self.embedded.endpoint

    async def _start_metrics(self, etcd: str | None) -> None:
        listen = self.cfg.server.metrics_listen
        if not listen:
            return
        from lockbroker.server.etcd.client import EtcdClient  # noqa: PLC0415  # grpc only when asked for
        from lockbroker.server.metrics import WorkersMetrics  # noqa: PLC0415

        self._metrics_dir = tempfile.mkdtemp(prefix="lockbroker-metrics-")
        metrics = WorkersMetrics(self._metrics_dir)
        etcd_cfg = self.cfg.etcd if etcd is None else dataclasses.replace(self.cfg.etcd, endpoints=(etcd,))
        self._etcd_client = client = EtcdClient(etcd_cfg)
        metrics.watch_state(client, etcd_cfg.key_root)
        try:
            metrics.serve(listen)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot serve metrics on {listen}: {e}") from None
        self._metrics = metrics
        log.info(
            "metrics on /metrics", extra={"metrics_listen": listen, "port": metrics.port, "workers": len(self.slots)}
        )

    async def _start_workers(self, etcd: str | None) -> int | None:
        """Start every worker; None once all serve, else the exit code of the one that did not."""
        results = await asyncio.gather(*(self._start(slot, etcd) for slot in self.slots))
        failed = next((code for code in results if code is not None), None)
        if failed is None:
            return None
        log.error("a worker did not start; stopping the others", extra={"exit_status": failed})
        return failed if failed > 0 else EXIT_UNAVAILABLE

    async def _start(self, slot: _Slot, etcd: str | None) -> int | None:
        """Spawn one worker and wait until it serves: None, or its exit status if it died first."""
        read_fd, write_fd = os.pipe()
        spec = WorkerSpec(
            index=slot.index,
            parent=os.getpid(),
            ready_fd=write_fd,
            listen=self.ports["--listen"],
            health_listen=self.ports.get("--health-listen"),
            etcd=etcd,
        )
        env = {**os.environ, WORKER_ENV: json.dumps(dataclasses.asdict(spec))}
        if self._metrics_dir is not None:
            env[MULTIPROC_ENV] = self._metrics_dir
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lockbroker.server.cli",
                *self.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(write_fd,),
                process_group=0,  # a Ctrl-C at the terminal reaches the parent only
            )
        finally:
            os.close(write_fd)
        log.info("worker started", extra={"index": slot.index, "pid": slot.proc.pid})
        # EOF (b"") when the worker exits before it serves. Bounded by the worker's own start.
        line = await asyncio.to_thread(_read_once, read_fd)
        if line.startswith(b"ready"):
            slot.ready_at = time.monotonic()
            return None
        return await slot.proc.wait()

    async def _watch(self, slot: _Slot, etcd: str | None) -> None:
        """Restart `slot`'s worker whenever it exits, until the parent stops or gives up."""
        while not self._stopping:
            assert slot.proc is not None
            status = await slot.proc.wait()
            if self._stopping:
                return
            up = time.monotonic() - slot.ready_at if slot.ready_at is not None else 0.0
            slot.failures = 1 if up >= WORKER_STABLE_AFTER else slot.failures + 1
            log.error(
                "worker exited; restarting it",
                extra={
                    "index": slot.index,
                    "pid": slot.proc.pid,
                    "exit_status": status,
                    "signal": lifecycle.signal_name(status),
                    "attempt": slot.failures,
                    "of": WORKER_RESTART_ATTEMPTS,
                },
            )
            while not self._stopping:
                if slot.failures > WORKER_RESTART_ATTEMPTS:
                    self._give_up(
                        WorkersGaveUpError(
                            f"worker {slot.index} exited {WORKER_RESTART_ATTEMPTS} times in a row; giving up"
                        )
                    )
                    return
                await asyncio.sleep(WORKER_RESTART_BASE * 2 ** (slot.failures - 1))
                if self._stopping:
                    return
                slot.ready_at = None
                failed = await self._start(slot, etcd)
                if failed is None:
                    log.info("worker restarted", extra={"index": slot.index, "pid": slot.proc.pid})
                    break
                slot.failures += 1
                log.error("worker did not start again", extra={"index": slot.index, "exit_status": failed})

    # Signals --------------------------------------------------------------------------------

    def _on_stop(self, signo: signal.Signals) -> None:
        if self._received:
            self._exit_now(signo)
        self._received.append(signo.name)
        self._stop.set()

    def _on_hup(self) -> None:
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("reload: the configuration is not valid; nothing changed", extra={"error": str(e)})
            return
        logs.set_level(new.server.log_level)
        # Only workers that serve: SIGHUP's default action ends a process, and a worker still
        # starting has no handler yet (it reads the configuration as it is now anyway).
        self._signal_workers(signal.SIGHUP, serving_only=True)
        log.info("reloaded on SIGHUP; told every worker", extra={"workers": len(self.slots)})

    def _give_up(self, err: BaseException) -> None:
        self._fatal.append(err)
        self._stop.set()

    def _signal_workers(self, sig: signal.Signals, *, serving_only: bool = False) -> None:
        for slot in self.slots:
            if serving_only and slot.ready_at is None:
                continue
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, sig)

    def _exit_now(self, signo: signal.Signals) -> None:
        """The second Ctrl-C: the workers' second signal too (they exit at once), etcd SIGTERM."""
        log.warning("second signal; exiting without draining", extra={"signal": signo.name})
        self._signal_workers(signal.SIGTERM)
        pid = self.embedded.pid if self.embedded is not None else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(lifecycle.EXIT_SIGNAL_BASE + signo)

    # Shutdown -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Drain every worker (each within its grace period), then etcd, then the rest."""
        self._stopping = True
        # Restarts first, so that no worker starts after the others were told to stop.
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._signal_workers(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None]
        budget = self.cfg.server.grace_period + 10.0  # each worker's drain, plus its cleanups
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), budget)
        except TimeoutError:
            log.error("workers did not drain in time; killing them", extra={"after": budget})
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
        if self._etcd_client is not None:
            await self._etcd_client.close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self.embedded is not None:
            await self.embedded.stop()
        if self._state_lock is not None:
            self._state_lock.release()
        self.guard.close()

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def run_parent(argv: Sequence[str], cfg: Config, reload: Callable[[], Config]) -> int:
    name_log_lines("parent")
    return asyncio.run(Parent(argv, cfg, reload).run())


__all__ = ["WORKER_ENV", "Parent", "WorkerSpec", "name_log_lines", "run_parent"]
