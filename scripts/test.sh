#!/usr/bin/env bash
# The whole test suite in a fresh (or reused) virtual environment.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Redis-backed tests start their own redis-server; the deploy tests validate docker-compose.yml
# with Debian's docker-compose (no Docker engine needed). Install them when missing and we may.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; the tests that need them will say so" >&2
  else
    echo "warning: ${missing[*]} not found; the tests that need them will say so" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
