"""Training speed: seconds per epoch at the reference settings, against RecBole's figures.

    python bench/train_speed.py --data data/ml-100k/ml-100k.inter [--modes sasrec duorec] [--json out.json]

Reference settings (the issue's): ML-100K, every prefix a sample (97,171), max_seq_len 50,
hidden 64, 2 layers, 2 heads, inner 256, GELU, dropout 0.5/0.5, Adam lr 1e-3, batch 256.
RecBole 1.2.1 on this 2-core machine: SASRec 144 s/epoch, DuoRec (us_x) 406 s/epoch.

Also reports the floor: the epoch's matrix-multiply FLOPs (counted from the real batches)
divided by the FLOP/s this machine sustains on the same matrix shapes.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.config import load_config
from training.data.batches import iterate_batches
from training.trainer import Trainer

RECBOLE_SECONDS = {"sasrec": 144.0, "duorec": 406.0}
MODES = {
    "sasrec": ["loss.contrastive=none"],
    "duorec": ["loss.contrastive=us_x", "loss.tau=1.0", "loss.sim=dot", "loss.lmd=0.1", "loss.lmd_sem=0.1"],
}


def epoch_flops(trainer: Trainer) -> float:
    """Forward+backward matmul FLOPs of one epoch (x3 of forward), from the real batch shapes."""
    cfg = trainer.cfg
    D, F, n_items = cfg.model.dim, cfg.model.inner, trainer.data.n_items
    n_layers = cfg.model.n_layers
    views = {"none": 1, "un": 2, "su": 2, "us": 3, "us_x": 3}[cfg.loss.contrastive]
    rng = np.random.default_rng(0)
    total = 0.0
    assert trainer.prefix_plan is not None
    for b in iterate_batches(trainer.prefix_plan, trainer.data, cfg.data.max_seq_len, cfg.train.batch_size, rng,
                             trainer.prefix_windows):
        n_win, width = b.windows.shape
        p = len(b.rows)
        # dropout view repeats the windows; the same-target view adds p windows (~ full width)
        tokens = n_win * width * (2 if views >= 2 and cfg.loss.contrastive != "su" else 1)
        if cfg.loss.contrastive in ("su", "us", "us_x"):
            tokens += p * width
        rows = p * views
        full_layer = 2 * tokens * (4 * D * D + 2 * D * F) + 2 * 2 * tokens * width * D / 2  # proj+ffn+causal attn
        last_layer = 2 * tokens * 2 * D * D + 2 * rows * (2 * D * D + 2 * D * F) + 2 * 2 * rows * width * D
        ce = 2 * p * D * n_items
        total += (n_layers - 1) * full_layer + last_layer + ce
    return 3.0 * total


def sustained_flops(dim: int, inner: int, rows: int = 256 * 50, repeats: int = 20) -> float:
    """FLOP/s of fp32 matmuls shaped like the encoder's (tokens x dim) @ (dim x inner), fwd and bwd."""
    a = torch.randn(rows, dim, requires_grad=True)
    w = torch.randn(dim, inner, requires_grad=True)
    for _ in range(3):
        (a @ w).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        (a @ w).sum().backward()
    seconds = time.perf_counter() - start
    return repeats * 3 * 2 * rows * dim * inner / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/ml-100k/ml-100k.inter")
    ap.add_argument("--modes", nargs="+", default=["sasrec", "duorec"], choices=sorted(MODES))
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per mode (after one warm-up batch set)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                "torch": torch.__version__}, "modes": {}}
    flops_per_s = sustained_flops(64, 256)
    report["machine"]["sustained_matmul_gflops"] = flops_per_s / 1e9
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, [f"data.path={args.data}", "train.mode=prefix", *MODES[mode], *args.overrides])
            trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
            trainer.setup()
            times, samples = [], 0
            for epoch in range(1, args.epochs + 1):
                stats = trainer.train_epoch(epoch)
                times.append(stats["seconds"])
                samples = stats["samples"]
            valid = trainer.evaluate("valid").metrics["NDCG@10"]
            sec = float(np.median(times))
            flops = epoch_flops(trainer)
            row = {
                "seconds_per_epoch": sec,
                "all_epochs": times,
                "samples_per_epoch": samples,
                "samples_per_s": samples / sec,
                "encoder_passes_per_epoch": trainer.prefix_plan.n_units if trainer.prefix_plan else None,
                "recbole_seconds_per_epoch": RECBOLE_SECONDS[mode],
                "speedup_vs_recbole": RECBOLE_SECONDS[mode] / sec,
                "target_seconds": RECBOLE_SECONDS[mode] / 5,
                "epoch_tflops": flops / 1e12,
                "floor_seconds": flops / flops_per_s,
                "valid_NDCG@10_after": valid,
                "precision": cfg.train.precision,
            }
            report["modes"][mode] = row
            print(f"{mode:7s} {sec:7.1f} s/epoch  {samples / sec:8.0f} samples/s  "
                  f"x{row['speedup_vs_recbole']:.2f} vs RecBole ({RECBOLE_SECONDS[mode]:.0f} s)  "
                  f"floor {row['floor_seconds']:.1f} s ({row['epoch_tflops']:.2f} TFLOP at "
                  f"{flops_per_s / 1e9:.0f} GFLOP/s)  valid NDCG@10 {valid:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
