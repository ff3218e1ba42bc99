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

import functools
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


def _numpy(x, dtype) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == dtype:  # the service's arrays: nothing to convert
        return x
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(dtype, copy=False)


def vote_weights(D: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor, *, tau: float, decay: float,
                 seen: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """(Q, K, m) float64 unnormalised votes: exp((sim - top sim) / τ) · decay^j for the j-th next
    item of each neighbour; 0 for missing neighbours (-inf), empty slots (item 0) and, with
    seen (Q, N) bool, the query's own items. The one computation behind the distribution and
    the service's per-neighbour contributions."""
    D = _numpy(D, np.float64)
    items = _numpy(items, np.int64)
    Q, K, m = items.shape
    finite = np.isfinite(D)
    if finite.all():  # the usual case: every neighbour found
        w = np.exp((D - D.max(axis=1, keepdims=True)) / tau) if K else D
    else:
        top = np.where(finite, D, -1e9).max(axis=1, keepdims=True)
        w = np.exp(np.where(finite, D - top, -np.inf) / tau)  # (Q, K) in (0, 1], 0 where missing
    raw = w[:, :, None] * _decays(decay, m)
    live = items > 0
    if seen is not None:
        seen = _numpy(seen, np.bool_)
        # an empty slot (item 0) reads column -1, a real one: it is not live either way
        live &= ~seen[np.arange(Q)[:, None, None], items - 1]
    return np.where(live, raw, 0.0)


@functools.lru_cache(maxsize=64)
def _decays(decay: float, m: int) -> np.ndarray:
    """(m,) float64 decay^j, read-only (shared between calls)."""
    out = decay ** np.arange(m, dtype=np.float64)
    out.flags.writeable = False
    return out


def _distribution(items: np.ndarray, raw: np.ndarray, n_items: int) -> np.ndarray:
    """(Q, N) float32 p_kNN from ``vote_weights``; all zero where nothing votes."""
    Q = items.shape[0]
    flat = (items.reshape(Q, -1) + (np.arange(Q, dtype=np.int64) * (n_items + 1))[:, None]).ravel()
    p = np.bincount(flat, raw.ravel(), minlength=Q * (n_items + 1)).reshape(Q, n_items + 1)[:, 1:]
    total = p.sum(axis=1, keepdims=True)
    return (p / np.where(total > 0, total, 1.0)).astype(np.float32)


def _lambda(D: np.ndarray, s: VoteSettings) -> np.ndarray:
    """(Q, 1) float32 λ per query."""
    if s.beta == 0:
        return np.full((D.shape[0], 1), s.lam, dtype=np.float32)
    top = np.where(np.isfinite(D), D, np.float32(-1.0)).max(axis=1, keepdims=True)
    return (s.lam / (1 + np.exp(-s.beta * (top - s.pivot)))).astype(np.float32)


def _scaled_softmax(logits: np.ndarray, T: float, keep: np.ndarray | np.float32,
                    out: np.ndarray | None) -> np.ndarray:
    """keep · softmax(logits / T) row-wise as float32, into ``out`` when given (it may be logits)."""
    x = np.subtract(logits, logits.max(axis=-1, keepdims=True), out=out)
    if T != 1:
        x *= np.float32(1 / T)
    np.exp(x, out=x)
    x *= keep / x.sum(axis=-1, keepdims=True)
    return x


def vote_distribution(D: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor, n_items: int, *,
                      tau: float, decay: float, seen: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """(Q, N) float32 p_kNN; rows with no visible vote are all zero.

    D: (Q, K) similarities (-inf for missing); items: (Q, K, m) visible item ids (0 = none);
    seen: (Q, N) bool items to zero (the query's own history).
    """
    items = _numpy(items, np.int64)
    return torch.from_numpy(_distribution(items, vote_weights(D, items, tau=tau, decay=decay, seen=seen), n_items))


def confidence_lambda(D: np.ndarray | torch.Tensor, s: VoteSettings) -> torch.Tensor:
    """(Q, 1) float32 λ per query."""
    return torch.from_numpy(_lambda(_numpy(D, np.float32), s))


def interpolate(logits: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor | float, T: float) -> torch.Tensor:
    """(Q, N) float32 mixed probabilities (ranking scores). numpy inside: for one request
    torch's per-operation overhead costs more than the arithmetic."""
    lam = _numpy(lam, np.float32) if isinstance(lam, torch.Tensor | np.ndarray) else np.float32(lam)
    x = _scaled_softmax(_numpy(logits, np.float32), T, 1 - lam, None)
    x += lam * _numpy(p_knn, np.float32)
    return torch.from_numpy(x)


@dataclass
class Voted:
    """numpy throughout: a served request would pay more for wrapping them as tensors than for
    most of the arithmetic."""

    scores: np.ndarray  # (Q, N) float32 ranking scores with the vote (``out`` when given)
    lam: np.ndarray  # (Q, 1) float32 the vote's share; 0 where no neighbour gives a visible item
    raw: np.ndarray  # (Q, k, m) ``vote_weights``: each neighbour's unnormalised vote per next item


def vote(logits: torch.Tensor | np.ndarray, D: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor,
         s: VoteSettings, *, seen: np.ndarray | torch.Tensor | None = None, out: np.ndarray | None = None) -> Voted:
    """The neighbour vote for queries with base logits (Q, N), their neighbours' similarities D
    (Q, >= k) and visible next items (Q, >= k, >= m): the one computation the stage tunes
    (``training.ra.stage.vote_scores``) and the service serves (``RetrievalBundle.score``).
    out: a C-contiguous (Q, N) float32 array to write the scores into (it may be the logits'
    own memory). One query takes ``_vote_one``: the same arithmetic on its row in fewer numpy
    calls (a served request pays per call, not per item)."""
    D = _numpy(D, np.float32)[:, : s.k]
    items = _numpy(items, np.int64)[:, : s.k, : s.m]
    logits = _numpy(logits, np.float32)
    if logits.shape[0] == 1:
        return _vote_one(logits, D, items, s, seen, out)
    raw = vote_weights(D, items, tau=s.tau, decay=s.decay, seen=seen)
    total = raw.sum(axis=(1, 2))[:, None]  # (Q, 1)
    lam = _lambda(D, s) * (total > 0)  # no visible vote: λ = 0
    x = _scaled_softmax(logits, s.T, 1 - lam, out)
    Q, n_items = x.shape
    share = raw * (lam / np.where(total > 0, total, 1.0))[:, :, None]  # λ·p_kNN per neighbour and step
    flat = (items.reshape(Q, -1) + (np.arange(Q, dtype=np.int64) * (n_items + 1))[:, None]).ravel()
    x += np.bincount(flat, share.ravel(), minlength=Q * (n_items + 1)).reshape(Q, n_items + 1)[:, 1:]
    return Voted(x, lam, raw)


def _vote_one(logits: np.ndarray, D: np.ndarray, items: np.ndarray, s: VoteSettings,
              seen: np.ndarray | torch.Tensor | None, out: np.ndarray | None) -> Voted:
    """``vote`` for one query (every array with a leading axis of 1): the same weights and,
    operation for operation, the batched mix on its row, so that both give the same floats;
    without the batch's per-row offsets and normalisation passes."""
    raw = vote_weights(D, items, tau=s.tau, decay=s.decay, seen=seen)  # (1, K, m)
    total = raw.sum()
    lam = _lambda(D, s) if total > 0 else np.zeros((1, 1), dtype=np.float32)
    x = _scaled_softmax(logits, s.T, 1 - lam, out)
    if total > 0:
        p = np.bincount(items.ravel(), (raw * (lam[0, 0] / total)).ravel(), minlength=x.shape[1] + 1)
        x[0] += p[1:]
    return Voted(x, lam, raw)
