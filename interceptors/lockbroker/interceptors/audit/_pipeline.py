"""The record pipeline: constants, processors (record -> record), JSON rendering, and `AuditLog`,
the one writer task that batches rendered records into every sink."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Final, Literal, Protocol

import orjson

from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.audit")

SCHEMA: Final = "lockbroker.audit/v1"
AUDIT_UNAVAILABLE: Final = ErrorReason.AUDIT_UNAVAILABLE
# Stages, as Kubernetes audit names them: a mutating unary call gets a RequestReceived record
# as it enters its handler (made durable while the handler works) and a ResponseComplete record
# when it ends; every other call only the ResponseComplete one.
REQUEST_RECEIVED: Final = "RequestReceived"
RESPONSE_COMPLETE: Final = "ResponseComplete"
LOCK_SERVICE: Final = "lockbroker.v1.LockService"
MUTATING_METHODS: Final = (
    frozenset(
        f"/{LOCK_SERVICE}/{name}"
        for name in (
            "CreateSession",
            "Acquire",
            "AcquireMany",
            "Release",
            "CloseSession",
            "KeepAlive",
            "Refresh",
            # The Session stream and the lock operations it carries, one record each (server/session_stream.py).
            "Session",
            "Session/Open",
            "Session/Acquire",
            "Session/AcquireMany",
            "Session/Release",
            "Session/KeepAlive",
            "Session/Close",
        )
    )
    | frozenset(f"/lockbroker.v1.AdminService/{name}" for name in ("ForceRelease", "RevokeSession"))
    | frozenset(f"/lockbroker.v1.ElectionService/{name}" for name in ("Campaign", "Proclaim", "Resign"))
)
# Metadata whose values are credentials. The interceptor never copies these fields into a record;
# their values are also scrubbed from `outcome.message`, the one free-text field (a careless
# handler may echo a header there), and from nothing else: a caller choosing its "key" must not be
# able to blank out its own lock name, tenant, method or peer.
SECRET_METADATA: Final = ("x-api-key", "authorization")
REDACTED: Final = "[REDACTED]"
# Shorter values are not scrubbed: no credential is this short, and "a" would garble the message.
MIN_SECRET: Final = 8
MAX_MESSAGE: Final = 1024
# Every other string a record copies from a call (lock, session, requestId, method, userAgent,
# sourceAddress, ids) is cut to this many characters, before the record is built: 256 is the
# longest valid lock name (bytes), so no valid value is ever cut.
MAX_FIELD: Final = 256
MAX_STREAM_SESSIONS: Final = 64


def truncated(value: str, limit: int = MAX_FIELD) -> str:
    """`value` if it fits in `limit` characters, else its first `limit` and a marker with its size."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[truncated, {len(value)} chars]"


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
    """Replace the caller's credentials in `outcome.message` (e.g. a handler echoed its key there).

    Redaction is by field: the credential headers are never copied into a record, and the message
    is the only field whose text a handler writes freely. Substituting the values across the whole
    record let a caller blank out any field by sending its value as "x-api-key" (issue 18, item 8).
    The interceptor passes the values under the private key `_secrets`; private keys never reach a sink.
    """
    if "_secrets" not in record:
        return record
    secrets = [s for s in record["_secrets"] if s and len(s) >= MIN_SECRET]
    record = dict(record)
    del record["_secrets"]
    outcome = record.get("outcome")
    if not secrets or not isinstance(outcome, dict) or not isinstance(outcome.get("message"), str):
        return record
    message = outcome["message"]
    for s in secrets:
        message = message.replace(s, REDACTED)
    return {**record, "outcome": {**outcome, "message": message}}


def limit_message(record: Record) -> Record:
    """Cap `outcome.message` at MAX_MESSAGE characters; after redaction, so no secret is cut in half."""
    outcome = record.get("outcome")
    if isinstance(outcome, dict) and isinstance(outcome.get("message"), str) and len(outcome["message"]) > MAX_MESSAGE:
        return {**record, "outcome": {**outcome, "message": truncated(outcome["message"], MAX_MESSAGE)}}
    return record


def add_fields(**fields: Any) -> Processor:
    """A processor adding constant fields, e.g. `add_fields(cluster="eu-1")`."""

    def add(record: Record) -> Record:
        return {**record, **fields}

    return add


DEFAULT_PROCESSORS: Final[tuple[Processor, ...]] = (redact_secrets, limit_message)


# What a JSON encoder leaves raw although some line reader breaks lines there:
# U+0085 (NEL), U+2028 and U+2029 (str.splitlines, JavaScript before ES2019, some log shippers).
# The other C1 controls and DEL go with them, for terminals. Controls below U+0020 (\v, \f,
# U+001C-U+001E among them) are already escaped by the encoder. Matched as orjson writes them (UTF-8).
_RAW_BREAKS: Final = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _escape_break(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def render_json(record: Record) -> bytes:
    # The check runs in C (map over the keys); the copy only when a private key is there.
    public = (
        {k: v for k, v in record.items() if not k.startswith("_")}
        if any(map(str.startswith, record, repeat("_")))
        else record
    )
    # orjson writes what json.dumps(ensure_ascii=False, separators=(",", ":"), default=str) did,
    # as UTF-8, about ten times faster (bench.micro audit). It escapes newlines inside strings but
    # leaves the other line breaks raw; the substitution escapes those (they occur only inside
    # strings, where "\u2028" means the same), so a record is exactly one line to every reader.
    data = orjson.dumps(public, default=str, option=orjson.OPT_APPEND_NEWLINE)
    if _RAW_BREAKS.search(data) is not None:
        return _RAW_BREAKS.sub(_escape_break, data)
    # orjson's bytes keep the 4 KB buffer it wrote into (tracemalloc: 4,098 bytes for a 526-byte
    # line). A call holds its RequestReceived line until it is answered, so each blocked Acquire
    # kept ~8 KB of audit buffers; a copy of the line's own size costs a memcpy.
    return bytes(memoryview(data))


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
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[None], bool] | None] | None = None
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
        line, done = self.submit(record)
        try:
            # Awaited directly: a cancelled caller cancels only its own future; the record is
            # still written with its batch.
            await done
        except AuditWriteError as exc:
            # A batch shares one error: each waiter gets its own, with its own line.
            raise AuditWriteError(str(exc), line) from exc
        assert line is not None  # the future failed if rendering did
        return line

    def submit(self, record: Record, *, lazy: bool = False) -> tuple[bytes | None, asyncio.Future[None]]:
        """Process and render `record` and queue it for the writer, without waiting.

        Returns the line (None if the processors failed) and a future that is done when every
        sink has it (as durable as each promises), or fails with AuditWriteError (carrying the
        line). The caller may await the future later, e.g. after work that runs while the
        record's fsync is in flight, or never: a failure nobody awaits is still retrieved.

        `lazy`: nobody waits for this record's durability (a ResponseComplete record, sent after
        the answer). A batch of only lazy records goes to a sink's `write_lazily` when it has one
        (the file sink: written now, synced by the next batch's fsync or within a short delay),
        so it does not hold an fsync slot the next call's RequestReceived record waits behind.
        The future is then done once the lines are written.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        try:
            line = self.render(record)
        except Exception as exc:
            done.set_exception(AuditWriteError(f"audit processors failed: {exc!r}"))
            return None, done
        if self._queue is None or self._writer is None or self._writer.done():
            self._queue = asyncio.Queue()
            self._writer = loop.create_task(self._write_loop(self._queue))
        self._queue.put_nowait((line, done, lazy))
        deadline = loop.time() + self.write_timeout
        self._unanswered.append((deadline, done))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        return line, done

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

    async def _write_loop(self, queue: asyncio.Queue[tuple[bytes, asyncio.Future[None], bool] | None]) -> None:
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
            lines = [line for line, _, _ in batch]
            lazy = all(lazy for _, _, lazy in batch)
            failure: AuditWriteError | None = None
            for sink in self.sinks:
                try:
                    write = getattr(sink, "write_lazily", None) if lazy else None
                    await (write or sink.write)(lines)
                except Exception as exc:
                    log.error("audit sink %s failed: %r", sink.name, exc)
                    failure = failure or AuditWriteError(f"audit sink {sink.name} failed: {exc!r}")
            for _, done, _ in batch:
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
