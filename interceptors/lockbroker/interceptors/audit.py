"""Exactly one JSON-lines audit record per RPC, written before a mutating call's response leaves.

The promise to an auditor is "every grant the broker handed out is in the log". A grant exists in
etcd as soon as the handler ran, so the record of a mutating call is written (durably, per the
file sink's fsync policy) before its response is returned, and a caller whose record could not be
written gets UNAVAILABLE (reason AUDIT_UNAVAILABLE) instead of the grant. To keep that case rare,
the sinks are probed before a mutating handler runs and the call is refused early when they are
known to be failing. Reads (Describe, List) are never refused for want of an audit record.

A record is built as a dict, passed through a list of processors (structlog-style callables
record -> record), rendered as one JSON line and handed to every sink. docs/audit.md describes
the schema field by field.

Placement: directly inside the tracing interceptor (so `traceId` is the server span's trace) and
outside identity, quota and retry (so their rejections are recorded and `retryAttempts` is
final). The identity interceptor sets `current_principal` only around what it wraps; put
`AuditInterceptor.capture()` right after it so the record names the principal even when quota
then rejects the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio
from opentelemetry import trace

from lockbroker.interceptors.base import (
    OPEN_SERVICES,
    CallInfo,
    Context,
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    metadata_value,
)
from lockbroker.interceptors.retry import LOCK_SERVICE, retry_attempts
from lockbroker.interceptors.rpcstatus import Trailers, error_reason, trailers
from lockbroker.interceptors.tenancy import Principal, current_principal
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.audit")

SCHEMA: Final = "lockbroker.audit/v1"
AUDIT_UNAVAILABLE: Final = ErrorReason.AUDIT_UNAVAILABLE
MUTATING_METHODS: Final = frozenset(
    f"/{LOCK_SERVICE}/{name}"
    for name in ("CreateSession", "Acquire", "Release", "CloseSession", "KeepAlive", "Refresh")
)
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


# --- sinks --------------------------------------------------------------------------------------


class Sink(Protocol):
    name: str

    async def write(self, lines: Sequence[bytes]) -> None:
        """Write whole lines; return once they are as durable as the sink promises; raise if not."""

    async def ready(self) -> bool:
        """Cheap check run before a mutating handler: False when a write would surely fail."""

    async def close(self) -> None: ...


class StreamSink:
    """Lines to a binary stream; by default the process's stdout (resolved at each write)."""

    def __init__(self, stream: IO[bytes] | None = None, name: str = "stdout") -> None:
        self.name = name
        self._stream = stream
        self._failed = False

    def _target(self) -> IO[bytes]:
        return self._stream if self._stream is not None else sys.stdout.buffer

    def _write_sync(self, data: bytes) -> None:
        target = self._target()
        target.write(data)
        target.flush()

    async def write(self, lines: Sequence[bytes]) -> None:
        try:
            # A pipe whose reader stalls blocks the writer: never on the event loop.
            await asyncio.to_thread(self._write_sync, b"".join(lines))
        except (OSError, ValueError):
            self._failed = True
            raise
        self._failed = False

    async def ready(self) -> bool:
        return not self._failed and not self._target().closed

    async def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            await asyncio.to_thread(self._target().flush)


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
        self._lock = threading.Lock()  # writes, timed syncs and close run on worker threads
        self._dirty = False
        self._last_sync = time.monotonic()
        self._failed_at: float | None = None
        self._syncer: asyncio.Task[None] | None = None

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
            whole = os.fstat(fd).st_size
            try:
                view = memoryview(data)
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
                # A torn last line would make the whole file unparseable for strict readers.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, whole)
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
                await asyncio.to_thread(self._sync_sync)
            except OSError:
                log.exception("audit file %s: fsync failed", self.path)
                self._failed_at = time.monotonic()

    async def write(self, lines: Sequence[bytes]) -> None:
        try:
            await asyncio.to_thread(self._write_sync, b"".join(lines))
        except OSError:
            self._failed_at = time.monotonic()
            raise
        self._failed_at = None
        if self.fsync == "interval" and self._syncer is None:
            self._syncer = asyncio.get_running_loop().create_task(self._sync_periodically())

    def _probe_sync(self) -> bool:
        try:
            with self._lock:
                fd = self._open_locked()
                st = os.fstatvfs(fd)
        except OSError:
            return False
        return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= self.min_free_bytes

    async def ready(self) -> bool:
        if self._fd is not None and self._failed_at is None:
            return True  # the hot path costs no system call; a failing write is caught after
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after:
            return False
        return await asyncio.to_thread(self._probe_sync)

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
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
        await asyncio.to_thread(self._close_sync)


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


# --- the interceptor ----------------------------------------------------------------------------


@dataclass
class _Call:
    info: CallInfo
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    captured: bool = False


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("lockbroker_audit_call", default=None)


@dataclass(frozen=True, slots=True)
class _Outcome:
    code: grpc.StatusCode
    reason: str | None = None
    message: str | None = None

    @staticmethod
    def of_context(context: Context, default: grpc.StatusCode = grpc.StatusCode.OK) -> _Outcome:
        code = _status_code(context.code()) or default
        details = context.details()
        message = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
        return _Outcome(code, error_reason(context.trailing_metadata()), message or None)

    @staticmethod
    def cancelled(context: Context) -> _Outcome:
        left = context.time_remaining()
        if left is not None and left <= 0:
            return _Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, None, "deadline exceeded")
        return _Outcome(grpc.StatusCode.CANCELLED, None, "cancelled")


def _status_code(raw: object) -> grpc.StatusCode | None:
    if isinstance(raw, grpc.StatusCode):
        return raw
    if isinstance(raw, int):
        return next((c for c in grpc.StatusCode if c.value[0] == raw), None)
    return None


def _fields(message: object) -> Mapping[str, Any]:
    return message.DESCRIPTOR.fields_by_name if isinstance(message, Message) else {}


def _str_or_none(value: object) -> str | None:
    return str(value) if value not in (None, "", 0) else None


_REFS: Final = (
    # fencing tokens are int64: strings, as proto3's JSON mapping does, so no reader loses digits
    ("lock", "name"),
    ("session", "session_id"),
    ("fencingToken", "fencing_token"),
    ("requestId", "request_id"),
)


_REF_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}


def _ref_fields(message: Message) -> tuple[tuple[str, str], ...]:
    """The references a request's type can carry (looked up once per type, not per call)."""
    found = _REF_FIELDS.get(type(message))
    if found is None:
        fields = message.DESCRIPTOR.fields_by_name
        found = _REF_FIELDS[type(message)] = tuple((key, name) for key, name in _REFS if name in fields)
    return found


def _request_refs(request: object) -> dict[str, str | None]:
    refs: dict[str, str | None] = dict.fromkeys(key for key, _ in _REFS)
    if isinstance(request, Message):
        for key, name in _ref_fields(request):
            refs[key] = _str_or_none(getattr(request, name))
    return refs


def _add_response_refs(refs: dict[str, str | None], response: object) -> None:
    fields = _fields(response)
    r: Any = response  # fields checked by name: responses differ
    if "grant" in fields and r.HasField("grant"):
        refs["fencingToken"] = refs["fencingToken"] or _str_or_none(r.grant.fencing_token)
        refs["session"] = refs["session"] or _str_or_none(r.grant.session_id)
        refs["lock"] = refs["lock"] or _str_or_none(r.grant.name)
        refs["requestId"] = refs["requestId"] or _str_or_none(r.grant.request_id)
    if "session_id" in fields:
        refs["session"] = refs["session"] or _str_or_none(r.session_id)


def audit_unavailable(retry_after: float) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailers) for a call refused because its record cannot be written."""
    message = "the audit log cannot be written; the call was not confirmed, retry later"
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(retry_after * 1000))
    code = grpc.StatusCode.UNAVAILABLE
    return (
        code,
        message,
        trailers(code, message, AUDIT_UNAVAILABLE, details=[error_details_pb2.RetryInfo(retry_delay=delay)]),
    )


def _secrets(context: Context) -> list[str]:
    return [v for key in SECRET_METADATA if (v := metadata_value(context, key))]


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A stream behavior's responses; none when it wrote them with `context.write` and returned None."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


class _UtcStamp:
    """RFC 3339 UTC time with microseconds ("2026-11-23T07:45:23.123456Z"); the date and time of
    day are formatted once per second, the microseconds per record."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        # Rounded to the microsecond exactly as datetime.fromtimestamp does.
        frac, whole = math.modf(t)
        micros, second = round(frac * 1e6), int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{micros:06d}Z"


class _AuditIds:
    """Random (version 4) UUIDs, from the OS's randomness 256 at a time rather than one call each."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        _ID_POOLS.add(self)

    def forget(self) -> None:
        """Drop the unused randomness (a forked child must not hand out its parent's ids)."""
        self._pool, self._at = b"", 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * self._BATCH), 0
        n = int.from_bytes(self._pool[self._at : self._at + 16], "big")
        self._at += 16
        # RFC 4122: version 4 in bits 76-79, variant 10 in bits 62-63.
        n = (n & ~(0xF << 76) & ~(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_ID_POOLS: weakref.WeakSet[_AuditIds] = weakref.WeakSet()


def _forget_id_pools() -> None:
    for pool in list(_ID_POOLS):
        pool.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_id_pools)


class PrincipalCapture(WrappingInterceptor):
    """Tells the audit record who the call acts for; placed right after the identity interceptor."""

    def _note(self) -> None:
        call = _current.get()
        if call is not None:
            call.principal = current_principal.get()
            call.captured = True

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        async def captured(request: Any, context: Context) -> Any:
            self._note()
            return await behavior(request, context)

        return captured

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        async def captured(request: Any, context: Context) -> AsyncIterator[Any]:
            self._note()
            async for response in _responses(behavior(request, context)):
                yield response

        return captured


class AuditInterceptor(WrappingInterceptor):
    """Writes one record per RPC to `audit_log`; see the module docstring and docs/audit.md.

    `fail_open=True` answers mutating calls even when their record cannot be written (the
    failure is logged, with the record, to the `lockbroker.audit` logger). Health and reflection
    are not recorded unless `include_open_services`; calls to unknown methods are (as
    UNIMPLEMENTED) unless `include_unimplemented` is False.
    """

    def __init__(
        self,
        audit_log: AuditLog,
        *,
        fail_open: bool = False,
        mutating: Iterable[str] = MUTATING_METHODS,
        include_open_services: bool = False,
        include_unimplemented: bool = True,
        retry_after: float = 1.0,
    ) -> None:
        self.log = audit_log
        self.fail_open = fail_open
        self.mutating = frozenset(mutating)
        self.include_open_services = include_open_services
        self.include_unimplemented = include_unimplemented
        self.retry_after = retry_after
        self._stamp = _UtcStamp()
        self._ids = _AuditIds()

    @staticmethod
    def capture() -> PrincipalCapture:
        return PrincipalCapture()

    def handle_missing(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self.include_unimplemented and method.lstrip("/").split("/")[0] not in OPEN_SERVICES:
            return self._unimplemented(method)
        return None

    def _audited(self, call: CallInfo) -> bool:
        return self.include_open_services or not call.open

    def _record(
        self, call: _Call, context: Context, outcome: _Outcome, refs: Mapping[str, str | None], **extra: Any
    ) -> Record:
        principal = call.principal if call.captured else current_principal.get()
        if not call.captured and outcome.code == grpc.StatusCode.UNAUTHENTICATED:
            principal = None  # nobody was established; the default tenant must not take the blame
        return {
            "schema": SCHEMA,
            "time": self._stamp(call.started),
            "auditId": self._ids.next(),
            "tenant": principal.tenant if principal is not None else None,
            "principal": {"kind": principal.kind, "id": principal.id} if principal is not None else None,
            "sourceAddress": context.peer(),
            "userAgent": metadata_value(context, "user-agent"),
            "method": call.info.method,
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": {"code": outcome.code.name, "reason": outcome.reason, "message": outcome.message},
            "durationMs": round((time.monotonic() - call.started_mono) * 1000, 3),
            "retryAttempts": retry_attempts.get(),
            "traceId": _trace_id(),
            **extra,
            "_secrets": _secrets(context),
        }

    async def _write(self, record: Record, consequence: str = "the caller's status stands") -> bool:
        try:
            await self.log.write(record)
        except AuditWriteError as exc:
            # The process log is the last place the record can go. Only the rendered line (which
            # went through redaction) may go there; a record the processors choked on is named only.
            line = exc.line.decode().rstrip("\n") if exc.line else f"(unprocessable record {record['auditId']})"
            log.error("audit record not written (%s; %s): %s", exc, consequence, line)
            return False
        return True

    async def _refuse_early(self, call: _Call, context: Context, refs: Mapping[str, str | None]) -> None:
        """Refuse a mutating call before its handler runs if its record could not be written."""
        if self.fail_open or call.info.method not in self.mutating or await self.log.ready():
            return
        code, message, trailers = audit_unavailable(self.retry_after)
        await self._write(self._record(call, context, _Outcome(code, AUDIT_UNAVAILABLE, message), refs))
        await context.abort(code, message, trailers)

    async def _confirm(self, call: _Call, context: Context, record: Record) -> None:
        """Write the record of a call that is about to succeed; turn it into UNAVAILABLE if we cannot."""
        refuse = not self.fail_open and call.info.method in self.mutating
        if await self._write(record, "caller answered UNAVAILABLE" if refuse else "failing open") or not refuse:
            return
        # The handler's effect stands (a grant, a session): the caller repeats with the same
        # request_id to get it back, or lets the session expire.
        await context.abort(*audit_unavailable(self.retry_after))

    def wrap_unary(self, behavior: UnaryBehavior, info: CallInfo) -> UnaryBehavior:
        if not self._audited(info):
            return behavior

        async def audited(request: Any, context: Context) -> Any:
            call = _Call(info)
            _current.set(call)
            retry_attempts.set(0)
            refs = _request_refs(request)
            await self._refuse_early(call, context, refs)
            try:
                response = await behavior(request, context)
            except aio.AbortError:
                await self._write(
                    self._record(call, context, _Outcome.of_context(context, grpc.StatusCode.UNKNOWN), refs)
                )
                raise
            except asyncio.CancelledError:
                await self._write(self._record(call, context, _Outcome.cancelled(context), refs))
                raise
            except Exception as exc:
                # Only the type: an exception's text may hold anything, and the caller's copy of it
                # is grpc's business.
                outcome = _Outcome(grpc.StatusCode.UNKNOWN, None, f"unhandled {type(exc).__name__}")
                await self._write(self._record(call, context, outcome, refs))
                raise
            _add_response_refs(refs, response)
            await self._confirm(call, context, self._record(call, context, _Outcome.of_context(context), refs))
            return response

        return audited

    def wrap_stream(self, behavior: StreamBehavior, info: CallInfo) -> StreamBehavior:
        if not self._audited(info):
            return behavior

        async def audited(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(info)
            _current.set(call)
            retry_attempts.set(0)
            received = 0
            sent = 0
            sessions: dict[str, None] = {}  # insertion-ordered set
            refs = _request_refs(request) if not info.client_streaming else _request_refs(None)

            async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                nonlocal received
                async for r in requests:
                    received += 1
                    sid = getattr(r, "session_id", "") if isinstance(r, Message) else ""
                    if sid and len(sessions) < MAX_STREAM_SESSIONS:
                        sessions.setdefault(sid)
                    yield r

            def record(outcome: _Outcome) -> Record:
                if info.client_streaming and len(sessions) == 1:
                    refs["session"] = next(iter(sessions))
                stream: dict[str, Any] = {"received": received if info.client_streaming else 1, "sent": sent}
                if info.client_streaming:
                    stream["sessions"] = list(sessions)
                return self._record(call, context, outcome, refs, stream=stream)

            await self._refuse_early(call, context, refs)
            try:
                responses = behavior(counted(request) if info.client_streaming else request, context)
                async for response in _responses(responses):
                    sent += 1
                    yield response
            except aio.AbortError:
                await self._write(record(_Outcome.of_context(context, grpc.StatusCode.UNKNOWN)))
                raise
            except (asyncio.CancelledError, GeneratorExit):
                await self._write(record(_Outcome.cancelled(context)))
                raise
            except Exception as exc:
                await self._write(record(_Outcome(grpc.StatusCode.UNKNOWN, None, f"unhandled {type(exc).__name__}")))
                raise
            await self._confirm(call, context, record(_Outcome.of_context(context)))

        return audited

    def _unimplemented(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        info = CallInfo(method, service, name, client_streaming=True, server_streaming=True)

        async def unknown(_requests: Any, context: Context) -> AsyncIterator[Any]:
            # No identity interceptor ran for a method that does not exist: nobody is established.
            call = _Call(info, principal=None, captured=True)
            # grpc's own text for an unknown method, so callers see no difference
            outcome = _Outcome(grpc.StatusCode.UNIMPLEMENTED, None, "Method not found!")
            await self._write(self._record(call, context, outcome, _request_refs(None)))
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            yield  # an async generator, like every stream behavior

        # Raw bytes in and out: the method is unknown, so is its message type.
        return grpc.stream_stream_rpc_method_handler(unknown)


__all__ = [
    "AUDIT_UNAVAILABLE",
    "DEFAULT_PROCESSORS",
    "MUTATING_METHODS",
    "SCHEMA",
    "AuditInterceptor",
    "AuditLog",
    "AuditWriteError",
    "FileSink",
    "FsyncPolicy",
    "PrincipalCapture",
    "Processor",
    "Record",
    "Sink",
    "StreamSink",
    "add_fields",
    "audit_log",
    "audit_unavailable",
    "redact_secrets",
    "render_json",
]
