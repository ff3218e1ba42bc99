"""The retrieval-augmented (RA) model: a pretrained ``SequenceEncoder`` plus a query
encoder, attention over memory-bank neighbours and a fusion of ``h`` with the knowledge vector.

Read top to bottom: query encoder, the model, and
``search_neighbours`` (bank search -> ``Neighbours`` tensors).

Shapes: B queries, K neighbours, D hidden size, N items. Submodule names (``encoder``,
``query_encoder``, ``attention``, ``fusion``) are the names progressive-unfreezing phases use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.config import RAConfig
from training.model import SequenceEncoder
from training.ra.finetune.fusion import FusionOutput, Neighbours, Retrieved, build_attention, build_fusion


class QueryEncoder(nn.Module):
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
class RAOutput:
    scores_h: torch.Tensor  # (B, N) base scores from h
    scores_fused: torch.Tensor  # (B, N) scores after fusion with the retrieved knowledge
    retrieved: Retrieved
    fusion: FusionOutput


class RAModel(nn.Module):
    """encoder -> h; query_encoder(h) -> query; neighbours -> r; fusion(h, r) -> scores."""

    def __init__(self, encoder: SequenceEncoder, ra: RAConfig) -> None:
        """The model the ``ra`` config section describes, around ``encoder`` (its defaults live
        in ``RAConfig`` only)."""
        super().__init__()
        dim = encoder.cfg.dim
        self.match_norm = ra.match_norm
        self.encoder = encoder
        self.query_encoder = QueryEncoder(dim)
        if ra.attention == "similarity":
            self.attention = build_attention(ra.attention, dim, temperature=ra.temperature_t0, values=ra.values,
                                             usefulness_threshold=ra.usefulness_threshold,
                                             entropy_gain=ra.entropy_gain)
        else:  # cross-attention: its values are the neighbours' targets, its scores learned
            self.attention = build_attention(ra.attention, dim, temperature=ra.temperature_t0,
                                             usefulness_threshold=ra.usefulness_threshold)
        extra = {} if ra.fusion_temperature is None or ra.fusion == "fixed" else {"temperature": ra.fusion_temperature}
        self.fusion = build_fusion(ra.fusion, dim, alpha_max=ra.alpha_max, **extra)

    @property
    def temperature(self) -> float:
        return self.attention.temperature

    def set_schedule(self, *, temperature: float, alpha_max: float) -> None:
        """Per-epoch schedule values: retrieval softmax temperature and the fusion's alpha cap."""
        self.attention.temperature = temperature
        self.fusion.alpha_max = alpha_max

    def fuse(self, h: torch.Tensor, nb: Neighbours) -> RAOutput:
        """h: (B, D) encoder representations; nb: their neighbours."""
        scores_h = self.encoder.scores(h)
        ret = self.attention(h, nb)
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


def build_ra_model(encoder: SequenceEncoder, ra: RAConfig) -> RAModel:
    """The RA model of a validated ``ra`` section (``RAConfig``) around ``encoder``."""
    return RAModel(encoder, ra)
