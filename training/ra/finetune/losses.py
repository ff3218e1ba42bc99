"""Losses of the retrieval-augmented stage: CE on h, weighted CE on the fused side, and a KL
term that teaches the retrieval attention which neighbours are useful.

Shapes: B examples, K neighbours, N items (item id j is score column j - 1, as in
``SequenceEncoder.scores``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.ra.finetune.fusion import masked_log_softmax

KL_DIRECTIONS = ("forward", "reverse", "js")


def _kl(p_log: torch.Tensor, q_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(p ‖ q) = Σ p (log p - log q) over the mask; entries with p = 0 add nothing."""
    p_log = p_log.masked_fill(~mask, 0.0)  # zeroed BEFORE arithmetic so no -inf - -inf NaN reaches backward
    q_log = q_log.masked_fill(~mask, 0.0)
    p = p_log.exp() * mask
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


def kl_divergence(
    p_log: torch.Tensor,
    q_log: torch.Tensor,
    direction: str = "forward",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between two distributions given as log-probabilities over the last axis.

    direction: "forward" = KL(p ‖ q), "reverse" = KL(q ‖ p), "js" = Jensen-Shannon (symmetric,
    at most ln 2). p_log, q_log: (..., K), each normalised over the mask. mask: bool (..., K),
    entries that count; default: where both are finite. Entries outside the mask are treated
    as zero-probability under both. Returns (...) — no reduction.
    """
    if p_log.shape != q_log.shape:
        raise ValueError(
            f"p_log and q_log must have the same shape, got {tuple(p_log.shape)} and {tuple(q_log.shape)}"
        )
    if mask is None:
        mask = torch.isfinite(p_log) & torch.isfinite(q_log)
    if direction == "forward":
        return _kl(p_log, q_log, mask)
    if direction == "reverse":
        return _kl(q_log, p_log, mask)
    if direction == "js":
        p_safe, q_safe = p_log.masked_fill(~mask, 0.0), q_log.masked_fill(~mask, 0.0)
        m_log = torch.logaddexp(p_safe, q_safe) - math.log(2.0)  # log((p + q) / 2)
        return 0.5 * _kl(p_safe, m_log, mask) + 0.5 * _kl(q_safe, m_log, mask)
    raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")


# ---------------------------------------------------------------- usefulness of each neighbour


def usefulness_from_scores(
    scores: torch.Tensor,
    neighbour_targets: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) the recommender's score for each neighbour's target. Softmax over neighbours of
    these equals softmax of its log-probabilities (the log-partition cancels).
    scores: (B, N); neighbour_targets: (B, K) item ids >= 1 (padding slots are clamped, mask them)."""
    return scores.gather(1, (neighbour_targets - 1).clamp(min=0))


def usefulness_from_match(
    scores: torch.Tensor | None,
    neighbour_targets: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) 1.0 where the neighbour's target is the true next item, else 0."""
    return (neighbour_targets == targets[:, None]).float()


def usefulness_from_similarity(
    scores: torch.Tensor | None,
    neighbour_targets: torch.Tensor,
    targets: torch.Tensor,
    item_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) cosine between each neighbour target's embedding and the true item's. item_emb: (N + 1, D)."""
    if item_emb is None:
        raise ValueError("usefulness 'similarity' needs the item embedding table")
    nb = F.normalize(item_emb[neighbour_targets.clamp(min=0)], dim=-1)  # (B, K, D)
    true = F.normalize(item_emb[targets], dim=-1)  # (B, D)
    return torch.einsum("bkd,bd->bk", nb, true)


USEFULNESS = {
    "score": usefulness_from_scores,
    "match": usefulness_from_match,
    "similarity": usefulness_from_similarity,
}


def usefulness_log_probs(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, K) log of the usefulness distribution: masked softmax(logits / τ), gradient stopped
    (it is a teacher for the retrieval attention, not something to be moved by it)."""
    return masked_log_softmax(logits.detach() / temperature, mask)


# ---------------------------------------------------------------- the RA objective


def retrieval_kl_loss(
    retrieval_log: torch.Tensor,
    usefulness_log: torch.Tensor,
    mask: torch.Tensor,
    direction: str = "forward",
) -> torch.Tensor:
    """Mean over examples with at least one used neighbour of the divergence between the
    usefulness distribution (p) and the retrieval distribution (q): "forward" = KL(use ‖ ret),
    "reverse" = KL(ret ‖ use), "js". 0 (with a graph) when no example has a neighbour."""
    per_example = kl_divergence(usefulness_log, retrieval_log, direction, mask)  # (B,)
    has = mask.any(dim=1)
    if not bool(has.any()):
        return retrieval_log.masked_fill(~mask, 0.0).sum() * 0.0
    return per_example[has].mean()


def ra_loss(
    scores_h: torch.Tensor,
    scores_fused: torch.Tensor,
    targets: torch.Tensor,
    *,
    retrieval_log: torch.Tensor,
    usefulness_log: torch.Tensor,
    mask: torch.Tensor,
    enhanced_weight: float,
    kl_weight: float,
    direction: str = "forward",
    gate_score: torch.Tensor | None = None,
    gate_threshold: float | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted terms of the RA objective; the total is their sum.

    "ce": CE on the base scores; "ce_fused": enhanced_weight · CE on the fused scores;
    "kl": kl_weight · retrieval KL. targets: (B,) item ids >= 1. With gate_score (B,) and a
    threshold (the gate_score-gated variant), examples with gate_score < threshold contribute 0 to
    "ce_fused" and "kl"; "ce_fused" stays averaged over the whole batch, so its scale shows
    how much of the batch retrieval served.
    """
    labels = targets - 1
    out = {"ce": F.cross_entropy(scores_h, labels)}
    ce_fused = F.cross_entropy(scores_fused, labels, reduction="none")  # (B,)
    if gate_threshold is not None:
        if gate_score is None:
            raise ValueError("gate_threshold is set but no gate_score was given")
        keep = gate_score >= gate_threshold  # (B,)
        ce_fused = ce_fused * keep
        mask = mask & keep[:, None]
    out["ce_fused"] = enhanced_weight * ce_fused.mean()
    out["kl"] = kl_weight * retrieval_kl_loss(retrieval_log, usefulness_log, mask, direction)
    return out
