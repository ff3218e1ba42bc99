import math

import numpy as np
import pytest
import torch

from training.ra.finetune.model import QueryEncoder
from training.ra.finetune.warmup import query_contrastive_loss, warm_up_query_encoder


def test_contrastive_loss_matches_hand_computation_and_masks_false_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([5, 7, 5])  # rows 0 and 2 share a target: not each other's negatives
    loss, top1 = query_contrastive_loss(q, p, targets, tau=0.5)
    s = (q @ p.T / 0.5).tolist()
    row0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[0][1]))  # column 2 masked
    row1 = -s[1][1] + math.log(sum(math.exp(x) for x in s[1]))
    row2 = -s[2][2] + math.log(math.exp(s[2][1]) + math.exp(s[2][2]))  # column 0 masked
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    assert top1.tolist() == [True, True, False]


def test_warm_up_pulls_same_target_prefixes_together():
    """Prefixes with the same next item share half of h; the other half is larger noise. The
    warm-up must teach the query_encoder to look past the noise and rank the partner first."""
    g = torch.Generator().manual_seed(0)
    n_targets, per_target, dim = 40, 6, 16
    targets = np.repeat(np.arange(1, n_targets + 1), per_target)
    signal = torch.randn(n_targets, dim // 2, generator=g)[torch.from_numpy(targets - 1)]
    h = torch.cat([signal, 3.0 * torch.randn(len(targets), dim // 2, generator=g)], dim=1)
    query_encoder = QueryEncoder(dim)
    history = warm_up_query_encoder(query_encoder, h, targets, epochs=12, tau=0.1, lr=1e-2, batch_size=64,
                                rng=np.random.default_rng(0))
    assert len(history) == 12 and history[0]["pairs"] == len(targets)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["top1"] < 0.2 < 0.5 < history[-1]["top1"]


def test_examples_without_a_partner_sit_out():
    h = torch.randn(4, 8)
    history = warm_up_query_encoder(QueryEncoder(8), h, np.array([1, 2, 3, 3]), epochs=1, tau=0.1, lr=1e-3,
                                batch_size=8, rng=np.random.default_rng(0))
    assert history[0]["pairs"] == 2  # only the two examples of target 3
