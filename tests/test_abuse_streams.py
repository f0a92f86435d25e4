"""Issue 18, item 10: KeepAlive streams are counted by a quota (max_streams per tenant and
replica), session ids are bounded in size, and the audit keeps only ids of a session id's size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from lockbroker.server.config import AuditConfig
from lockbroker.server.core.quota import TenantQuota
from lockbroker.v1 import lock_pb2
from tests.abuse_util import Served, served
from tests.overload_util import refusal

VALID_UNKNOWN = "00000000000000aa"  # the shape of a session id, of no session: answered `expired`


async def _open(s: Served, tenant: str) -> Any:
    """A KeepAlive stream that the handler has taken (it answered one request)."""
    call = s.stub.KeepAlive(metadata=s.md(tenant), timeout=30)
    await call.write(lock_pb2.KeepAliveRequest(session_id=VALID_UNKNOWN))
    resp = await call.read()
    assert resp is not aio.EOF and resp.expired, resp
    return call


async def _refused(call: Any) -> aio.AioRpcError:
    try:
        for _ in range(3):  # bounded: a refused stream ends at once
            if await call.read() is aio.EOF:
                break
    except aio.AioRpcError as err:
        return err
    raise AssertionError("the stream was not refused")


async def test_keepalive_streams_are_counted_per_tenant(tmp_path: Path) -> None:
    async with served(tmp_path, quota=TenantQuota(max_streams=3)) as s:
        held = [await _open(s, "flood") for _ in range(3)]
        extra = s.stub.KeepAlive(metadata=s.md("flood"), timeout=30)
        await extra.write(lock_pb2.KeepAliveRequest(session_id=VALID_UNKNOWN))
        err = await _refused(extra)
        r = refusal(err)
        assert (r.code, r.reason, r.quota_ids, r.quota_values) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUOTA_EXCEEDED",
            ["max_streams"],
            [3],
        ), r
        assert r.retry_after and "KeepAlive streams" in r.message
        # Another tenant's streams are its own.
        other = await _open(s, "calm")
        other.cancel()
        # A stream that ends gives its place back.
        await held[0].done_writing()
        assert await held[0].read() is aio.EOF
        again = None
        for _ in range(50):  # bounded: the handler's exit is seen within a few loop turns
            try:
                again = await _open(s, "flood")
                break
            except aio.AioRpcError as e:
                assert refusal(e).quota_ids == ["max_streams"]
        assert again is not None, "the closed stream's place was not given back"
        for call in [*held[1:], again]:
            call.cancel()


async def test_a_huge_session_id_ends_the_stream_invalid_and_is_not_echoed(tmp_path: Path) -> None:
    huge = "a" * 200_000
    audit_file = tmp_path / "audit.jsonl"
    async with served(tmp_path, audit=AuditConfig(file=str(audit_file), fsync="never")) as s:
        call = s.stub.KeepAlive(metadata=s.md("calm"), timeout=30)
        # Long ids that still pass validation (17-64 characters) reach neither the audit's list ...
        for i in range(70):
            await call.write(lock_pb2.KeepAliveRequest(session_id=f"{i:064x}"))
            resp = await call.read()
            assert resp.expired and len(resp.session_id) == 64
        # ... and a huge one ends the stream, naming the field, without echoing it.
        await call.write(lock_pb2.KeepAliveRequest(session_id=huge))
        err = await _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "session_id" in (err.details() or "") and huge[:100] not in (err.details() or "")
        # Unary calls reject an oversized id too (they always did: the id must be 16 hex digits).
        try:
            await s.stub.Refresh(lock_pb2.RefreshRequest(session_id=huge), metadata=s.md("calm"), timeout=10)
        except aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("Refresh accepted a huge session id")
    lines = audit_file.read_text().splitlines()
    stream_lines = [line for line in lines if "KeepAlive" in line]
    assert len(stream_lines) == 1, lines
    assert len(stream_lines[0]) < 8_000  # 70 ids of 64 characters, and one of 200,000, left out
    streams = [json.loads(stream_lines[0])]
    assert not any(len(sid) > 16 for sid in streams[0].get("stream", {}).get("sessions", [])), streams[0]
