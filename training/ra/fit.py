"""Fitting the retrieval design on validation and scoring it against the frozen base.

``fit_design`` makes every choice on validation only: the vote's settings by a coordinate
search (mean masked NDCG@10 over the given bases), or one head per base trained with its
epoch chosen on validation. ``evaluate`` ranks a split with and without retrieval (seen
items masked and not) and pairs them user by user.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from training.evaluate import ndcg_at
from training.ra import stage as st
from training.ra.config import RetrievalSection
from training.ra.scoring import both_ranks, compare, target_ranks
from training.ra.vote import VoteSettings

log = logging.getLogger(__name__)


def base_ranks(prep: st.Prepared, which: str) -> dict[str, np.ndarray]:
    q = st.queries_for(prep, which)
    return both_ranks(prep.base_logits(q), q.targets, q.seen)


def tune_vote(preps: list[st.Prepared], sec: RetrievalSection) -> tuple[VoteSettings, list[dict]]:
    """Coordinate search of the vote's settings on validation (mean masked NDCG@10 over seeds)."""
    v = sec.vote
    s = v.settings()
    pivots = [float(np.median(p.valid.D[:, 0])) for p in preps]
    s = dataclasses.replace(s, pivot=float(np.mean(pivots)))
    logits = [p.base_logits(p.valid) for p in preps]
    trail = []

    def score(cand: VoteSettings) -> float:
        vals = []
        for p, lg in zip(preps, logits, strict=True):
            sc = st.vote_scores(p, "valid", cand, lg)
            vals.append(float(ndcg_at(target_ranks(sc, p.valid.targets, p.valid.seen), 10).mean()))
        return float(np.mean(vals))

    best = score(s)
    for _ in range(2):  # two sweeps over the axes
        for axis, values in (("lam", v.tune_lam), ("k", v.tune_k), ("m", v.tune_m), ("tau", v.tune_tau),
                             ("T", v.tune_T), ("beta", v.tune_beta), ("lam", v.tune_lam)):
            for val in values:
                cand = dataclasses.replace(s, **{axis: val})
                got = score(cand)
                trail.append({**cand.as_dict(), "valid_ndcg10_masked": got})
                if got > best + 1e-6:
                    best, s = got, cand
    log.info("vote chosen on validation: %s (valid NDCG@10 %.4f)", s, best)
    return s, trail


def design_scores(preps: list[st.Prepared], sec: RetrievalSection, design: str, which: str,
                  state: dict) -> list[torch.Tensor]:
    """(Q, N) ranking scores of ``which`` for every seed; ``state`` carries what was chosen or
    trained on validation (the vote settings, the heads)."""
    if design == "vote":
        return [st.vote_scores(p, which, state["vote"]) for p in preps]
    if design == "head":
        return [h.scores(which) for h in state["heads"]]
    raise ValueError(design)


def fit_design(preps: list[st.Prepared], sec: RetrievalSection) -> tuple[dict, dict]:
    """Choose / train everything the design needs on validation. Returns (state, info)."""
    if sec.design == "vote":
        vote, trail = tune_vote(preps, sec)
        return {"vote": vote}, {"vote": vote.as_dict(), "vote_trail": trail}
    hs = sec.head_settings()
    heads, hist = [], []
    for i, p in enumerate(preps):
        head, h = st.train_head(p, dataclasses.replace(hs, seed=sec.seed + i))
        heads.append(head)
        hist.append(h)
    return {"heads": heads}, {"head": dataclasses.asdict(hs), "head_history": hist}


def evaluate(preps: list[st.Prepared], sec: RetrievalSection, state: dict, which: str) -> dict:
    base = [base_ranks(p, which) for p in preps]
    scores = design_scores(preps, sec, sec.design, which, state)
    withr = [both_ranks(s, st.queries_for(p, which).targets, st.queries_for(p, which).seen)
             for s, p in zip(scores, preps, strict=True)]
    return {
        "masked": compare([w["masked"] for w in withr], [b["masked"] for b in base]),
        "unmasked": compare([w["unmasked"] for w in withr], [b["unmasked"] for b in base]),
        "_ranks": {"with": [w["masked"] for w in withr], "without": [b["masked"] for b in base]},
    }


def flat(res: dict) -> dict:
    """The metrics.json layout for one split: with / without / ratio / CI (masked)."""
    m = res["masked"]
    return {"with": {k: m["with"][k] for k in ("NDCG@10", "HR@10")},
            "without": {k: m["without"][k] for k in ("NDCG@10", "HR@10")},
            "ratio_ndcg10": m["ratio_ndcg10"], "ratio_hr10": m["ratio_hr10"],
            "delta_ndcg10_ci95": m["delta_ndcg10_ci95"], "per_seed": m["per_seed"]}


def flat_unmasked(res: dict) -> dict:
    return flat({"masked": res["unmasked"]})
