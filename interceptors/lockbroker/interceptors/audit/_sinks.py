"""Where records go: a stream (stdout by default) or an append-only file with an fsync policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from lockbroker.interceptors.audit._pipeline import (
    DEFAULT_PROCESSORS,
    AuditLog,
    FsyncPolicy,
    Processor,
    Sink,
    log,
)
from lockbroker.interceptors.audit._worker import SinkWorker


class StreamSink:
    """Lines to a binary stream; by default the process's stdout (resolved at each write)."""

    def __init__(self, stream: IO[bytes] | None = None, name: str = "stdout") -> None:
        self.name = name
        self._stream = stream
        self._failed = False
        self._worker = SinkWorker(name)

    def _target(self) -> IO[bytes]:
        return self._stream if self._stream is not None else sys.stdout.buffer

    def _write_sync(self, data: bytes) -> None:
        target = self._target()
        target.write(data)
        target.flush()

    async def write(self, lines: Sequence[bytes]) -> None:
        try:
            # A pipe whose reader stalls blocks the writer: never on the event loop.
            await self._worker.run(functools.partial(self._write_sync, b"".join(lines)))
        except (OSError, ValueError):
            self._failed = True
            raise
        self._failed = False

    async def ready(self) -> bool:
        return self._ready_now()

    def _ready_now(self) -> bool:
        return not self._failed and not self._target().closed

    def _stalled_for(self, now: float) -> float:
        """How long its write in progress has blocked (AuditLog's watchdog: a hung pipe)."""
        return self._worker.busy_for(now)

    async def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            await self._worker.run(self._target().flush)
        self._worker.stop()


_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class FileSink:
    """An append-only JSON-lines file.

    fsync "always": each batch of records is on disk before any of their RPCs answers (records
    arriving together share one fdatasync). "interval": at most `fsync_interval` seconds of
    records can be lost in a power failure. "never": the OS decides. After a failed write the
    file is cut back to its last whole record and `ready()` answers False for `retry_after`
    seconds, then lets calls try again if the file system is writable and has `min_free_bytes`.
    One writer per file: two brokers must not share one.
    """

    # How long a record given to `write_lazily` may wait for the next write when none comes: it
    # bounds what a crash can take of ResponseComplete records.
    LAZY_SYNC_DELAY = 0.1

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "always",
        fsync_interval: float = 1.0,
        min_free_bytes: int = 1 << 20,
        retry_after: float = 1.0,
        mode: int = 0o600,
    ) -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be always, interval or never, not {fsync!r}")
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.fsync: FsyncPolicy = fsync
        self.fsync_interval = fsync_interval
        self.min_free_bytes = min_free_bytes
        self.retry_after = retry_after
        self.mode = mode
        self._fd: int | None = None
        self._lock = threading.Lock()  # writes, timed syncs and close run on the worker's thread
        # Every blocking call runs on this one thread, in the order it was made.
        self._worker = SinkWorker(self.name)
        self._dirty = False
        self._last_sync = time.monotonic()
        self._failed_at: float | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._lazy_sync: asyncio.TimerHandle | None = None
        self._held: list[bytes] = []  # lines of write_lazily, not yet written
        self._lazy_tasks: set[asyncio.Task[None]] = set()

    def _open_locked(self) -> int:
        if self._fd is None:
            existed = self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
            if not existed and self.fsync != "never":
                # The new file's directory entry must survive a crash too, or its records vanish with it.
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return self._fd

    def _write_sync(self, data: bytes) -> None:
        with self._lock:
            fd = self._open_locked()
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync == "always" or (
                    self.fsync == "interval" and time.monotonic() - self._last_sync >= self.fsync_interval
                ):
                    _datasync(fd)
                    self._last_sync = time.monotonic()
                    self._dirty = False
                else:
                    self._dirty = True
            except OSError:
                # A torn last line would make the whole file unparseable for strict readers: cut
                # what this call appended. Its size is known, so the file's is read only now; an
                # fstat before every write cost the writer thread one more wait for the GIL.
                # Only while our bytes are the file's last: the workers of `serve --workers N`
                # append to one file, and another's records after ours (answered, maybe) stay.
                written = len(data) - len(view)
                with contextlib.suppress(OSError):
                    end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: where our last write ended
                    if written and os.fstat(fd).st_size == end:
                        os.ftruncate(fd, end - written)
                raise

    def _sync_sync(self) -> None:
        with self._lock:
            if self._fd is not None and self._dirty:
                _datasync(self._fd)
                self._last_sync = time.monotonic()
                self._dirty = False

    async def _sync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval)
            try:
                await self._worker.run(self._sync_sync)
            except OSError:
                log.exception("audit file %s: fsync failed", self.path)
                self._failed_at = time.monotonic()

    def _take_held(self) -> list[bytes]:
        held, self._held = self._held, []
        return held

    def _lost_held(self, held: Sequence[bytes], exc: BaseException) -> None:
        # Their callers were answered long ago: the process log is the last place they can go.
        for line in held:
            log.error("audit record not written (%r; the caller was answered): %s", exc, line.decode().rstrip("\n"))

    async def write(self, lines: Sequence[bytes]) -> None:
        for task in list(self._lazy_tasks):
            # A timed write of held records in flight goes first: the file keeps the order in
            # which records were handed over (every sink gets the same order).
            await task
        held = self._take_held()  # lazily written records go first, in the order they came
        try:
            data = b"".join([*held, *lines]) if held else b"".join(lines)
            await self._worker.run(functools.partial(self._write_sync, data))
        except OSError as exc:
            self._failed_at = time.monotonic()
            self._lost_held(held, exc)
            raise
        self._failed_at = None
        if self.fsync == "interval" and self._syncer is None:
            self._syncer = asyncio.get_running_loop().create_task(self._sync_periodically())

    async def write_lazily(self, lines: Sequence[bytes]) -> None:
        """Take lines nobody waits on (ResponseComplete records, their callers already answered):
        with fsync "always" they are held here and written with the next `write` (the next call's
        RequestReceived record, whose fsync covers them), or by a timed write within
        LAZY_SYNC_DELAY if none comes. A write and a thread hand-off of their own per call would
        cost as much CPU as the record itself, and an fsync of their own would delay the next
        call. A failed write logs them (`lockbroker.audit`), as any record nobody waits for."""
        if self.fsync != "always":
            return await self.write(lines)
        self._held.extend(lines)
        if self._lazy_sync is None:
            self._lazy_sync = asyncio.get_running_loop().call_later(self.LAZY_SYNC_DELAY, self._sync_lazily)

    def _sync_lazily(self) -> None:
        self._lazy_sync = None
        if self._held:
            task = asyncio.get_running_loop().create_task(self._write_held())
            self._lazy_tasks.add(task)
            task.add_done_callback(self._lazy_tasks.discard)

    async def _write_held(self) -> None:
        held = self._take_held()
        if not held:
            return
        try:
            await self._worker.run(functools.partial(self._write_sync, b"".join(held)))
        except OSError as exc:
            self._failed_at = time.monotonic()
            self._lost_held(held, exc)

    def _probe_sync(self) -> bool:
        try:
            with self._lock:
                fd = self._open_locked()
                st = os.fstatvfs(fd)
        except OSError:
            return False
        return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= self.min_free_bytes

    def _stalled_for(self, now: float) -> float:
        """How long its write or fsync in progress has blocked (AuditLog's watchdog: a hung disk)."""
        return self._worker.busy_for(now)

    def _ready_now(self) -> bool:
        """`ready()` without a coroutine when its answer is a sure True (see AuditLog.ready_now)."""
        return self._fd is not None and self._failed_at is None

    async def ready(self) -> bool:
        if self._fd is not None and self._failed_at is None:
            return True  # the hot path costs no system call; a failing write is caught after
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after:
            return False
        return await self._worker.run(self._probe_sync)

    def _close_sync(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    if self.fsync != "never":
                        _datasync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None

    async def close(self) -> None:
        if self._lazy_sync is not None:
            self._lazy_sync.cancel()
            self._lazy_sync = None
        for task in list(self._lazy_tasks):
            with contextlib.suppress(Exception):
                await task
        await self._write_held()
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
        try:
            await self._worker.run(self._close_sync)
        finally:
            self._worker.stop()


def audit_log(
    *,
    stdout: bool = False,
    path: str | os.PathLike[str] | None = None,
    fsync: FsyncPolicy = "always",
    fsync_interval: float = 1.0,
    processors: Sequence[Processor] = DEFAULT_PROCESSORS,
) -> AuditLog:
    sinks: list[Sink] = []
    if stdout:
        sinks.append(StreamSink())
    if path is not None:
        sinks.append(FileSink(path, fsync=fsync, fsync_interval=fsync_interval))
    return AuditLog(sinks, processors)
