"""The machine and the processes around a benchmark run: the log line, subprocesses, what
meta.json records about the machine, and aetcd's own venv."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import google.protobuf
import grpc

from bench.procs import REPO

AETCD_VENV = REPO / "bench" / ".venv-aetcd"
AETCD_REQUIREMENT = "aetcd==1.0.0"

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"{time.monotonic() - _T0:6.1f}s {message}", file=sys.stderr, flush=True)


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "etcd": _run_text([shutil.which("etcd") or "/usr/bin/etcd", "--version"]).splitlines()[:1],
        "commit": _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(_run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "server", "interceptors"])),
        "loadavg_start": os.getloadavg(),
    }


async def _exec(*cmd: str, timeout: float = 300.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{cmd[0]} timed out after {timeout:g}s"
    return proc.returncode or 0, out.decode(errors="replace")


async def aetcd_python() -> tuple[str | None, str]:
    """aetcd's interpreter (a venv of its own under bench/, made on first use), or why there is none."""
    python = AETCD_VENV / "bin" / "python"
    if python.exists():
        code, out = await _exec(str(python), "-c", "import aetcd, grpc; print(grpc.__version__)")
        if code == 0:
            return str(python), f"aetcd venv {AETCD_VENV.relative_to(REPO)} (grpcio {out.strip()})"
    uv = shutil.which("uv")
    if uv is None:
        return None, "uv is not on PATH: cannot make aetcd's venv"
    code, out = await _exec(uv, "venv", "-q", "--allow-existing", "--python", sys.executable, str(AETCD_VENV))
    if code != 0:
        return None, f"uv venv failed: {out.strip()[-300:]}"
    code, out = await _exec(uv, "pip", "install", "-q", "--python", str(python), AETCD_REQUIREMENT)
    if code != 0:
        return None, f"uv pip install {AETCD_REQUIREMENT} failed: {out.strip()[-300:]}"
    code, out = await _exec(str(python), "-c", "import aetcd, grpc; print(grpc.__version__)")
    if code != 0:
        return None, f"aetcd does not import in its venv: {out.strip()[-300:]}"
    return str(python), f"aetcd venv {AETCD_VENV.relative_to(REPO)} (grpcio {out.strip()})"
