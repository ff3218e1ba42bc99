"""Per-epoch diagnostics of the retrieval-augmented stage, as plain numbers for metrics.jsonl.

- ``neighbour_stats``: how close and how right the retrieved neighbours are;
- ``parameter_drift``: how far each learned tensor of a module moved from its initial value
  (learned fusion weights that never move are a known failure, so they are logged);
- ``RunningMean``: example-weighted means over the batches of an epoch, NaNs skipped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from retriever import SearchResult


def neighbour_stats(res: SearchResult, targets: np.ndarray, used: np.ndarray) -> dict[str, float]:
    """res: a batch's search result (Q, K); targets: (Q,) true next items; used: (Q, K) bool,
    the neighbours retrieval attention used. NaN for a statistic with nothing to average.

    neighbour_sim: mean cosine of the found neighbours; neighbour_hit: fraction of found
    neighbours whose target is the query's true next item; masked_by_usefulness: fraction of
    found neighbours the usefulness threshold masked out."""
    found = res.found
    n = int(found.sum())
    if n == 0:
        return {"neighbour_sim": math.nan, "neighbour_hit": math.nan, "masked_by_usefulness": math.nan}
    return {
        "neighbour_sim": float(res.D[found].mean()),
        "neighbour_hit": float((res.targets == np.asarray(targets)[:, None])[found].mean()),
        "masked_by_usefulness": float((found & ~used).sum() / n),
    }


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a module's parameters, by name."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}


def parameter_drift(module: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{name: {"norm": ‖θ‖, "change": ‖θ - θ₀‖ / max(‖θ₀‖, 1e-12)}} per parameter tensor, plus
    "all" over every tensor together. Empty for a module without parameters."""
    out: dict[str, dict[str, float]] = {}
    sq_norm, sq_diff, sq_init = 0.0, 0.0, 0.0
    for name, p in module.named_parameters():
        now, then = p.detach().cpu().float(), initial[name].float()
        diff, init = float((now - then).norm()), float(then.norm())
        out[name] = {"norm": float(now.norm()), "change": diff / max(init, 1e-12)}
        sq_norm, sq_diff, sq_init = sq_norm + float(now.norm()) ** 2, sq_diff + diff**2, sq_init + init**2
    if out:
        out["all"] = {"norm": math.sqrt(sq_norm), "change": math.sqrt(sq_diff) / max(math.sqrt(sq_init), 1e-12)}
    return out


class RunningMean:
    """Example-weighted means of named values over batches; NaN values are left out."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, values: dict[str, float], n: int) -> None:
        for k, v in values.items():
            if not math.isnan(v):
                self.sums[k] = self.sums.get(k, 0.0) + v * n
                self.counts[k] = self.counts.get(k, 0.0) + n

    def result(self) -> dict[str, float]:
        return {k: s / self.counts[k] for k, s in self.sums.items()}
