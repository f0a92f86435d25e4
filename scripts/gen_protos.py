"""Regenerate every *_pb2 module from the .proto files; the only way generated code is made.

Usage: uv run python scripts/gen_protos.py [--check]

--check regenerates into a temporary tree and fails if it differs from the committed files (CI).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (source root, .proto files relative to it). The generated module path follows the file's path
# under its root, so the bench's copy of etcd's Lock service is rooted at the repository itself
# (bench/v3lock.proto -> bench.v3lock_pb2): it is a peer the benchmark measures against, not part
# of the broker, and the broker's package does not ship it.
PROTOS: list[tuple[str, list[str]]] = [
    ("proto", ["lockbroker/v1/lock.proto", "lockbroker/v1/election.proto"]),
    ("server", ["lockbroker/server/etcd/rpc.proto"]),
    (".", ["bench/v3lock.proto"]),
]
# Where imports resolve: every source root that holds .proto files (v3lock.proto imports rpc.proto).
INCLUDE_ROOTS = ("proto", "server")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise SystemExit(f"{name} not found beside {sys.executable}: install the dev group (uv sync)")
    return path


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every source root, writing into out_root/<root>/...; returns the files written."""
    include = str(resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    for root, files in PROTOS:
        out = out_root / root
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *dict.fromkeys(f"-I{ROOT / r}" for r in (root, *INCLUDE_ROOTS)),
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *files,
        ]
        subprocess.run(cmd, check=True)
        for f in files:
            stem = f.removesuffix(".proto")
            written += [Path(root) / f"{stem}{s}" for s in SUFFIXES]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            str(rel)
            for rel in generate(Path(tmp))
            if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)
        ]
    if stale:
        print("generated code is stale; run: uv run python scripts/gen_protos.py", *stale, sep="\n  ")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
