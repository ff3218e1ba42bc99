import math

import numpy as np
import pytest
import torch
from torch import nn

from retriever import SearchResult
from training.ra.finetune.diagnostics import RunningMean, neighbour_stats, parameter_drift, snapshot


def _result(D, I, targets):
    D, I, targets = (np.asarray(x) for x in (D, I, targets))
    zeros = np.zeros(I.shape, dtype=np.int64)
    return SearchResult(D=D.astype(np.float32), I=I, targets=targets, users=zeros, positions=zeros,
                        quality=np.ones(I.shape, dtype=np.float32), low_quality=np.zeros(I.shape, dtype=bool))


def test_neighbour_stats_against_hand_counts():
    res = _result([[0.9, 0.5, -np.inf], [0.7, 0.1, 0.3]], [[4, 2, -1], [1, 3, 0]], [[8, 3, -1], [5, 5, 2]])
    used = np.array([[True, False, False], [True, True, True]])
    stats = neighbour_stats(res, np.array([3, 5]), used)
    assert stats["neighbour_sim"] == pytest.approx((0.9 + 0.5 + 0.7 + 0.1 + 0.3) / 5)
    assert stats["neighbour_hit"] == pytest.approx(3 / 5)  # (0, 1), (1, 0), (1, 1)
    assert stats["masked_by_usefulness"] == pytest.approx(1 / 5)  # found but not used: (0, 1)
    empty = neighbour_stats(_result([[-np.inf]], [[-1]], [[-1]]), np.array([3]), np.array([[False]]))
    assert all(math.isnan(v) for v in empty.values())


def test_parameter_drift_reports_relative_change():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        lin.bias.fill_(0.0)
    before = snapshot(lin)
    assert parameter_drift(lin, before)["all"]["change"] == 0.0
    with torch.no_grad():
        lin.weight.add_(torch.tensor([[0.0, 0.5]]))
        lin.bias.fill_(1.0)
    drift = parameter_drift(lin, before)
    assert drift["weight"]["change"] == pytest.approx(0.5 / 5.0)
    assert drift["bias"]["change"] == pytest.approx(1.0 / 1e-12)  # from zero: huge, not a division error
    assert drift["all"]["change"] == pytest.approx(math.sqrt(0.25 + 1.0) / 5.0)
    assert parameter_drift(nn.Identity(), {}) == {}


def test_running_mean_weights_by_examples_and_skips_nan():
    m = RunningMean()
    m.add({"a": 1.0, "b": math.nan}, 3)
    m.add({"a": 3.0, "b": 2.0}, 1)
    assert m.result() == {"a": pytest.approx(1.5), "b": 2.0}
