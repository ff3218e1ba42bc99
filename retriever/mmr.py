"""Maximal marginal relevance (MMR) re-ranking for diverse neighbour lists."""

from __future__ import annotations

import numpy as np

from retriever.errors import InvalidParameter

__all__ = ["mmr_select"]


def mmr_select(sims: np.ndarray, cand_vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Greedy MMR: pick k of C candidates per query, maximising
    ``lam * sim(q, c) - (1 - lam) * max_{s in picked} sim(c, s)``.

    sims: (Q, C) query-candidate similarities, -inf for missing candidates.
    cand_vectors: (Q, C, d) unit-norm candidate vectors.
    Returns (Q, k) column indices into the candidates in pick order, -1 once a
    query runs out of candidates. ``lam = 1`` keeps the similarity order.
    Loops over the k picks; every step is vectorised over the queries.
    """
    if not 0.0 <= lam <= 1.0:
        raise InvalidParameter(f"mmr_lambda must be in [0, 1], got {lam}")
    Q, C = sims.shape
    pair = np.matmul(cand_vectors, cand_vectors.transpose(0, 2, 1))  # (Q, C, C)
    available = np.isfinite(sims)
    redundancy = np.zeros((Q, C), dtype=np.float32)  # max similarity to anything picked so far
    picked = np.full((Q, k), -1, dtype=np.int64)
    rows = np.arange(Q)
    for step in range(min(k, C)):
        score = np.where(available, lam * sims - (1.0 - lam) * redundancy, -np.inf)
        best = np.argmax(score, axis=1)
        ok = available[rows, best]
        picked[:, step] = np.where(ok, best, -1)
        available[rows, best] = False
        pick_sims = pair[rows, best]  # (Q, C)
        redundancy = np.where(ok[:, None], np.maximum(redundancy, pick_sims) if step else pick_sims, redundancy)
    return picked
