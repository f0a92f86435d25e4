"""`lockbroker serve` as a real process with console tracing: stderr is JSON lines only, spans go to
their own stream, and health checks (the gRPC ones and the broker's own etcd probe) make no traces."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lockbroker.server.embedded import EmbeddedEtcd, free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.procutil import clean_env, lockbroker_command, stop_process, wait_until


async def test_stderr_is_json_lines_and_health_checks_make_no_spans(
    etcd: EmbeddedEtcd, key_root: str, tmp_path: Path
) -> None:
    port = free_port()
    out_path, err_path = tmp_path / "serve.stdout", tmp_path / "serve.stderr"
    env = clean_env(OTEL_TRACES_EXPORTER="console")
    env.pop("GRPC_VERBOSITY", None)
    env.pop("OTEL_EXPORTER_CONSOLE_FILE", None)
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--etcd-endpoints",
            etcd.endpoint,
            "--etcd-key-root",
            key_root,
            "--health-interval",
            "0.1",
            "--log-level",
            "debug",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def serving() -> bool:
                assert proc.returncode is None, err_path.read_text()
                try:
                    r = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except aio.AioRpcError:
                    return False
                return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

            await wait_until(serving, 30, "lockbroker serve to report SERVING", interval=0.1)
            for _ in range(10):
                await health.Check(health_pb2.HealthCheckRequest(service="lockbroker.v1.LockService"))
            stub = lock_pb2_grpc.LockServiceStub(ch)
            ttl = duration_pb2.Duration(seconds=5)
            r = await stub.Acquire(lock_pb2.AcquireRequest(name="logs/one", ttl=ttl))
            await stub.Release(lock_pb2.ReleaseRequest(name="logs/one", fencing_token=r.grant.fencing_token))
            await asyncio.sleep(0.5)  # a few more of the broker's own 0.1 s etcd probes
    finally:
        await stop_process(proc, grace=10)

    err_lines = err_path.read_text().splitlines()
    assert err_lines, "the broker logged nothing"
    for line in err_lines:
        doc = json.loads(line)  # every stderr line is one JSON object
        assert isinstance(doc, dict) and "msg" in doc, line
    started = [doc for doc in map(json.loads, err_lines) if doc["msg"] == "lockbroker serving"]
    assert len(started) == 1, err_lines
    assert started[0]["event_loop"] == "asyncio"  # the default, although uvloop is installed here

    spans = [json.loads(line) for line in out_path.read_text().splitlines()]  # one span per line
    names = [s["name"] for s in spans]
    assert "/lockbroker.v1.LockService/Acquire" in names, names
    assert not [n for n in names if "grpc.health" in n], names
    # The etcd calls that were traced all belong to a call's trace; the broker's own health probe
    # (a Range every 0.1 s) made none, or there would be root etcd spans here.
    etcd_spans = [s for s in spans if s["name"].startswith("/etcdserverpb.")]
    assert etcd_spans, names
    assert all(s["parent_id"] is not None for s in etcd_spans), [s["name"] for s in etcd_spans if not s["parent_id"]]


@pytest.mark.parametrize(("given", "expected"), [(None, "ERROR"), ("debug", "debug")])
def test_grpc_core_logs_errors_only_unless_the_user_says_otherwise(given: str | None, expected: str) -> None:
    """grpc's C core reads GRPC_VERBOSITY once, when grpc is first imported: importing the server
    package (as the `lockbroker` command does first) must set the default before that."""
    env = clean_env()
    env.pop("GRPC_VERBOSITY", None)
    if given is not None:
        env["GRPC_VERBOSITY"] = given
    code = (
        "import sys, os; import lockbroker.server; "
        "assert 'grpc' not in sys.modules; print(os.environ['GRPC_VERBOSITY'])"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
