"""One broker per state dir: an flock on a file that holds the owner's PID.

Two brokers on one embedded etcd data dir would start two etcd members on the same files. The
lock is the kernel's, so it is released when the process dies however it dies; the PID in the
file is only there to name the other process in the error.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lockbroker.server.config import ConfigError

LOCK_FILE = "broker.pid"


class StateDirBusyError(ConfigError):
    """Another live process holds the state dir's lock."""


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_CLOEXEC (Python's default, spelled out): the embedded etcd must not inherit the
            # lock, or it would outlive a broker that was killed.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(
                f"--embedded-state-dir / LOCKBROKER_EMBEDDED_STATE_DIR / [embedded] state_dir: cannot use "
                f"{self.path.parent} ({e.strerror or e}); expected a directory this user can write"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirBusyError(
                f"state dir {self.path.parent} is in use by another lockbroker (pid {other}); stop it, "
                "or give this broker its own --embedded-state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock


__all__ = ["LOCK_FILE", "StateDirBusyError", "StateDirLock"]
