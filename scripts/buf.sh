#!/usr/bin/env bash
# Lint the public API (proto/) with buf and check it for breaking changes against main.
#
# The baseline is the branch `main`, or origin/main in a clone without a local main (a CI
# checkout); LOCKBROKER_BUF_AGAINST=<git ref> names another. An intended break of the API should
# be a new package version (lockbroker.v2) instead. Nothing is skipped under CI=true: a missing
# buf or a missing baseline fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

buf=tests/node/node_modules/.bin/buf
if [ ! -x "$buf" ]; then
  echo "buf.sh: $buf is missing: run bash scripts/bootstrap.sh (it runs npm install in tests/node)" >&2
  exit 1
fi

echo "== buf lint (buf $("$buf" --version))"
"$buf" lint

against="${LOCKBROKER_BUF_AGAINST:-}"
if [ -z "$against" ]; then
  for ref in main origin/main; do
    if git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
      against="$ref"
      break
    fi
  done
fi
if [ -z "$against" ]; then
  if [ "${CI:-}" = true ]; then
    echo "buf.sh: neither main nor origin/main exists in this clone: cannot check breaking changes" >&2
    exit 1
  fi
  echo "buf.sh: WARNING: no main or origin/main to compare with; the breaking-change check did NOT run" >&2
  exit 0
fi
git rev-parse --verify --quiet "$against^{commit}" >/dev/null || {
  echo "buf.sh: LOCKBROKER_BUF_AGAINST=$against is not a commit" >&2
  exit 1
}

# The contract starts with the commit that brought buf.yaml: a baseline without it was never
# held to these rules (it predates go_package, for one), so there is nothing to compare with yet.
if ! git cat-file -e "$against:buf.yaml" 2>/dev/null; then
  echo "buf.sh: NOTE: $against has no buf.yaml yet (the contract starts when it lands); breaking check not run"
  exit 0
fi

echo "== buf breaking (FILE) against $against ($(git rev-parse --short "$against"))"
"$buf" breaking --against ".git#ref=$against,subdir=proto"
