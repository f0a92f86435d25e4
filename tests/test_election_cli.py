"""`lockbroker elect NAME -- CMD`: the command runs only while its candidate leads, the next
candidate takes over when it exits, and lost leadership stops it (as `lockbroker run` does)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from lockbroker.client import Client
from lockbroker.server.app import Broker
from tests.etcdutil import EtcdProbe
from tests.lockutil import lease_of
from tests.procutil import is_gone, stop_process, wait_until
from tests.test_cli_client import child_cmd, cli, finish, run_main, spawn, target_of, wait_ready


async def election_keys(probe: EtcdProbe) -> list[bytes]:
    return [k for k in await probe.keys() if b"/q/v/" in k or (b"/e/" in k and b"/q/" not in k)]


async def test_elect_runs_the_command_while_leader_and_hands_over(
    broker: Broker, probe: EtcdProbe, tmp_path: Path
) -> None:
    t = target_of(broker)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    first = await spawn(t, "elect", "svc", "--value", "host-a", "--ttl", "10", *child_cmd(first_dir, "exit"))
    second: asyncio.subprocess.Process | None = None
    try:
        env = await wait_ready(first_dir, first)
        second = await spawn(t, "elect", "svc", "--value", "host-b", "--ttl", "10", *child_cmd(second_dir, "exit"))

        async def queued() -> bool:
            return len([k for k in await election_keys(probe) if b"/e/" in k and b"/q/" not in k]) == 2

        await wait_until(queued, 30, "the second candidate to queue")
        assert env["LOCKBROKER_LOCK_NAME"] == "svc" and int(env["LOCKBROKER_FENCING_TOKEN"]) > 0
        async with Client(t, default_timeout=5.0) as c:
            leader = await c.election("svc").leader()
            assert leader is not None and leader.value == b"host-a"
            assert not (second_dir / "ready").exists()  # one leader at a time: b waits in line
            first.send_signal(signal.SIGTERM)  # forwarded; the command exits 42, the candidate resigns
            r = await finish(first)
            assert r.code == 42, r
            env_b = await wait_ready(second_dir, second)
            assert int(env_b["LOCKBROKER_FENCING_TOKEN"]) > int(env["LOCKBROKER_FENCING_TOKEN"])
            leader = await c.election("svc").leader()
            assert leader is not None and leader.value == b"host-b"
            second.send_signal(signal.SIGTERM)
            assert (await finish(second)).code == 42
            assert await c.election("svc").leader() is None
    finally:
        await stop_process(first)
        if second is not None:
            await stop_process(second)
    assert await election_keys(probe) == []


async def test_elect_lost_leadership_stops_the_command(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    proc = await spawn(t, "elect", "lost", "--ttl", "3", "--grace", "1", "-o", "json", *child_cmd(tmp_path, "ignore"))
    try:
        env = await wait_ready(tmp_path, proc)
        await probe.revoke(lease_of(env["LOCKBROKER_SESSION_ID"]))
        r = await finish(proc, timeout=30)
    finally:
        await stop_process(proc)
    assert r.code == 3, r
    assert "lost" in r.err
    assert (tmp_path / "signals").read_text() == "TERM\n"
    assert r.summary["child_exit_code"] == 128 + signal.SIGKILL and is_gone(r.summary["pid"])
    assert await election_keys(probe) == []


async def test_elect_not_won_within_wait(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    t = target_of(broker)
    async with Client(t, default_timeout=5.0) as c, c.election("busy").campaign(b"someone"):
        r = await cli(t, "elect", "busy", "--wait", "300ms", "--conflict-exit-code", "9", "--", "true")
        assert r.code == 9, r
        # Only the leader's key: the timed-out candidate left none.
        assert len([k for k in await election_keys(probe) if b"/q/" not in k]) == 1
    assert await election_keys(probe) == []


def test_elect_usage(capsys: object) -> None:
    r = run_main(capsys, "elect", "x")  # type: ignore[arg-type]
    assert r.code == 2 and "lockbroker elect NAME" in r.err, r
