"""Retrieval attention and fusion for the retrieval-augmented (RA) stage.

Read top to bottom: neighbour batch, masked softmax, retrieval attention (similarity-
weighted and cross-attention), fusion statistics, the five fusions, registries.

Shapes: B examples, K neighbours, D hidden size, N items. ``h`` is the encoder's
representation of the query prefix; ``r`` the knowledge vector built from its
neighbours. Every fusion returns exactly ``h`` (bit for bit) for an example whose
alpha/gate is 0 or that has no usable neighbour, so the RA model reduces to the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Neighbours:
    """The top-K search results for a batch of queries, already looked up as tensors."""

    sim: torch.Tensor  # (B, K) cosine similarity of query to neighbour key
    target_emb: torch.Tensor  # (B, K, D) embedding of each neighbour's target item
    seq_repr: torch.Tensor | None = None  # (B, K, D) neighbour's prefix representation, if banked
    keys: torch.Tensor | None = None  # (B, K, Dk) neighbour keys, for cross-attention
    usefulness: torch.Tensor | None = None  # (B, K) each neighbour's entry usefulness
    valid: torch.Tensor | None = None  # (B, K) bool; False for padding (search returned < K hits)

    def mask(self, usefulness_threshold: float | None) -> torch.Tensor:
        """(B, K) bool: neighbours that take part (valid and, if a threshold is set, good enough)."""
        mask = torch.ones_like(self.sim, dtype=torch.bool) if self.valid is None else self.valid.bool()
        if usefulness_threshold is not None:
            if self.usefulness is None:
                raise ValueError("usefulness_threshold is set but the neighbours carry no usefulness")
            mask = mask & (self.usefulness >= usefulness_threshold)
        return mask


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log softmax over the entries where mask is True; -inf elsewhere.

    A row with no True entry comes back all -inf (its probabilities are all 0), never NaN,
    and passes no NaN gradient back.
    """
    any_valid = mask.any(dim=dim, keepdim=True)
    safe = logits.masked_fill(~mask, float("-inf")).masked_fill(~any_valid, 0.0)
    return torch.log_softmax(safe, dim=dim).masked_fill(~mask, float("-inf"))


@dataclass
class Retrieved:
    """What the retrieval step hands to the fusion and to the KL loss."""

    r: torch.Tensor  # (B, D) knowledge vector; zeros where has_neighbours is False
    log_weights: torch.Tensor  # (B, K) log attention weights; -inf on masked neighbours
    mask: torch.Tensor  # (B, K) bool, neighbours used
    sim: torch.Tensor  # (B, K) similarities (for adaptive alpha and the loss gate)
    temperature: torch.Tensor  # (B,) temperature each example's attention used

    @property
    def has_neighbours(self) -> torch.Tensor:
        return self.mask.any(dim=1)  # (B,)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()  # (B, K), rows of examples without neighbours are 0

    def mean_sim(self) -> torch.Tensor:
        """(B,) mean similarity over used neighbours; 0 where there are none."""
        n = self.mask.sum(dim=1).clamp(min=1)
        return (self.sim * self.mask).sum(dim=1) / n

    def max_sim(self) -> torch.Tensor:
        """(B,) best similarity over used neighbours; -inf where there are none."""
        return self.sim.masked_fill(~self.mask, float("-inf")).amax(dim=1)


def entropy_temperature(sim: torch.Tensor, mask: torch.Tensor, t0: float, gain: float) -> torch.Tensor:
    """Per-example temperature t0 · (1 + gain · H), H the normalised entropy in [0, 1].

    H is the entropy of softmax(sim / t0) over the used neighbours divided by log(n_used):
    a query whose neighbours are about equally similar is uncertain, and a higher
    temperature lets it attend more evenly instead of trusting a noisy winner. No gradient.
    """
    with torch.no_grad():
        log_p = masked_log_softmax(sim / t0, mask)
        p = log_p.exp()
        entropy = -(p * log_p.masked_fill(~mask, 0.0)).sum(dim=1)
        n = mask.sum(dim=1).to(sim.dtype)
        h_norm = torch.where(n > 1, entropy / n.clamp(min=2).log(), torch.zeros_like(entropy))
        return t0 * (1.0 + gain * h_norm.clamp(0.0, 1.0))


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, K), (B, K, D) -> (B, D). Masked values are zeroed first: padded slots may hold NaN/garbage.
    return torch.einsum("bk,bkd->bd", weights, values.masked_fill(~mask[..., None], 0.0))


VALUE_SOURCES = ("target", "sequence", "both")


class SimilarityAttention(nn.Module):
    """Weights softmax(sim / τ) over the K neighbours; r = weighted sum of their values.

    values: "target" (neighbours' target embeddings), "sequence" (their prefix
    representations) or "both" (the mean of the two). No learned parameters.
    entropy_gain > 0 turns on the per-example temperature of ``entropy_temperature``.
    ``temperature`` is a plain attribute so a schedule can anneal it between epochs.
    """

    def __init__(
        self,
        dim: int | None = None,  # unused; every retrieval module takes it so build_attention is uniform
        temperature: float = 0.1,
        values: str = "target",
        usefulness_threshold: float | None = None,
        entropy_gain: float = 0.0,
    ) -> None:
        super().__init__()
        if values not in VALUE_SOURCES:
            raise ValueError(f"values must be one of {VALUE_SOURCES}, got {values!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.values = values
        self.usefulness_threshold = usefulness_threshold
        self.entropy_gain = entropy_gain

    def forward(self, h: torch.Tensor, nb: Neighbours) -> Retrieved:
        del h  # the query already spoke through the similarities
        mask = nb.mask(self.usefulness_threshold)
        if self.entropy_gain > 0:
            temp = entropy_temperature(nb.sim, mask, self.temperature, self.entropy_gain)  # (B,)
        else:
            temp = torch.full_like(nb.sim[:, 0], self.temperature)
        log_w = masked_log_softmax(nb.sim / temp[:, None], mask)  # (B, K)
        w = log_w.exp()
        if self.values != "target" and nb.seq_repr is None:
            raise ValueError(f"values={self.values!r} needs neighbour sequence representations (seq_repr)")
        if self.values == "target":
            r = _weighted_sum(w, nb.target_emb, mask)
        elif self.values == "sequence":
            r = _weighted_sum(w, nb.seq_repr, mask)
        else:
            r = 0.5 * (_weighted_sum(w, nb.target_emb, mask) + _weighted_sum(w, nb.seq_repr, mask))
        return Retrieved(r=r, log_weights=log_w, mask=mask, sim=nb.sim, temperature=temp)


class CrossAttention(nn.Module):
    """Learned cross-attention: query = W_q h, keys = W_k (neighbour keys), values = targets.

    Single head, scaled dot product divided by ``temperature``; masked neighbours get no
    weight and an example without any gets r = 0.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int | None = None,
        temperature: float = 1.0,
        usefulness_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(key_dim or dim, dim)
        self.temperature = temperature
        self.usefulness_threshold = usefulness_threshold
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, nb: Neighbours) -> Retrieved:
        if nb.keys is None:
            raise ValueError("cross-attention retrieval needs neighbour keys (Neighbours.keys)")
        mask = nb.mask(self.usefulness_threshold)
        q = self.query(h)  # (B, D)
        k = self.key(nb.keys)  # (B, K, D)
        logits = torch.einsum("bd,bkd->bk", q, k) / (math.sqrt(q.shape[-1]) * self.temperature)
        log_w = masked_log_softmax(logits, mask)
        r = _weighted_sum(log_w.exp(), nb.target_emb, mask)
        temp = torch.full_like(nb.sim[:, 0], self.temperature)
        return Retrieved(r=r, log_weights=log_w, mask=mask, sim=nb.sim, temperature=temp)


# ---------------------------------------------------------------- fusion


@dataclass
class FusionOutput:
    fused: torch.Tensor  # (B, D) representation, or (B, N) scores for the "entropy" fusion
    alpha: torch.Tensor  # (B, 1) or (B, D): weight on the retrieval side; 0 without neighbours
    stats: dict[str, torch.Tensor]  # detached 0-d tensors; call .item() only when logging


def fusion_stats(
    a: torch.Tensor, b: torch.Tensor, fused: torch.Tensor, alpha: torch.Tensor, has: torch.Tensor
) -> dict[str, torch.Tensor]:
    """alpha mean, alpha std ACROSS examples (of each example's mean alpha), the mean
    per-example std over dimensions (0 for a scalar alpha), ‖a‖/‖b‖ over examples with
    neighbours (NaN if none), cosine(a, fused) and the fraction of examples retrieving."""
    with torch.no_grad():
        per_example = alpha.mean(dim=1)  # (B,)
        ratio = a.norm(dim=1) / b.norm(dim=1).clamp(min=1e-12)
        return {
            "alpha_mean": per_example.mean(),
            "alpha_std": per_example.std(unbiased=False),
            "alpha_dim_std": alpha.std(dim=1, unbiased=False).mean()
            if alpha.shape[1] > 1
            else alpha.new_zeros(()),
            "norm_ratio": ratio[has].mean() if bool(has.any()) else ratio.new_tensor(float("nan")),
            "cos_fused": F.cosine_similarity(a, fused, dim=1).mean(),
            "retrieval_rate": has.float().mean(),
        }


def _mix(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, has: torch.Tensor) -> FusionOutput:
    """(1 - α) a + α b, with α forced to 0 (and the output to a exactly) where has is False."""
    alpha = torch.where(has[:, None], alpha, torch.zeros_like(alpha))
    mixed = (1.0 - alpha) * a + alpha * b
    fused = torch.where(has[:, None], mixed, a)  # exact a even if b holds NaN there
    return FusionOutput(fused, alpha, fusion_stats(a, b, fused, alpha, has))


class FixedFusion(nn.Module):
    """fused = (1 - α) h + α r with a constant α (= alpha_max, so warm-up can drive it)."""

    output = "representation"

    def __init__(self, dim: int | None = None, alpha_max: float = 0.3) -> None:
        super().__init__()
        self.alpha_max = alpha_max

    def forward(self, h: torch.Tensor, r: torch.Tensor, ret: Retrieved) -> FusionOutput:
        alpha = torch.full_like(h[:, :1], self.alpha_max)
        return _mix(h, r, alpha, ret.has_neighbours)


class AdaptiveFusion(nn.Module):
    """α = sigmoid(mean similarity / t) · alpha_max: trust retrieval more when neighbours are close."""

    output = "representation"

    def __init__(self, dim: int | None = None, alpha_max: float = 0.5, temperature: float = 0.1) -> None:
        super().__init__()
        self.alpha_max = alpha_max
        self.temperature = temperature

    def forward(self, h: torch.Tensor, r: torch.Tensor, ret: Retrieved) -> FusionOutput:
        alpha = torch.sigmoid(ret.mean_sim() / self.temperature)[:, None] * self.alpha_max  # (B, 1)
        return _mix(h, r, alpha, ret.has_neighbours)


class GatedFusion(nn.Module):
    """Per-dimension gate g = sigmoid(W [LN(h); LN(r)] / temperature) · alpha_max.

    h and r are normalised separately before the gate: their scales differ (r is a mix of
    item embeddings, h a post-LN hidden state) and the larger would otherwise decide the gate.
    """

    output = "representation"

    def __init__(
        self, dim: int, alpha_max: float = 1.0, temperature: float = 1.0, init_bias: float = 0.0
    ) -> None:
        super().__init__()
        self.norm_h = nn.LayerNorm(dim)
        self.norm_r = nn.LayerNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.constant_(self.gate.bias, init_bias)
        self.alpha_max = alpha_max
        self.temperature = temperature

    def forward(self, h: torch.Tensor, r: torch.Tensor, ret: Retrieved) -> FusionOutput:
        x = torch.cat([self.norm_h(h), self.norm_r(r)], dim=-1)  # (B, 2D)
        gate = torch.sigmoid(self.gate(x) / self.temperature) * self.alpha_max  # (B, D)
        return _mix(h, r, gate, ret.has_neighbours)


class AttentionFusion(nn.Module):
    """A learned query attends over the two candidates (h, r); α = weight on r · alpha_max."""

    output = "representation"

    def __init__(self, dim: int, alpha_max: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # same reason as GatedFusion: compare directions, not scales
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        nn.init.normal_(self.key.weight, std=0.02)
        nn.init.zeros_(self.key.bias)
        self.alpha_max = alpha_max
        self.temperature = temperature

    def forward(self, h: torch.Tensor, r: torch.Tensor, ret: Retrieved) -> FusionOutput:
        keys = self.key(self.norm(torch.stack([h, r], dim=1)))  # (B, 2, D)
        logits = keys @ self.query / (math.sqrt(h.shape[-1]) * self.temperature)  # (B, 2)
        alpha = torch.softmax(logits, dim=1)[:, 1:] * self.alpha_max  # (B, 1)
        return _mix(h, r, alpha, ret.has_neighbours)


def score_entropy(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) logits -> (B,) entropy of softmax(scores), in nats."""
    log_p = torch.log_softmax(scores, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class EntropyFusion(nn.Module):
    """Fuses SCORES: s = (1 - α) s_h + α s_r, α = alpha_max · softmax(-[H_h, H_r] / τ)[r].

    The more confident (lower-entropy) distribution gets more weight. α carries no gradient:
    otherwise the loss could fall just by sharpening whichever side is weighted. Takes
    ``scores_h = model.scores(h)`` and ``scores_r = model.scores(r)``; returns fused scores.
    """

    output = "scores"

    def __init__(self, dim: int | None = None, alpha_max: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.alpha_max = alpha_max
        self.temperature = temperature

    def forward(self, scores_h: torch.Tensor, scores_r: torch.Tensor, ret: Retrieved) -> FusionOutput:
        with torch.no_grad():
            neg_entropy = -torch.stack([score_entropy(scores_h), score_entropy(scores_r)], dim=1)  # (B, 2)
            alpha = torch.softmax(neg_entropy / self.temperature, dim=1)[:, 1:] * self.alpha_max  # (B, 1)
        return _mix(scores_h, scores_r, alpha, ret.has_neighbours)


FUSIONS: dict[str, type[nn.Module]] = {
    "fixed": FixedFusion,
    "adaptive": AdaptiveFusion,
    "gated": GatedFusion,
    "attention": AttentionFusion,
    "entropy": EntropyFusion,
}

ATTENTIONS: dict[str, type[nn.Module]] = {
    "similarity": SimilarityAttention,
    "cross_attention": CrossAttention,
}


def build_fusion(name: str, dim: int, **kwargs: object) -> nn.Module:
    if name not in FUSIONS:
        raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {name!r}")
    return FUSIONS[name](dim=dim, **kwargs)


def build_attention(name: str, dim: int, **kwargs: object) -> nn.Module:
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {name!r}")
    return ATTENTIONS[name](dim=dim, **kwargs)
