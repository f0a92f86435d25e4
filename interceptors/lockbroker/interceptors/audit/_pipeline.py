"""The record pipeline: constants, processors (record -> record), JSON rendering, and `AuditLog`,
the one writer task that batches rendered records into every sink."""

from __future__ import annotations

import asyncio
import logging
import re
import time
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
# A record overdue by LATE_LIMIT x write_timeout fails even while every sink is working (see
# AuditLog._expire): a bound for a writer that stopped for any reason no sink can see.
LATE_LIMIT: Final = 12


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
    return _dumps(public)


def _dumps(public: Record) -> bytes:
    """`public` (no private keys) as one JSON line."""
    # orjson writes what json.dumps(ensure_ascii=False, separators=(",", ":"), default=str) did,
    # as UTF-8, about ten times faster (bench.micro audit). It escapes newlines inside strings but
    # leaves the other line breaks raw; the substitution escapes those (they occur only inside
    # strings, where "\u2028" means the same), so a record is exactly one line to every reader.
    data = orjson.dumps(public, default=str, option=orjson.OPT_APPEND_NEWLINE)
    # Every byte the pattern matches is DEL or starts with 0xc2/0xe2: an ASCII line without DEL
    # (nearly every line) needs no search. isascii and `in` run at memchr speed; the search
    # (three alternatives tried at every byte) cost four times orjson's own work.
    if (not data.isascii() or b"\x7f" in data) and _RAW_BREAKS.search(data) is not None:
        return _RAW_BREAKS.sub(_escape_break, data)
    # orjson's bytes keep the 4 KB buffer it wrote into (tracemalloc: 4,098 bytes for a 526-byte
    # line). A call holds its RequestReceived line until it is answered, so each blocked Acquire
    # kept ~8 KB of audit buffers; a copy of the line's own size costs a memcpy.
    return bytes(memoryview(data))


# --- the sink protocol --------------------------------------------------------------------------------------


class Sink(Protocol):
    """What the log writes to. Optional, found by name: `_ready_now()` (see AuditLog.ready_now)
    and `_stalled_for(now)`, how long the sink's blocking call in progress has run at `now`
    (time.monotonic), so a late record is failed for a hung sink only (AuditLog._expire)."""

    name: str

    async def write(self, lines: Sequence[bytes]) -> None:
        """Write whole lines; return once they are as durable as the sink promises; raise if not."""

    async def ready(self) -> bool:
        """Cheap check run before a mutating handler: False when a write would surely fail."""

    async def close(self) -> None: ...


# --- the log ------------------------------------------------------------------------------------


# Told that a record nobody waits for was lost: its line (None if the processors failed) and why.
Lost = Callable[[bytes | None, BaseException], None]
# A record handed to the writer: its line, its future, lazy, and whom to tell if it is lost.
_Item = tuple[bytes, "asyncio.Future[None]", bool, Lost | None]


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
        # Records for the writer, oldest first. A deque and one future the writer sleeps on
        # while it is empty cost a fraction of an asyncio.Queue's put and get (which keep
        # counters, an Event and a waiter list per item).
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None
        # Every record not yet answered, oldest first, with the time it must be answered by. One
        # timer for the oldest replaces a timeout per record (wait_for + shield cost the loop more
        # than rendering the record did).
        self._unanswered: deque[tuple[float, _Item]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    def render(self, record: Record) -> bytes:
        record = dict(record)
        for process in self.processors:
            record = process(record)
        return render_json(record)

    @property
    def renders_purely(self) -> bool:
        """Whether rendering a record again gives the same line: true of the default
        processors; a custom one may stamp a sequence number or a time."""
        processors = self.processors
        return processors is DEFAULT_PROCESSORS or processors == DEFAULT_PROCESSORS

    def _render_built(self, record: Record) -> bytes:
        """`render` for a record the interceptor built: its only private key is `_secrets`.

        With the default processors (nearly every setup) their work is done here on one copy
        of the record: `render` copied it three times, and scanned it for private keys, for a
        message that is usually None or short and holds no secret. The line is the same.
        """
        processors = self.processors
        if processors is not DEFAULT_PROCESSORS and processors != DEFAULT_PROCESSORS:
            return self.render(record)
        public = dict(record)
        secrets = public.pop("_secrets", None)
        outcome = public.get("outcome")
        if isinstance(outcome, dict) and isinstance(message := outcome.get("message"), str):
            # redact_secrets, then limit_message
            text = message
            for s in secrets or ():
                if s and len(s) >= MIN_SECRET:
                    text = text.replace(s, REDACTED)
            if len(text) > MAX_MESSAGE:
                text = truncated(text, MAX_MESSAGE)
            if text != message:
                public["outcome"] = {**outcome, "message": text}
        return _dumps(public)

    async def write(self, record: Record) -> bytes:
        """Process, render and write one record; returns the line. Raises AuditWriteError."""
        return await self._write(record, self.render)

    async def _write(self, record: Record, render: Callable[[Record], bytes]) -> bytes:
        line, done = self._submit(record, render, False, None)
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
        return self._submit(record, self.render, lazy, None)

    def _submit(
        self, record: Record, render: Callable[[Record], bytes], lazy: bool, lost: Lost | None
    ) -> tuple[bytes | None, asyncio.Future[None]]:
        """`submit`, rendering with `render`; `lost` is called (instead of a callback on the
        future, which cost a loop iteration per record) if the record cannot be written."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        try:
            line = render(record)
        except Exception as exc:
            failure = AuditWriteError(f"audit processors failed: {exc!r}")
            done.set_exception(failure)
            if lost is not None:
                done.exception()  # retrieved: `lost` is told
                lost(None, failure)
            return None, done
        writer = self._writer
        if writer is None or writer.done():
            self._writer = loop.create_task(self._write_loop())
        item: _Item = (line, done, lazy, lost)
        self._pending.append(item)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)
        deadline = loop.time() + self.write_timeout
        self._unanswered.append((deadline, item))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        return line, done

    def _expire(self) -> None:
        """Fail the records whose sinks did not finish in time (the writer may be stuck on a
        hung disk or pipe; it keeps its one write, rather than piling up threads behind it).

        A record can also be late with every sink working: the event loop ran late (an
        overloaded broker steps thousands of calls between two looks at the writer), or the
        queue ahead of it is long. Failing it then turned overload into refusals (the broker
        answers a mutating call UNAVAILABLE when its record fails) while the disk kept up. So
        an overdue record fails only if a sink says a blocking call of its own has run for
        write_timeout (`_stalled_for`), or a sink cannot say, or it is LATE_LIMIT x
        write_timeout overdue; its caller's own deadline bounds its wait meanwhile."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._unanswered
        progressing: bool | None = None
        while pending:
            deadline, (line, done, _, lost) = pending[0]
            if not done.done():
                if deadline > now:
                    self._watchdog = loop.call_at(deadline, self._expire)
                    return
                if now - deadline < self.write_timeout * LATE_LIMIT:
                    if progressing is None:
                        progressing = self._sinks_progressing()
                    if progressing:
                        self._watchdog = loop.call_at(now + self.write_timeout / 4, self._expire)
                        return
                failure = AuditWriteError(f"audit sinks did not finish within {self.write_timeout}s")
                done.set_exception(failure)
                done.exception()  # retrieved here: a cancelled caller never looks
                if lost is not None:
                    lost(line, failure)
            pending.popleft()

    def _sinks_progressing(self) -> bool:
        """True when every sink can tell how long its blocking call in progress has run, and
        none has run for write_timeout."""
        now = time.monotonic()
        for sink in self.sinks:
            stalled = getattr(sink, "_stalled_for", None)
            try:
                if stalled is None or stalled(now) >= self.write_timeout:
                    return False
            except Exception:
                return False
        return True

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        while True:
            if not pending:
                if self._stopping:
                    return
                self._wakeup = wakeup = loop.create_future()
                await wakeup
                continue
            batch = [pending.popleft() for _ in range(min(len(pending), self.max_batch))]
            lines = [line for line, _, _, _ in batch]
            lazy = all(lazy for _, _, lazy, _ in batch)
            failure: AuditWriteError | None = None
            for sink in self.sinks:
                try:
                    write = getattr(sink, "write_lazily", None) if lazy else None
                    await (write or sink.write)(lines)
                except Exception as exc:
                    log.error("audit sink %s failed: %r", sink.name, exc)
                    failure = failure or AuditWriteError(f"audit sink {sink.name} failed: {exc!r}")
            for line, done, _, lost in batch:
                if done.done():
                    continue
                if failure is None:
                    done.set_result(None)
                else:
                    done.set_exception(failure)
                    done.exception()  # retrieved here: a timed-out waiter may never look
                    if lost is not None:
                        lost(line, failure)
            unanswered = self._unanswered
            while unanswered and unanswered[0][1][1].done():
                unanswered.popleft()

    def ready_now(self) -> bool:
        """True when every sink knows, without waiting, that it is ready; False means "ask
        `ready()`". Mutating calls ask before their handler runs: two coroutines per call for
        an answer that is nearly always a plain True. A sink offers it with `_ready_now()`."""
        for sink in self.sinks:
            check = getattr(sink, "_ready_now", None)
            try:
                if check is None or not check():
                    return False
            except Exception:
                return False  # ready() asks again, and logs what fails
        return True

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
        writer = self._writer
        if writer is not None and not writer.done():
            # The writer empties the queue (records queued while it does included), then stops.
            self._stopping = True
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                self._wakeup = None
                wakeup.set_result(None)
            try:
                await writer
            finally:
                self._stopping = False
        if self._writer is writer:  # not one a record queued meanwhile started
            self._writer = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._unanswered.clear()
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("audit sink %s: close failed", sink.name)
