import numpy as np
import pytest
import torch

from training.evaluate import evaluate_scorer, metrics_from_ranks, paired_bootstrap, target_ranks


def test_target_ranks_counts_strictly_higher_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    # targets are item ids (column + 1)
    assert target_ranks(scores, torch.tensor([3, 1])).tolist() == [1, 0]
    assert target_ranks(scores, torch.tensor([1, 4])).tolist() == [3, 3]


def test_metrics_against_hand_computed_values():
    ranks = np.array([0, 1, 4, 9, 10, 25])
    m = metrics_from_ranks(ranks, [5, 10, 20])
    assert m["HR@5"] == pytest.approx(3 / 6)
    assert m["HR@10"] == pytest.approx(4 / 6)
    assert m["HR@20"] == pytest.approx(5 / 6)
    ndcg10 = (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(11)) / 6
    assert m["NDCG@10"] == pytest.approx(ndcg10)
    mrr5 = (1 + 1 / 2 + 1 / 5) / 6
    assert m["MRR@5"] == pytest.approx(mrr5)
    assert m["MRR@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 11) / 6)


def test_evaluate_scorer_full_ranking_and_mask_seen():
    n_items = 12
    popularity = np.arange(n_items + 1)
    prefixes = np.array([[1, 2, 0], [3, 0, 0]])
    targets = np.array([5, 3])

    def score(seq):
        # item id i scores i, so higher ids rank first; the seen items 1,2,3 rank low anyway
        return torch.arange(1, n_items + 1, dtype=torch.float32).repeat(len(seq), 1)

    res = evaluate_scorer(score, prefixes, targets, ks=[5, 10], item_popularity=popularity)
    assert res.ranks.tolist() == [7, 9]
    assert res.metrics["HR@10"] == 1.0
    assert res.metrics["HR@5"] == 0.0
    assert res.metrics["Coverage@10"] == pytest.approx(10 / 12)
    assert res.metrics["Popularity@10"] == pytest.approx(np.mean(np.arange(3, 13)))

    def score_seen_high(seq):
        s = torch.zeros(len(seq), n_items)
        s[:, :3] = 10.0  # items 1..3 score highest
        s[:, 4] = 5.0  # item 5
        return s

    plain = evaluate_scorer(score_seen_high, prefixes, targets, ks=[10], item_popularity=popularity)
    masked = evaluate_scorer(score_seen_high, prefixes, targets, ks=[10], item_popularity=popularity, mask_seen=True)
    assert plain.ranks.tolist() == [3, 0]  # user 2's target 3 ties at the top with 1 and 2: rank 0
    assert masked.ranks.tolist() == [1, 0]  # items 1, 2 hidden for user 1; the target 3 is never hidden


def test_paired_bootstrap_interval_contains_mean_and_detects_shift():
    rng = np.random.default_rng(0)
    a = rng.random(500)
    same = paired_bootstrap(a, a)
    assert same["mean"] == 0 and same["low"] == 0 and same["high"] == 0
    shifted = paired_bootstrap(a + 0.1 + rng.normal(0, 0.01, 500), a)
    assert shifted["low"] > 0.09 and shifted["high"] < 0.11
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap(a, a[:10])
