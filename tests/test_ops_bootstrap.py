"""`scripts/bootstrap.sh --serve` on a fresh clone (issue 16, item 7): runtime only, git status clean.

The clone is of this worktree's HEAD plus the bootstrap script under test; uv installs from its
cache (UV_OFFLINE), so the test needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procutil import REPO, clean_env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(600)
def test_serve_only_bootstrap_installs_no_dev_tools_and_leaves_git_clean(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH (scripts/bootstrap.sh installs it)")
    clone = tmp_path / "clone"
    env = clean_env(UV_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    _run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path, env)
    shutil.copy(REPO / "scripts" / "bootstrap.sh", clone / "scripts" / "bootstrap.sh")  # the version under test
    dirty_before = _run(["git", "status", "--porcelain"], clone, env)

    _run(["bash", "scripts/bootstrap.sh", "--serve"], clone, env)

    assert _run(["git", "status", "--porcelain"], clone, env) == dirty_before
    venv_bin = clone / ".venv" / "bin"
    assert (venv_bin / "lockbroker").is_file()
    for dev_tool in ("pytest", "mypy", "ruff"):
        assert not (venv_bin / dev_tool).exists(), f"--serve installed the dev tool {dev_tool}"
    assert not (clone / "tests" / "node" / "node_modules").exists(), "--serve installed the Node packages"
    version = _run([uv, "run", "--no-dev", "lockbroker", "--version"], clone, env)
    assert version.startswith("lockbroker ")
    assert not (venv_bin / "pytest").exists(), "uv run --no-dev must not install the dev group"
    assert os.access(venv_bin / "lockbroker", os.X_OK)


def test_bootstrap_refuses_an_unknown_option(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap.sh"), "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert done.returncode == 2 and "usage: bash scripts/bootstrap.sh [--serve]" in done.stderr
