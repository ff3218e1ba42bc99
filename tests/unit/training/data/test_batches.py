import numpy as np
import pytest

from training.data.batches import iterate_batches, prefix_plan, same_target_partners, window_plan
from training.data.sequences import pad_prefixes


@pytest.fixture
def sequences():
    rng = np.random.default_rng(0)
    lengths = [3, 5, 12, 30, 2, 17]
    return [rng.integers(1, 50, size=n).astype(np.int64) for n in lengths]


def examples(sequences):
    users, positions = [], []
    for u, s in enumerate(sequences):
        n = len(s)
        stop = n - 2 if n >= 3 else n
        for t in range(1, stop):
            users.append(u)
            positions.append(t)
    return np.array(users), np.array(positions)


def collect(plan, sequences, max_len, batch_size, rng, windows=None):
    got = {}
    for batch in iterate_batches(plan, sequences, max_len, batch_size, rng, windows):
        for r, c, i in zip(batch.rows, batch.cols, batch.sample_index, strict=True):
            assert i not in got, "an example appears twice in one epoch"
            got[int(i)] = batch.windows[r, : c + 1]
    return got


@pytest.mark.parametrize("max_len", [4, 8, 50])
def test_prefix_plan_reproduces_every_example_input_exactly(sequences, max_len):
    users, positions = examples(sequences)
    plan = prefix_plan(users, positions, max_len)
    assert plan.n_samples == len(users)
    assert plan.n_units < len(users)  # prefixes of a user's head window share one pass
    got = collect(plan, sequences, max_len, batch_size=7, rng=np.random.default_rng(1))
    expected, lengths = pad_prefixes(sequences, users, positions, max_len)
    assert sorted(got) == list(range(len(users)))
    for i in range(len(users)):
        np.testing.assert_array_equal(got[i], expected[i, : lengths[i]])


def test_window_plan_covers_each_example_once_with_a_suffix_of_its_input(sequences):
    users, positions = examples(sequences)
    max_len = 4
    plan = window_plan(users, positions, max_len, np.random.default_rng(3))
    got = collect(plan, sequences, max_len, batch_size=5, rng=np.random.default_rng(2))
    assert sorted(got) == list(range(len(users)))
    for i, window in got.items():
        u, t = users[i], positions[i]
        full = sequences[u][:t]
        assert 1 <= len(window) <= min(t, max_len)
        np.testing.assert_array_equal(window, full[len(full) - len(window):])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_window_chunks_give_each_target_a_longer_input(sequences, chunk):
    users, positions = examples(sequences)
    max_len = 4
    plan = window_plan(users, positions, max_len, np.random.default_rng(5), chunk_size=chunk)
    got = collect(plan, sequences, max_len, batch_size=5, rng=np.random.default_rng(2))
    assert sorted(got) == list(range(len(users)))
    for i, window in got.items():
        u, t = users[i], positions[i]
        full = sequences[u][:t]
        # a suffix of the true input, at least L - chunk + 1 items long (or all of it)
        assert min(t, max_len - chunk + 1) <= len(window) <= min(t, max_len)
        np.testing.assert_array_equal(window, full[len(full) - len(window):])
    assert np.bincount(plan.sample_unit).max() <= chunk
    with pytest.raises(ValueError, match="chunk_size"):
        window_plan(users, positions, max_len, np.random.default_rng(5), chunk_size=max_len + 1)


def test_batches_hold_about_batch_size_examples(sequences):
    users, positions = examples(sequences)
    plan = prefix_plan(users, positions, 8)
    sizes = [len(b.rows) for b in iterate_batches(plan, sequences, 8, 10, np.random.default_rng(0))]
    assert sum(sizes) == len(users)
    assert all(10 <= s < 10 + 8 for s in sizes[:-1])


def test_same_target_partners():
    targets = np.array([5, 7, 5, 9, 5, 7])
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = same_target_partners(targets, rng)
        np.testing.assert_array_equal(targets[p], targets)
        assert p[3] == 3  # unique target: itself
        others = np.array([0, 1, 2, 4, 5])
        assert np.all(p[others] != others)
