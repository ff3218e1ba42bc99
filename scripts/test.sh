#!/usr/bin/env bash
# The whole test suite in a fresh (or reused) virtual environment.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Redis-backed tests start their own redis-server; install it when missing and we may.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
      || echo "warning: could not install redis-server; Redis tests will be skipped" >&2
  else
    echo "warning: redis-server not found; Redis tests will be skipped" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
