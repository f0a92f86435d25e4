#!/usr/bin/env bash
# Install what lockbroker needs on a fresh Debian/Ubuntu machine: etcd, uv and the Python
# environment. Idempotent: on a machine that has everything it only syncs the environment.
# Under CI=true anything missing that cannot be installed fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)  # the fault suite's network namespaces
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

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

uv sync -q

# The Node.js test client needs its two packages (kept out of the repo root's node_modules).
if [ -f tests/node/package.json ]; then
  (cd tests/node && npm install --silent --no-audit --no-fund >/dev/null)
fi
