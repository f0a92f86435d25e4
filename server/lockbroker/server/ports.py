"""The ports of `serve --workers N`: shared by its own workers only.

SO_REUSEPORT lets any process of the same user join a port, so a second `lockbroker serve` on
the address must be refused before the workers start. The parent flocks a file named after the
address (two parents starting at once) and binds the address itself without SO_REUSEPORT, which
fails while anything listens there (a single broker, a multi-worker one, another program). It
keeps those sockets bound, never listening, until its workers listen, so port 0 resolves to one
port for all of them. (Checked on Linux: sockets with SO_REUSEADDR|SO_REUSEPORT bind and listen
beside a bound, non-listening SO_REUSEADDR socket; a bind without SO_REUSEPORT fails beside
listening ones.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lockbroker.server.config import ConfigError


def split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class PortGuard:
    """Keeps the ports of `serve --workers N` to its own workers (see the module docstring)."""

    def __init__(self, listens: Sequence[tuple[str, str]]) -> None:
        self._listens = listens  # (setting, HOST:PORT)
        self._sockets: list[socket.socket] = []
        self._locks: list[int] = []

    def acquire(self) -> dict[str, str]:
        """Each setting's address with its port resolved; ConfigError if one is in use."""
        resolved: dict[str, str] = {}
        try:
            for setting, listen in self._listens:
                host, port = split(listen)
                if port:
                    self._flock(setting, listen, host, port)
                port = self._probe(setting, listen, host, port)
                resolved[setting] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                if port:
                    self._flock(setting, listen, host, port)  # port 0: the port just picked
        except BaseException:
            self.close()
            raise
        return resolved

    def _flock(self, setting: str, listen: str, host: str, port: int) -> None:
        folder = Path(tempfile.gettempdir()) / f"lockbroker-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"listen-{host.replace(':', '_')}-{port}.lock"
        if any(os.fstat(fd).st_ino == _inode(path) for fd in self._locks):
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{setting}: cannot listen on {listen}: another lockbroker serves there") from None
        self._locks.append(fd)

    def _probe(self, setting: str, listen: str, host: str, port: int) -> int:
        """Bind every address of `host` without SO_REUSEPORT (as a single broker would); the port."""
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise ConfigError(f"{setting}: cannot listen on {listen}: {e.strerror}") from None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            # grpc sets SO_REUSEADDR too: a port whose old connections sit in TIME_WAIT binds.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr[0], port, *addr[2:]))
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRNOTAVAIL and self._sockets:
                    continue  # e.g. localhost's ::1 on a host without IPv6
                why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise ConfigError(f"{setting}: cannot listen on {listen}: {why}") from None
            self._sockets.append(sock)
            port = int(sock.getsockname()[1])
        return port

    def release_ports(self) -> None:
        """The workers listen: the parent's own binds can go (the flocks stay)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def close(self) -> None:
        self.release_ports()
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return -1


__all__ = ["PortGuard", "split"]
