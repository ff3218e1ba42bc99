"""Neighbour-vote interpolation (kNN-LM style, no training).

    p(i) = (1 - λ_q) · softmax(s / T)(i) + λ_q · p_kNN(i)

p_kNN spreads each neighbour's weight exp(sim / τ) over its next m visible items with a
decay per step (the j-th next item gets decay^j), and gives zero to the query's own items
(they are masked in the service anyway; zeroing them here keeps the vote's mass on items
that can be recommended). λ_q = λ, or with ``beta`` > 0 it follows the retrieval's
confidence: λ · sigmoid(beta · (top similarity - pivot)).

Shapes: Q queries, K neighbours, m next items, N items (column j = item id j + 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class VoteSettings:
    k: int = 100  # neighbours that vote
    m: int = 3  # next items per neighbour
    tau: float = 0.1  # similarity temperature of a neighbour's weight
    decay: float = 0.5  # weight of the j-th next item: decay^j
    T: float = 1.0  # temperature of the model's softmax
    lam: float = 0.2  # share of the vote
    beta: float = 0.0  # confidence slope (0: constant λ)
    pivot: float = 0.0  # top similarity where a confident λ is λ/2 (set from validation queries)

    def as_dict(self) -> dict:
        return asdict(self)


def vote_distribution(D: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor, n_items: int, *,
                      tau: float, decay: float, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, N) float32 p_kNN; rows with no visible vote are all zero.

    D: (Q, K) similarities (-inf for missing); items: (Q, K, m) visible item ids (0 = none);
    seen: (Q, N) bool items to zero (the query's own history).
    """
    D = torch.as_tensor(D, dtype=torch.float32)
    items = torch.as_tensor(items, dtype=torch.int64)
    Q, K, m = items.shape
    finite = torch.isfinite(D)
    top = torch.where(finite, D, torch.full_like(D, -1e9)).max(dim=1, keepdim=True).values
    w = torch.where(finite, torch.exp((D - top) / tau), torch.zeros_like(D))  # (Q, K) in (0, 1]
    steps = decay ** torch.arange(m, dtype=torch.float32)  # (m,)
    weights = (w[:, :, None] * steps[None, None, :]).reshape(Q, K * m)
    out = torch.zeros(Q, n_items + 1)
    out.scatter_add_(1, items.reshape(Q, K * m), weights * (items.reshape(Q, K * m) > 0))
    out = out[:, 1:]
    if seen is not None:
        out = out.masked_fill(seen, 0.0)
    total = out.sum(dim=1, keepdim=True)
    return torch.where(total > 0, out / total.clamp(min=1e-30), out)


def confidence_lambda(D: np.ndarray | torch.Tensor, s: VoteSettings) -> torch.Tensor:
    """(Q, 1) λ per query."""
    D = torch.as_tensor(D, dtype=torch.float32)
    if s.beta == 0:
        return torch.full((D.shape[0], 1), s.lam)
    top = torch.where(torch.isfinite(D), D, torch.full_like(D, -1.0)).max(dim=1, keepdim=True).values
    return s.lam * torch.sigmoid(s.beta * (top - s.pivot))


def interpolate(logits: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor | float, T: float) -> torch.Tensor:
    """(Q, N) mixed probabilities (ranking scores)."""
    return (1 - lam) * torch.softmax(logits.float() / T, dim=1) + lam * p_knn
