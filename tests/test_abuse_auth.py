"""Issue 18, item 16: a tenants file that lists no tenants must not silently turn authentication off.

Runs the real `lockbroker serve` entry point as a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import run_cli


@pytest.mark.parametrize("text", ["", "# all tenants removed\n", "[tenants]\n"])
async def test_a_tenants_file_with_no_tenants_refuses_to_start(tmp_path: Path, text: str) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(text)
    rc, out = await run_cli(
        tmp_path,
        "serve",
        "--backend",
        "memory",
        "--listen",
        "127.0.0.1:0",
        "--auth-tenants-file",
        str(tenants),
        timeout=30,
    )
    assert rc == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip() and "--backend memory" not in ln]
    assert len(lines) == 1, out
    assert lines[0].startswith("lockbroker: ") and str(tenants) in lines[0] and "no tenants" in lines[0], out
    assert "Traceback" not in out
