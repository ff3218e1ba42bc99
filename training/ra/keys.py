"""A retriever trained for the task, on the frozen base: a key projection learned so that a
query finds bank entries whose next items contain the query's next item.

    key(h) = normalize(x + W₂ gelu(W₁ x)),  x = h - center,  W₂ = 0 at the start

Positives of a training query (user u, target y): entries of OTHER users whose next m items
(within the validation bank's limits) contain y. Loss: InfoNCE with in-batch negatives,
where another query's positive that also leads to y is not a negative. The teacher is the
data, not the model's own scores, so keys cannot collapse onto what the model already ranks.

Gate before fusing anything on top: neighbour recall@20 on validation (share of users whose
target is the next item of one of their 20 neighbours) must clearly beat the base keys'.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class KeyProjection(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden or 2 * dim)
        self.down = nn.Linear(hidden or 2 * dim, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def positives_index(next_items: np.ndarray, m: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets (n_items + 2,), entries) of the bank entries whose first m next items hold each item id."""
    items = next_items[:, :m]
    entry = np.repeat(np.arange(len(items)), m)
    flat = items.reshape(-1)
    keep = flat > 0
    flat, entry = flat[keep], entry[keep]
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=n_items + 1)
    offsets = np.zeros(n_items + 2, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, entry[order]


def neighbour_recall(bank_targets: np.ndarray, I: np.ndarray, targets: np.ndarray, k: int = 20) -> float:
    """Share of queries whose target is the next item of one of their first k neighbours."""
    nb = np.where(I[:, :k] >= 0, bank_targets[np.maximum(I[:, :k], 0)], -1)
    return float((nb == targets[:, None]).any(axis=1).mean())


def fit_keys(h_queries: torch.Tensor, q_users: np.ndarray, q_targets: np.ndarray, bank_h: torch.Tensor,
             bank_users: np.ndarray, bank_next: np.ndarray, center: torch.Tensor, n_items: int, *,
             m: int = 3, epochs: int = 3, tau: float = 0.05, lr: float = 1e-3, batch_size: int = 1024,
             seed: int = 0, on_epoch=None) -> tuple[KeyProjection, list[dict]]:
    """Train a KeyProjection; ``on_epoch(proj) -> dict`` may add validation figures per epoch."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    proj = KeyProjection(bank_h.shape[1])
    opt = torch.optim.AdamW(proj.parameters(), lr=lr)
    offsets, entries = positives_index(bank_next, m, n_items)
    has = offsets[q_targets + 1] > offsets[q_targets]
    pool = np.flatnonzero(has)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        proj.train()
        order = rng.permutation(pool)
        total, steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            y = q_targets[rows]
            lo, hi = offsets[y], offsets[y + 1]
            pos = entries[lo + (rng.random(len(rows)) * (hi - lo)).astype(np.int64)]
            own = bank_users[pos] == q_users[rows]  # redraw once; still own: dropped
            if own.any():
                j = np.flatnonzero(own)
                pos[j] = entries[lo[j] + (rng.random(len(j)) * (hi[j] - lo[j])).astype(np.int64)]
                keep = bank_users[pos] != q_users[rows]
                rows, y, pos = rows[keep], y[keep], pos[keep]
            q = F.normalize(proj(h_queries[torch.from_numpy(rows)] - center), dim=-1)
            k = F.normalize(proj(bank_h[torch.from_numpy(pos)] - center), dim=-1)
            logits = q @ k.T / tau  # (B, B)
            shares = torch.from_numpy((bank_next[pos, :m][None, :, :] == y[:, None, None]).any(axis=2))
            shares.fill_diagonal_(False)  # another query's positive that also leads to y: not a negative
            loss = F.cross_entropy(logits.masked_fill(shares, float("-inf")), torch.arange(len(rows)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        rec = {"epoch": epoch + 1, "loss": total / max(steps, 1), "seconds": time.perf_counter() - t0}
        if on_epoch is not None:
            proj.eval()
            rec.update(on_epoch(proj))
        log.info("key projection epoch %d: %s", epoch + 1, rec)
        history.append(rec)
    return proj.eval(), history
