"""Full-ranking evaluation: the target is ranked among ALL items, no sampled negatives.

Metrics: HR@K, NDCG@K, MRR@K for each K, catalogue coverage@10 and the mean training
popularity of the recommended top-10 items. Ranks are kept per example so callers can
compare two scorers user by user (paired bootstrap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoints import load_model_file, require_finished_run
from training.config import load_config
from training.data.sequences import Vocabulary, gather_items, item_popularity, leave_one_out, pad_prefixes
from training.data.source import load_run_data
from training.lifecycle import autocast

log = logging.getLogger(__name__)

# (B, L) int64 prefixes -> (B, n_items) scores; column j is item id j + 1
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray  # (N,) 0-based rank of each target among all items

    def per_example(self, k: int = 10) -> np.ndarray:
        """NDCG@k of each example: (N,) float64."""
        return ndcg_at(self.ranks, k)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: the number of items scored strictly higher.

    scores: (B, n_items) float; targets: (B,) item ids 1..n_items. Ties count in the
    target's favour, as a stable sort would place it; with float scores they are rare.
    """
    target_scores = scores.gather(1, (targets - 1).unsqueeze(1))  # (B, 1)
    return (scores > target_scores).sum(dim=1)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no examples to evaluate")
    out: dict[str, float] = {}
    for k in sorted(ks):
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(ndcg_at(ranks, k).mean())
        out[f"MRR@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


@torch.no_grad()
def evaluate_scorer(
    score_fn: ScoreFn,
    prefixes: np.ndarray,
    targets: np.ndarray,
    *,
    ks: list[int],
    item_popularity: np.ndarray,
    mask_seen: bool = False,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Rank every target against the whole catalogue.

    prefixes: (N, L) int64 left-aligned inputs; targets: (N,) item ids;
    item_popularity: (n_items + 1,) training interaction counts indexed by item id.
    """
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    n_items = len(item_popularity) - 1
    ranks, top = [], []
    for start in range(0, len(prefixes), batch_size):
        seq = torch.as_tensor(prefixes[start : start + batch_size], device=device)
        tgt = torch.as_tensor(targets[start : start + batch_size], device=device)
        scores = score_fn(seq).float()  # (B, n_items)
        if mask_seen:
            seen = torch.zeros_like(scores, dtype=torch.bool)
            rows = torch.arange(len(seq), device=device).unsqueeze(1).expand_as(seq)
            real = seq > 0
            seen[rows[real], seq[real] - 1] = True
            seen[torch.arange(len(seq), device=device), tgt - 1] = False  # never hide the target
            scores = scores.masked_fill(seen, float("-inf"))
        ranks.append(target_ranks(scores, tgt).cpu().numpy())
        top.append(scores.topk(min(10, n_items), dim=1).indices.cpu().numpy() + 1)
    all_ranks = np.concatenate(ranks)
    metrics = metrics_from_ranks(all_ranks, ks)
    top10 = np.concatenate(top)
    metrics["Coverage@10"] = float(len(np.unique(top10)) / n_items)
    metrics["Popularity@10"] = float(item_popularity[top10].mean())
    return EvalResult(metrics=metrics, ranks=all_ranks)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of a - b over examples with a bootstrap confidence interval (paired by index)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal 1-D arrays, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_resamples, diff.size))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(diff.mean()), "low": float(lo), "high": float(hi)}


def evaluate_run(run_dir: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Recompute valid/test metrics of a finished run from its saved files (``ragrec evaluate``)."""
    run = require_finished_run(run_dir)
    cfg = load_config(run / "config.yaml")
    data = load_run_data(cfg, item_vocab=Vocabulary.load(run / "items.json"))
    split = leave_one_out(data)
    model, _ = load_model_file(run / "model.pt", map_location=device)
    model.eval()
    pop = item_popularity(data, split)
    L = cfg.data.max_seq_len
    out: dict[str, Any] = {}
    for name, u, p in (("valid", split.valid_users, split.valid_positions),
                       ("test", split.test_users, split.test_positions)):
        prefixes, _ = pad_prefixes(data, u, p, L)

        def score(seq: torch.Tensor) -> torch.Tensor:
            with autocast(torch.device(device), cfg.train.precision):
                return model.scores(model(seq))

        out[name] = evaluate_scorer(score, prefixes, gather_items(data, u, p), ks=cfg.eval.ks,
                                    item_popularity=pop, mask_seen=cfg.eval.mask_seen,
                                    batch_size=cfg.eval.batch_size, device=device).metrics
    return out
