#!/usr/bin/env bash
# Does the API page work on an air-gapped host? Serves a run on 127.0.0.1, opens /docs in headless
# Chromium (Debian's `chromium` package), saves a screenshot and checks that the rendered page
# lists the API's operations (Swagger UI's `opblock` elements, /v1/recommend among them).
#
#   bash scripts/check_docs_offline.sh [--run RUN_DIR] [--out PNG]
#
# Without --run it trains a tiny run on generated data first (~20 s). When it may (root), it runs
# everything in a network namespace of its own, where only loopback exists, so a page that needed
# anything from outside could not render; otherwise Chromium's resolver maps every host name but
# 127.0.0.1 to "not found". Without chromium it prints why and exits 0 (CI does not install it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
RUN="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --run) RUN=$(realpath "$2"); shift 2 ;;
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    *) echo "usage: $0 [--run RUN_DIR] [--out PNG]" >&2; exit 2 ;;
  esac
done

CHROME=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROME" ]; then
  echo "skip: chromium not found (Debian: apt-get install chromium); /docs was not checked in a browser"
  exit 0
fi

if [ "${DOCS_CHECK_NETNS:-}" != 1 ] && unshare --net true 2>/dev/null; then
  echo "isolating the check in a new network namespace: loopback only"
  args=()
  [ -n "$RUN" ] && args+=(--run "$RUN")
  [ -n "$OUT" ] && args+=(--out "$OUT")
  DOCS_CHECK_NETNS=1 exec unshare --net bash "$0" "${args[@]}"
fi
if [ "${DOCS_CHECK_NETNS:-}" = 1 ]; then
  ip link set lo up
fi

work=$(mktemp -d /tmp/docs-check.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work/chrome"
}
trap cleanup EXIT
OUT=${OUT:-$work/docs.png}

if [ -z "$RUN" ]; then
  echo "training a tiny run in $work/run ..."
  "$PY" -m app.cli data synthetic --out "$work/syn.inter" --users 60 --items 40 --mean-length 10 >/dev/null
  "$PY" -m app.cli train --out "$work/run" --set "data.path=$work/syn.inter" --set model.dim=8 \
    --set model.inner=16 --set train.epochs=1 --set data.max_seq_len=8 >/dev/null 2>"$work/train.log"
  RUN=$work/run
fi

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
env RAGREC_INDEX_DIR="$work/index" "$PY" -m app.cli serve --run "$RUN" --host 127.0.0.1 --port "$port" \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$url/healthz" 2>/dev/null; then
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || { echo "error: the server exited; log:" >&2; tail -20 "$work/server.log" >&2; exit 1; }
  sleep 0.2
done

chrome() {
  "$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1" --user-data-dir="$work/chrome" \
    --window-size=1280,1600 --virtual-time-budget=20000 "$@" 2>>"$work/chrome.log"
}
mkdir -p "$(dirname "$OUT")"
chrome --screenshot="$OUT" "$url/docs" >/dev/null
chrome --dump-dom "$url/docs" >"$work/docs.dom.html"

ops=$(grep -o 'class="opblock opblock-[a-z]*' "$work/docs.dom.html" | wc -l)
paths=$(grep -o 'data-path="[^"]*"' "$work/docs.dom.html" | sort -u | sed 's/data-path=//; s/"//g' | tr '\n' ' ')
echo "screenshot: $OUT ($(stat -c %s "$OUT") bytes)"
echo "rendered operations: $ops; paths: $paths"
if grep -q -e "Failed to load API definition" -e "Unable to render this definition" "$work/docs.dom.html"; then
  echo "FAIL: Swagger UI reports an error loading the API definition" >&2
  exit 1
fi
if [ "$ops" -lt 1 ] || ! grep -q 'data-path="/v1/recommend"' "$work/docs.dom.html"; then
  echo "FAIL: /docs rendered no operations (no opblock for /v1/recommend); DOM in $work/docs.dom.html" >&2
  exit 1
fi
echo "PASS: /docs renders $ops operations with no network but loopback"
