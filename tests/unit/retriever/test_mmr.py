import numpy as np
import pytest

from retriever.errors import InvalidParameter
from retriever.mmr import mmr_select


def test_mmr_matches_a_hand_computed_example():
    # candidates a, a' (a copy of a), b; query similarities 0.9, 0.9, 0.6
    a = np.array([1.0, 0.0])
    b = np.array([0.0, 1.0])
    cand = np.stack([a, a, b])[None]
    sims = np.array([[0.9, 0.9, 0.6]], np.float32)
    # lam = 0.5: pick a (0.45); then a' scores 0.45 - 0.5 = -0.05, b scores 0.3 - 0 = 0.3 -> b; then a'
    np.testing.assert_array_equal(mmr_select(sims, cand, 3, 0.5), [[0, 2, 1]])
    # lam = 1: pure similarity order (stable on ties)
    np.testing.assert_array_equal(mmr_select(sims, cand, 3, 1.0), [[0, 1, 2]])


def test_mmr_skips_missing_candidates_and_pads():
    cand = np.eye(3)[None].repeat(2, axis=0)
    sims = np.array([[0.5, -np.inf, 0.4], [-np.inf, -np.inf, 0.1]], np.float32)
    picked = mmr_select(sims, cand, 3, 0.7)
    np.testing.assert_array_equal(picked, [[0, 2, -1], [2, -1, -1]])


def test_mmr_rejects_lambda_outside_unit_interval():
    with pytest.raises(InvalidParameter, match="mmr_lambda"):
        mmr_select(np.zeros((1, 2), np.float32), np.zeros((1, 2, 2)), 1, 1.5)
