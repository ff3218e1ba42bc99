"""The synthetic generator: determinism, shape of the catalogue, learnable structure, .inter output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data.readers import DataError, Interactions, read_interactions
from training.data.sequences import build_sequences, leave_one_out
from training.data.synthetic import generate_interactions, write_inter


def test_same_seed_same_log_and_other_seed_another():
    a = generate_interactions(50, 40, mean_length=8, seed=7)
    b = generate_interactions(50, 40, mean_length=8, seed=7)
    c = generate_interactions(50, 40, mean_length=8, seed=8)
    for col in ("users", "items", "timestamps"):
        assert np.array_equal(getattr(a, col), getattr(b, col))
    assert not np.array_equal(a.items, c.items)


def test_sizes_lengths_and_time_order():
    inter = generate_interactions(2000, 300, mean_length=12, min_length=4, max_length=40, seed=1)
    assert inter.users.dtype == object
    assert isinstance(inter.items[0], str)
    lengths = pd.Series(inter.users).value_counts()
    assert len(lengths) == 2000
    assert lengths.min() >= 4
    assert lengths.max() <= 40
    assert 11 < lengths.mean() < 13
    assert np.all(np.diff(inter.timestamps) >= 0)  # order="time": a log sorted by time
    frame = pd.DataFrame({"u": inter.users, "t": inter.timestamps})
    assert frame.duplicated(["u", "t"]).any()  # some same-user ties, like real logs

    grouped = generate_interactions(
        2000, 300, mean_length=12, min_length=4, max_length=40, seed=1, order="user"
    )
    assert len(grouped) == len(inter)
    # Same interactions either way; grouped rows keep each user's events together and in time order.
    assert sorted(zip(grouped.users, grouped.items, strict=True)) == sorted(
        zip(inter.users, inter.items, strict=True)
    )
    runs = (grouped.users[1:] != grouped.users[:-1]).sum() + 1
    assert runs == 2000


def loglog_slope(items: np.ndarray, top: int) -> float:
    counts = np.sort(pd.Series(items).value_counts().to_numpy())[::-1][:top]
    ranks = np.arange(1, len(counts) + 1)
    return float(np.polyfit(np.log(ranks), np.log(counts), 1)[0])


def test_catalogue_popularity_is_power_law():
    flat = generate_interactions(3000, 2000, mean_length=20, zipf_a=1.1, seed=2)
    steep = generate_interactions(3000, 2000, mean_length=20, zipf_a=1.5, seed=2)
    s_flat, s_steep = loglog_slope(flat.items, 200), loglog_slope(steep.items, 200)
    assert -1.5 < s_flat < -0.7
    assert s_steep < s_flat - 0.2  # a larger exponent gives a steeper head


def hit_rate_at_10(predict, data, split) -> float:
    hits = 0
    for u, t in zip(split.test_users, split.test_positions, strict=True):
        seq = data.sequences[u]
        hits += seq[t] in predict(seq[t - 1])
    return hits / len(split.test_users)


def test_planted_structure_is_learnable():
    inter = generate_interactions(3000, 500, mean_length=15, seed=3)
    data = build_sequences(inter)
    split = leave_one_out(data)
    # Fit both predictors on everything before the test target (train and validation targets).
    prev = np.concatenate([data.sequences[u][:-2] for u in range(data.n_users)])
    nxt = np.concatenate([data.sequences[u][1:-1] for u in range(data.n_users)])
    popular = set(pd.Series(nxt).value_counts().index[:10])
    successors = (
        pd.DataFrame({"a": prev, "b": nxt}).groupby("a")["b"].agg(lambda s: set(s.value_counts().index[:10]))
    )
    hr_pop = hit_rate_at_10(lambda _: popular, data, split)
    hr_succ = hit_rate_at_10(lambda last: successors.get(last, popular), data, split)
    # Zipf(1.1) makes popularity a strong baseline (~0.55 here); the successor predictor still misses
    # less than half as often.
    assert hr_succ > hr_pop + 0.2, (hr_succ, hr_pop)
    assert 1 - hr_succ < (1 - hr_pop) / 2, (hr_succ, hr_pop)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_length"):
        generate_interactions(5, 5, mean_length=3, min_length=5)
    with pytest.raises(ValueError, match="order"):
        generate_interactions(5, 5, order="random")


def test_write_inter_round_trips_through_the_reader(tmp_path):
    inter = generate_interactions(30, 20, mean_length=6, seed=4)
    path = tmp_path / "syn.inter"
    write_inter(inter, path)
    assert path.read_text().splitlines()[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert "." not in path.read_text().splitlines()[1].split("\t")[2]  # whole seconds stay integers
    back = read_interactions(path)
    for col in ("users", "items", "timestamps"):
        assert np.array_equal(getattr(back, col), getattr(inter, col))
    assert [p.name for p in tmp_path.iterdir()] == ["syn.inter"]


def test_write_inter_refuses_ids_with_tabs_and_writes_nothing(tmp_path):
    bad = Interactions(np.array(["a\tb"], dtype=object), np.array(["x"], dtype=object), np.array([1.5]))
    with pytest.raises(DataError, match="tab or newline"):
        write_inter(bad, tmp_path / "bad.inter")
    assert list(tmp_path.iterdir()) == []
