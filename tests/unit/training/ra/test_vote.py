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


def _random_case(rng: np.random.Generator, Q: int, N: int = 40, K: int = 12, m: int = 3):
    D = np.sort(rng.uniform(-0.2, 0.95, (Q, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    D[rng.random((Q, K)) < 0.15] = -np.inf  # missing neighbours
    items = rng.integers(0, N + 1, (Q, K, m))  # 0: an empty slot
    seen = rng.random((Q, N)) < 0.2
    logits = rng.normal(0, 3, (Q, N)).astype(np.float32)
    return logits, D, items, seen


@pytest.mark.parametrize("beta", [0.0, 8.0])
def test_one_query_gives_the_floats_of_its_row_in_a_batch(beta):
    """The service scores one request at a time (``_vote_one``), the stage tunes on batches:
    both must give the same floats, and both (1 - λ)·softmax(s/T) + λ·p_kNN."""
    from training.ra.vote import vote

    rng = np.random.default_rng(7)
    s = VoteSettings(k=10, m=2, tau=0.07, decay=0.6, T=0.5, lam=0.3, beta=beta, pivot=0.6)
    logits, D, items, seen = _random_case(rng, 30)
    items[3] = 0  # a query whose neighbours give nothing visible: λ = 0
    batch = vote(torch.from_numpy(logits), D, items, s, seen=seen)
    for q in range(len(D)):
        one = vote(logits[q:q + 1], D[q:q + 1], items[q:q + 1], s, seen=seen[q:q + 1])
        np.testing.assert_array_equal(one.scores, batch.scores[q:q + 1])
        np.testing.assert_array_equal(one.lam, batch.lam[q:q + 1])
        np.testing.assert_array_equal(one.raw, batch.raw[q:q + 1])
    assert float(batch.lam[3, 0]) == 0.0
    p = vote_distribution(D[:, : s.k], items[:, : s.k, : s.m], 40, tau=s.tau, decay=s.decay, seen=seen)
    lam = torch.from_numpy(batch.lam).double()
    expected = (1 - lam) * torch.softmax(torch.from_numpy(logits).double() / s.T, dim=1) + lam * p.double()
    np.testing.assert_allclose(batch.scores, expected.numpy(), rtol=2e-6, atol=1e-9)
    assert abs(float(batch.scores.sum()) - len(D)) < 1e-4  # each row still a distribution


def test_vote_writes_into_out_and_leaves_the_inputs_alone():
    from training.ra.vote import vote

    rng = np.random.default_rng(3)
    s = VoteSettings(k=12, m=3, tau=0.1, decay=0.5, T=1.0, lam=0.2)
    for Q in (1, 5):
        logits, D, items, seen = _random_case(rng, Q)
        before = (logits.copy(), D.copy(), items.copy(), seen.copy())
        fresh = vote(logits, D, items, s, seen=seen).scores
        for a, b in zip((logits, D, items, seen), before, strict=True):
            np.testing.assert_array_equal(a, b)
        out = logits.copy()
        got = vote(out, D, items, s, seen=seen, out=out).scores  # in place over the logits
        assert np.shares_memory(got, out)
        np.testing.assert_array_equal(got, fresh)
