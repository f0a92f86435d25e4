"""lock.proto's ErrorReason enum is the one list of error reasons, and its idempotency levels hold.

Checked here without a broker: the Python mirror against the proto enum, each value's documented
status code against the server's mapping and the client's exception classes, the sources against
spelled-out reason strings, and the RPCs' idempotency_level against what the server retries.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
from google.protobuf import any_pb2, descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from lockbroker.client import errors as client_errors
from lockbroker.server import status
from lockbroker.server.core import errors as core_errors
from lockbroker.server.service import Idempotency
from lockbroker.v1 import lock_pb2
from lockbroker.v1.reasons import PROTO_PREFIX, ErrorReason
from tests.procutil import REPO

PROTO = REPO / "proto" / "lockbroker" / "v1" / "lock.proto"
SERVICE = lock_pb2.DESCRIPTOR.services_by_name["LockService"]
Level = descriptor_pb2.MethodOptions.IdempotencyLevel


def documented() -> dict[ErrorReason, tuple[grpc.StatusCode, str]]:
    """Each ErrorReason value of lock.proto with the status code and the comment documenting it."""
    text = PROTO.read_text()
    body = text[text.index("enum ErrorReason {") :]
    body = body[: body.index("\n}")]
    found: dict[ErrorReason, tuple[grpc.StatusCode, str]] = {}
    for comment, name in re.findall(r"((?:\n  //[^\n]*)+)\n  (ERROR_REASON_[A-Z_]+) = \d+;", body):
        if name == f"{PROTO_PREFIX}UNSPECIFIED":
            continue
        words = " ".join(line.strip().removeprefix("//").strip() for line in comment.strip().splitlines())
        code = re.match(r"Code ([A-Z_]+)\b", words)
        assert code is not None, f"{name}: the comment must start with its status code: {words!r}"
        found[ErrorReason(name.removeprefix(PROTO_PREFIX))] = (grpc.StatusCode[code.group(1)], words)
    return found


def test_the_python_enum_mirrors_the_proto_enum() -> None:
    proto_names = set(lock_pb2.ErrorReason.keys())
    assert {PROTO_PREFIX + r.value for r in ErrorReason} | {f"{PROTO_PREFIX}UNSPECIFIED"} == proto_names
    assert lock_pb2.ErrorReason.Value(f"{PROTO_PREFIX}UNSPECIFIED") == 0
    for reason in ErrorReason:
        # The wire string is the member's name, and the proto value's name without the prefix.
        assert reason.name == reason.value and str(reason) == reason.value
        assert lock_pb2.ErrorReason.Name(reason.proto) == PROTO_PREFIX + reason.value
    assert len({r.proto for r in ErrorReason}) == len(ErrorReason)


def test_every_reason_documents_its_code_retry_and_payload() -> None:
    docs = documented()
    assert set(docs) == set(ErrorReason), "every value needs a comment starting with 'Code <STATUS>'"
    for reason, (_, words) in docs.items():
        assert "etryable" in words, f"{reason}: say whether a retry can help"
        assert re.search(r"Details|[Mm]etadata", words), f"{reason}: say which details and metadata come along"


def _core_error_classes() -> list[type[core_errors.LockBrokerError]]:
    todo, seen = [core_errors.LockBrokerError], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in seen if "reason" in vars(c)]


def test_the_server_sends_each_core_error_with_its_documented_code() -> None:
    docs = documented()
    classes = _core_error_classes()
    assert len(classes) >= 11
    for cls in classes:
        assert isinstance(cls.reason, ErrorReason), cls
        exc = cls.__new__(cls)  # code_of looks at the class only
        assert status.code_of(exc) == docs[cls.reason][0], cls
    code, message, trailers = status.internal("abc123")
    assert "abc123" in message
    [(key, raw)] = trailers
    assert isinstance(raw, bytes)
    sent = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert key == "grpc-status-details-bin" and sent.details[0].Unpack(info)
    assert code == docs[ErrorReason.INTERNAL][0]
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {"incident": "abc123"})


def test_the_client_has_an_exception_class_for_every_reason() -> None:
    assert set(client_errors._BY_REASON) == set(ErrorReason)
    for reason, (code, _) in documented().items():
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="lockbroker"))
        trailer = status_pb2.Status(code=code.value[0], message="m", details=[packed]).SerializeToString()
        err = client_errors.from_rpc_error(
            aio.AioRpcError(code, aio.Metadata(), aio.Metadata(("grpc-status-details-bin", trailer)), "m")
        )
        assert type(err) is client_errors._BY_REASON[reason] and err.reason == reason.value and err.code == code
        # The class agrees with the code it is documented with (the base stands for INTERNAL).
        assert type(err) is client_errors.LockBrokerError or type(err).default_code == code, reason


def _source_files() -> list[Path]:
    roots = [REPO / "server", REPO / "interceptors", REPO / "client"]
    return [p for root in roots for p in root.rglob("*.py") if "_pb2" not in p.name and ".venv" not in p.parts]


def test_sources_name_reasons_by_the_enum_and_send_every_one() -> None:
    wire = {r.value for r in ErrorReason}
    spelled: list[str] = []
    used: set[str] = set()
    for path in _source_files():
        tree = ast.parse(path.read_text(), str(path))
        exported = {
            id(elt)
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            for elt in ast.walk(node.value)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in wire and id(node) not in exported:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ErrorReason"
                and "client" not in path.relative_to(REPO).parts[:1]
            ):
                used.add(node.attr)
    assert spelled == [], "use lockbroker.v1.reasons.ErrorReason instead of a string"
    # Every reason in the catalogue is one the server or its interceptors actually send.
    assert used == {r.name for r in ErrorReason}


# What repeating each RPC does; a change here is a change of the public contract (see buf.yaml).
LEVELS = {
    "CreateSession": Level.IDEMPOTENCY_UNKNOWN,  # idempotent only with a request_id
    "KeepAlive": Level.IDEMPOTENCY_UNKNOWN,  # a stream
    "Refresh": Level.IDEMPOTENT,
    "CloseSession": Level.IDEMPOTENT,
    "Acquire": Level.IDEMPOTENCY_UNKNOWN,  # idempotent only with a request_id
    "AcquireMany": Level.IDEMPOTENCY_UNKNOWN,  # likewise
    "Release": Level.IDEMPOTENCY_UNKNOWN,  # a repeat answers released = false
    "Describe": Level.NO_SIDE_EFFECTS,
    "List": Level.NO_SIDE_EFFECTS,
    "Session": Level.IDEMPOTENCY_UNKNOWN,  # a stream; each message is what its unary RPC is
    "CheckFence": Level.NO_SIDE_EFFECTS,
    "Watch": Level.NO_SIDE_EFFECTS,  # a server stream that only reads
}


def test_idempotency_levels_are_declared_and_agree_with_the_server_retry() -> None:
    levels = {m.name: m.GetOptions().idempotency_level for m in SERVICE.methods}
    assert levels == LEVELS
    # The server's retry reads the same levels (service.Idempotency.of), so a change of level in the
    # proto changes what the broker retries; this pins what each method gets.
    expected = {
        "CreateSession": Idempotency.WITH_REQUEST_ID,
        "KeepAlive": Idempotency.NEVER,
        "Refresh": Idempotency.ALWAYS,
        "CloseSession": Idempotency.ALWAYS,
        "Acquire": Idempotency.WITH_REQUEST_ID,
        "AcquireMany": Idempotency.WITH_REQUEST_ID,
        "Release": Idempotency.WITH_REQUEST_ID,
        "Describe": Idempotency.ALWAYS,
        "List": Idempotency.ALWAYS,
        "Session": Idempotency.NEVER,  # the stream itself; its messages run through the unary handlers
        "CheckFence": Idempotency.ALWAYS,
        "Watch": Idempotency.ALWAYS,  # not retried by the edge (a stream); the client resumes it
    }
    assert {m.name: Idempotency.of(m.name) for m in SERVICE.methods} == expected
    # The admin plane: the reads are retried, the forced changes only once.
    admin = lock_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert {m.name: Idempotency.of(m.name, admin) for m in admin.methods} == {
        "ForceRelease": Idempotency.NEVER,
        "RevokeSession": Idempotency.NEVER,
        "ListSessions": Idempotency.ALWAYS,
    }
