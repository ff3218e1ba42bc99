#!/usr/bin/env bash
# The main job: fetch MovieLens-100K, train DuoRec, evaluate it.
#   bash scripts/main.sh            (run directory: runs/ml100k; reruns resume it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN=${RUN:-runs/ml100k}
CONFIG=${CONFIG:-configs/ml100k.yaml}
.venv/bin/ragrec data ml-100k --out data/ml-100k
if [ -f "$RUN/metrics.json" ]; then
  echo "run $RUN is finished; re-evaluating it from its checkpoint (delete $RUN to train again)"
elif [ -f "$RUN/last.pt" ]; then
  .venv/bin/ragrec train --config "$CONFIG" --out "$RUN" --resume
else
  .venv/bin/ragrec train --config "$CONFIG" --out "$RUN"
fi
.venv/bin/ragrec evaluate --run "$RUN"
