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
# Parallel workers (pytest-xdist). The suite mostly waits (TTLs, timers, brokers and etcd in other
# processes): a serial run keeps about a third of one core busy, so on 2 cores 4 workers still pay
# off. `--dist loadgroup` keeps each xdist_group on one worker (tests/conftest.py says which and why).
# Tests marked `serial` (a benchmark) then run alone. LOCKBROKER_TEST_WORKERS=0 runs the first part in
# this one process too. Options given to this script go to both parts (both set -m themselves).
# Both parts always run; the script fails if either does. pytest's exit 5 (nothing selected) is
# success for one part as long as the other ran tests.
parallel=0
uv run pytest -n "${LOCKBROKER_TEST_WORKERS:-4}" --dist loadgroup -m "not serial" "$@" || parallel=$?
echo "== pytest: serial"
serial=0
uv run pytest -m serial "$@" || serial=$?
if [ "$parallel" = 5 ] && [ "$serial" = 5 ]; then
  exit 5
fi
for rc in "$parallel" "$serial"; do
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
    exit "$rc"
  fi
done
