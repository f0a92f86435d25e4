"""The record pipeline: constants, processors (record -> record), JSON rendering, and `AuditLog`,
the one writer task that batches rendered records into every sink."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Final, Literal, Protocol

from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.audit")

SCHEMA: Final = "lockbroker.audit/v1"
AUDIT_UNAVAILABLE: Final = ErrorReason.AUDIT_UNAVAILABLE
LOCK_SERVICE: Final = "lockbroker.v1.LockService"
MUTATING_METHODS: Final = frozenset(
    f"/{LOCK_SERVICE}/{name}"
    for name in ("CreateSession", "Acquire", "Release", "CloseSession", "KeepAlive", "Refresh")
) | frozenset(f"/lockbroker.v1.AdminService/{name}" for name in ("ForceRelease", "RevokeSession"))
# Metadata whose values are credentials: never in a record, whatever a handler put in a message.
SECRET_METADATA: Final = ("x-api-key", "authorization")
REDACTED: Final = "[REDACTED]"
MAX_MESSAGE: Final = 1024
MAX_STREAM_SESSIONS: Final = 64

Record = dict[str, Any]
Processor = Callable[[Record], Record]
FsyncPolicy = Literal["always", "interval", "never"]


class AuditWriteError(Exception):
    """A record could not be processed or written to every sink."""

    def __init__(self, message: str, line: bytes | None = None) -> None:
        super().__init__(message)
        self.line = line  # the rendered record, if rendering got that far


# --- processors ---------------------------------------------------------------------------------


def redact_secrets(record: Record) -> Record:
    """Replace the caller's credentials wherever they appear (e.g. echoed in an error message).

    The interceptor passes them under the private key `_secrets`; private keys never reach a sink.
    """
    if "_secrets" not in record:
        return record
    secrets = [s for s in record["_secrets"] if s]
    record = dict(record)
    del record["_secrets"]
    if not secrets:
        return record

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for s in secrets:
                value = value.replace(s, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return {k: scrub(v) for k, v in record.items()}


def limit_message(record: Record) -> Record:
    """Cap `outcome.message` at MAX_MESSAGE characters; after redaction, so no secret is cut in half."""
    outcome = record.get("outcome")
    if isinstance(outcome, dict) and isinstance(outcome.get("message"), str) and len(outcome["message"]) > MAX_MESSAGE:
        return {**record, "outcome": {**outcome, "message": outcome["message"][:MAX_MESSAGE] + "…"}}
    return record


def add_fields(**fields: Any) -> Processor:
    """A processor adding constant fields, e.g. `add_fields(cluster="eu-1")`."""

    def add(record: Record) -> Record:
        return {**record, **fields}

    return add


DEFAULT_PROCESSORS: Final[tuple[Processor, ...]] = (redact_secrets, limit_message)


def render_json(record: Record) -> bytes:
    # The check runs in C (map over the keys); the copy only when a private key is there.
    public = (
        {k: v for k, v in record.items() if not k.startswith("_")}
        if any(map(str.startswith, record, repeat("_")))
        else record
    )
    # json.dumps escapes newlines inside strings, so a record is always exactly one line.
    return (json.dumps(public, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()


# --- the sink protocol --------------------------------------------------------------------------------------


class Sink(Protocol):
    name: str

    async def write(self, lines: Sequence[bytes]) -> None:
        """Write whole lines; return once they are as durable as the sink promises; raise if not."""

    async def ready(self) -> bool:
        """Cheap check run before a mutating handler: False when a write would surely fail."""

    async def close(self) -> None: ...


# --- the log ------------------------------------------------------------------------------------


class AuditLog:
    """Processors, rendering, and one writer task that batches records into every sink.

    Batching is what makes fsync "always" affordable: records that arrive while a write is in
    flight share the next write and fsync. A record handed to the writer is written even if the
    RPC that produced it is cancelled meanwhile.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        processors: Sequence[Processor] = DEFAULT_PROCESSORS,
        *,
        write_timeout: float = 5.0,
        max_batch: int = 512,
    ) -> None:
        if not sinks:
            raise ValueError("an audit log needs at least one sink")
        self.sinks = tuple(sinks)
        self.processors = tuple(processors)
        self.write_timeout = write_timeout
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[None]] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        # Every record not yet answered, oldest first, with the time it must be answered by. One
        # timer for the oldest replaces a timeout per record (wait_for + shield cost the loop more
        # than rendering the record did).
        self._unanswered: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    def render(self, record: Record) -> bytes:
        record = dict(record)
        for process in self.processors:
            record = process(record)
        return render_json(record)

    async def write(self, record: Record) -> bytes:
        """Process, render and write one record; returns the line. Raises AuditWriteError."""
        try:
            line = self.render(record)
        except Exception as exc:
            raise AuditWriteError(f"audit processors failed: {exc!r}") from exc
        try:
            await self._write_line(line)
        except AuditWriteError as exc:
            exc.line = line
            raise
        return line

    async def _write_line(self, line: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._writer is None or self._writer.done():
            self._queue = asyncio.Queue()
            self._writer = loop.create_task(self._write_loop(self._queue))
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put_nowait((line, done))
        deadline = loop.time() + self.write_timeout
        self._unanswered.append((deadline, done))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        # Awaited directly: a cancelled caller cancels only its own future; the record is still
        # written with its batch.
        await done

    def _expire(self) -> None:
        """Fail the records whose sinks did not finish in time (the writer may be stuck on a
        hung disk or pipe; it keeps its one write, rather than piling up threads behind it)."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._unanswered
        while pending:
            deadline, done = pending[0]
            if not done.done():
                if deadline > now:
                    self._watchdog = loop.call_at(deadline, self._expire)
                    return
                done.set_exception(AuditWriteError(f"audit sinks did not finish within {self.write_timeout}s"))
                done.exception()  # retrieved here: a cancelled caller never looks
            pending.popleft()

    async def _write_loop(self, queue: asyncio.Queue[tuple[bytes, asyncio.Future[None]] | None]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            batch = [item]
            while not queue.empty() and len(batch) < self.max_batch:
                nxt = queue.get_nowait()
                if nxt is None:
                    queue.put_nowait(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            lines = [line for line, _ in batch]
            failure: AuditWriteError | None = None
            for sink in self.sinks:
                try:
                    await sink.write(lines)
                except Exception as exc:
                    log.error("audit sink %s failed: %r", sink.name, exc)
                    failure = failure or AuditWriteError(f"audit sink {sink.name} failed: {exc!r}")
            for _, done in batch:
                if done.done():
                    continue
                if failure is None:
                    done.set_result(None)
                else:
                    done.set_exception(failure)
                    done.exception()  # retrieved here: a timed-out waiter may never look
            pending = self._unanswered
            while pending and pending[0][1].done():
                pending.popleft()

    async def ready(self) -> bool:
        for sink in self.sinks:
            try:
                if not await sink.ready():
                    return False
            except Exception:
                log.exception("audit sink %s: readiness probe failed", sink.name)
                return False
        return True

    async def close(self) -> None:
        if self._queue is not None and self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            await self._writer
        self._queue = self._writer = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._unanswered.clear()
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("audit sink %s: close failed", sink.name)
