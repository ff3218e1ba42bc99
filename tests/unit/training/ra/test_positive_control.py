"""Positive control: on data where retrieval must help, it does, by a wide margin.

``generate_trails`` plants many rare item trails, each walked by a few users. A small base
trained briefly cannot memorise every trail's successions; a bank of other users' prefixes
holds them verbatim. Both retrieval paths (the neighbour vote and the learned head on the
frozen base) must beat the same frozen base by >= 1.5x test NDCG@10 with seen items
masked on both sides. Disconnect retrieval (λ = 0, or a head that ignores neighbours) and
this test fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import load_config
from training.data.synthetic import generate_trails, write_inter
from training.evaluate import ndcg_at
from training.ra import stage as st
from training.ra.config import RetrievalSection
from training.ra.scoring import target_ranks
from training.ra.vote import VoteSettings
from training.trainer import run_training

pytestmark = pytest.mark.slow  # trains a base and a head on planted trails


@pytest.fixture(scope="module")
def trails_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("trails")
    path = root / "trails.inter"
    write_inter(generate_trails(200, users_per_trail=4, trail_length=8, n_popular=30, seed=3), path)
    run = root / "base"
    cfg = load_config(None, [f"data.path={path}", "data.max_seq_len=20", "model.dim=16", "model.inner=32",
                             "model.dropout=0.1", "model.attn_dropout=0.1", "train.batch_size=128",
                             "train.seed=1", "loss.contrastive=none", "train.lr=0.003", "train.epochs=2",
                             "train.threads=1"])
    run_training(cfg, run, progress=False)
    torch.manual_seed(0)
    return st.prepare(run, k_train=10, k_eval=20, own_user="keep")


def _test_ndcg(prep, scores) -> float:
    return float(ndcg_at(target_ranks(scores, prep.test.targets, prep.test.seen), 10).mean())


def test_vote_beats_the_frozen_base_on_trails(trails_base):
    prep = trails_base
    base = _test_ndcg(prep, prep.base_logits(prep.test))
    voted = _test_ndcg(prep, st.vote_scores(prep, "test", VoteSettings(k=10, m=1, tau=0.1, lam=0.5)))
    off = _test_ndcg(prep, st.vote_scores(prep, "test", VoteSettings(k=10, m=1, tau=0.1, lam=0.0)))
    assert off == pytest.approx(base, abs=1e-9)  # λ = 0 is the base: the comparison is paired
    print(f"trails: vote {voted:.4f} vs base {base:.4f}")
    assert voted >= 1.5 * base, (voted, base)


def test_learned_head_beats_the_frozen_base_on_trails(trails_base):
    prep = trails_base
    base = _test_ndcg(prep, prep.base_logits(prep.test))
    head, history = st.train_head(prep, RetrievalSection(head={"k": 10, "epochs": 4, "patience": 4, "lr": 3e-3, "batch_size": 128,
                                                        "copy_items": True}).head_settings())
    assert len(history) >= 1 and np.isfinite(history[0]["loss"])
    got = _test_ndcg(prep, head.scores("test"))
    print(f"trails: head {got:.4f} vs base {base:.4f}")
    assert got >= 1.5 * base, (got, base)
