#!/usr/bin/env bash
# The project's test command (README): every check CI runs, then the test suite on a real etcd.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/bootstrap.sh
echo "== generated code is current"
uv run python scripts/gen_protos.py --check
echo "== ruff"
uv run ruff check .
uv run ruff format --check .
bash scripts/buf.sh
echo "== mypy"
uv run mypy
echo "== pytest"
uv run pytest "$@"
