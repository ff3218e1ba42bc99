"""A finished retrieval run as the service uses it: the untouched base encoder, the chosen
design (vote settings, the learned head, a trained key projection) and how to score a batch
of queries given their neighbours. No trainer is imported here.

Bank entries the service builds carry their payload in the bank's ``values``: the entry's
next m item ids (as float32, exact below 2^24) followed, when the head needs it, by the
entry's prefix representation h. ``pack_values`` / ``unpack_values`` are the one format.

Shapes: Q queries, K neighbours, D hidden size, N items, m next items.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoints import MODEL_FORMAT, RunError
from training.model import ModelConfig, SequenceEncoder
from training.ra.bank import unit_keys
from training.ra.encode import encode_prefixes
from training.ra.keys import KeyProjection
from training.ra.module import RetrievalHead, freeze
from training.ra.vote import VoteSettings, vote, vote_distribution

RETRIEVAL_FORMAT = "ragrec.retrieval.v1"


@dataclass
class Scored:
    scores: torch.Tensor | None  # (Q, N) ranking scores with retrieval; None: written into ``out``
    weights: torch.Tensor | None  # (Q, K) each neighbour's share (vote weight or the reader's attention)
    share: torch.Tensor | None  # (Q, 1) the retrieval side's share of the output (λ or the copy gate /
    # alpha); the vote leaves it out (None) unless asked for evidence
    contrib: torch.Tensor | None  # (Q, K, m) the score each neighbour adds to each of its next items


class RetrievalBundle:
    """The base encoder + the retrieval design chosen on validation."""

    def __init__(self, encoder: SequenceEncoder, settings: dict[str, Any], vote: VoteSettings,
                 center: torch.Tensor, head: RetrievalHead | None = None, proj: KeyProjection | None = None,
                 *, metrics: dict | None = None, base_checksum: str | None = None) -> None:
        self.encoder = freeze(encoder)
        self.settings = settings
        self.design = settings["design"]
        self.own_user = settings["own_user"]
        self.vote = vote
        self.center = center.float()
        self._center_np = self.center.detach().cpu().numpy()  # per-request keys are computed in numpy
        self.head = None if head is None else freeze(head)
        self.proj = None if proj is None else freeze(proj)
        self.metrics = metrics or {}
        self.base_checksum = base_checksum
        hs = settings["head"]
        self.k = vote.k if self.design == "vote" else max(hs["k"], vote.k if hs["vote_channel"] else 0)
        self.m = vote.m if self.design == "vote" or hs["vote_channel"] else 1

    @property
    def stores_h(self) -> bool:
        return self.design == "head"

    @property
    def value_dim(self) -> int:
        return self.m + (self.encoder.cfg.dim if self.stores_h else 0)

    # -------------------------------------------------------------- bank entries

    def keys_of(self, h: torch.Tensor | np.ndarray) -> np.ndarray:
        return unit_keys(h, self._center_np if self.proj is None else self.center, self.proj)

    @torch.no_grad()
    def encode(self, sequences: Sequence[np.ndarray], rows: np.ndarray, positions: np.ndarray, *,
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(h (M, D), unit keys (M, D)) of the prefixes sequences[rows[j]][:positions[j]]."""
        h = encode_prefixes(self.encoder, sequences, rows, positions, self.encoder.cfg.max_len,
                            batch_size=batch_size, device=torch.device("cpu"))
        return h.numpy(), self.keys_of(h)

    def pack_values(self, next_items: np.ndarray, h: np.ndarray | None) -> np.ndarray:
        """(M, value_dim) float32 payload: next m items (0 = none), then h when the head reads it."""
        parts = [next_items[:, : self.m].astype(np.float32)]
        if self.stores_h:
            parts.append(np.asarray(h, dtype=np.float32))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def unpack_values(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(Q, K, value_dim) -> (next items (Q, K, m) int64, h (Q, K, D) or None)."""
        items = np.rint(values[..., : self.m]).astype(np.int64)
        return items, (values[..., self.m:] if self.stores_h else None)

    # -------------------------------------------------------------- scoring

    def score(self, h: torch.Tensor, logits: torch.Tensor | np.ndarray, D: np.ndarray, found: np.ndarray,
              items: np.ndarray, nb_h: np.ndarray | None, seen: np.ndarray | torch.Tensor, *,
              evidence: bool = True, out: np.ndarray | None = None) -> Scored:
        """Scores with retrieval for queries h (Q, D) with base logits (Q, N) float32, neighbours'
        similarities D (Q, K), found (Q, K) bool, their visible next items (Q, K, m), their
        prefix representations (head only) and the queries' seen items (Q, N) bool.
        evidence: also each neighbour's weight and contributions (for explain; the vote's
        costs ~0.1 ms a request, so the service asks only when a query explains).
        out: (Q, N) float32 memory the vote writes its scores into (it may hold the logits); then
        ``Scored.scores`` is None. The head ignores it and returns its scores."""
        if not found.all():
            D = np.where(found, D, -np.inf)
            items = np.where(found[:, :, None], items, 0)
        D = D.astype(np.float32, copy=False)
        v = self.vote
        if self.design == "vote":
            voted = vote(logits, D, items, v, seen=seen, out=out)
            scores = None if out is not None else torch.from_numpy(voted.scores)
            if not evidence:
                return Scored(scores, None, None, None)
            lam = torch.from_numpy(voted.lam)
            total = voted.raw.sum(axis=(1, 2), keepdims=True)
            share = np.divide(voted.raw, total, out=np.zeros_like(voted.raw), where=total > 0)
            contrib = lam[:, :, None] * torch.from_numpy(share.astype(np.float32))  # (Q, K, m)
            weights = contrib.sum(dim=2) / lam.clamp(min=1e-30)
            return Scored(scores, weights, lam, contrib)
        with torch.no_grad():
            return self._head_score(h, logits, D, found, items, nb_h, seen)

    def _head_score(self, h: torch.Tensor, logits: torch.Tensor | np.ndarray, D: np.ndarray, found: np.ndarray,
                    items: np.ndarray, nb_h: np.ndarray | None, seen: np.ndarray | torch.Tensor) -> Scored:
        assert self.head is not None
        v = self.vote
        hs = self.settings["head"]
        k = hs["k"]
        mask = torch.from_numpy(found[:, :k])
        tg = torch.from_numpy(items[:, :k, 0])
        keys = torch.from_numpy(np.nan_to_num(nb_h[:, :k]).astype(np.float32))
        values = self.encoder.item_emb.weight[tg]
        sim = torch.from_numpy(np.where(found[:, :k], D[:, :k], 0.0).astype(np.float32))
        z, alpha = self.head(h.float(), keys, values, sim, mask)
        log_vote = None
        if hs["vote_channel"]:
            p = vote_distribution(D[:, : v.k], items[:, : v.k, : v.m], logits.shape[1], tau=v.tau,
                                  decay=v.decay, seen=seen)
            log_vote = torch.log(p + 1e-6)
        scores = self.head.scores(z, self.encoder.item_emb.weight[1:], log_vote, (tg.masked_fill(~mask, 0), sim, mask))
        weights = self.head.reader.weights
        share = alpha.mean(dim=1, keepdim=True) if alpha.dim() == 2 else alpha
        contrib = None
        if self.head.copy_gate is not None:
            g = self.head.copy_gate(sim, weights * mask, mask)
            contrib = (g * weights * mask)[:, :, None]
            share = g
        return Scored(scores, weights, share, contrib)

    # -------------------------------------------------------------- files

    def state(self) -> dict[str, Any]:
        return {
            "format": RETRIEVAL_FORMAT,
            "settings": self.settings,
            "vote": self.vote.as_dict(),
            "center": self.center.clone(),
            "head": None if self.head is None else {k: v.clone() for k, v in self.head.state_dict().items()},
            "proj": None if self.proj is None else {k: v.clone() for k, v in self.proj.state_dict().items()},
            "model_config": self.encoder.cfg.to_dict(),
            "base_checksum": self.base_checksum,
            "metrics": self.metrics,
        }


def build_head(settings: dict[str, Any], dim: int) -> RetrievalHead:
    hs = settings["head"]
    return RetrievalHead(dim, fusion=hs["fusion"], alpha=hs["alpha"], n_layers=hs["n_layers"],
                         n_heads=hs["n_heads"], dropout=hs["dropout"], vote_channel=hs["vote_channel"],
                         copy_items=hs["copy_items"])


def load_bundle(run_dir: str | Path, *, map_location: str | torch.device = "cpu") -> RetrievalBundle:
    """Rebuild a retrieval run's bundle from ``retrieval.pt`` and ``model.pt`` (weights only)."""
    run = Path(run_dir)
    file = run / "retrieval.pt"
    try:
        blob = torch.load(file, map_location=map_location, weights_only=True)
        base = torch.load(run / "model.pt", map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise RunError(f"{run} is not a finished retrieval run: {Path(e.filename).name} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{file} is not a readable ragrec retrieval file ({reason[:120]})") from None
    if not isinstance(blob, dict) or blob.get("format") != RETRIEVAL_FORMAT:
        raise RunError(f"{file} is not a ragrec retrieval file (format "
                       f"{blob.get('format') if isinstance(blob, dict) else '?'})")
    if not isinstance(base, dict) or base.get("format") != MODEL_FORMAT:
        raise RunError(f"{run / 'model.pt'} is not a ragrec model file")
    encoder = SequenceEncoder(ModelConfig(**base["model_config"]))
    encoder.load_state_dict(base["model"], strict=True)
    if blob.get("base_checksum") and base.get("checksum") != blob["base_checksum"]:
        raise RunError(f"{run}: model.pt is not the base this retrieval stage was fitted on")
    settings = blob["settings"]
    head = None
    if blob["head"] is not None:
        head = build_head(settings, encoder.cfg.dim)
        head.load_state_dict(blob["head"], strict=True)
    proj = None
    if blob["proj"] is not None:
        proj = KeyProjection(encoder.cfg.dim)
        proj.load_state_dict(blob["proj"], strict=True)
    return RetrievalBundle(encoder, settings, VoteSettings(**blob["vote"]), blob["center"], head, proj,
                           metrics=blob.get("metrics"), base_checksum=blob.get("base_checksum"))
