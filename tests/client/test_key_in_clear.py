"""Issue 18, item 15: an API key sent in clear to a remote target is never silent.

The client warns (InsecureApiKeyWarning) and the CLI prints one warning line on stderr. It does not
refuse: a trusted network is a legitimate setup (docs/security.md, item 15).
"""

from __future__ import annotations

import asyncio
import warnings

import grpc
import pytest

from lockbroker.client import Client, SyncClient
from lockbroker.client._clear import InsecureApiKeyWarning, is_loopback_target
from lockbroker.server.embedded import free_port
from tests.procutil import clean_env, lockbroker_command, stop_process

REMOTE = ["broker.example:50051", "dns:///broker.example:50051", "10.1.2.3:50051", "[2001:db8::1]:50051", "0.0.0.0:1"]
LOCAL = ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///localhost:1", "ipv4:127.0.0.2:1", "unix:/tmp/s"]


@pytest.mark.parametrize("target", REMOTE)
def test_remote_targets_are_not_loopback(target: str) -> None:
    assert not is_loopback_target(target)


@pytest.mark.parametrize("target", LOCAL)
def test_loopback_targets_are_loopback(target: str) -> None:
    assert is_loopback_target(target)


async def _made(target: str, **kwargs: object) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = Client(target, **kwargs)  # type: ignore[arg-type]
        await client.close()
    return [w for w in caught if issubclass(w.category, InsecureApiKeyWarning)]


async def test_an_api_key_to_a_remote_target_without_tls_warns() -> None:
    caught = await _made("broker.example:50051", api_key="k1.secret")
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "broker.example:50051" in text and "TLS" in text and "secret" not in text
    assert caught[0].filename == __file__  # points at the caller's line, not at the client's code


async def test_no_warning_with_tls_on_loopback_or_without_a_key() -> None:
    assert await _made("broker.example:50051", api_key="k1.s", credentials=grpc.ssl_channel_credentials()) == []
    assert await _made("127.0.0.1:50051", api_key="k1.s") == []
    assert await _made("broker.example:50051") == []


def test_the_sync_client_warns_too() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SyncClient("10.1.2.3:50051", api_key="k1.s").close()
    assert [w for w in caught if issubclass(w.category, InsecureApiKeyWarning)]


async def _cli(*args: str) -> tuple[int, str, str]:
    # 0.0.0.0 is not a loopback address (so the warning is due), yet connecting to it stays on
    # this machine: nothing listens on the port, the call fails fast with "unavailable".
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        "describe",
        "x",
        "--target",
        f"0.0.0.0:{free_port()}",
        "--timeout",
        "0.5",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await stop_process(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_warns_in_one_line_on_stderr() -> None:
    rc, out, err = await _cli("--api-key", "k1.topsecret")
    assert rc == 69, err
    warned = [ln for ln in err.splitlines() if ln.startswith("lockbroker: warning: ")]
    assert len(warned) == 1 and "without TLS" in warned[0], err
    assert "topsecret" not in err + out and "Warning" not in err
    rc, out, err = await _cli()
    assert rc == 69 and "warning" not in err, err
