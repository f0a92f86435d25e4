"""The broker's life as a process: signals (drain, second signal, SIGHUP) and the embedded etcd's
supervision. Kept apart from app.py, which assembles the broker.

- SIGTERM/SIGINT: drain (Broker.stop), then exit 0. A second one during the drain exits at once
  with 128 + its number; the embedded etcd (its own process group) gets SIGTERM.
- SIGHUP: re-read the configuration and apply what can change live (Broker.reload).
- The embedded etcd exits: log its status, restart it with backoff, and after
  ETCD_RESTART_ATTEMPTS failed starts in a row end the run with EtcdGaveUpError (exit 69).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from lockbroker.server.config import Config, ConfigError
from lockbroker.server.embedded import EmbeddedEtcd, EtcdNotFoundError, EtcdStartError

if TYPE_CHECKING:
    from lockbroker.server.app import Broker

log = logging.getLogger("lockbroker.server")

# Pauses of 0.5, 1, 2, 4, 8 s between restarts; then the broker exits non-zero so that its own
# supervisor (systemd, Kubernetes) takes over.
ETCD_RESTART_ATTEMPTS = 5
ETCD_RESTART_BASE = 0.5
EXIT_SIGNAL_BASE = 128


class EtcdGaveUpError(RuntimeError):
    """The embedded etcd exited and could not be started again."""


def signal_name(status: int | None) -> str | None:
    """asyncio reports a death by signal N as the status -N."""
    if status is None or status >= 0:
        return None
    try:
        return signal.Signals(-status).name
    except ValueError:
        return None


class EtcdSupervisor:
    """Restarts the embedded etcd when it exits. `probe` refreshes health at once (NOT_SERVING on
    the exit, SERVING after the restart); `fatal` is told when it gives up."""

    def __init__(
        self, etcd: EmbeddedEtcd, probe: Callable[[], Awaitable[None]], fatal: Callable[[BaseException], object]
    ) -> None:
        self._etcd = etcd
        self._probe = probe
        self._fatal = fatal

    async def run(self) -> None:
        """Until cancelled (Broker.stop cancels it before stopping etcd) or it gives up."""
        etcd = self._etcd
        while True:
            status = await etcd.wait()
            if status is None:
                return  # nothing running to watch
            log.error(
                "embedded etcd exited; restarting it",
                extra={"exit_status": status, "signal": signal_name(status), "endpoint": etcd.endpoint},
            )
            await self._probe()
            if not await self._restart():
                err = EtcdGaveUpError(
                    f"the embedded etcd exited and did not start again after {ETCD_RESTART_ATTEMPTS} attempts; "
                    f"see {etcd.log_file}"
                )
                log.critical(str(err))
                self._fatal(err)
                return
            await self._probe()

    async def _restart(self) -> bool:
        for attempt in range(ETCD_RESTART_ATTEMPTS):
            await asyncio.sleep(ETCD_RESTART_BASE * 2**attempt)
            try:
                await self._etcd.restart()
            except (EtcdStartError, EtcdNotFoundError, OSError) as e:
                log.error(
                    "embedded etcd did not start again",
                    extra={"attempt": attempt + 1, "of": ETCD_RESTART_ATTEMPTS, "error": str(e).splitlines()[0]},
                )
                continue
            log.info("embedded etcd restarted", extra={"attempt": attempt + 1, "pid": self._etcd.pid})
            return True
        return False


async def run_until_signal(
    broker: Broker, reload: Callable[[], Config] | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain. SIGHUP calls `reload` and hands the result to
    Broker.reload; a `reload` that raises ConfigError changes nothing. `on_ready` is called once
    the broker serves (a worker tells its parent so; workers.py)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    fatal: list[BaseException] = []
    received: list[str] = []
    pending: set[asyncio.Task[None]] = set()

    def on_stop(signo: signal.Signals) -> None:
        if received:
            _exit_now(broker, signo)
        received.append(signo.name)
        stop.set()

    def on_fatal(err: BaseException) -> None:
        fatal.append(err)
        stop.set()

    def on_hup() -> None:
        if reload is None or broker.server is None:
            log.warning("SIGHUP before the broker was serving; ignored")
            return
        task = asyncio.ensure_future(_reload_from(broker, reload))
        pending.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(pending.discard)

    broker.on_fatal = on_fatal
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    serving = False
    try:
        await broker.start()
        serving = True
        if on_ready is not None:
            on_ready()
        await stop.wait()
        if received:
            log.info(
                "signal received; draining",
                extra={"signal": received[0], "grace_period": broker.config.server.grace_period},
            )
    finally:
        await broker.stop()
        if serving:  # a refused start says why in one line of its own (lockbroker serve prints it)
            log.info("stopped")
    if fatal:
        raise fatal[0]


async def _reload_from(broker: Broker, reload: Callable[[], Config]) -> None:
    try:
        new = reload()
    except ConfigError as e:
        log.error("reload: the configuration is not valid; nothing changed", extra={"error": str(e)})
        return
    await broker.reload(new)


def _exit_now(broker: Broker, signo: signal.Signals) -> None:
    """The second Ctrl-C: no drain. The embedded etcd, in its own process group, gets SIGTERM
    (it stops cleanly on its own); waiters' queue entries are cleaned by the next start."""
    log.warning("second signal; exiting without draining", extra={"signal": signo.name})
    pid = broker.embedded.pid if broker.embedded is not None else None
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(EXIT_SIGNAL_BASE + signo)


__all__ = ["ETCD_RESTART_ATTEMPTS", "EtcdGaveUpError", "EtcdSupervisor", "run_until_signal", "signal_name"]
