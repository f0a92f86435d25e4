"""The client commands of `lockbroker` as real processes against a real broker.

Every CLI here is a subprocess of the installed entry point, and every command that `run`
starts is a child of that CLI. Those commands exit on their own within a minute, so a failed
test cannot leave them running for long. Flag combinations that are refused before any
connection is made are checked in-process (`main()`), which is much cheaper than a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lockbroker.client import Client
from lockbroker.client import cli as client_cli
from lockbroker.client.aio import TRANSPORT_ENV
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig, TlsConfig
from lockbroker.server.embedded import EmbeddedEtcd, free_port
from tests.conftest import broker_config
from tests.etcdutil import EtcdProbe
from tests.interceptors.certs import CA
from tests.lockutil import LOCKS, SESSIONS, lease_of
from tests.procutil import clean_env, is_gone, lockbroker_command, stop_process, wait_until

CALL_TIMEOUT = 60.0
KEEPER_TTL = 15  # seconds: a `session keepalive` process must start (import grpc, connect) within it
# seconds: a lock that `acquire` takes on its own session, which nothing refreshes after it exits,
# must outlive the test that holds it. Each CLI call is a Python process start; on a loaded 2-core
# machine with parallel test workers a test of a dozen calls took over 40 s.
HELD_TTL = "300"


@pytest.fixture(params=["stream", "unary"], autouse=True)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both client transports: the in-process Clients read the variable, the CLI
    processes get it through `client_env`."""
    value: str = request.param
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


def client_env(**extra: str) -> dict[str, str]:
    # clean_env drops LOCKBROKER_*: pass the transport under test on explicitly (modules that borrow
    # these helpers without the transport fixture get the client's default).
    transport = os.environ.get(TRANSPORT_ENV)
    return clean_env(**({TRANSPORT_ENV: transport} if transport else {}), **extra)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def summary(self) -> Any:
        """`run -o json` writes its one object to stderr (stdout belongs to the command), last."""
        return json.loads(self.err.strip().splitlines()[-1])

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def target_of(broker: Broker) -> str:
    return f"127.0.0.1:{broker.port}"


async def spawn(target: str, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(LOCKBROKER_TARGET=target, **env),
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = CALL_TIMEOUT) -> Result:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await stop_process(proc)
        raise AssertionError(f"lockbroker did not exit within {timeout:g}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def cli(target: str, *args: str, **env: str) -> Result:
    return await finish(await spawn(target, *args, **env))


async def first_stderr_line(proc: asyncio.subprocess.Process, timeout: float = 30) -> str:
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), timeout)
    return line.decode()


async def lock_keys(probe: EtcdProbe) -> list[bytes]:
    return await probe.keys(LOCKS)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    try:
        code = client_cli.main(list(argv))
    except SystemExit as e:  # argparse's own usage errors and --help
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


# A command for `run`: records its environment and each SIGTERM it gets, says it is ready,
# then waits (bounded). Modes: "exit" exits 42 on SIGTERM, "ignore" ignores it, "exit-now N"
# exits N at once.
CHILD = r"""
import json, os, pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
mode = sys.argv[2]
def on_term(signo, frame):
    with open(d / "signals", "a") as f:
        f.write("TERM\n")
    if mode == "exit":
        sys.exit(42)
signal.signal(signal.SIGTERM, on_term)
keys = ("LOCKBROKER_FENCING_TOKEN", "LOCKBROKER_LOCK_NAME", "LOCKBROKER_SESSION_ID")
(d / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
(d / "ready").write_text("1")
if mode == "exit-now":
    sys.exit(int(sys.argv[3]))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(5)
"""


def child_cmd(d: Path, mode: str, *extra: str) -> list[str]:
    return ["--", sys.executable, "-c", CHILD, str(d), mode, *extra]


async def wait_ready(d: Path, proc: asyncio.subprocess.Process) -> dict[str, str]:
    """Wait until the command under `run` is up; its LOCKBROKER_* environment."""

    async def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"lockbroker run exited with {proc.returncode} before the command was ready")
        return await asyncio.to_thread((d / "ready").exists)

    await wait_until(ready, 30, "the command under `run` to start")
    env: dict[str, str] = json.loads((d / "env.json").read_text())
    return env


# -- acquire, describe, list, release -------------------------------------------------------


async def test_acquire_describe_list_release(broker: Broker, probe: EtcdProbe) -> None:
    t = target_of(broker)
    r1, r2 = await asyncio.gather(
        cli(t, "acquire", "orders/1", "--ttl", HELD_TTL, "--owner", "alice", "-o", "json"),
        cli(t, "acquire", "orders/2", "--ttl", HELD_TTL),
    )
    assert r1.code == 0, r1
    g = r1.json
    token, sid = g["fencing_token"], g["session_id"]
    assert isinstance(token, int) and token > 0 and len(sid) == 16
    assert g["name"] == "orders/1" and g["owner"] == "alice" and g["own_session"] is True
    # Without --session nothing refreshes the lock once the CLI exits: it says so.
    assert "nothing keeps orders/1 alive" in r1.err and f"session keepalive {sid}" in r1.err
    assert r2.code == 0, r2
    assert r2.out.startswith("acquired orders/2: fencing token ")
    token2 = int(r2.out.split("fencing token ")[1].split(",")[0])

    d_human, d_json, l_human, l_json = await asyncio.gather(
        cli(t, "describe", "orders/1"),
        cli(t, "describe", "orders/1", "-o", "json"),
        cli(t, "list"),
        cli(t, "list", "--prefix", "orders/", "--limit", "1", "-o", "json"),
    )
    assert d_human.code == 0, d_human
    assert d_human.out.startswith("orders/1: held by 'alice'")
    assert f"fencing token  {token}" in d_human.out and sid in d_human.out
    assert d_json.json["held"] is True and d_json.json["holder"]["fencing_token"] == token
    assert d_json.json["holder"]["owner"] == "alice" and d_json.json["waiters"] == []

    lines = l_human.out.splitlines()
    assert lines[0].split() == ["NAME", "TOKEN", "OWNER", "SESSION", "SINCE", "WAITERS"]
    assert lines[1].split()[:3] == ["orders/1", str(token), "alice"]
    assert lines[2].split()[:2] == ["orders/2", str(token2)]
    assert l_json.json["count"] == 1 and l_json.json["truncated"] is True
    assert l_json.json["locks"][0]["name"] == "orders/1"
    assert l_json.json["locks"][0]["holder"]["fencing_token"] == token

    # Held: exit 1 and one stderr line naming the holder; -o json adds an error object on stdout.
    held, expired = await asyncio.gather(
        cli(t, "acquire", "orders/1"),
        cli(t, "acquire", "orders/1", "--wait", "200ms", "-o", "json"),
    )
    assert held.code == 1, held
    assert held.out == ""
    assert held.err.count("\n") == 1
    assert "orders/1 is held by 'alice'" in held.err and f"fencing token {token}" in held.err
    assert expired.code == 1, expired
    e = expired.json["error"]
    assert e["code"] == "ABORTED" and e["reason"] == "WAIT_EXPIRED" and e["exit_code"] == 1
    assert e["holder"]["fencing_token"] == token and e["holder"]["owner"] == "alice"
    assert "gave up waiting for orders/1" in expired.err

    r = await cli(t, "release", "orders/1", "--token", str(token))
    assert r.code == 0, r
    assert r.out.strip() == f"released orders/1 (fencing token {token})"
    again, rel2 = await asyncio.gather(
        cli(t, "release", "orders/1", "--token", str(token), "-o", "json"),
        cli(t, "release", "orders/2", "--token", str(token2), "-o", "json"),
    )
    # Already gone: exit 4, and the JSON still says what happened.
    assert again.code == 4, again
    assert again.json == {"name": "orders/1", "fencing_token": token, "released": False}
    assert "was not held with fencing token" in again.err
    assert rel2.code == 0 and rel2.json["released"] is True, rel2

    d_free, l_empty, l_empty_json = await asyncio.gather(
        cli(t, "describe", "orders/1"), cli(t, "list"), cli(t, "list", "-o", "json")
    )
    assert d_free.code == 0 and d_free.out.startswith("orders/1: not held"), d_free
    assert l_empty.out.strip() == "no locks held"
    assert l_empty_json.json == {"locks": [], "count": 0, "truncated": False}
    assert await lock_keys(probe) == []
    assert await probe.keys(SESSIONS) == []  # releasing a one-lock grant closes its session


async def test_any_utf8_name_and_a_non_utf8_argument(broker: Broker, probe: EtcdProbe) -> None:
    # Names are any UTF-8 text without control characters (issue 19); argv that is not UTF-8
    # reaches Python as lone surrogates, which the client refuses before sending.
    t = target_of(broker)
    name = "été/锁 #1 $x"
    got = await cli(t, "acquire", name, "--ttl", HELD_TTL, "-o", "json")
    assert got.code == 0, got
    assert got.json["name"] == name
    token = got.json["fencing_token"]
    desc, listed, bad = await asyncio.gather(
        cli(t, "describe", name, "-o", "json"),
        cli(t, "list", "--prefix", "été/锁 #", "-o", "json"),
        cli(t, "acquire", os.fsdecode(b"orders/\xff"), "-o", "json"),
    )
    assert desc.code == 0 and desc.json["holder"]["fencing_token"] == token, desc
    assert listed.code == 0 and [lk["name"] for lk in listed.json["locks"]] == [name], listed
    assert bad.code == 2, bad
    assert bad.json["error"]["field_violations"][0]["field"] == "name"
    assert "not valid UTF-8" in bad.err
    rel = await cli(t, "release", name, "--token", str(token))
    assert rel.code == 0, rel
    assert await lock_keys(probe) == []


def test_usage_errors_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_main(capsys, "acquire", "x", "--ttl", "5", "--session", "0123456789abcdef", "-o", "json")
    assert r.code == 2 and "--ttl applies only without --session" in r.err, r
    assert r.json["error"]["code"] == "USAGE" and r.json["error"]["exit_code"] == 2
    r = run_main(capsys, "run", "x", "--ttl", "5")
    assert r.code == 2 and "name the command to run after --" in r.err, r
    r = run_main(capsys, "run", "x", "true", "--", "false")
    assert r.code == 2 and "after --, not before it" in r.err, r
    r = run_main(capsys, "acquire", "x", "--wait", "soon")
    assert r.code == 2 and "is not a duration" in r.err, r
    r = run_main(capsys, "release", "x")
    assert r.code == 2 and "--token" in r.err, r
    r = run_main(capsys, "describe", "x", "--cert-file", "c.pem")
    assert r.code == 2 and "--cert-file and --key-file go together" in r.err, r
    r = run_main(capsys, "describe", "x", "--api-key", "has space")
    assert r.code == 2 and "x-api-key" in r.err and "has space" not in r.err, r
    # The standalone client has no server: it says so instead of failing to parse.
    r = run_main(capsys, "serve", "--listen", "127.0.0.1:1")
    assert r.code == 2 and "`serve` is not a client command" in r.err, r
    r = run_main(capsys, "run", "--help")
    assert r.code == 0
    assert "exit codes:" in r.out and "69       unavailable" in r.out and "--lost-exit-code" in r.out
    assert "-- CMD [ARGS...]" in r.out


async def test_broker_refusals_and_unavailable(broker: Broker) -> None:
    t = target_of(broker)
    bad_name, unavailable, help_text = await asyncio.gather(
        cli(t, "acquire", "a\nb", "-o", "json"),  # a control character: the one rule a name can break here
        cli(f"127.0.0.1:{free_port()}", "describe", "x", "--timeout", "1", "-o", "json"),
        cli(t, "--help"),
    )
    # The broker refuses the name: INVALID_ARGUMENT is a usage error, naming the field.
    assert bad_name.code == 2, bad_name
    assert bad_name.json["error"]["code"] == "INVALID_ARGUMENT"
    assert bad_name.json["error"]["field_violations"][0]["field"] == "name"
    assert "invalid argument: name" in bad_name.err
    # Nobody listens there: unavailable, within --timeout.
    assert unavailable.code == 69, unavailable
    assert unavailable.json["error"]["code"] == "UNAVAILABLE" and "is unavailable" in unavailable.err
    # The full package's entry point offers the client commands beside serve and tenants.
    assert help_text.code == 0
    for command in ("serve", "tenants", "acquire", "release", "describe", "list", "session", "run"):
        assert command in help_text.out
    assert "exit codes:" in help_text.out

    # `python -m lockbroker.client` is the same client CLI.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lockbroker.client",
        "describe",
        "x",
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        env=client_env(LOCKBROKER_TARGET=t),
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and json.loads(out) == {"name": "x", "held": False, "holder": None, "waiters": []}


# -- sessions -----------------------------------------------------------------------------------


async def test_session_create_keepalive_acquire_close(broker: Broker, probe: EtcdProbe) -> None:
    t = target_of(broker)
    # The TTL must outlast the keepalive process's start (a Python process importing grpc): on a
    # loaded 2-core machine with parallel test workers that took over 6 s. It refreshes every ttl/3.
    r = await cli(t, "session", "create", "--ttl", str(KEEPER_TTL), "--owner", "script", "-o", "json")
    assert r.code == 0, r
    sid = r.json["session_id"]
    assert r.json["ttl"] == KEEPER_TTL and r.json["owner"] == "script"

    keeper = await spawn(t, "session", "keepalive", sid, "-o", "json")
    try:
        assert f"keeping session {sid} alive" in await first_stderr_line(keeper)
        r = await cli(t, "acquire", "jobs/a", "--session", sid, "-o", "json")
        assert r.code == 0, r
        assert r.json["fencing_token"] > 0
        assert r.json["session_id"] == sid and r.json["own_session"] is False
        assert "nothing keeps" not in r.err
        # Acquiring it again on the same session is a conflict, not "held by someone else".
        r = await cli(t, "acquire", "jobs/a", "--session", sid)
        assert r.code == 5 and "not reentrant" in r.err, r

        # The keepalive process refreshes the lease: its remaining TTL goes back up.
        lease = lease_of(sid)
        low = await probe.lease_ttl(lease)

        async def refreshed() -> bool:
            nonlocal low
            now = await probe.lease_ttl(lease)
            if now > low:
                return True
            low = min(low, now)
            return False

        await wait_until(refreshed, 20, "the keepalive process to refresh the session", interval=0.2)
        assert keeper.returncode is None
        keeper.send_signal(signal.SIGTERM)
        k = await finish(keeper)
    finally:
        await stop_process(keeper)
    assert k.code == 0, k
    assert k.json == {"session_id": sid, "ttl": KEEPER_TTL, "stopped": "signal", "signal": "SIGTERM"}
    assert "stopped keeping session" in k.err

    # Stopping keepalive does not close the session: the lock lives on until the TTL runs out.
    assert len(await lock_keys(probe)) == 1
    r = await cli(t, "session", "close", sid)
    assert r.code == 0 and r.out.strip() == f"session {sid} closed; its locks are released", r
    assert await lock_keys(probe) == []
    closed, keep_closed, acquire_closed, created = await asyncio.gather(
        cli(t, "session", "close", sid, "-o", "json"),
        cli(t, "session", "keepalive", sid, "-o", "json"),
        cli(t, "acquire", "jobs/a", "--session", sid),
        cli(t, "session", "create", "--ttl", "30"),
    )
    assert closed.code == 4 and closed.json == {"session_id": sid, "closed": False}, closed
    assert keep_closed.code == 4 and keep_closed.json["error"]["reason"] == "SESSION_NOT_FOUND", keep_closed
    assert acquire_closed.code == 4 and "SESSION_NOT_FOUND" in acquire_closed.err, acquire_closed
    assert created.code == 0 and created.out.startswith("session ") and "session keepalive" in created.err, created
    sid2 = created.out.split()[1]
    r = await cli(t, "session", "close", sid2, "-o", "json")
    assert r.code == 0 and r.json == {"session_id": sid2, "closed": True}, r


async def test_keepalive_exits_3_when_the_session_is_lost(broker: Broker, probe: EtcdProbe) -> None:
    t = target_of(broker)
    # Lost by a revoke, not by expiry: the TTL only has to outlast the keepalive process's start.
    r = await cli(t, "session", "create", "--ttl", str(KEEPER_TTL), "-o", "json")
    sid = r.json["session_id"]
    keeper = await spawn(t, "session", "keepalive", sid, "-o", "json")
    try:
        assert "alive" in await first_stderr_line(keeper)
        await probe.revoke(lease_of(sid))  # behind the broker's back
        k = await finish(keeper, timeout=30)
    finally:
        await stop_process(keeper)
    assert k.code == 3, k
    assert f"session {sid} lost" in k.err
    assert k.json["stopped"] == "lost" and k.json["session_id"] == sid


# -- run ----------------------------------------------------------------------------------------


async def test_run_passes_exit_code_token_and_signal_death(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    r = await cli(t, "run", "jobs/run", "--ttl", "10", "-o", "json", *child_cmd(tmp_path, "exit-now", "7"))
    assert r.code == 7, r
    summary = r.summary
    env = json.loads((tmp_path / "env.json").read_text())
    assert env == {
        "LOCKBROKER_FENCING_TOKEN": str(summary["fencing_token"]),
        "LOCKBROKER_LOCK_NAME": "jobs/run",
        "LOCKBROKER_SESSION_ID": summary["session_id"],
    }
    assert summary["child_started"] is True and summary["child_exit_code"] == 7 and summary["exit_code"] == 7

    killed, clean, missing = await asyncio.gather(
        cli(t, "run", "jobs/a", "--", "sh", "-c", "echo out; kill -KILL $$"),
        cli(t, "run", "jobs/b", "--", "sh", "-c", "exit 0"),
        cli(t, "run", "jobs/c", "--", str(tmp_path / "no-such-command")),
    )
    # Killed by a signal: 128 + signo, as a shell reports it; stdout is the command's own.
    assert killed.code == 128 + signal.SIGKILL, killed
    assert killed.out == "out\n"
    assert clean.code == 0 and clean.out == "" and clean.err == "", clean
    assert missing.code == 127 and "command not found" in missing.err, missing
    assert await lock_keys(probe) == []
    assert await probe.keys(SESSIONS) == []


async def test_run_forwards_sigterm_and_releases(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    proc = await spawn(t, "run", "jobs/fwd", "--ttl", "10", *child_cmd(tmp_path, "exit"))
    try:
        env = await wait_ready(tmp_path, proc)
        assert env["LOCKBROKER_LOCK_NAME"] == "jobs/fwd"
        assert len(await lock_keys(probe)) == 1
        proc.send_signal(signal.SIGTERM)
        r = await finish(proc)
    finally:
        await stop_process(proc)
    assert r.code == 42, r  # the command's own answer to the forwarded SIGTERM
    assert (tmp_path / "signals").read_text() == "TERM\n"
    assert await lock_keys(probe) == []
    assert await probe.keys(SESSIONS) == []


async def test_run_lost_lock_terms_then_kills_the_command(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    proc = await spawn(
        t, "run", "jobs/lost", "--ttl", "3", "--grace", "1", "-o", "json", *child_cmd(tmp_path, "ignore")
    )
    try:
        env = await wait_ready(tmp_path, proc)
        await probe.revoke(lease_of(env["LOCKBROKER_SESSION_ID"]))
        r = await finish(proc, timeout=30)
    finally:
        await stop_process(proc)
    assert r.code == 3, r
    assert "lock jobs/lost lost" in r.err and "SIGKILL after 1s" in r.err
    # It got SIGTERM, ignored it, and was killed.
    assert (tmp_path / "signals").read_text() == "TERM\n"
    summary = r.summary
    assert summary["child_exit_code"] == 128 + signal.SIGKILL and summary["exit_code"] == 3
    assert summary["lost"]
    assert is_gone(summary["pid"])
    assert await lock_keys(probe) == []


async def test_not_acquired_and_interrupted_waits(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    r = await cli(t, "acquire", "jobs/busy", "--ttl", HELD_TTL, "--owner", "holder", "-o", "json")
    token = r.json["fencing_token"]
    marker = tmp_path / "ran"
    touch = ["--", "touch", str(marker)]
    busy, waited = await asyncio.gather(
        cli(t, "run", "jobs/busy", *touch),
        cli(t, "run", "jobs/busy", "--wait", "300ms", "--conflict-exit-code", "9", "-o", "json", *touch),
    )
    assert busy.code == 1, busy
    assert "jobs/busy is held by 'holder'" in busy.err
    assert waited.code == 9, waited
    assert waited.summary["child_started"] is False and waited.summary["error"]["reason"] == "WAIT_EXPIRED"

    # A signal while waiting for the lock: exit 128+N, no command, nothing left queued.
    runner = await spawn(t, "run", "jobs/busy", "--wait", "60", *touch)
    acquirer = await spawn(t, "acquire", "jobs/busy", "--wait", "60")
    try:
        async with Client(t, default_timeout=10) as client:

            async def both_queued() -> bool:
                return len((await client.describe("jobs/busy")).waiters) == 2

            await wait_until(both_queued, 30, "run and acquire to queue for the lock", interval=0.1)
        runner.send_signal(signal.SIGTERM)
        acquirer.send_signal(signal.SIGINT)
        ran, acq = await asyncio.gather(finish(runner), finish(acquirer))
    finally:
        await stop_process(runner)
        await stop_process(acquirer)
    assert ran.code == 128 + signal.SIGTERM, ran
    assert acq.code == 128 + signal.SIGINT, acq
    assert not marker.exists()
    r = await cli(t, "describe", "jobs/busy", "-o", "json")
    assert r.json["waiters"] == [] and r.json["holder"]["fencing_token"] == token
    r = await cli(t, "release", "jobs/busy", "--token", str(token))
    assert r.code == 0, r
    assert await lock_keys(probe) == []


# -- TLS and API keys ---------------------------------------------------------------------------


@pytest.fixture
async def secured(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[tuple[Broker, str, str]]:
    ca = CA()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    cert, key = ca.server_pair().write(tmp_path, "server")
    path = tmp_path / "tenants.toml"
    api_key = tenants.add_tenant(path, "acme")
    cfg = broker_config(etcd.endpoint, key_root)
    b = Broker(
        type(cfg)(
            server=cfg.server,
            etcd=cfg.etcd,
            limits=cfg.limits,
            auth=AuthConfig(str(path)),
            tls=TlsConfig(cert_file=cert, key_file=key),
        )
    )
    await b.start()
    try:
        yield b, str(tmp_path / "ca.pem"), api_key
    finally:
        await b.stop(grace=1.0)


async def test_tls_and_api_key(secured: tuple[Broker, str, str]) -> None:
    broker, ca_file, api_key = secured
    t = target_of(broker)
    r = await cli(
        t, "acquire", "tls/a", "--ttl", HELD_TTL, "--ca-file", ca_file, "-o", "json", LOCKBROKER_API_KEY=api_key
    )
    assert r.code == 0, r
    token = r.json["fencing_token"]
    wrong = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    released, wrong_key, no_key, plaintext = await asyncio.gather(
        cli(t, "release", "tls/a", "--token", str(token), "--ca-file", ca_file, "--api-key", api_key),
        cli(t, "describe", "tls/a", "--ca-file", ca_file, "-o", "json", LOCKBROKER_API_KEY=wrong),
        cli(t, "describe", "tls/a", "--ca-file", ca_file),
        cli(t, "describe", "tls/a", "--timeout", "1", LOCKBROKER_API_KEY=api_key),
    )
    assert released.code == 0, released
    # Wrong or missing key: 77, and no key ever appears in what the CLI prints.
    assert wrong_key.code == 77, wrong_key
    assert wrong_key.json["error"]["code"] == "UNAUTHENTICATED" and "not authenticated" in wrong_key.err
    assert no_key.code == 77, no_key
    for r in (released, wrong_key, no_key):
        assert api_key not in r.out + r.err and wrong not in r.out + r.err
    # Plaintext against a TLS port never gets an answer.
    assert plaintext.code == 69, plaintext


# -- at a terminal ------------------------------------------------------------------------------

# For `run` at a terminal: reads a line from the terminal (only a foreground job can), counts
# each SIGINT, then exits 42 a second after the first one (time for a duplicate to be counted).
TTY_CHILD = r"""
import pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
def on_int(signo, frame):
    with open(d / "signals", "a") as f:
        f.write("INT\n")
signal.signal(signal.SIGINT, on_int)
(d / "env.json").write_text("{}")
(d / "ready").write_text("1")
(d / "line").write_text(sys.stdin.readline())
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
    if (d / "signals").exists():
        time.sleep(1)
        sys.exit(42)
sys.exit(5)
"""


async def test_run_at_a_terminal_ctrl_c_reaches_the_command_once(
    broker: Broker, probe: EtcdProbe, tmp_path: Path
) -> None:
    # util-linux `script` gives the CLI a terminal of its own, with the CLI as its foreground
    # job; a ^C written to the terminal is what a person pressing Ctrl-C sends.
    script = shutil.which("script")
    assert script is not None, "`script` (util-linux, Debian's bsdutils) is missing"
    line = shlex.join(
        ["exec", *lockbroker_command(), "run", "jobs/tty", "--", sys.executable, "-c", TTY_CHILD, str(tmp_path)]
    )
    proc = await asyncio.create_subprocess_exec(
        script,
        "-qec",
        line,
        "/dev/null",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(LOCKBROKER_TARGET=target_of(broker)),
    )
    try:
        await wait_ready(tmp_path, proc)
        assert len(await lock_keys(probe)) == 1
        assert proc.stdin is not None
        proc.stdin.write(b"typed\n")
        await proc.stdin.drain()
        await wait_until(
            lambda: asyncio.to_thread((tmp_path / "line").exists), 30, "the command to read from the terminal"
        )
        proc.stdin.write(b"\x03")
        await proc.stdin.drain()
        r = await finish(proc)
    finally:
        await stop_process(proc)
    assert r.code == 42, r
    # Once: from the terminal, not a second time from the CLI.
    assert (tmp_path / "signals").read_text() == "INT\n"
    assert (tmp_path / "line").read_text() == "typed\n"
    assert await lock_keys(probe) == []
