"""What a record says: the call's outcome, the references read from its request and response, and
the RequestReceived / ResponseComplete dicts built from them (docs/audit.md, field by field).

Apart from _interceptor.py, which decides when records are written and what a failed write means:
this module only turns a call into a `Record` and writes nothing. `RecordBuilder` is a mixin of
`AuditInterceptor`, so building a record costs the same calls (and frames) as when its methods
were the interceptor's own.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from lockbroker.interceptors.audit._pipeline import (
    MAX_FIELD,
    REQUEST_RECEIVED,
    RESPONSE_COMPLETE,
    SCHEMA,
    SECRET_METADATA,
    Record,
    truncated,
)
from lockbroker.interceptors.base import CallState, Context


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


# Whether a response type has a `grant` and a `session_id` field, looked up once per type.
_RESPONSE_FIELDS: dict[type, tuple[bool, bool]] = {}


def _response_fields(message: object) -> tuple[bool, bool]:
    found = _RESPONSE_FIELDS.get(type(message))
    if found is None:
        fields = message.DESCRIPTOR.fields_by_name if isinstance(message, Message) else {}
        found = _RESPONSE_FIELDS[type(message)] = ("grant" in fields, "session_id" in fields)
    return found


def _str_or_none(value: object) -> str | None:
    # Cut here, not in a processor: a record never holds more than MAX_FIELD characters of what a
    # caller sent, whatever processors are configured (request fields may be up to 1 MiB).
    # References are strings and integers (fencing tokens): unset is "" or 0, both falsy; a
    # truth test costs less than comparing with (None, "", 0) one by one.
    if not value:
        return None
    text = value if type(value) is str else str(value)
    return text if len(text) <= MAX_FIELD else truncated(text)


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


_REF_KEYS: Final = tuple(key for key, _ in _REFS)

# What a request's type can carry, looked up once per type rather than per call: its references
# (key, field) and whether it has the mode, limit and locks fields of shared claims (issue 17).
_RefPlan = tuple[tuple[tuple[str, str], ...], Any, bool, bool]
_REF_PLANS: dict[type, _RefPlan] = {}


def _ref_plan(message: Message) -> _RefPlan:
    found = _REF_PLANS.get(type(message))
    if found is None:
        fields = message.DESCRIPTOR.fields_by_name
        mode = fields.get("mode")
        found = _REF_PLANS[type(message)] = (
            tuple((key, name) for key, name in _REFS if name in fields),
            mode.enum_type if mode is not None else None,
            "limit" in fields,
            "locks" in fields,
        )
    return found


def _request_refs(request: object) -> dict[str, str | None]:
    refs: dict[str, str | None] = dict.fromkeys(_REF_KEYS)
    if isinstance(request, Message):
        names, mode, limit, locks = _ref_plan(request)
        for key, name in names:
            refs[key] = _str_or_none(getattr(request, name))
        if mode is not None or limit or locks:
            _add_mode_refs(refs, request, mode, limit, locks)
    return refs


def _add_mode_refs(refs: dict[str, str | None], request: Message, mode: Any, limit: bool, locks: bool) -> None:
    """Shared claims, semaphores and AcquireMany (issue 17): the mode by name, the limit, the names."""
    r: Any = request
    if mode is not None and r.mode:
        known = mode.values_by_number.get(r.mode)
        refs["lockMode"] = known.name.removeprefix("LOCK_MODE_") if known is not None else str(r.mode)
    if limit and r.limit:
        refs["semaphoreLimit"] = str(r.limit)
    if locks and r.locks:
        refs["lock"] = truncated(",".join(c.name for c in r.locks))


def _mode_fields(refs: Mapping[str, str | None]) -> dict[str, str]:
    """The record's mode keys, only when the request set them (other records keep their shape)."""
    return {key: value for key in ("lockMode", "semaphoreLimit") if (value := refs.get(key))}


def _add_optional(record: Record, refs: Mapping[str, str | None]) -> None:
    """The keys only some records have, in their place after `traceId`: the admin's reason, then
    `_mode_fields`. Added in place: spreading a dict per key into the record cost a dict each."""
    if reason := refs.get("adminReason"):
        record["adminReason"] = reason
    if mode := refs.get("lockMode"):
        record["lockMode"] = mode
    if limit := refs.get("semaphoreLimit"):
        record["semaphoreLimit"] = limit


def _add_response_refs(refs: dict[str, str | None], response: object) -> None:
    has_grant, has_session = _response_fields(response)
    r: Any = response  # fields checked by name: responses differ
    if has_grant and r.HasField("grant"):
        g = r.grant
        refs["fencingToken"] = refs["fencingToken"] or _str_or_none(g.fencing_token)
        refs["session"] = refs["session"] or _str_or_none(g.session_id)
        refs["lock"] = refs["lock"] or _str_or_none(g.name)
        refs["requestId"] = refs["requestId"] or _str_or_none(g.request_id)
    if has_session:
        refs["session"] = refs["session"] or _str_or_none(r.session_id)


_NO_REFS: Final[Mapping[str, str | None]] = dict.fromkeys(key for key, _ in _REFS)


def _credential(call: CallState) -> dict[str, str | None] | None:
    """What a caller whose authentication failed presented: the API key's public id (or
    "(malformed)") and the certificate identity, as identity wrote them. Never a secret."""
    if call.credential is None:
        return None
    key_id, certificate = call.credential
    return {"apiKeyId": _capped(key_id), "certificate": _capped(certificate)}


_X_API_KEY, _AUTHORIZATION = SECRET_METADATA


def _caller(context: Context) -> tuple[str | None, list[str]]:
    """The caller's user agent (cut) and the values of its SECRET_METADATA (the first of each
    key, as `metadata_value` reads it, in that order, empty ones left out), from one pass over
    the metadata: three passes, each through the context's attribute forwarding, cost more than
    rendering the record.
    """
    agent = api_key = authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent":
            if agent is None:
                agent = value
        elif key == _X_API_KEY:
            if api_key is None:
                api_key = value
        elif key == _AUTHORIZATION and authorization is None:
            authorization = value
    secrets = [_text(v) for v in (api_key, authorization) if v]
    return (truncated(_text(agent)) if agent is not None else None), secrets


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


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


class RecordBuilder:
    """The records of `AuditInterceptor`'s calls: mixed into it, with its clock and id pool."""

    def __init__(self) -> None:
        self._stamp = _UtcStamp()
        self._ids = _AuditIds()

    def _record(
        self, call: CallState, context: Context, outcome: _Outcome, refs: Mapping[str, str | None], **extra: Any
    ) -> Record:
        principal = call.principal  # None when authentication failed: the default tenant must not take the blame
        if principal is None:
            # Nobody vouches for a stranger's request: record what was tried, not what was asked
            # (issue 18, item 5). Stream counts stay; the request's own fields do not.
            refs = _NO_REFS
        agent, secrets = _caller(context)
        record: Record = {
            "schema": SCHEMA,
            "time": self._stamp(call.started),
            "auditId": self._ids.next(),
            "stage": RESPONSE_COMPLETE,
            "requestAuditId": None,
            "tenant": principal.tenant if principal is not None else None,
            "principal": {"kind": principal.kind, "id": truncated(principal.id)} if principal is not None else None,
            "credential": _credential(call) if principal is None else None,
            "sourceAddress": _capped(context.peer()),
            "userAgent": agent,
            "method": truncated(call.info.method),
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": {"code": outcome.code.name, "reason": outcome.reason, "message": outcome.message},
            "durationMs": round((time.monotonic() - call.started_mono) * 1000, 3),
            "retryAttempts": call.attempts,
            "traceId": _trace_id(),
        }
        # Only admin calls carry a reason, only shared claims a mode: other records keep their shape.
        _add_optional(record, refs)
        if extra:
            record.update(extra)
        record["_secrets"] = secrets
        return record

    def _received(self, call: CallState, context: Context, refs: Mapping[str, str | None]) -> Record:
        """The RequestReceived record: who asks what, before the handler acts (no outcome yet)."""
        principal = call.principal
        agent, secrets = _caller(context)
        record: Record = {
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
            "userAgent": agent,
            "method": truncated(call.info.method),
            "lock": refs.get("lock"),
            "session": refs.get("session"),
            "fencingToken": refs.get("fencingToken"),
            "requestId": refs.get("requestId"),
            "outcome": None,
            "durationMs": None,
            "retryAttempts": None,
            "traceId": _trace_id(),
        }
        _add_optional(record, refs)
        record["_secrets"] = secrets
        return record

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


__all__ = ["RecordBuilder"]
