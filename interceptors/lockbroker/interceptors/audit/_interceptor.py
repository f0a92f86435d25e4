"""The interceptor: one record per RPC, built from the request, the response and the call's state.

When a record is written and what a failed write means for the call are decided here; what a record
says (its fields, the references read from request and response) is _records.py's.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio

from lockbroker.interceptors.audit._pipeline import (
    AUDIT_UNAVAILABLE,
    MAX_STREAM_SESSIONS,
    MUTATING_METHODS,
    AuditLog,
    AuditWriteError,
    Record,
    log,
)
from lockbroker.interceptors.audit._records import (
    _REF_KEYS,
    RecordBuilder,
    _add_response_refs,
    _AuditIds,
    _mode_fields,
    _Outcome,
    _request_refs,
    _UtcStamp,
)
from lockbroker.interceptors.base import (
    OPEN_SERVICES,
    CallInfo,
    CallState,
    Context,
    Layer,
    StreamBehavior,
    WrappingInterceptor,
    scoped,
    state_of,
)
from lockbroker.interceptors.rpcstatus import Trailers, trailers


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


_SESSION_ID_FIELD: dict[type, bool] = {}


def _has_session_id(message: object) -> bool:
    """Whether `message` is a protobuf message whose type has a `session_id` field (looked up once per type)."""
    kind = type(message)
    known = _SESSION_ID_FIELD.get(kind)
    if known is None:
        fields = message.DESCRIPTOR.fields_by_name if isinstance(message, Message) else {}
        known = _SESSION_ID_FIELD[kind] = "session_id" in fields
    return known


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A stream behavior's responses; none when it wrote them with `context.write` and returned None."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def _lost(record: Record, line: bytes | None, exc: BaseException, consequence: str) -> None:
    # The process log is the last place the record can go. Only the rendered line (which went
    # through redaction) may go there; a record the processors choked on is named only.
    text = line.decode().rstrip("\n") if line else f"(unprocessable record {record['auditId']})"
    log.error("audit record not written (%s; %s): %s", exc, consequence, text)


def _lost_lazily(record: Record, consequence: str, line: bytes | None, exc: BaseException) -> None:
    _lost(record, line, exc, consequence)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A call's RequestReceived record and its write in flight (kept on `CallState.audit`).

    Its rendered line only when rendering again could give another (custom processors): a
    blocked Acquire keeps this until it is answered, and the line (0.6-1 KB) is only wanted in
    the process log if the write fails; `_line_of` renders it again then."""

    received: Record
    done: asyncio.Future[None]
    line: bytes | None = None


class _RequestStage(WrappingInterceptor):
    """AuditInterceptor.request_stage: a `before` hook for mutating unary calls only."""

    def __init__(self, audit: AuditInterceptor, layer: Layer) -> None:
        self._audit = audit
        self._stage = layer

    def layer(self, call: CallInfo) -> Layer | None:
        audit = self._audit
        staged = audit._audited(call) and call.method in audit.mutating and not call.client_streaming
        return self._stage if staged else None


class AuditInterceptor(RecordBuilder, WrappingInterceptor):
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
        super().__init__()  # RecordBuilder's clock and audit id pool
        self._layer = Layer(before=self._before, after=self._after, failed=self._failed)
        self._request_stage = _RequestStage(self, Layer(before=self._receive))

    def handle_missing(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self.include_unimplemented and method.lstrip("/").split("/")[0] not in OPEN_SERVICES:
            return self._unimplemented(method)
        return None

    def _audited(self, call: CallInfo) -> bool:
        return self.include_open_services or not call.open

    async def _write(self, record: Record, consequence: str = "the caller's status stands") -> bool:
        log = self.log
        try:
            await log._write(record, log._render_built)
        except AuditWriteError as exc:
            _lost(record, exc.line, exc, consequence)
            return False
        return True

    def _send(self, record: Record, consequence: str) -> None:
        """Queue `record` without waiting for it; a failure goes to the process log."""
        log = self.log
        # The log calls `lost` itself: a callback on the record's future cost a loop iteration
        # per record, for a failure that almost never comes.
        log._submit(record, log._render_built, True, functools.partial(_lost_lazily, record, consequence))

    async def _refuse_early(self, call: CallState, context: Context, refs: Mapping[str, str | None]) -> None:
        """Refuse a mutating call before its handler runs if its record could not be written."""
        if self.fail_open or call.info.method not in self.mutating or self.log.ready_now() or await self.log.ready():
            return
        code, message, trailers = audit_unavailable(self.retry_after)
        await self._write(self._record(call, context, _Outcome(code, AUDIT_UNAVAILABLE, message), refs))
        await context.abort(code, message, trailers)

    async def _confirm(self, call: CallState, context: Context, record: Record) -> None:
        """Write the record of a call that is about to succeed; turn it into UNAVAILABLE if we cannot."""
        refuse = not self.fail_open and call.info.method in self.mutating
        if await self._write(record, "caller answered UNAVAILABLE" if refuse else "failing open") or not refuse:
            return
        # The handler's effect stands (a grant, a session): the caller repeats with the same
        # request_id to get it back, or lets the session expire.
        await context.abort(*audit_unavailable(self.retry_after))

    def layer(self, call: CallInfo) -> Layer | None:
        return self._layer if self._audited(call) else None

    @property
    def request_stage(self) -> WrappingInterceptor:
        """The interceptor that writes RequestReceived records: put it last in the chain (after
        identity and quota, right before the service), so the record names the principal and is
        written only for calls whose handler runs. Without it, a mutating call gets a single
        record, written (and fsynced) after its handler and before its answer."""
        return self._request_stage

    async def _before(self, request: Any, context: Context) -> None:
        """Refuse a mutating call before its handler runs if its record could not be written.

        Only the abort here: `_failed` writes the refusal's record, as it does every other's."""
        call = state_of(context)
        if self.fail_open or call.info.method not in self.mutating or self.log.ready_now() or await self.log.ready():
            return
        await context.abort(*audit_unavailable(self.retry_after))

    async def _failed(self, request: Any, context: Context, exc: BaseException) -> None:
        call = state_of(context)
        if isinstance(exc, aio.AbortError):
            outcome = _Outcome.of(call, context, grpc.StatusCode.UNKNOWN)
        elif isinstance(exc, asyncio.CancelledError):
            outcome = _Outcome.cancelled(context)
        else:
            # Only the type: an exception's text may hold anything, and the caller's copy of it is
            # grpc's business.
            outcome = _Outcome(grpc.StatusCode.UNKNOWN, None, f"unhandled {type(exc).__name__}")
        staged: _Staged | None = call.audit
        refs = _request_refs(request)
        if staged is None:
            await self._write(self._record(call, context, outcome, refs))
        else:
            # Nobody waits for the RequestReceived record on this path: its loss is logged here.
            staged.done.add_done_callback(self._check_received(staged))
            await self._write(self._completed(call, staged.received, outcome, refs))

    def _check_received(self, staged: _Staged) -> Callable[[asyncio.Future[None]], None]:
        def check(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                _lost(staged.received, self._line_of(staged), exc, "the call failed anyway")

        return check

    def _line_of(self, staged: _Staged) -> bytes | None:
        """The line `staged`'s record was written as: kept, or rendered again when the log's
        processors render purely (the defaults); None if rendering fails (it failed then too)."""
        if staged.line is not None:
            return staged.line
        try:
            return self.log._render_built(staged.received)
        except Exception:
            return None

    async def _receive(self, request: Any, context: Context) -> None:
        """The request stage (innermost layer): queue the RequestReceived record, don't wait."""
        call = state_of(context)
        received = self._received(call, context, _request_refs(request))
        log = self.log
        line, done = log._submit(received, log._render_built, False, None)
        call.audit = _Staged(received, done, None if log.renders_purely else line)

    async def _after(self, request: Any, response: Any, context: Context) -> None:
        call = state_of(context)
        staged: _Staged | None = call.audit
        if staged is None:  # no request stage in the chain, or not a mutating call
            refs = _request_refs(request)
            _add_response_refs(refs, response)
            await self._confirm(call, context, self._record(call, context, _Outcome.of(call, context), refs))
            return
        received = staged.received  # the request's references were read into it already
        refs = dict(zip(_REF_KEYS, map(received.get, _REF_KEYS), strict=True))  # in C: no comprehension frame
        _add_response_refs(refs, response)
        try:
            # The RequestReceived record's write (and fsync) ran while the handler worked; the
            # call is answered only once it is durable.
            await staged.done
        except asyncio.CancelledError:
            self._send(self._completed(call, staged.received, _Outcome.cancelled(context), refs), "cancelled")
            raise
        except AuditWriteError as exc:
            refuse = not self.fail_open and call.info.method in self.mutating
            consequence = "caller answered UNAVAILABLE" if refuse else "failing open"
            _lost(staged.received, self._line_of(staged), exc, consequence)
            if refuse:
                # The handler's effect stands (a grant, a session), as when a single record fails.
                code, message, trailers = audit_unavailable(self.retry_after)
                outcome = _Outcome(code, AUDIT_UNAVAILABLE, message)
                self._send(self._completed(call, staged.received, outcome, refs), consequence)
                await context.abort(code, message, trailers)
        # Queued now, so it follows its RequestReceived record in the log; the answer does not
        # wait for its fsync (the next group commit covers it). docs/audit.md: what that means.
        outcome = _Outcome.of(call, context)
        self._send(self._completed(call, staged.received, outcome, refs), "the caller was answered")

    def wrap_stream(self, behavior: StreamBehavior, info: CallInfo) -> StreamBehavior:
        if not self._audited(info):
            return behavior

        async def audited(request: Any, context: Context) -> AsyncIterator[Any]:
            context = scoped(context, info)
            call = state_of(context)
            received = 0
            sent = 0
            sessions: dict[str, None] = {}  # insertion-ordered set
            refs = _request_refs(request) if not info.client_streaming else _request_refs(None)

            async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                nonlocal received
                async for r in requests:
                    received += 1
                    # A message without the field (the Session stream's envelope) is only counted:
                    # getattr with a default raised and caught an AttributeError per message.
                    if _has_session_id(r):
                        sid = r.session_id
                        # Bounded in number and size (issue 18, item 10): a session id has 16 characters.
                        if sid and len(sid) <= 16 and len(sessions) < MAX_STREAM_SESSIONS:
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
                await self._write(record(_Outcome.of(call, context, grpc.StatusCode.UNKNOWN)))
                raise
            except (asyncio.CancelledError, GeneratorExit):
                await self._write(record(_Outcome.cancelled(context)))
                raise
            except Exception as exc:
                await self._write(record(_Outcome(grpc.StatusCode.UNKNOWN, None, f"unhandled {type(exc).__name__}")))
                raise
            await self._confirm(call, context, record(_Outcome.of(call, context)))

        return audited

    def _unimplemented(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        info = CallInfo(method, service, name, client_streaming=True, server_streaming=True)

        async def unknown(_requests: Any, context: Context) -> AsyncIterator[Any]:
            # No identity interceptor ran for a method that does not exist: nobody is established.
            call = CallState(info, principal=None)
            # grpc's own text for an unknown method, so callers see no difference
            outcome = _Outcome(grpc.StatusCode.UNIMPLEMENTED, None, "Method not found!")
            await self._write(self._record(call, context, outcome, _request_refs(None)))
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            yield  # an async generator, like every stream behavior

        # Raw bytes in and out: the method is unknown, so is its message type.
        return grpc.stream_stream_rpc_method_handler(unknown)


# _AuditIds, _Outcome, _UtcStamp, _mode_fields and _request_refs moved to _records.py; tests import
# them from here (test_audit.py, test_security_audit.py, test_shared_observability.py).
__all__ = [
    "AuditInterceptor",
    "_AuditIds",
    "_Outcome",
    "_UtcStamp",
    "_mode_fields",
    "_request_refs",
    "audit_unavailable",
]
