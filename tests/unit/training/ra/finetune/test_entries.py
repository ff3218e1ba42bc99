import numpy as np
import pytest
import torch

from training.data.sequences import pad_prefixes
from training.data.synthetic import generate_interactions, write_inter
from training.model import ModelConfig, SequenceEncoder
from training.ra.encode import encode_prefixes
from training.ra.finetune.entries import BankEntries, entry_usefulness, gate_score


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.data.sequences import load_dataset

    path = tmp_path_factory.mktemp("bank") / "syn.inter"
    write_inter(generate_interactions(40, 30, mean_length=18, seed=1), path)
    return load_dataset(path)


def test_encode_prefixes_matches_one_pass_per_prefix(data):
    """Shared passes over head windows give each prefix the representation a pass of its own gives."""
    torch.manual_seed(0)
    L = 8  # shorter than most users' histories: both head windows and sliding windows occur
    encoder = SequenceEncoder(ModelConfig(n_items=data.n_items, max_len=L, dim=16, n_layers=2, n_heads=2,
                                          inner=32)).eval()
    users = np.concatenate([np.full(len(s) - 1, u) for u, s in enumerate(data.sequences)])
    positions = np.concatenate([np.arange(1, len(s)) for s in data.sequences])
    order = np.random.default_rng(0).permutation(len(users))  # any order in, same order out
    users, positions = users[order], positions[order]
    h = encode_prefixes(encoder, data, users, positions, L, batch_size=7, device=torch.device("cpu"))
    with torch.no_grad():
        direct = encoder(torch.from_numpy(pad_prefixes(data, users, positions, L)[0]))
    assert (positions > L).any() and (positions <= L).any()
    torch.testing.assert_close(h, direct, rtol=1e-5, atol=1e-5)


def test_encode_prefixes_refuses_empty_prefixes(data):
    encoder = SequenceEncoder(ModelConfig(n_items=data.n_items, max_len=8, dim=8, n_layers=1, n_heads=1, inner=8))
    with pytest.raises(ValueError, match="position >= 1"):
        encode_prefixes(encoder, data, np.array([0]), np.array([0]), 8, batch_size=4, device=torch.device("cpu"))


def test_bank_entries_minimum_prefix_and_eviction():
    entries = BankEntries.for_examples(np.array([1, 2, 3, 4, 5, 6]), min_prefix=3)
    assert entries.ids.tolist() == [2, 3, 4, 5]
    assert (entries.usefulness == 1).all()
    entries.absorb(np.array([3, -1, 5, 4]), np.array([0.2, 9.0, 0.4, 0.05], dtype=np.float32))
    assert entries.usefulness.tolist() == pytest.approx([1, 1, 1, 0.2, 0.05, 0.4])  # -1 (not an example) skipped
    assert entries.evict(0.5, keep_at_least=2) == 2  # 3 under the floor, room for 2: the worst two
    assert entries.ids.tolist() == [2, 5] and entries.evicted == 2
    assert entries.evict(0.5, keep_at_least=0) == 1
    assert entries.ids.tolist() == [2]
    again = BankEntries.from_state(entries.state())
    assert again.ids.tolist() == [2] and again.evicted == 3
    np.testing.assert_array_equal(again.usefulness, entries.usefulness)


def test_entry_usefulness_is_share_relative_to_uniform():
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    p = torch.tensor([[0.5, 0.25, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0]])
    log_p = p.log().masked_fill(~mask, float("-inf"))
    value = entry_usefulness(log_p, mask)
    torch.testing.assert_close(value, torch.tensor([[1.5, 0.75, 0.0, 0.75], [1.0, 0.0, 0.0, 0.0]]))


def test_gate_score_is_weighted_mean_over_used_neighbours():
    w = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0]])
    v = torch.tensor([[0.4, 0.8, -5.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    q = gate_score(w, v, mask)
    assert q[0].item() == pytest.approx(0.75 * 0.4 + 0.25 * 0.8)
    assert q[1].item() == float("-inf")  # no neighbour: always under a gate
