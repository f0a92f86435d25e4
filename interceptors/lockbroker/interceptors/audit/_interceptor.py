"""The interceptor: one record per RPC, built from the request, the response and the call's state."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio
from opentelemetry import trace

from lockbroker.interceptors.audit._pipeline import (
    AUDIT_UNAVAILABLE,
    MAX_STREAM_SESSIONS,
    MUTATING_METHODS,
    REQUEST_RECEIVED,
    RESPONSE_COMPLETE,
    SCHEMA,
    SECRET_METADATA,
    AuditLog,
    AuditWriteError,
    Record,
    log,
    truncated,
)
from lockbroker.interceptors.base import (
    OPEN_SERVICES,
    CallInfo,
    CallState,
    Context,
    Layer,
    StreamBehavior,
    WrappingInterceptor,
    metadata_value,
    scoped,
    state_of,
)
from lockbroker.interceptors.rpcstatus import Trailers, trailers

# --- the interceptor ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    code: grpc.StatusCode
    reason: str | None = None
    message: str | None = None

    @staticmethod
    def of(state: CallState, context: Context, default: grpc.StatusCode = grpc.StatusCode.OK) -> _Outcome:
        """The outcome the call's layers recorded on its state (grpc's own code as a fallback)."""
        code = state.code or _status_code(context.code()) or default
        message = state.message
        if message is None:
            details = context.details()
            message = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
        return _Outcome(code, state.reason, message or None)

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
    # Cut here, not in a processor: a record never holds more than MAX_FIELD characters of what a
    # caller sent, whatever processors are configured (request fields may be up to 1 MiB).
    return truncated(str(value)) if value not in (None, "", 0) else None


def _capped(value: str | None) -> str | None:
    return truncated(value) if value is not None else None


_REFS: Final = (
    # fencing tokens are int64: strings, as proto3's JSON mapping does, so no reader loses digits
    ("lock", "name"),
    ("session", "session_id"),
    ("fencingToken", "fencing_token"),
    ("requestId", "request_id"),
    ("adminReason", "reason"),  # AdminService: why the admin acted
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
        _add_mode_refs(refs, request)
    return refs


def _add_mode_refs(refs: dict[str, str | None], request: Message) -> None:
    """Shared claims, semaphores and AcquireMany (issue 17): the mode by name, the limit, the names."""
    fields = request.DESCRIPTOR.fields_by_name
    r: Any = request
    mode = fields.get("mode")
    if mode is not None and mode.enum_type is not None and r.mode:
        known = mode.enum_type.values_by_number.get(r.mode)
        refs["lockMode"] = known.name.removeprefix("LOCK_MODE_") if known is not None else str(r.mode)
    if "limit" in fields and r.limit:
        refs["semaphoreLimit"] = str(r.limit)
    if "locks" in fields and r.locks:
        refs["lock"] = truncated(",".join(c.name for c in r.locks))


def _mode_fields(refs: Mapping[str, str | None]) -> dict[str, str]:
    """The record's mode keys, only when the request set them (other records keep their shape)."""
    return {key: value for key in ("lockMode", "semaphoreLimit") if (value := refs.get(key))}


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


_NO_REFS: Final[Mapping[str, str | None]] = dict.fromkeys(key for key, _ in _REFS)


def _credential(call: CallState) -> dict[str, str | None] | None:
    """What a caller whose authentication failed presented: the API key's public id (or
    "(malformed)") and the certificate identity, as identity wrote them. Never a secret."""
    if call.credential is None:
        return None
    key_id, certificate = call.credential
    return {"apiKeyId": _capped(key_id), "certificate": _capped(certificate)}


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


# RFC 4122's variant "10" in the top bits of the clock_seq_hi digit: 8, 9, a or b.
_VARIANT: Final = {d: format((int(d, 16) & 0x3) | 0x8, "x") for d in "0123456789abcdef"}


class _AuditIds:
    """Random (version 4) UUIDs, from the OS's randomness 256 at a time rather than one call each.

    The pool is kept as hex: an id is a slice of it with the version and variant digits set, which
    costs a tenth of building it from an int (two ids per mutating call, so it shows).
    """

    _BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        _ID_POOLS.add(self)

    def forget(self) -> None:
        """Drop the unused randomness (a forked child must not hand out its parent's ids)."""
        self._hex, self._at = "", 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(16 * self._BATCH).hex(), 0
        h = self._hex[at : at + 32]
        self._at = at + 32
        # RFC 4122: version 4 in the 13th digit, the variant in the 17th.
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_ID_POOLS: weakref.WeakSet[_AuditIds] = weakref.WeakSet()


def _forget_id_pools() -> None:
    for pool in list(_ID_POOLS):
        pool.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_id_pools)


def _lost(record: Record, line: bytes | None, exc: BaseException, consequence: str) -> None:
    # The process log is the last place the record can go. Only the rendered line (which went
    # through redaction) may go there; a record the processors choked on is named only.
    text = line.decode().rstrip("\n") if line else f"(unprocessable record {record['auditId']})"
    log.error("audit record not written (%s; %s): %s", exc, consequence, text)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A call's RequestReceived record and its write in flight (kept on `CallState.audit`)."""

    received: Record
    line: bytes | None
    done: asyncio.Future[None]


class _RequestStage(WrappingInterceptor):
    """AuditInterceptor.request_stage: a `before` hook for mutating unary calls only."""

    def __init__(self, audit: AuditInterceptor, layer: Layer) -> None:
        self._audit = audit
        self._stage = layer

    def layer(self, call: CallInfo) -> Layer | None:
        audit = self._audit
        staged = audit._audited(call) and call.method in audit.mutating and not call.client_streaming
        return self._stage if staged else None


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
        self._layer = Layer(before=self._before, after=self._after, failed=self._failed)
        self._request_stage = _RequestStage(self, Layer(before=self._receive))

    def handle_missing(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self.include_unimplemented and method.lstrip("/").split("/")[0] not in OPEN_SERVICES:
            return self._unimplemented(method)
        return None

    def _audited(self, call: CallInfo) -> bool:
        return self.include_open_services or not call.open

    def _record(
        self, call: CallState, context: Context, outcome: _Outcome, refs: Mapping[str, str | None], **extra: Any
    ) -> Record:
        principal = call.principal  # None when authentication failed: the default tenant must not take the blame
        if principal is None:
            # Nobody vouches for a stranger's request: record what was tried, not what was asked
            # (issue 18, item 5). Stream counts stay; the request's own fields do not.
            refs = _NO_REFS
        return {
            "schema": SCHEMA,
            "time": self._stamp(call.started),
            "auditId": self._ids.next(),
            "stage": RESPONSE_COMPLETE,
            "requestAuditId": None,
            "tenant": principal.tenant if principal is not None else None,
            "principal": {"kind": principal.kind, "id": truncated(principal.id)} if principal is not None else None,
            "credential": _credential(call) if principal is None else None,
            "sourceAddress": _capped(context.peer()),
            "userAgent": _capped(metadata_value(context, "user-agent")),
            "method": truncated(call.info.method),
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": {"code": outcome.code.name, "reason": outcome.reason, "message": outcome.message},
            "durationMs": round((time.monotonic() - call.started_mono) * 1000, 3),
            "retryAttempts": call.attempts,
            "traceId": _trace_id(),
            # Only admin calls carry a reason; other records keep their shape.
            **({"adminReason": refs["adminReason"]} if refs.get("adminReason") else {}),
            **_mode_fields(refs),
            **extra,
            "_secrets": _secrets(context),
        }

    def _received(self, call: CallState, context: Context, refs: Mapping[str, str | None]) -> Record:
        """The RequestReceived record: who asks what, before the handler acts (no outcome yet)."""
        principal = call.principal
        return {
            "schema": SCHEMA,
            "time": self._stamp(call.started),
            "auditId": self._ids.next(),
            "stage": REQUEST_RECEIVED,
            "requestAuditId": None,
            "tenant": principal.tenant if principal is not None else None,
            "principal": {"kind": principal.kind, "id": truncated(principal.id)} if principal is not None else None,
            # The request stage runs after identity admitted the call, so nothing failed to vouch.
            "credential": None,
            "sourceAddress": _capped(context.peer()),
            "userAgent": _capped(metadata_value(context, "user-agent")),
            "method": truncated(call.info.method),
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": None,
            "durationMs": None,
            "retryAttempts": None,
            "traceId": _trace_id(),
            **({"adminReason": refs["adminReason"]} if refs.get("adminReason") else {}),
            **_mode_fields(refs),
            "_secrets": _secrets(context),
        }

    def _completed(
        self, call: CallState, received: Record, outcome: _Outcome, refs: Mapping[str, str | None]
    ) -> Record:
        """The ResponseComplete record of a call that has a RequestReceived one: the same call,
        so who and whence are copied rather than read again from the context."""
        return {
            **received,
            "auditId": self._ids.next(),
            "stage": RESPONSE_COMPLETE,
            "requestAuditId": received["auditId"],
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": {"code": outcome.code.name, "reason": outcome.reason, "message": outcome.message},
            "durationMs": round((time.monotonic() - call.started_mono) * 1000, 3),
            "retryAttempts": call.attempts,
        }

    async def _write(self, record: Record, consequence: str = "the caller's status stands") -> bool:
        try:
            await self.log.write(record)
        except AuditWriteError as exc:
            _lost(record, exc.line, exc, consequence)
            return False
        return True

    def _send(self, record: Record, consequence: str) -> None:
        """Queue `record` without waiting for it; a failure goes to the process log."""
        line, done = self.log.submit(record, lazy=True)

        def check(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                _lost(record, line, exc, consequence)

        done.add_done_callback(check)

    async def _refuse_early(self, call: CallState, context: Context, refs: Mapping[str, str | None]) -> None:
        """Refuse a mutating call before its handler runs if its record could not be written."""
        if self.fail_open or call.info.method not in self.mutating or await self.log.ready():
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
        if self.fail_open or call.info.method not in self.mutating or await self.log.ready():
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

    @staticmethod
    def _check_received(staged: _Staged) -> Callable[[asyncio.Future[None]], None]:
        def check(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                _lost(staged.received, staged.line, exc, "the call failed anyway")

        return check

    async def _receive(self, request: Any, context: Context) -> None:
        """The request stage (innermost layer): queue the RequestReceived record, don't wait."""
        call = state_of(context)
        received = self._received(call, context, _request_refs(request))
        line, done = self.log.submit(received)
        call.audit = _Staged(received, line, done)

    async def _after(self, request: Any, response: Any, context: Context) -> None:
        call = state_of(context)
        staged: _Staged | None = call.audit
        if staged is None:  # no request stage in the chain, or not a mutating call
            refs = _request_refs(request)
            _add_response_refs(refs, response)
            await self._confirm(call, context, self._record(call, context, _Outcome.of(call, context), refs))
            return
        received = staged.received  # the request's references were read into it already
        refs = {key: received.get(key) for key, _ in _REFS}
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
            _lost(staged.received, staged.line, exc, consequence)
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
                    sid = getattr(r, "session_id", "") if isinstance(r, Message) else ""
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
