"""buf guards the .proto contract: lint (STANDARD + COMMENTS) and breaking changes (FILE) against main.

scripts/buf.sh runs both in scripts/test.sh on the real module. These tests show that the checks
bite: on temporary copies of the module with a deliberate violation, and on throwaway git
repositories (made in tmp, never this one) for the baseline logic of scripts/buf.sh. buf is the
npm package @bufbuild/buf from tests/node; under CI=true a missing buf fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procutil import REPO

BUF = REPO / "tests" / "node" / "node_modules" / ".bin" / "buf"
PROTO = "proto/lockbroker/v1/lock.proto"


@pytest.fixture(scope="module")
def buf() -> str:
    if not (BUF.is_file() and shutil.which("node")):
        why = f"{BUF.relative_to(REPO)} or node is missing (run bash scripts/bootstrap.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return str(BUF)


def env(tmp: Path, **extra: str) -> dict[str, str]:
    # No GIT_* from outside (a hook's GIT_DIR would point git at this repository) and no CI
    # unless a test sets it; buf's cache stays in tmp.
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != "CI"}
    return {**base, "BUF_CACHE_DIR": str(tmp / "buf-cache"), **extra}


def run(cmd: list[str], cwd: Path, tmp: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env(tmp, **extra), capture_output=True, text=True, timeout=60, check=False)


def module_copy(dest: Path, replace: tuple[str, str] | None = None) -> Path:
    """buf.yaml and the .proto files of this repo under dest, optionally with one edit to lock.proto."""
    dest.mkdir(parents=True)
    shutil.copy(REPO / "buf.yaml", dest / "buf.yaml")
    for src in (REPO / "proto").rglob("*.proto"):
        target = dest / src.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
    if replace is not None:
        old, new = replace
        text = (dest / PROTO).read_text()
        assert text.count(old) == 1, f"{old!r} must occur once in {PROTO}"
        (dest / PROTO).write_text(text.replace(old, new))
    return dest


def lint_rules(buf: str, module: Path, tmp: Path) -> set[str]:
    result = run([buf, "lint", "--error-format", "json"], module, tmp)
    found = {json.loads(line)["type"] for line in result.stdout.splitlines() if line.strip()}
    assert (result.returncode == 0) == (not found), result.stdout + result.stderr
    return found


def breaking(buf: str, module: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return run([buf, "breaking", "--against", str(REPO / "proto")], module, tmp)


def test_lint_passes_and_catches_violations(buf: str, tmp_path: Path) -> None:
    assert lint_rules(buf, module_copy(tmp_path / "clean"), tmp_path) == set()
    camel = module_copy(tmp_path / "camel", ("  string prefix = 1;", "  string namePrefix = 1;"))
    assert lint_rules(buf, camel, tmp_path) == {"FIELD_LOWER_SNAKE_CASE"}
    undocumented = module_copy(tmp_path / "undocumented", ("  // Page size, 1-1000; unset: 100.\n", ""))
    assert lint_rules(buf, undocumented, tmp_path) == {"COMMENT_FIELD"}
    shared = module_copy(
        tmp_path / "shared",
        (
            "rpc Refresh(RefreshRequest) returns (RefreshResponse) {",
            "rpc Refresh(KeepAliveRequest) returns (RefreshResponse) {",
        ),
    )
    assert "RPC_REQUEST_STANDARD_NAME" in lint_rules(buf, shared, tmp_path)


def test_breaking_catches_wire_and_generated_code_breaks(buf: str, tmp_path: Path) -> None:
    same = breaking(buf, module_copy(tmp_path / "same"), tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    added = breaking(
        buf,
        module_copy(
            tmp_path / "added", ("  int32 waiters = 3;\n}", "  int32 waiters = 3;\n  // New.\n  bool hot = 4;\n}")
        ),
        tmp_path,
    )
    assert added.returncode == 0, "adding a field is compatible: " + added.stdout + added.stderr

    renumbered = breaking(
        buf,
        module_copy(
            tmp_path / "renumbered",
            ("int64 fencing_token = 2;\n  // Optional", "int64 fencing_token = 9;\n  // Optional"),
        ),
        tmp_path,
    )
    assert renumbered.returncode == 100, renumbered.stdout + renumbered.stderr
    assert 'Previously present field "2" with name "fencing_token" on message "ReleaseRequest"' in renumbered.stdout

    narrowed = breaking(
        buf, module_copy(tmp_path / "narrowed", ("  int64 fencing_token = 3;", "  int32 fencing_token = 3;")), tmp_path
    )
    assert narrowed.returncode == 100 and "LockHolder" in narrowed.stdout, narrowed.stdout + narrowed.stderr


def git(repo: Path, tmp: Path, *args: str) -> str:
    result = run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], repo, tmp)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout


def script_repo(repo: Path, tmp: Path, branch: str = "main", with_buf_yaml: bool = True) -> Path:
    """A throwaway git repository with this module, scripts/buf.sh and a link to tests/node's buf."""
    module_copy(repo)
    if not with_buf_yaml:
        (repo / "buf.yaml").unlink()
    (repo / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "buf.sh", repo / "scripts" / "buf.sh")
    (repo / "tests" / "node").mkdir(parents=True)
    (repo / "tests" / "node" / "node_modules").symlink_to(REPO / "tests" / "node" / "node_modules")
    (repo / ".gitignore").write_text("node_modules\n")
    git(repo, tmp, "init", "-q", "-b", branch)
    git(repo, tmp, "add", "-A")
    git(repo, tmp, "commit", "-q", "-m", "baseline")
    if not with_buf_yaml:
        shutil.copy(REPO / "buf.yaml", repo / "buf.yaml")
    return repo


def buf_sh(repo: Path, tmp: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return run(["bash", "scripts/buf.sh"], repo, tmp, **extra)


def test_buf_sh_checks_against_main_and_origin_main(buf: str, tmp_path: Path) -> None:
    repo = script_repo(tmp_path / "repo", tmp_path)
    ok = buf_sh(repo, tmp_path, CI="true")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "== buf breaking (FILE) against main" in ok.stdout

    # An uncommitted break in the working tree is caught against main.
    text = (repo / PROTO).read_text()
    (repo / PROTO).write_text(
        text.replace("string owner = 2;\n  // Optional idempotency", "string owner = 7;\n  // Optional idempotency")
    )
    broken = buf_sh(repo, tmp_path)
    assert broken.returncode == 100, broken.stdout + broken.stderr
    assert 'with name "owner" on message "CreateSessionRequest"' in broken.stdout
    (repo / PROTO).write_text(text)

    # A CI checkout: detached HEAD, no local main, only origin/main.
    clone = tmp_path / "clone"
    git(tmp_path, tmp_path, "clone", "-q", "--depth", "1", repo.as_uri(), str(clone))
    (clone / "tests" / "node").mkdir(parents=True)
    (clone / "tests" / "node" / "node_modules").symlink_to(REPO / "tests" / "node" / "node_modules")
    git(clone, tmp_path, "checkout", "-q", "--detach")
    git(clone, tmp_path, "branch", "-q", "-D", "main")
    detached = buf_sh(clone, tmp_path, CI="true")
    assert detached.returncode == 0, detached.stdout + detached.stderr
    assert "against origin/main" in detached.stdout


def test_buf_sh_without_a_baseline_fails_under_ci(buf: str, tmp_path: Path) -> None:
    repo = script_repo(tmp_path / "repo", tmp_path, branch="feature")
    under_ci = buf_sh(repo, tmp_path, CI="true")
    assert under_ci.returncode == 1
    assert "neither main nor origin/main" in under_ci.stderr
    local = buf_sh(repo, tmp_path)
    assert local.returncode == 0
    assert "breaking-change check did NOT run" in local.stderr

    # A baseline from before buf.yaml existed: the contract starts when buf.yaml lands.
    old = script_repo(tmp_path / "old", tmp_path, with_buf_yaml=False)
    before = buf_sh(old, tmp_path, CI="true")
    assert before.returncode == 0, before.stdout + before.stderr
    assert "main has no buf.yaml yet" in before.stdout
