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
outside identity and quota (so their rejections are recorded). Who the call acts for, its retry
attempts and its outcome are read from the call's `CallState` when it ends (identity and the
service edge write them there), so nothing has to sit between the other layers to hand them over.

The package: `_pipeline` (constants, processors, `render_json`, `AuditLog`), `_sinks` (`StreamSink`,
`FileSink`, `audit_log`), `_records` (what a record says), `_interceptor` (`AuditInterceptor`: when
records are written), and `testing` (`MemorySink`, for users' tests of their own processors and
setups). Import from `lockbroker.interceptors.audit`.
"""

from lockbroker.interceptors.audit._interceptor import AuditInterceptor, audit_unavailable
from lockbroker.interceptors.audit._pipeline import (
    AUDIT_UNAVAILABLE,
    DEFAULT_PROCESSORS,
    MUTATING_METHODS,
    SCHEMA,
    AuditLog,
    AuditWriteError,
    FsyncPolicy,
    Processor,
    Record,
    Sink,
    add_fields,
    limit_message,
    redact_secrets,
    render_json,
)
from lockbroker.interceptors.audit._sinks import FileSink, StreamSink, audit_log

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
    "Processor",
    "Record",
    "Sink",
    "StreamSink",
    "add_fields",
    "audit_log",
    "audit_unavailable",
    "limit_message",
    "redact_secrets",
    "render_json",
]
