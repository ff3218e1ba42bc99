"""Data-parallel speed: seconds per training epoch, N torchrun processes vs one process.

    .venv/bin/python bench/ddp_speed.py --config configs/ml100k.yaml [--nproc 2] [--set loss.contrastive=none]

Runs ``ragrec train`` for one epoch three ways, each in a fresh run directory:
  1 process x 1 thread | 1 process x N threads | N torchrun processes x 1 thread (gloo)
and reads each run's epoch time from ``metrics.jsonl`` (``train.seconds``: the training loop
only, no start-up or evaluation; under torchrun rank 0's, which includes waiting on the
gradient all-reduces). The load average before and after each run is reported: on a shared
machine the ratios are only as good as the quiet they were taken in. ``cpu_seconds`` (user +
system time of the run's processes, start-up and evaluation included) is less sensitive to
other load: how much work data parallelism adds, rather than how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_epoch(config: str, overrides: list[str], out: Path, *, nproc: int, threads: int) -> dict:
    """One epoch of ``ragrec train``; returns the epoch's train stats plus wall time and load."""
    args = ["-m", "app.cli", "train", "--config", config, "--out", str(out)]
    for item in [*overrides, "train.epochs=1", f"train.threads={threads}", "train.tensorboard=false"]:
        args += ["--set", item]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)  # torchrun would set 1 anyway; same for the single runs
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # torchrun's workers included: it waits for them
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"nproc": nproc, "threads": threads, "seconds_per_epoch": record["train"]["seconds"],
            "samples": record["train"]["samples"], "steps": record["train"]["steps"],
            "loss": record["train"]["loss"], "wall_seconds": wall, "cpu_seconds": cpu,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (and threads of the wide single run)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.nproc < 2:
        ap.error("--nproc must be at least 2")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, threads in (("1proc_1thread", 1, 1), (f"1proc_{args.nproc}threads", 1, args.nproc),
                                     (f"{args.nproc}proc_1thread", args.nproc, 1)):
            row = run_epoch(args.config, args.overrides, Path(tmp) / name, nproc=nproc, threads=threads)
            rows[name] = row
            print(f"{name:16s} {row['seconds_per_epoch']:7.1f} s/epoch  {row['cpu_seconds']:7.1f} cpu-s  "
                  f"({row['samples']} samples, {row['steps']} steps, loss {row['loss']:.4f})  "
                  f"load {row['load_before']:.2f} -> {row['load_after']:.2f}", flush=True)
    ddp = rows[f"{args.nproc}proc_1thread"]["seconds_per_epoch"]
    ratios = {f"{args.nproc}proc_vs_1proc_1thread": rows["1proc_1thread"]["seconds_per_epoch"] / ddp,
              f"{args.nproc}proc_vs_1proc_{args.nproc}threads":
                  rows[f"1proc_{args.nproc}threads"]["seconds_per_epoch"] / ddp}
    for k, v in ratios.items():
        print(f"speed-up {k}: x{v:.2f}")
    report = {"config": args.config, "overrides": args.overrides, "cpus": os.cpu_count(), "runs": rows,
              "speedup": ratios}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
