"""Accuracy over seeds: train one config per seed (in parallel processes) and summarise.

    python bench/accuracy.py --config configs/ml100k.yaml --seeds 1 2 3 --out runs/acc \
        [--set loss.contrastive=us ...] [--parallel 2] [--name duorec]

Each seed trains to early stopping in ``<out>/<name>-seed<S>/``; the summary
(``<out>/<name>.json``) gives mean ± std of valid and test metrics, epochs, train and
wall seconds per run. With --parallel > 1 on a CPU machine each process gets one thread
(train.threads=1): several single-threaded runs beat oversubscribed multi-threaded ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEYS = ("NDCG@10", "HR@10", "MRR@10", "NDCG@20", "HR@20")


def run_one(config: str, overrides: list[str], seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", config, "--out", str(out),
           "--set", f"train.seed={seed}", *[x for o in overrides for x in ("--set", o)]]
    if out.exists() and (out / "last.pt").exists() and not (out / "metrics.json").exists():
        cmd.append("--resume")
    start = time.perf_counter()
    if not (out / "metrics.json").exists():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    result = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["wall_seconds"] = wall
    result["valid_curve"] = [h.get("valid", {}).get("NDCG@10") for h in history]
    result["seconds_per_epoch"] = result["train_seconds"] / max(result["epochs_run"], 1)
    return result


def summarise(results: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    out: dict = {}
    for split in ("valid", "test"):
        out[split] = {k: stat([r[split][k] for r in results]) for k in KEYS}
    for k in ("best_epoch", "epochs_run", "train_seconds", "wall_seconds", "seconds_per_epoch"):
        out[k] = stat([float(r[k]) for r in results])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    ap.add_argument("--name", default="run")
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()

    overrides = list(args.overrides)
    if args.parallel > 1 and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append("train.threads=1")
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_one, args.config, overrides, s, args.out / f"{args.name}-seed{s}")
                   for s in args.seeds]
        results = [f.result() for f in futures]
    summary = {"name": args.name, "config": args.config, "overrides": overrides, "seeds": args.seeds,
               "summary": summarise(results), "runs": results}
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    s = summary["summary"]
    print(f"{args.name}: test NDCG@10 {s['test']['NDCG@10']['mean']:.4f} ± {s['test']['NDCG@10']['std']:.4f}  "
          f"HR@10 {s['test']['HR@10']['mean']:.4f}  valid NDCG@10 {s['valid']['NDCG@10']['mean']:.4f}  "
          f"epochs {s['epochs_run']['mean']:.1f}  wall {s['wall_seconds']['mean']:.0f}s per run")


if __name__ == "__main__":
    main()
