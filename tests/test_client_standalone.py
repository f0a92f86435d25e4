"""The client installs and works on its own: `lockbroker-client` (client/pyproject.toml).

Builds the wheel with uv, installs it into a fresh venv, and from that venv's interpreter
checks that neither the server nor OpenTelemetry is there, then takes and releases a real lock
on a real broker, through the Python API and through the venv's own `lockbroker` command.
A missing uv fails the test (scripts/bootstrap.sh installs it): it never skips.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

from lockbroker.server.app import Broker
from tests.etcdutil import EtcdProbe
from tests.lockutil import LOCKS
from tests.procutil import REPO, clean_env, stop_process

STEP_TIMEOUT = 180.0

# Run by the standalone venv's python: what is importable there, then a lock through the API.
SCRIPT = r"""
import importlib.util, json, sys
found = {m: importlib.util.find_spec(m) is not None for m in sys.argv[2:]}
from lockbroker.client import SyncClient, LockHeld
with SyncClient(sys.argv[1], default_timeout=10) as c:
    with c.lock("standalone/a", ttl=10, wait=5, owner="standalone") as held:
        token = held.fencing_token
        state = c.describe("standalone/a")
        try:
            c.acquire("standalone/a", ttl=5)
            second = "granted"
        except LockHeld as e:
            second = e.holder.owner
    after = c.describe("standalone/a")
print(json.dumps({
    "found": found,
    "token": token,
    "holder_token": state.holder.fencing_token,
    "second": second,
    "held_after": after.held,
    "client_file": __import__("lockbroker.client").client.__file__,
}))
"""


def _uv() -> str:
    found = shutil.which("uv")
    assert found is not None, "uv is not on PATH: scripts/bootstrap.sh installs it; this test never skips"
    return found


def _env(**extra: str) -> dict[str, str]:
    # Nothing of the dev environment may leak in: not its venv, not the repo on sys.path.
    env = clean_env(**extra)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT"):
        env.pop(key, None)
    return env


async def _run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else _env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
    except TimeoutError:
        await stop_process(proc)
        raise AssertionError(f"{cmd[:3]} did not finish within {STEP_TIMEOUT:g}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _ok(*cmd: str, cwd: Path) -> str:
    code, out, err = await _run(*cmd, cwd=cwd)
    assert code == 0, f"{' '.join(cmd)} exited {code}:\n{out}\n{err}"
    return out


async def test_standalone_client_wheel(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    uv = _uv()
    dist, venv, full = tmp_path / "dist", tmp_path / "venv", tmp_path / "full"
    await asyncio.gather(
        _ok(uv, "build", "--wheel", str(REPO / "client"), "-o", str(dist), cwd=REPO),
        _ok(uv, "venv", "--python", sys.executable, str(venv), cwd=tmp_path),
        # The full package still builds beside it, and still carries the client and its CLI.
        _ok(uv, "build", "--wheel", str(REPO), "-o", str(full), cwd=REPO),
    )
    full_names = zipfile.ZipFile(next(full.glob("lockbroker-*.whl"))).namelist()
    assert "lockbroker/server/cli.py" in full_names and "lockbroker/client/cli/__init__.py" in full_names
    wheels = list(dist.glob("lockbroker_client-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "lockbroker/client/aio.py" in names and "lockbroker/client/cli/__init__.py" in names
    # Every module of the client and of its CLI package ships, not only the entry points.
    for module in (
        "_keepalive",
        "_session",
        "_lock",
        "cli/_common",
        "cli/_runner",
        "cli/lock",
        "cli/session",
        "cli/run",
    ):
        assert f"lockbroker/client/{module}.py" in names, module
    assert "lockbroker/client/py.typed" in names
    assert "lockbroker/v1/lock_pb2.py" in names and "lockbroker/v1/lock_pb2_grpc.py" in names
    assert "lockbroker/v1/reasons.py" in names  # imported by lockbroker.client.errors
    assert not [n for n in names if n.startswith(("lockbroker/server/", "lockbroker/interceptors/"))], names
    assert "lockbroker/__init__.py" not in names  # a namespace package, shared with the server
    assert not [n for n in names if "__pycache__" in n], names
    metadata = zipfile.ZipFile(wheels[0]).read(f"{wheels[0].name.split('-')[0]}-0.1.0.dist-info/METADATA").decode()
    requires = sorted(
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist")
    )
    assert [r.split(">")[0].split("=")[0] for r in requires] == ["googleapis-common-protos", "grpcio", "protobuf"]

    python = venv / "bin" / "python"
    # The dev environment's versions: uv's cache already holds them, so the install is quick
    # and needs no download; the wheel's own floors are checked by the resolver all the same.
    pins = tmp_path / "constraints.txt"
    pins.write_text("".join(f"{d}=={version(d)}\n" for d in ("grpcio", "protobuf", "googleapis-common-protos")))
    await _ok(uv, "pip", "install", "--python", str(python), "-c", str(pins), str(wheels[0]), cwd=tmp_path)

    target = f"127.0.0.1:{broker.port}"
    modules = ["lockbroker.server", "lockbroker.interceptors", "opentelemetry", "tenacity", "grpc", "google.rpc"]
    out = await _ok(str(python), "-c", SCRIPT, target, *modules, cwd=tmp_path)
    result = json.loads(out)
    assert result["found"] == {
        "lockbroker.server": False,
        "lockbroker.interceptors": False,
        "opentelemetry": False,
        "tenacity": False,
        "grpc": True,
        "google.rpc": True,
    }
    assert result["client_file"].startswith(str(venv)), result["client_file"]
    assert result["token"] > 0 and result["holder_token"] == result["token"]
    assert result["second"] == "standalone"
    assert result["held_after"] is False

    # The venv's own `lockbroker` command: the client CLI, with `serve` explained, not crashed.
    lockbroker = str(venv / "bin" / "lockbroker")
    # Nothing refreshes the lock once `acquire` exits: its TTL must outlast the start of the next
    # process (`release`), which on a loaded 2-core machine with parallel test workers took over 10 s.
    code, out, err = await _run(
        lockbroker,
        "acquire",
        "standalone/b",
        "--ttl",
        "120",
        "-o",
        "json",
        cwd=tmp_path,
        env=_env(LOCKBROKER_TARGET=target),
    )
    assert code == 0, err
    token = json.loads(out)["fencing_token"]
    code, out, err = await _run(
        lockbroker, "release", "standalone/b", "--token", str(token), cwd=tmp_path, env=_env(LOCKBROKER_TARGET=target)
    )
    assert code == 0 and "released standalone/b" in out, err
    code, _, err = await _run(lockbroker, "serve", cwd=tmp_path)
    assert code == 2 and "install the full `lockbroker` package" in err, err
    assert await probe.keys(LOCKS) == []
