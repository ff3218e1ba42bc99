"""Ranking a split the same way on both sides: full-catalogue ranks with the query's seen
items masked (what the service serves) or not (RecBole's protocol), per-user metrics, and
the paired bootstrap pooled across seeds.

Seen items are the user's WHOLE history before the query's position (the service drops
all of them, not only the last max_len); the target itself is never hidden.
"""

from __future__ import annotations

import numpy as np
import torch

from training.data.sequences import SequenceData
from training.evaluate import metrics_from_ranks, ndcg_at, paired_bootstrap

KS = [5, 10, 20]


def seen_mask(data: SequenceData, users: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """(Q, N) bool: item id j + 1 occurs in seq[u][:t]."""
    n = data.n_items
    lengths = positions.astype(np.int64)
    rows = np.repeat(np.arange(len(users)), lengths)
    starts = np.repeat(data.offsets[users], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = data.flat[starts + within]
    out = torch.zeros(len(users), n, dtype=torch.bool)
    out[torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64) - 1)] = True
    return out


def target_ranks(scores: torch.Tensor, targets: np.ndarray, seen: torch.Tensor | np.ndarray | None = None
                 ) -> np.ndarray:
    """(Q,) 0-based rank of each target among all items (ties in its favour); with ``seen``
    those items drop out of the ranking, the target never does."""
    scores = scores.float()
    tgt = torch.as_tensor(targets, dtype=torch.int64) - 1
    if seen is not None:
        seen = torch.as_tensor(seen).clone()
        seen[torch.arange(len(tgt)), tgt] = False
        scores = scores.masked_fill(seen, float("-inf"))
    t = scores.gather(1, tgt[:, None])
    return (scores > t).sum(dim=1).numpy()


def both_ranks(scores: torch.Tensor, targets: np.ndarray, seen: torch.Tensor) -> dict[str, np.ndarray]:
    return {"masked": target_ranks(scores, targets, seen), "unmasked": target_ranks(scores, targets)}


def summary(ranks: np.ndarray) -> dict[str, float]:
    m = metrics_from_ranks(ranks, KS)
    return {k: m[k] for k in ("NDCG@10", "HR@10", "MRR@10", "NDCG@20", "HR@20")}


def compare(with_ranks: list[np.ndarray], without_ranks: list[np.ndarray], *, seed: int = 0) -> dict:
    """Figures for one protocol: means over seeds of NDCG@10 / HR@10 with and without, the
    ratio, and the paired bootstrap over users of each user's NDCG@10 delta averaged over
    seeds (users are the resampling unit; every seed's run sees the same users)."""
    w = [summary(r) for r in with_ranks]
    wo = [summary(r) for r in without_ranks]
    out: dict = {"with": {k: float(np.mean([x[k] for x in w])) for k in w[0]},
                 "without": {k: float(np.mean([x[k] for x in wo])) for k in wo[0]},
                 "per_seed": {"with": [x["NDCG@10"] for x in w], "without": [x["NDCG@10"] for x in wo]}}
    a = np.mean([ndcg_at(r, 10) for r in with_ranks], axis=0)
    b = np.mean([ndcg_at(r, 10) for r in without_ranks], axis=0)
    boot = paired_bootstrap(a, b, seed=seed)
    out["ratio_ndcg10"] = out["with"]["NDCG@10"] / max(out["without"]["NDCG@10"], 1e-12)
    out["ratio_hr10"] = out["with"]["HR@10"] / max(out["without"]["HR@10"], 1e-12)
    out["delta_ndcg10"] = boot["mean"]
    out["delta_ndcg10_ci95"] = [boot["low"], boot["high"]]
    return out
