#!/usr/bin/env bash
# Install what lockbroker needs on a fresh Debian/Ubuntu machine. Idempotent: on a machine that has
# everything it only syncs the environment, and it never changes a tracked file (git status stays
# clean: npm ci installs exactly tests/node/package-lock.json instead of rewriting it).
#
#   bash scripts/bootstrap.sh --serve   to serve only: etcd, uv, and the runtime dependencies
#                                       (uv sync --no-dev); no Node.js, npm or dev tools
#   bash scripts/bootstrap.sh           everything the tests need as well (what CI runs)
#
# Under CI=true anything missing that cannot be installed fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

serve_only=false
case "${1:-}" in
  --serve) serve_only=true ;;
  "") ;;
  *)
    echo "usage: bash scripts/bootstrap.sh [--serve]" >&2
    exit 2
    ;;
esac

missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || [ -n "${LOCKBROKER_ETCD_BINARY:-}" ] || missing+=(etcd-server)
if ! $serve_only; then
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)  # the fault suite's network namespaces
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "bootstrap: need root to install ${missing[*]} (apt-get); or point LOCKBROKER_ETCD_BINARY at an etcd" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q uv
fi

if $serve_only; then
  # Runtime dependencies only; `uv run --no-dev lockbroker serve` keeps it that way (a plain
  # `uv run` would install the dev group).
  uv sync -q --no-dev
  exit 0
fi

uv sync -q

# The Node.js test client needs its packages (kept out of the repo root's node_modules). `npm ci`
# installs the lock file as committed; `npm install` rewrote it with this machine's npm.
if [ -f tests/node/package.json ]; then
  (cd tests/node && npm ci --silent --no-audit --no-fund >/dev/null)
fi
