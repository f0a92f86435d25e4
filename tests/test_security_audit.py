"""Issue 18, items 5, 8, 17 and 18: what an audit record may copy, redact and contain.

Each test drives a real grpc.aio server (127.0.0.1) with the audit and identity interceptors, as
tests/interceptors/test_audit.py does, and reads the lines the sink received.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog, render_json
from lockbroker.interceptors.audit._interceptor import _Outcome
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import CallContext, CallInfo, CallState, state_of
from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.server.auth.tenants import add_tenant, load
from lockbroker.v1 import lock_pb2
from tests.interceptors.test_audit import LOCK, outcome_of, serving, stub, until

# The bound docs/security.md gives for a record of a call whose authentication failed: it copies
# no request field, and every string it holds is at most MAX_FIELD characters plus a marker.
MAX_UNAUTHENTICATED_RECORD = 2048
# Any record of a unary call: every string at most MAX_FIELD (the message 1024) characters.
MAX_RECORD = 4096
BIG = 512 * 1024
MAX_FIELD = 256  # audit._pipeline.MAX_FIELD, as docs/audit.md gives it


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, IdentityInterceptor]:
    path = tmp_path_factory.mktemp("security-tenants") / "tenants.toml"
    key = add_tenant(path, "acme")
    identity = IdentityInterceptor.from_registry(load(path))
    assert identity is not None
    return key, identity


async def _calls(
    identity: IdentityInterceptor,
    requests: Sequence[tuple[lock_pb2.AcquireRequest, Sequence[tuple[str, str]]]],
    user_agent: str | None = None,
) -> list[bytes]:
    options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 8 << 20)]
    if user_agent is not None:
        options.append(("grpc.primary_user_agent", user_agent))
    memory = MemorySink()
    log = AuditLog([memory])
    async with (
        serving([AuditInterceptor(log), identity]) as srv,
        aio.insecure_channel(f"127.0.0.1:{srv.port}", options=options) as ch,
    ):
        for request, md in requests:
            await outcome_of(stub(ch).Acquire(request, metadata=md, timeout=10))
        await until(lambda: len(memory.lines) >= len(requests))
    await log.close()
    return memory.lines


def _big(i: int) -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(name=f"{i}" + "n" * BIG, owner="o" * BIG, request_id="r" * BIG, session_id="s" * BIG)


async def test_item5_a_flood_of_large_unauthenticated_requests_writes_bounded_records(
    acme: tuple[str, IdentityInterceptor],
) -> None:
    key, identity = acme
    key_id = key.split("_")[1]
    wrong = f"lbk_{key_id}_{'A' * 43}"
    flood = [(_big(i), (("x-api-key", wrong),) if i % 2 else ()) for i in range(20)]
    lines = await _calls(identity, flood)
    assert len(lines) == 20
    for line in lines:
        # Before the fix each line held the whole name, session and request id: about 2 MiB.
        assert len(line) <= MAX_UNAUTHENTICATED_RECORD, len(line)
        record = json.loads(line)
        assert record["outcome"]["code"] == "UNAUTHENTICATED"
        # Terse: method, peer, what was tried, outcome; nothing the stranger asked for.
        assert (record["lock"], record["session"], record["requestId"], record["fencingToken"]) == (None,) * 4
        assert record["method"] == LOCK + "Acquire"
        assert record["sourceAddress"].startswith("ipv4:127.0.0.1:")


async def test_item5_an_authenticated_record_cuts_every_field_with_a_marker_and_the_size(
    acme: tuple[str, IdentityInterceptor],
) -> None:
    key, identity = acme
    (line,) = await _calls(identity, [(_big(7), (("x-api-key", key),))], user_agent="u" * 4000)
    assert len(line) <= MAX_RECORD, len(line)
    record = json.loads(line)
    assert record["tenant"] == "acme"  # the test servicer grants it
    assert record["lock"] == "7" + "n" * (MAX_FIELD - 1) + f"…[truncated, {BIG + 1} chars]"
    assert record["session"] == "s" * MAX_FIELD + f"…[truncated, {BIG} chars]"
    assert record["requestId"] == "r" * MAX_FIELD + f"…[truncated, {BIG} chars]"
    assert record["userAgent"].startswith("u" * MAX_FIELD + "…[truncated, ")


async def test_item8_a_chosen_credential_value_does_not_blank_other_fields(
    acme: tuple[str, IdentityInterceptor],
) -> None:
    key, identity = acme
    name = "jobs/nightly"
    method = LOCK + "Acquire"
    request = lock_pb2.AcquireRequest(name=name, session_id="s-1", owner="ok", request_id="r-8")
    lines = await _calls(
        identity,
        [
            # Authenticated, with `authorization` set to the values an attacker would hide.
            (request, (("x-api-key", key), ("authorization", name))),
            (request, (("x-api-key", key), ("authorization", method))),
            (request, (("x-api-key", key), ("authorization", "ipv4:127.0.0.1"))),
            # Unauthenticated: the "key" is the method or the peer.
            (request, (("x-api-key", method),)),
            (request, (("x-api-key", "ipv4:127.0.0.1"),)),
        ],
    )
    records = [json.loads(line) for line in lines]
    assert all("[REDACTED]" not in line.decode() for line in lines)
    for record in records[:3]:
        assert (record["tenant"], record["lock"], record["method"]) == ("acme", name, method)
        assert record["sourceAddress"].startswith("ipv4:127.0.0.1:")
    for record in records[3:]:
        assert (record["outcome"]["code"], record["method"]) == ("UNAUTHENTICATED", method)
        assert record["sourceAddress"].startswith("ipv4:127.0.0.1:")
    # The key itself is still never written.
    assert all(key not in line.decode() for line in lines)


async def test_item17_an_unauthenticated_record_names_the_key_id_tried_never_the_secret(
    acme: tuple[str, IdentityInterceptor],
) -> None:
    key, identity = acme
    key_id = key.split("_")[1]
    secret = "B" * 43
    request = lock_pb2.AcquireRequest(name="a", session_id="s-1", owner="ok", request_id="r-17")
    lines = await _calls(
        identity,
        [
            (request, (("x-api-key", f"lbk_{key_id}_{secret}"),)),  # known id, wrong secret
            (request, (("x-api-key", f"lbk_0123abcd_{secret}"),)),  # unknown id
            (request, (("x-api-key", "not-a-key-at-all"),)),
            (request, ()),
        ],
    )
    records = [json.loads(line) for line in lines]
    assert [r["credential"] for r in records] == [
        {"apiKeyId": key_id, "certificate": None},
        {"apiKeyId": "0123abcd", "certificate": None},
        {"apiKeyId": "(malformed)", "certificate": None},
        None,  # nothing presented
    ]
    assert all(r["principal"] is None and r["tenant"] is None for r in records)
    text = b"".join(lines).decode()
    assert secret not in text and "not-a-key-at-all" not in text


class _CertOnly:
    """Enough of a servicer context for identity: a verified client certificate, no API key."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [b"stranger"]}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_item17_an_unknown_certificate_is_named_by_its_subject(acme: tuple[str, IdentityInterceptor]) -> None:
    _, identity = acme
    info = CallInfo(LOCK + "Acquire", "lockbroker.v1.LockService", "Acquire", False, False)
    context: Any = CallContext(_CertOnly(), CallState(info))  # type: ignore[arg-type]
    assert await identity.authenticate(context) is None
    assert state_of(context).credential == (None, "CN=stranger")
    state_of(context).principal = None
    record = AuditInterceptor(AuditLog([MemorySink()]))._record(state_of(context), context, _unauthenticated(), {})
    assert record["credential"] == {"apiKeyId": None, "certificate": "CN=stranger"}


def _unauthenticated() -> _Outcome:
    return _Outcome(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "missing or invalid credentials")


# Every character Python's str.splitlines() breaks a line at.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_item18_the_line_breaks_json_leaves_raw_are_escaped() -> None:
    # What json.dumps(ensure_ascii=False) leaves raw, found rather than assumed.
    raw = [ch for ch in LINE_BREAKS if ch in json.dumps(ch, ensure_ascii=False)]
    assert raw == ["\x85", "\u2028", "\u2029"]
    value = "a" + LINE_BREAKS + "\x7f\x9fb"
    line = render_json({"lock": value, "owner": value}).decode()
    assert len(line.splitlines()) == 1
    assert not any(ch in line[:-1] for ch in LINE_BREAKS)
    assert json.loads(line) == {"lock": value, "owner": value}  # the same value, escaped


async def test_item18_a_lock_name_with_line_separators_is_one_line_per_record(
    acme: tuple[str, IdentityInterceptor], tmp_path: Path
) -> None:
    key, identity = acme
    name = 'jobs\u2028{"forged":1}\x85next\u2029'
    requests = [
        (lock_pb2.AcquireRequest(name=name, session_id="s-1", owner="ok", request_id=f"r-{i}"), (("x-api-key", key),))
        for i in range(3)
    ]
    lines = await _calls(identity, requests)
    text = b"".join(lines).decode()
    # Before the fix str.splitlines() saw 4 lines per record.
    assert len(text.splitlines()) == 3
    assert [json.loads(line)["lock"] for line in text.splitlines()] == [name] * 3
