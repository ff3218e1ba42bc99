"""A learned reader of neighbours on a frozen base (RaSeRec-style), and the fusions that mix
its output with the base representation h.

    r = Reader(h; neighbour keys, neighbour target embeddings)   # cross-attention layers
    z = fusion(h, r)                                              # fixed / adaptive / gated / attention
    scores = z · Eᵀ (+ vote_weight · log p_kNN, optional score channel)

Everything of the base (encoder, item embeddings E) stays frozen; the bank's keys and
values are snapshots of the base in eval mode, so an epoch never runs the encoder (except
the ``multi_layer`` variant, which re-enters the frozen blocks through adapters).

Shapes: B queries, K neighbours, D hidden size, N items.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training.model import SequenceEncoder


class CrossAttentionLayer(nn.Module):
    """x <- LN(x + Wo·attn(Wq x, Wk keys, Wv values)); x <- LN(x + FFN(x)): (B, D) -> (B, D).

    The attention logits get a learned multiple of the neighbour's similarity, so the layer
    starts from "closer neighbours count more" instead of from nothing.
    """

    def __init__(self, dim: int, n_heads: int, inner: int, dropout: float, *, adapter: bool = False) -> None:
        super().__init__()
        self.adapter = adapter  # residual without LayerNorm, zero-initialised outputs: starts as identity
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.sim_scale = nn.Parameter(torch.tensor(5.0))
        self.ffn = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.last_weights: torch.Tensor | None = None  # (B, K) head-averaged attention, for KL and explain
        if adapter:
            nn.init.zeros_(self.o.weight)
            nn.init.zeros_(self.o.bias)
            nn.init.zeros_(self.ffn[2].weight)
            nn.init.zeros_(self.ffn[2].bias)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sim: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        B, K, D = keys.shape
        H, d = self.n_heads, D // self.n_heads
        q = self.q(x).view(B, H, 1, d)
        k = self.k(keys).view(B, K, H, d).transpose(1, 2)  # (B, H, K, d)
        v = self.v(values).view(B, K, H, d).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d)  # (B, H, K)
        logits = logits + self.sim_scale * sim[:, None, :]
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        att = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without neighbours: all 0
        self.last_weights = att.mean(dim=1)
        a = (att.unsqueeze(2) @ v).reshape(B, D)  # (B, D)
        if self.adapter:
            x = x + self.drop(self.o(a))
            return x + self.drop(self.ffn(x))
        x = self.norm1(x + self.drop(self.o(a)))
        return self.norm2(x + self.drop(self.ffn(x)))


class Reader(nn.Module):
    """Stacked cross-attention over neighbours: query = h, keys = the neighbours' prefix
    representations, values = their next item's embedding."""

    def __init__(self, dim: int, *, n_layers: int = 2, n_heads: int = 2, inner: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, n_heads, inner or 4 * dim, dropout)
                                    for _ in range(n_layers))

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sim: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x = h
        for layer in self.layers:
            x = layer(x, keys, values, sim, mask)
        return x

    @property
    def weights(self) -> torch.Tensor | None:
        return self.layers[-1].last_weights


# ------------------------------------------------------------------ fusions of h and r


class FixedFusion(nn.Module):
    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, h, r, sim, mask):
        a = torch.full((h.shape[0], 1), self.alpha, device=h.device) * mask.any(dim=1, keepdim=True)
        return (1 - a) * h + a * r, a


class AdaptiveFusion(nn.Module):
    """alpha = alpha_max · sigmoid(w · mean similarity + b): more retrieval when neighbours are close."""

    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.alpha_max = 2 * alpha  # starts at alpha when the similarity term is 0
        self.w = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, h, r, sim, mask):
        n = mask.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (sim * mask).sum(dim=1, keepdim=True) / n
        a = self.alpha_max * torch.sigmoid(self.w * mean + self.b) * mask.any(dim=1, keepdim=True)
        return (1 - a) * h + a * r, a


class GatedFusion(nn.Module):
    """Per-dimension gate on LayerNorm'd inputs (inputs of different scale otherwise drown one)."""

    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.norm_h = nn.LayerNorm(dim)
        self.norm_r = nn.LayerNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(alpha / (1 - alpha)))  # starts at alpha

    def forward(self, h, r, sim, mask):
        a = torch.sigmoid(self.gate(torch.cat([self.norm_h(h), self.norm_r(r)], dim=-1)))
        a = a * mask.any(dim=1, keepdim=True)
        return (1 - a) * h + a * r, a


class AttentionFusion(nn.Module):
    """A learned query scores the two candidates {h, r}; z = their softmax-weighted sum."""

    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, h, r, sim, mask):
        c = torch.stack([h, r], dim=1)  # (B, 2, D)
        w = torch.softmax(torch.tanh(self.proj(c)) @ self.query, dim=1)  # (B, 2)
        a = w[:, 1:] * mask.any(dim=1, keepdim=True)
        return (1 - a) * h + a * r, a


FUSIONS: dict[str, Callable[[int, float], nn.Module]] = {
    "fixed": FixedFusion, "adaptive": AdaptiveFusion, "gated": GatedFusion, "attention": AttentionFusion,
}


class CopyGate(nn.Module):
    """g = sigmoid(w · [top similarity, mean similarity, attention entropy] + b): how much of
    the output distribution copies the neighbours' next items (a learned vote)."""

    def __init__(self, start: float = 0.1) -> None:
        super().__init__()
        self.w = nn.Linear(3, 1)
        nn.init.zeros_(self.w.weight)
        nn.init.constant_(self.w.bias, math.log(start / (1 - start)))

    def forward(self, sim: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum(dim=1, keepdim=True).clamp(min=1)
        top = sim.masked_fill(~mask, -1.0).max(dim=1, keepdim=True).values
        mean = (sim * mask).sum(dim=1, keepdim=True) / n
        ent = -(weights * weights.clamp(min=1e-9).log()).sum(dim=1, keepdim=True) / n.float().log().clamp(min=1)
        g = torch.sigmoid(self.w(torch.cat([top, mean, ent], dim=1)))
        return g * mask.any(dim=1, keepdim=True)


class RetrievalHead(nn.Module):
    """Reader + fusion (+ the vote channel, + the copy distribution) on a frozen encoder's h."""

    def __init__(self, dim: int, *, fusion: str = "fixed", alpha: float = 0.5, n_layers: int = 2,
                 n_heads: int = 2, dropout: float = 0.1, vote_channel: bool = False, copy_items: bool = False) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        self.reader = Reader(dim, n_layers=n_layers, n_heads=n_heads, dropout=dropout)
        self.fusion = FUSIONS[fusion](dim, alpha)
        self.vote_weight = nn.Parameter(torch.tensor(0.0)) if vote_channel else None
        self.copy_gate = CopyGate() if copy_items else None

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sim: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (B, D), alpha (B, 1) or (B, D))."""
        r = self.reader(h, keys, values, sim, mask)
        return self.fusion(h, r, sim, mask)

    def scores(self, z: torch.Tensor, item_emb: torch.Tensor, log_vote: torch.Tensor | None,
               neighbours: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, N): z · Eᵀ, plus the vote channel when there is one. item_emb: (N, D) real items.

        With the copy distribution, log((1 - g) softmax(z · Eᵀ) + g · p_copy), where p_copy
        spreads the reader's last attention over the neighbours' next items; neighbours =
        (targets (B, K) item ids, sim (B, K), mask (B, K)). Log-probabilities are valid logits.
        """
        s = z @ item_emb.T
        if self.vote_weight is not None and log_vote is not None:
            s = s + self.vote_weight * log_vote
        if self.copy_gate is not None and neighbours is not None:
            targets, sim, mask = neighbours
            w = self.reader.weights * mask  # (B, K)
            p_copy = torch.zeros(s.shape[0], s.shape[1] + 1, dtype=s.dtype).scatter_add(1, targets, w)[:, 1:]
            g = self.copy_gate(sim, w, mask)  # (B, 1)
            s = torch.log((1 - g) * torch.softmax(s, dim=1) + g * p_copy + 1e-12)
        return s


def kl_term(attn: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            direction: str) -> torch.Tensor:
    """Divergence between the reader's attention over the K neighbours and the base model's
    distribution over the same neighbours' targets (renormalised over K); averaged over
    queries with neighbours. attn: (B, K); base_logits: (B, N); targets: (B, K) item ids."""
    t = base_logits.detach().gather(1, (targets.clamp(min=1) - 1)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(t, dim=1).nan_to_num(0.0)
    q = attn.clamp(min=1e-9)
    pp = p.clamp(min=1e-9)
    rows = mask.any(dim=1)

    def kl(a, b):
        return (a * (a.log() - b.log()) * mask).sum(dim=1)

    if direction == "forward":
        d = kl(pp, q)
    elif direction == "reverse":
        d = kl(q, pp)
    elif direction == "js":
        mid = 0.5 * (pp + q)
        d = 0.5 * kl(pp, mid) + 0.5 * kl(q, mid)
    else:
        raise ValueError(f"kl direction must be forward, reverse or js, got {direction!r}")
    return d[rows].mean() if bool(rows.any()) else d.sum() * 0


class LayerAdapters(nn.Module):
    """Multi-depth fusion: after every frozen encoder block, the last position's state reads
    the neighbours through its own cross-attention layer (residual, starting near identity),
    so later blocks cannot dilute what an earlier one fused. Base weights stay frozen."""

    def __init__(self, encoder: SequenceEncoder, *, n_heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        dim = encoder.cfg.dim
        self.adapters = nn.ModuleList(CrossAttentionLayer(dim, n_heads, 4 * dim, dropout, adapter=True)
                                      for _ in encoder.blocks)

    def forward(self, encoder: SequenceEncoder, seq: torch.Tensor, keys, values, sim, mask) -> torch.Tensor:
        """seq: (B, L) left-aligned prefixes -> (B, D) representations fused at every depth."""
        B = seq.shape[0]
        last = (seq > 0).sum(dim=1) - 1
        rows = torch.arange(B)
        with torch.no_grad():
            x = encoder.emb_norm(encoder._embed(seq))
        for i, (block, adapter) in enumerate(zip(encoder.blocks, self.adapters, strict=True)):
            if i < len(encoder.blocks) - 1:
                x = block(x)  # (B, L, D)
                fused = adapter(x[rows, last], keys, values, sim, mask)
                x = x.index_put((rows, last), fused)
            else:
                x = adapter(block(x, (rows, last)), keys, values, sim, mask)
        return x


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def ce_loss(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """CE over all items; with ``seen`` the query's own items leave the softmax (never the target)."""
    if seen is not None:
        seen = seen.clone()
        seen[torch.arange(len(targets)), targets - 1] = False
        scores = scores.masked_fill(seen, float("-inf"))
    return F.cross_entropy(scores, targets - 1)
