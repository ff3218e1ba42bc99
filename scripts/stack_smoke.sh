#!/usr/bin/env bash
# The stack for real, on one machine with Debian's docker.io (make stack-smoke). Not part of `make test`.
#   starts the engine if none runs -> makes the base image if missing (debootstrap) -> builds
#   ragrec:cpu, ragrec-redis, ragrec-proxy -> trains into the artifacts volume (train profile) ->
#   bad-input checks -> redis, api, api2, worker, proxy up -> scripts/stack_checks.py -> down.
# Every service runs on the host network on its own 127.0.0.1 port (docker-compose.host.yml), and
# every test request goes to 127.0.0.1. Prints `N passed, M failed`; exits non-zero if any failed.
#
# Environment (all optional):
#   TRAIN_SET     overrides for the DuoRec stage; default caps it for a smoke run:
#                 "--set train.max_minutes=2"   (the full recipe: TRAIN_SET=" ")
#   RA_SET        overrides for the retrieval stage; default "--set retrieval.head.epochs=1"
#                 (full: RA_SET=" ")
#   RETRAIN=1     train even if the artifacts volume already holds a finished run
#   PURGE=1       also remove the volumes (trained run, data, Redis) at the end
#   PROJECT       compose project name (default ragrec-smoke)
#   CONTEXT=worktree  build the images from the checkout as it is (default: the last commit)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BASE=ragrec-base:bookworm

# ---- what this needs, said once --------------------------------------------------------------
missing=()
command -v docker >/dev/null || missing+=("docker (apt-get install -y docker.io)")
command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || missing+=("dockerd (apt-get install -y docker.io)")
command -v debootstrap >/dev/null || docker image inspect "$BASE" >/dev/null 2>&1 \
  || missing+=("debootstrap (apt-get install -y debootstrap)")
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else missing+=("docker compose (apt-get install -y docker-compose)"); fi
command -v python3 >/dev/null || missing+=("python3")
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: stack_smoke needs: ${missing[*]}" >&2
  exit 2
fi

PROJECT=${PROJECT:-ragrec-smoke}
export TRAIN_SET=${TRAIN_SET:---set train.max_minutes=2}
export RA_SET=${RA_SET:---set retrieval.head.epochs=1}
export REBUILD_INTERVAL=${REBUILD_INTERVAL:-30}
# Creating a container of the 1.5 GB image copies its whole filesystem on vfs: minutes on a busy
# machine, past docker-compose's default 60 s client timeout.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-900} DOCKER_CLIENT_TIMEOUT=${DOCKER_CLIENT_TIMEOUT:-900}
export RAGREC_API_KEY=${RAGREC_API_KEY:-smoke-$RANDOM$RANDOM}
RESULTS=$(mktemp /tmp/ragrec-smoke.XXXXXX.jsonl)
LOG=/tmp/ragrec-smoke-logs
mkdir -p "$LOG"

say() { printf '\n== %s\n' "$*"; }
record() {  # record NAME OK(0/1) DETAIL
  local status=PASS; [ "$2" = 0 ] || status=FAIL
  printf '%s %s: %s\n' "$status" "$1" "$3"
  python3 -c 'import json,sys; print(json.dumps({"check": sys.argv[1], "ok": sys.argv[2] == "0", "detail": sys.argv[3]}))' \
    "$1" "$2" "$3" >> "$RESULTS"
}

COMPOSE+=(-p "$PROJECT" -f docker-compose.yml -f docker-compose.host.yml)
compose() { "${COMPOSE[@]}" "$@"; }

# ---- engine --------------------------------------------------------------------------------------
STARTED_ENGINE=
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "error: no Docker engine runs and starting one needs root" >&2; exit 2; }
  say "starting dockerd (vfs storage, no bridge, no iptables)"
  dockerd --storage-driver=vfs --iptables=false --bridge=none >"$LOG/dockerd.log" 2>&1 &
  STARTED_ENGINE=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "error: dockerd did not start, see $LOG/dockerd.log" >&2; exit 1; }
fi

cleanup() {
  say "teardown"
  compose --profile train down --remove-orphans ${PURGE:+--volumes} >/dev/null 2>&1
  docker rm -f "$PROJECT-badinput" >/dev/null 2>&1
  docker volume rm "$PROJECT-empty" >/dev/null 2>&1
  [ -n "${CTX:-}" ] && rm -rf "$CTX"
  if [ -n "$STARTED_ENGINE" ]; then kill "$STARTED_ENGINE" 2>/dev/null; wait "$STARTED_ENGINE" 2>/dev/null; fi
  left=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null | wc -l)
  echo "containers of $PROJECT still running: $left"
}
trap cleanup EXIT

# ---- images --------------------------------------------------------------------------------------
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  say "base image $BASE (debootstrap)"
  t0=$(date +%s)
  bash docker/base_image.sh "$BASE" || { record "base image" 1 "docker/base_image.sh failed"; exit 1; }
  record "base image" 0 "$(( $(date +%s) - t0 )) s"
fi

# The build context: the committed tree (git archive HEAD), so work in progress in the checkout never
# reaches an image (CONTEXT=worktree builds the checkout as it is), plus two build inputs: pip's CA
# bundle (builder stage only) and the local torch CPU wheel.
CTX=$(mktemp -d /tmp/ragrec-context.XXXXXX)
if [ "${CONTEXT:-head}" = worktree ]; then
  tar -c --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./data . | tar -x -C "$CTX"
else
  git archive HEAD | tar -x -C "$CTX"
fi
# One fixed mtime: the classic builder's COPY cache counts it, and git archive stamps the commit time.
find "$CTX" -exec touch -h -d @0 {} +
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
[ -n "$cert" ] && [ -f "$cert" ] && cp "$cert" "$CTX/docker/certs/ca.crt"
torch_source=
links=${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
wheel=$(ls "$links"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ]; then
  ln -f "$wheel" "$CTX/docker/wheels/" 2>/dev/null || cp "$wheel" "$CTX/docker/wheels/"
  torch_source="--find-links /wheels"
fi

build() {  # build TAG DOCKERFILE [build args...]
  local tag=$1 file=$2; shift 2
  local t0; t0=$(date +%s)
  if DOCKER_BUILDKIT=0 nice -n 19 docker build --network host -q -f "$CTX/$file" -t "$tag" "$@" "$CTX" >"$LOG/build-$tag.log" 2>&1; then
    local size; size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')
    record "build $tag" 0 "$(( $(date +%s) - t0 )) s, $size"
  else
    record "build $tag" 1 "see $LOG/build-$tag.log: $(tail -1 "$LOG/build-$tag.log")"
    exit 1
  fi
}
say "images"
build ragrec:cpu docker/Dockerfile --build-arg PYTHON_IMAGE="$BASE" ${torch_source:+--build-arg "TORCH_SOURCE=$torch_source"}
build ragrec-redis docker/Dockerfile.redis --build-arg BASE_IMAGE="$BASE"
build ragrec-proxy docker/Dockerfile.proxy --build-arg BASE_IMAGE="$BASE"
# The vfs driver stores every layer as a full copy: the images these builds replaced would pile up
# (tens of GB after a few runs), so untagged ones go now.
docker image prune -f >/dev/null 2>&1
# ---- training into the volume ---------------------------------------------------------------------
# Looks into the artifacts volume with the small base image (a container of the 1.5 GB image costs a
# minute on the vfs storage driver: it copies the whole filesystem).
in_volume() { docker run --rm -v "${PROJECT}_artifacts:/artifacts" "$BASE" sh -c "$1" >/dev/null 2>&1; }
has_run() { in_volume "test -f /artifacts/run/$1"; }
# A finished retrieval run is reused; a base run served as a fallback (a symlink) is trained again.
if [ -n "${RETRAIN:-}" ] || ! has_run retrieval.pt; then
  in_volume "rm -rf /artifacts/run /artifacts/duorec"  # a fresh start: ragrec train refuses a used --out
  say "train profile: ML-100K, accurate DuoRec ($TRAIN_SET), then the retrieval stage ($RA_SET)"
  t0=$(date +%s)
  compose --profile train run --rm train >"$LOG/train.log" 2>&1
  rc=$?
  record "train profile (accurate DuoRec, then RA)" $rc "$(( $(date +%s) - t0 )) s, exit $rc; log $LOG/train.log"
  if [ $rc -ne 0 ] && in_volume "test -f /artifacts/duorec/model.pt"; then
    # The RA stage failed (e.g. its config is being reworked): serve the DuoRec run instead.
    # Retrieval checks (explain, rebuilds, worker) then fail, and say so.
    in_volume "rm -rf /artifacts/run && ln -s duorec /artifacts/run"
    echo "RA stage failed: serving /artifacts/duorec as /artifacts/run (tail of the log below)"
    tail -5 "$LOG/train.log"
  fi
else
  record "train profile" 0 "skipped: the artifacts volume holds a finished run (RETRAIN=1 to train again)"
fi
has_run model.pt || { echo "error: no finished run in the artifacts volume" >&2; exit 1; }

# ---- the image and bad input: one container (each costs a minute on vfs) -------------------------
say "image contents and bad input"
docker volume create "$PROJECT-empty" >/dev/null
out=$(timeout 300 docker run --rm --name "$PROJECT-badinput" --network host --read-only --tmpfs /tmp \
        -v "$PROJECT-empty:/missing" -v "${PROJECT}_artifacts:/artifacts:ro" --entrypoint sh ragrec:cpu -c '
  echo "@user $(id -u)"
  echo "@leak $(ls -d /certs /wheels /src 2>/dev/null; find / -xdev \( -name "torch-*.whl" -o -name ca.crt \) 2>/dev/null | tr "\n" " ")"
  ragrec serve --run /missing/run --host 127.0.0.1 --port 18009 >/tmp/o 2>&1
  echo "@missing rc=$? lines=$(grep -c . /tmp/o) $(cat /tmp/o)"
  RAGREC_REDIS_TIMEOUT_S=fast ragrec serve --run /artifacts/run --host 127.0.0.1 --port 18009 >/tmp/o 2>&1
  echo "@setting rc=$? lines=$(grep -c . /tmp/o) $(cat /tmp/o)"' 2>&1)
field() { sed -n "s/^@$1 //p" <<<"$out"; }
uid=$(field user); leak=$(field leak | tr -d ' ')
[ -n "$uid" ] && [ "$uid" != 0 ] && [ -z "$leak" ]
record "ragrec:cpu runs as uid $uid; no build inputs (CA bundle, wheel, sources) in it" $? "${leak:-clean}"
missing_out=$(field missing)
grep -q "^rc=2 lines=1 .*model.pt is missing" <<<"$missing_out"
record "missing trained volume: exits with one line naming what is missing" $? "$missing_out"
setting_out=$(field setting)
grep -q "^rc=2 lines=1 .*RAGREC_REDIS_TIMEOUT_S" <<<"$setting_out"
record "wrong RAGREC_* value: one clear line, exit" $? "$setting_out"

# ---- the stack ------------------------------------------------------------------------------------
say "stack up: redis, api, api2, worker, proxy-host"
t0=$(date +%s)
if compose up -d redis api api2 worker proxy-host >"$LOG/up.log" 2>&1; then
  record "stack up (all healthy)" 0 "$(( $(date +%s) - t0 )) s"
else
  record "stack up (all healthy)" 1 "$(tail -2 "$LOG/up.log")"
  compose logs --tail 20 >"$LOG/compose.log" 2>&1
  exit 1
fi
ro=0; desc=
for s in redis api api2 worker proxy-host; do
  read -r rofs user <<<"$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$(compose ps -q $s)")"
  desc+="$s ro=$rofs user=${user:-root}; "
  { [ "$rofs" = true ] && [ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "$user" != root ]; } || ro=1
done
record "every service: read-only root filesystem, non-root user" $ro "$desc"

say "checks (scripts/stack_checks.py)"
python3 scripts/stack_checks.py --compose "${COMPOSE[*]}" --api-key "$RAGREC_API_KEY" --results "$RESULTS" \
  --rebuild-interval "$REBUILD_INTERVAL" --lock-ttl 20
compose logs --no-color >"$LOG/compose.log" 2>&1

passed=$(grep -c '"ok": true' "$RESULTS")
failed=$(grep -c '"ok": false' "$RESULTS")
say "summary (logs in $LOG)"
grep '"ok": false' "$RESULTS" | sed 's/^/  /'
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
