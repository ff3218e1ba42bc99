"""The one neighbourhood rule: banks per split, searches against brute force, and a leaky
bank that the rule refuses (and that would indeed score higher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluate import ndcg_at
from training.ra import bank as bk
from training.ra import stage as st
from training.ra.scoring import target_ranks
from training.ra.vote import VoteSettings


@pytest.fixture(scope="module")
def prep(tiny_base):
    return st.prepare(tiny_base, k_train=8, k_eval=8, own_user="keep", m_max=3)


def test_split_banks_hold_no_target_of_their_split(prep):
    data, split = prep.data, prep.split
    n = data.lengths
    for which, first_forbidden in (("valid", n - 2), ("test", n - 1)):
        bank = prep.banks[which]
        evaluated = n[bank.users] >= 3
        # every item a bank may hand out lies before the split's target position of its user
        pos = np.where(bank.next_items > 0, bank.next_pos, -1)
        assert (pos[evaluated] < first_forbidden[bank.users][evaluated][:, None]).all()
        assert (bank.next_items[bank.next_pos < 0] == 0).all()
    # the test bank = training + validation examples; the validation bank = training examples
    assert len(prep.banks["test"]) == len(prep.banks["valid"]) + len(split.valid_users)


def test_search_matches_brute_force_under_both_rules(prep):
    bank = prep.banks["valid"]
    q = prep.train
    rows = np.arange(0, len(q), 7)
    keys = bank.query_keys(q.h[torch.from_numpy(rows)])
    sims = keys @ bank.keys.T  # (Q, M)
    for rule in ("keep", "exclude"):
        D, I = bk.search(bank, keys, q.users[rows], q.positions[rows], 5, rule)
        own = bank.users[None, :] == q.users[rows][:, None]
        hidden = own & (bank.positions[None, :] >= q.positions[rows][:, None]) if rule == "keep" else own
        ref = np.where(hidden, -np.inf, sims)
        expect = np.sort(ref, axis=1)[:, ::-1][:, :5]
        np.testing.assert_allclose(D, expect, atol=1e-5)
        assert not hidden[np.arange(len(rows))[:, None], I].any()  # never itself or its own future


def test_visible_next_hides_the_query_users_present_and_future(prep):
    bank = prep.banks["valid"]
    # a training query at (u, t) that retrieves its own user's entry at t - 1: that entry's
    # first item (position t - 1) is visible, the next ones (t, t + 1: the query's target and
    # beyond) are not
    u = int(np.flatnonzero(prep.data.lengths >= 8)[0])
    t = 5
    entry = int(np.flatnonzero((bank.users == u) & (bank.positions == t - 1))[0])
    items = bk.visible_next(bank, np.array([[entry]]), np.array([u]), np.array([t]), 3)[0, 0]
    seq = prep.data.sequences[u]
    assert items[0] == seq[t - 1] and (items[1:] == 0).all()
    other = bk.visible_next(bank, np.array([[entry]]), np.array([u + 1]), np.array([t]), 3)[0, 0]
    assert (other == seq[t - 1: t + 2]).all()  # another user sees all three


def test_a_leaky_bank_is_refused_and_would_have_scored_higher(prep):
    valid = prep.valid
    with pytest.raises(bk.BankRuleError, match="holds the target"):
        bk.search(prep.banks["test"], prep.banks["test"].query_keys(valid.h), valid.users, valid.positions, 5,
                  "keep")
    # bypass the rule by hand: validation queries against the test bank, which holds their
    # targets as its validation entries' first next item (reached through the own-user entry)
    leaky = prep.banks["test"]
    res = leaky.index.search(leaky.query_keys(valid.h), 8)
    D, I = res.D, res.I
    items = leaky.next_items[np.maximum(I, 0), :1]
    from training.ra.vote import confidence_lambda, interpolate, vote_distribution

    p = vote_distribution(D, items, prep.data.n_items, tau=0.1, decay=1.0, seen=valid.seen)
    s = VoteSettings(k=8, m=1, lam=0.5)
    cheat = interpolate(prep.base_logits(valid), p, confidence_lambda(D, s), 1.0)
    honest = st.vote_scores(prep, "valid", s)

    def ndcg(x):
        return float(ndcg_at(target_ranks(x, valid.targets, valid.seen), 10).mean())

    assert ndcg(cheat) > ndcg(honest) + 0.1


def test_k_larger_than_the_bank_is_refused(prep):
    bank = prep.banks["valid"]
    with pytest.raises(bk.BankRuleError, match="larger than"):
        bk.search(bank, bank.keys[:1], bank.users[:1], np.array([10**6]), len(bank) + 1, "keep")
