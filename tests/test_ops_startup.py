"""`lockbroker serve` refuses bad settings before serving, and owns its state dir (issue 16, items 4 and 6).

Every case runs the real entry point as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from grpc import aio

from lockbroker.server.embedded import free_port
from tests.procutil import clean_env, lockbroker_command, stop_process
from tests.test_cli import FAST_RECONNECT, GRACE, Served, run_cli, wait_serving

README_TOML = """
[server]
listen = "127.0.0.1:{port}"
grace_period = 10.0

[etcd]
endpoints = ["http://127.0.0.1:{etcd_port}"]
ca_file = "{missing}"
username = "lockbroker"

[limits]
max_ttl = 600
max_wait = 60
"""


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    ("args", "env", "toml_text", "named"),
    [
        (["--listen", "nonsense"], {}, "", "--listen"),
        ([], {}, "[server]\nlisten = 50081\n", "[server] listen"),
        (["--log-level", "verbose"], {}, "", "--log-level"),
        ([], {"LOCKBROKER_LOG_LEVEL": "loud"}, "", "LOCKBROKER_LOG_LEVEL"),
        (["--grace-period", "10 seconds"], {}, "", "--grace-period"),
        ([], {"LOCKBROKER_HEALTH_INTERVAL": "1x"}, "", "LOCKBROKER_HEALTH_INTERVAL"),
        ([], {}, '[limits]\nmax_wait = "soon"\n', "[limits] max_wait"),
        (["--etcd-ca-file", "/nonexistent/ca.pem"], {}, "", "--etcd-ca-file"),
        (["--tls-cert-file", "/nonexistent/c.pem", "--tls-key-file", "/nonexistent/k.pem"], {}, "", "--tls-cert-file"),
        ([], {}, '[server]\nlisten = "127.0.0.1:1"\nbogus = 1\n', "bogus"),
        (["--embedded-state-dir", "/proc/lockbroker-state"], {}, "", "--embedded-state-dir"),
    ],
)
async def test_bad_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], toml_text: str, named: str
) -> None:
    if toml_text:
        path = tmp_path / "lockbroker.toml"
        path.write_text(toml_text)
        args = [*args, "--config", str(path)]
    rc, text = await run_cli(
        tmp_path, "serve", "--embedded-state-dir", str(tmp_path / "state"), *args, env=env, timeout=60
    )
    assert rc == 2, text
    lines = _lines(text)
    assert len(lines) == 1 and lines[0].startswith("lockbroker: ") and named in lines[0], text
    assert "Traceback" not in text
    assert not (tmp_path / "state" / "etcd").exists(), "a bad setting must be refused before etcd starts"


async def test_readme_toml_with_a_missing_ca_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "lockbroker.toml"
    missing = tmp_path / "etcd-ca.pem"
    path.write_text(README_TOML.format(port=free_port(), etcd_port=free_port(), missing=missing))
    rc, text = await run_cli(tmp_path, "serve", "--config", str(path), timeout=60)
    assert rc == 2, text
    lines = _lines(text)
    assert len(lines) == 1 and "[etcd] ca_file" in lines[0] and str(missing) in lines[0], text


async def test_missing_etcd_hint_names_flags_that_exist(tmp_path: Path) -> None:
    rc, text = await run_cli(
        tmp_path,
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--embedded-state-dir",
        str(tmp_path / "state"),
        "--embedded-binary",
        "/nonexistent/etcd",
    )
    assert rc != 0 and "Traceback" not in text, text
    assert "--embedded-binary" in text and "LOCKBROKER_ETCD_BINARY" in text, text
    assert "--etcd-binary" not in text, text


async def test_version(tmp_path: Path) -> None:
    rc, text = await run_cli(tmp_path, "--version")
    assert rc == 0 and re.fullmatch(r"lockbroker \d+\.\d+\.\d+\S*\n", text), text


# -- the state dir ----------------------------------------------------------------------------


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


async def _serve_from(cwd: Path, xdg: Path, name: str) -> Served:
    _mkdir(cwd)
    port = free_port()
    err_path = cwd / f"{name}.stderr"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *lockbroker_command(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--grace-period",
            str(GRACE),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=err,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(XDG_STATE_HOME=str(xdg)),
            cwd=cwd,
        )
    return Served(proc, port, xdg / "lockbroker", err_path)


def _data_dir(log: str) -> str:
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "started embedded etcd":
            return str(json.loads(line)["data_dir"])
    raise AssertionError(f"no 'started embedded etcd' line in:\n{log}")


async def test_state_dir_is_xdg_whatever_the_cwd_and_locked_against_a_second_broker(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    first = await _serve_from(tmp_path / "a", xdg, "first")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{first.port}", FAST_RECONNECT) as ch:
            await wait_serving(first, ch)
        assert (xdg / "lockbroker" / "etcd").is_dir()
        assert not (tmp_path / "a" / "lockbroker-state").exists()
        assert (xdg / "lockbroker" / "broker.pid").read_text().strip() == str(first.proc.pid)

        # A second broker from another directory finds the same state dir, and refuses it at once.
        second = await _serve_from(tmp_path / "b", xdg, "second")
        rc = await asyncio.wait_for(second.proc.wait(), 60)
        assert rc == 2, second.log()
        assert f"in use by another lockbroker (pid {first.proc.pid})" in second.log(), second.log()
        assert str(xdg / "lockbroker") in second.log()
        assert "Traceback" not in second.log()
    finally:
        await stop_process(first.proc, grace=GRACE + 5)

    # Once the first is gone, a broker started from the other directory uses the same data.
    third = await _serve_from(tmp_path / "b", xdg, "third")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{third.port}", FAST_RECONNECT) as ch:
            await wait_serving(third, ch)
        assert _data_dir(third.log()) == _data_dir(first.log()) == str(xdg / "lockbroker")
        assert not (tmp_path / "b" / "lockbroker-state").exists()
    finally:
        await stop_process(third.proc, grace=GRACE + 5)
