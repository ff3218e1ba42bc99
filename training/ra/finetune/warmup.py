"""Contrastive warm-up of the query_encoder encoder, run once before retrieval-augmented fine-tuning.

A training prefix's positive is another training prefix with the same next item
(``same_target_partners``); the rest of the batch are negatives, except examples sharing the
anchor's target (false negatives, masked out). InfoNCE over the query_encoder's unit vectors.

The encoder stays frozen: the trainer encodes every training prefix once (eval mode, the
same h the bank is built from) and the warm-up trains the query_encoder's small MLP on those
rows, so an epoch costs a few thousand (B, D) matrix products. Examples whose target no
other example shares have no positive and sit the warm-up out.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data.batches import same_target_partners

log = logging.getLogger(__name__)


def query_contrastive_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor,
                               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of anchors q (B, D) against positives p (B, D), both unit vectors; row i's
    positive is p[i], other rows with the same target (B,) are not negatives.
    Returns (mean loss, (B,) bool: the positive scored highest)."""
    logits = q @ p.T / tau  # (B, B)
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill((targets[:, None] == targets[None, :]) & ~eye, float("-inf"))
    labels = torch.arange(len(q), device=q.device)
    return F.cross_entropy(logits, labels), logits.argmax(dim=1) == labels


def warm_up_query_encoder(
    query_encoder: nn.Module,
    h: torch.Tensor,
    targets: np.ndarray,
    *,
    epochs: int,
    tau: float,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> list[dict[str, float]]:
    """Train ``query_encoder`` (h -> unit key) for ``epochs`` passes; return per-epoch
    {"loss", "top1", "pairs", "seconds"}. h: (M, D) frozen representations; targets: (M,)."""
    if batch_size < 2:
        raise ValueError(f"the warm-up needs batches of at least 2 examples, got {batch_size}")
    targets = np.asarray(targets)
    target_t = torch.from_numpy(targets).to(h.device)
    optimizer = torch.optim.Adam([p for p in query_encoder.parameters() if p.requires_grad], lr=lr)
    query_encoder.train()
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        partners = same_target_partners(targets, rng)
        anchors = rng.permutation(np.flatnonzero(partners != np.arange(len(targets))))
        loss_sum, hits, seen = 0.0, 0, 0
        for lo in range(0, len(anchors) - 1, batch_size):
            a = anchors[lo : lo + batch_size]
            if len(a) < 2:
                break
            a_t = torch.from_numpy(a).to(h.device)
            p_t = torch.from_numpy(partners[a]).to(h.device)
            loss, top1 = query_contrastive_loss(query_encoder(h[a_t]), query_encoder(h[p_t]), target_t[a_t], tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(a)
            hits += int(top1.sum())
            seen += len(a)
        stats = {"loss": loss_sum / max(seen, 1), "top1": hits / max(seen, 1), "pairs": seen,
                 "seconds": time.perf_counter() - start}
        history.append(stats)
        log.info("query_encoder warm-up %d/%d: InfoNCE %.4f, positive ranked first %.3f over %d pairs",
                 epoch + 1, epochs, stats["loss"], stats["top1"], seen)
    return history
