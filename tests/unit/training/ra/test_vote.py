"""The neighbour vote against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.ra.vote import VoteSettings, confidence_lambda, interpolate, vote_distribution


def test_vote_distribution_by_hand():
    D = np.array([[0.9, 0.5, -np.inf]], dtype=np.float32)
    items = np.array([[[3, 1], [1, 0], [2, 2]]])  # (Q=1, K=3, m=2); the third neighbour is missing
    seen = torch.zeros(1, 4, dtype=torch.bool)
    seen[0, 0] = True  # item 1 is in the query's input: the vote gives it nothing
    p = vote_distribution(D, items, 4, tau=0.2, decay=0.5, seen=seen)
    w0, w1 = 1.0, np.exp((0.5 - 0.9) / 0.2)
    raw = np.zeros(4)
    raw[2] += w0  # item 3 from neighbour 0, step 0
    raw[0] += w0 * 0.5 + w1  # item 1: masked
    raw[0] = 0
    np.testing.assert_allclose(p.numpy()[0], raw / raw.sum(), rtol=1e-6)


def test_no_visible_vote_leaves_the_model_alone():
    D = np.array([[0.3]], dtype=np.float32)
    items = np.zeros((1, 1, 1), dtype=np.int64)
    p = vote_distribution(D, items, 5, tau=0.1, decay=1.0)
    assert float(p.sum()) == 0.0
    logits = torch.randn(1, 5)
    mixed = interpolate(logits, p, 0.4, 1.0)
    assert torch.equal(mixed.argsort(), torch.softmax(logits, 1).argsort())


def test_confidence_lambda_follows_the_top_similarity():
    D = np.array([[0.9, 0.1], [0.2, 0.1]], dtype=np.float32)
    flat = confidence_lambda(D, VoteSettings(lam=0.3, beta=0.0))
    assert torch.allclose(flat, torch.full((2, 1), 0.3))
    sloped = confidence_lambda(D, VoteSettings(lam=0.3, beta=10.0, pivot=0.5))
    assert float(sloped[0]) == pytest.approx(0.3 / (1 + np.exp(-4.0)), rel=1e-5)
    assert float(sloped[1]) < float(sloped[0])
