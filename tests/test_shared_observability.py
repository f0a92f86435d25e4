"""Audit records and lock spans carry the mode, the semaphore limit and AcquireMany's names (issue 17
item 5); requests without them keep their shape."""

from __future__ import annotations

from lockbroker.interceptors import tracing
from lockbroker.interceptors.audit import _interceptor as audit
from lockbroker.v1 import lock_pb2


def test_span_attributes_name_the_mode_and_limit() -> None:
    shared = tracing._request_attributes(lock_pb2.AcquireRequest(name="a", mode=lock_pb2.LOCK_MODE_SHARED))
    assert shared["lockbroker.lock.mode"] == "LOCK_MODE_SHARED"
    permit = tracing._request_attributes(lock_pb2.AcquireRequest(name="a", limit=3))
    assert permit["lockbroker.lock.limit"] == 3
    many = lock_pb2.AcquireManyRequest(locks=[lock_pb2.LockClaim(name="a"), lock_pb2.LockClaim(name="b")])
    assert tracing._request_attributes(many)["lockbroker.lock.names"] == "a,b"
    plain = tracing._request_attributes(lock_pb2.AcquireRequest(name="a"))
    assert not any(k in plain for k in ("lockbroker.lock.mode", "lockbroker.lock.limit"))


def test_audit_refs_name_the_mode_and_limit() -> None:
    refs = audit._request_refs(lock_pb2.AcquireRequest(name="a", mode=lock_pb2.LOCK_MODE_SHARED))
    assert audit._mode_fields(refs) == {"lockMode": "SHARED"}
    refs = audit._request_refs(lock_pb2.AcquireRequest(name="a", limit=5))
    assert audit._mode_fields(refs) == {"semaphoreLimit": "5"}
    many = lock_pb2.AcquireManyRequest(locks=[lock_pb2.LockClaim(name="a"), lock_pb2.LockClaim(name="b")])
    assert audit._request_refs(many)["lock"] == "a,b"
    assert audit._mode_fields(audit._request_refs(lock_pb2.AcquireRequest(name="a"))) == {}
