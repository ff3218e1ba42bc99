"""The retrieval-augmented (RA) model: a pretrained ``SequenceEncoder`` plus a retriever
encoder, retrieval attention over memory-bank neighbours and a fusion of ``h`` with them.

Read top to bottom: retriever encoder, the bank as the model sees it, the model, and
``search_neighbours`` (bank search -> ``Neighbours`` tensors).

Shapes: B queries, K neighbours, D hidden size, N items. Submodule names (``encoder``,
``retriever``, ``fusion``) are the names progressive-unfreezing phases use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retriever import MemoryBank, SearchResult
from training.model import SequenceEncoder
from training.ra.finetune.fusion import FusionOutput, Neighbours, Retrieved, build_fusion, build_retrieval


class RetrieverEncoder(nn.Module):
    """Query/key vectors q = normalize(h - c + W₂ gelu(W₁ h)), unit length: (B, D) -> (B, D).

    c (``center``, a buffer) is the mean h of the bank's examples, set at each rebuild: the
    post-LN representations share one large direction (mean pairwise cosine ~0.99 after
    pretraining), so uncentred every neighbour looks alike and the retrieval softmax is flat;
    centred, cosines spread (~0.1 ± 0.3). W₂ starts at zero, so stage 2 begins by searching
    with the pretrained encoder's own (centred) geometry and learns to move away from it.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.register_buffer("center", torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h - self.center + self.down(F.gelu(self.up(h))), dim=-1)


@dataclass
class Bank:
    """A memory bank plus the tensors the model reads by entry id.

    Entry ids are row numbers (the bank is built in one go, never edited), so
    ``keys[I]`` looks up the keys of search results. Keys and values are snapshots
    taken when the bank was built: they go stale between rebuilds by design.
    """

    index: MemoryBank
    keys: torch.Tensor  # (M, D) unit keys, no gradient
    values: torch.Tensor | None  # (M, D) prefix representations h, when values need them
    users: np.ndarray  # (M,) int64 payload, kept for leakage checks
    positions: np.ndarray  # (M,) int64
    examples: np.ndarray | None = None  # (M,) int64 training-example index of each entry (-1: none)

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class RAOutput:
    scores_h: torch.Tensor  # (B, N) base scores from h
    scores_fused: torch.Tensor  # (B, N) scores after fusion with the retrieved knowledge
    retrieved: Retrieved
    fusion: FusionOutput


class RAModel(nn.Module):
    """encoder -> h; retriever(h) -> query; neighbours -> r; fusion(h, r) -> scores."""

    def __init__(
        self,
        encoder: SequenceEncoder,
        *,
        fusion: str,
        values: str = "target",
        temperature: float = 0.1,
        alpha_max: float = 0.5,
        quality_threshold: float | None = None,
        match_norm: bool = True,
        retrieval: str = "similarity",
        entropy_gain: float = 0.0,
        fusion_temperature: float | None = None,
    ) -> None:
        super().__init__()
        dim = encoder.cfg.dim
        self.match_norm = match_norm
        self.encoder = encoder
        self.retriever = RetrieverEncoder(dim)
        if retrieval == "similarity":
            self.retrieval = build_retrieval(retrieval, dim, temperature=temperature, values=values,
                                             quality_threshold=quality_threshold, entropy_gain=entropy_gain)
        else:  # cross-attention: its values are the neighbours' targets, its scores learned
            if values != "target" or entropy_gain:
                raise ValueError(f"retrieval={retrieval!r} needs values='target' and entropy_gain=0, "
                                 f"got {values!r}, {entropy_gain}")
            self.retrieval = build_retrieval(retrieval, dim, temperature=temperature,
                                             quality_threshold=quality_threshold)
        extra = {} if fusion_temperature is None or fusion == "fixed" else {"temperature": fusion_temperature}
        self.fusion = build_fusion(fusion, dim, alpha_max=alpha_max, **extra)

    @property
    def temperature(self) -> float:
        return self.retrieval.temperature

    def set_schedule(self, *, temperature: float, alpha_max: float) -> None:
        """Per-epoch schedule values: retrieval softmax temperature and the fusion's alpha cap."""
        self.retrieval.temperature = temperature
        self.fusion.alpha_max = alpha_max

    def fuse(self, h: torch.Tensor, nb: Neighbours) -> RAOutput:
        """h: (B, D) encoder representations; nb: their neighbours."""
        scores_h = self.encoder.scores(h)
        ret = self.retrieval(h, nb)
        r = ret.r
        norm_ratio = (h.norm(dim=1) / r.norm(dim=1).clamp(min=1e-12)).detach()  # (B,) before any rescaling
        if self.match_norm:
            # r mixes item embeddings, far shorter than the post-LN h (ratio ~30 after pretraining):
            # unscaled, any alpha below ~0.9 leaves the ranking as it was. Rescaled to |h|, alpha
            # is the share of the direction that retrieval gets. Rows without neighbours stay 0.
            r = r * norm_ratio[:, None]
        if self.fusion.output == "scores":  # entropy fusion mixes score vectors
            out = self.fusion(scores_h, self.encoder.scores(r), ret)
            scores_fused = out.fused
        else:
            out = self.fusion(h, r, ret)
            scores_fused = self.encoder.scores(out.fused)
        has = ret.has_neighbours
        out.stats["norm_ratio_raw"] = norm_ratio[has].mean() if bool(has.any()) else norm_ratio.new_tensor(math.nan)
        return RAOutput(scores_h, scores_fused, ret, out)


def build_ra_model(encoder: SequenceEncoder, ra: dict) -> RAModel:
    """The RA model an ``ra`` config section describes (``RAConfig.model_dump()``, as saved in
    ``ra.pt``), around ``encoder``; keys missing from an older file take their defaults."""
    return RAModel(encoder, fusion=ra["fusion"], values=ra.get("values", "target"),
                   temperature=ra.get("temperature_t0", 0.1), alpha_max=ra.get("alpha_max", 0.5),
                   quality_threshold=ra.get("quality_threshold"), match_norm=ra.get("match_norm", True),
                   retrieval=ra.get("retrieval", "similarity"), entropy_gain=ra.get("entropy_gain", 0.0),
                   fusion_temperature=ra.get("fusion_temperature"))


def search_neighbours(
    model: RAModel,
    bank: Bank,
    h: torch.Tensor,
    k: int,
    *,
    exclude_user: np.ndarray | None = None,
    exclude_from_position: np.ndarray | None = None,
) -> tuple[Neighbours, SearchResult]:
    """Search the bank with the retriever's queries for h (B, D) and gather the neighbours.

    The search itself is numpy (no gradient); the similarities are recomputed here as
    q · key so the retriever learns through the attention weights (keys stay fixed).
    exclude_user / exclude_from_position: (B,) int64, passed to ``MemoryBank.search``.
    """
    q = model.retriever(h)  # (B, D) unit
    res = bank.index.search(q.detach().float().cpu().numpy(), min(k, len(bank)), exclude_user=exclude_user,
                            exclude_from_position=exclude_from_position)
    dev = h.device
    found = torch.from_numpy(res.found).to(dev)  # (B, K)
    ids = torch.from_numpy(np.maximum(res.I, 0)).to(dev)
    sim = torch.einsum("bd,bkd->bk", q.float(), bank.keys[ids])  # (B, K)
    targets = torch.from_numpy(res.targets).to(dev)
    quality = torch.from_numpy(np.nan_to_num(res.quality, nan=-np.inf)).to(dev)
    nb = Neighbours(
        sim=sim.masked_fill(~found, 0.0),
        target_emb=model.encoder.item_emb(targets.clamp(min=0)).to(h.dtype),  # (B, K, D), tied embeddings
        seq_repr=None if bank.values is None else bank.values[ids].to(h.dtype),
        keys=bank.keys[ids],
        quality=quality,
        valid=found,
    )
    return nb, res
