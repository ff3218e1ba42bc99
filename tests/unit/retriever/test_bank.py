import threading

import numpy as np
import pytest

from retriever import bank as bank_module
from retriever.bank import MemoryBank
from retriever.errors import (
    DimensionMismatch,
    EmptyBank,
    InvalidParameter,
    InvalidVectors,
    UnknownEntries,
)
from retriever.index import IndexSpec
from retriever.synthetic import clustered

IVF = IndexSpec(kind="ivf_flat", exact_below=0)


def make_bank(small, spec=None, **kw):
    x, targets, users, positions = small
    return MemoryBank(x, targets, users, positions, spec=spec, **kw)


def leakage_mask(users, positions, q_user, q_pos, self_ids=None):
    """(Q, N) True where the DESIGN §3 rule hides an entry from a query."""
    mask = (users[None, :] == q_user[:, None]) & (positions[None, :] >= q_pos[:, None])
    if self_ids is not None:
        mask[np.arange(len(self_ids)), self_ids] = True
    return mask


def test_exact_bank_matches_brute_force_with_payload(small, brute_force):
    x, targets, users, positions = small
    values = np.random.default_rng(0).standard_normal((len(x), 3)).astype(np.float32)
    bank = make_bank(small, values=values)
    q = x[:40] + 0.05
    result = bank.search(q, 8)
    D_true, I_true = brute_force(q, x, 8)
    np.testing.assert_array_equal(result.I, I_true)
    np.testing.assert_allclose(result.D, D_true, atol=1e-5)
    np.testing.assert_array_equal(result.targets, targets[I_true])
    np.testing.assert_array_equal(result.users, users[I_true])
    np.testing.assert_array_equal(result.positions, positions[I_true])
    np.testing.assert_array_equal(result.values, values[I_true])
    assert result.D.dtype == np.float32 and result.I.dtype == np.int64
    assert result.usable.all() and not result.low_quality.any()


@pytest.mark.parametrize("spec", [None, IVF], ids=["flat", "ivf"])
def test_leakage_rule_and_self_exclusion_match_filtered_brute_force(small, spec, brute_force):
    """A training query drops itself and its user's entries at or after its position."""
    x, _, users, positions = small
    bank = make_bank(small, spec=spec)
    rows = np.arange(0, 2_000, 37)
    result = bank.search(x[rows], 10, exclude_ids=rows[:, None], exclude_user=users[rows],
                         exclude_from_position=positions[rows])
    mask = leakage_mask(users, positions, users[rows], positions[rows], rows)
    _, I_true = brute_force(x[rows], x, 10, mask)
    assert not mask[np.arange(len(rows))[:, None], result.I].any()
    assert (result.I >= 0).all()
    if spec is None:
        np.testing.assert_array_equal(result.I, I_true)
    else:
        hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.I, I_true, strict=True)])
        assert hits >= 0.9


def test_overfetch_still_returns_k_when_a_user_owns_the_neighbourhood(brute_force):
    """Each user's 300 entries sit around one point: the user's own entries fill the first
    ~300 neighbours, so the leakage rule forces repeated over-fetch (and the IVF fallback)."""
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20, 32))
    x = np.repeat(centers, 300, axis=0) + 0.05 * rng.standard_normal((6_000, 32))
    users = np.repeat(np.arange(20), 300)
    positions = np.tile(np.arange(300), 20)
    for spec in (None, IVF):
        bank = MemoryBank(x, np.zeros(6_000, int), users, positions, spec=spec)
        rows = np.arange(0, 6_000, 150)
        result = bank.search(x[rows], 5, exclude_user=users[rows],
                             exclude_from_position=np.zeros(len(rows), int))
        _, I_true = brute_force(x[rows], x, 5, leakage_mask(users, positions, users[rows], 0 * rows))
        assert (result.I >= 0).all()
        assert (result.users != users[rows][:, None]).all()
        if spec is None:
            np.testing.assert_array_equal(result.I, I_true)
        else:
            hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(result.I, I_true, strict=True)])
            assert hits >= 0.9


def test_exclusions_are_vectorised_for_training_batches(small, monkeypatch):
    """A 4096-query batch with per-query exclusions must not fall back to exact scans per query."""
    x, _, users, positions = small
    bank = make_bank(small, spec=IVF)
    calls = []
    original = MemoryBank._exact_filtered

    def spy(self, q, *args):
        calls.append(len(q))
        return original(self, q, *args)

    monkeypatch.setattr(MemoryBank, "_exact_filtered", spy)
    rows = np.random.default_rng(0).integers(0, len(x), 4096)
    many = np.stack([rows, (rows + 1) % len(x), (rows + 2) % len(x)], axis=1)
    result = bank.search(x[rows], 10, exclude_ids=many, exclude_user=users[rows],
                         exclude_from_position=positions[rows])
    assert (result.I >= 0).all()
    assert not (result.I[:, :, None] == many[:, None, :]).any()
    assert sum(calls) <= 0.02 * len(rows)


def test_rowwise_isin_matches_python_sets():
    rng = np.random.default_rng(2)
    A = rng.integers(0, 50, (30, 12))
    for m in (1, 3, 9):
        B = rng.integers(-1, 50, (30, m))
        expected = np.array([[a in set(b[b >= 0]) for a in row_a] for row_a, b in zip(A, B, strict=True)])
        np.testing.assert_array_equal(bank_module._rowwise_isin(A, B), expected)


def test_fewer_eligible_than_k_pads_with_missing(small):
    x, _, users, _ = small
    bank = make_bank(small)
    keep_user = 7
    others = np.flatnonzero(users != keep_user)
    bank.remove(others)
    result = bank.search(x[:3], 8, exclude_user=np.full(3, keep_user), exclude_from_position=np.full(3, 6))
    assert (result.found.sum(axis=1) == 6).all()  # positions 0..5 of user 7 remain
    missing = ~result.found
    assert np.isneginf(result.D[missing]).all()
    assert (result.targets[missing] == -1).all() and np.isnan(result.quality[missing]).all()
    assert not result.low_quality[missing].any() and not result.usable[missing].any()


def test_quality_threshold_flags_without_dropping(small):
    x, *_ = small
    quality = np.linspace(0, 1, len(x), dtype=np.float32)
    bank = make_bank(small, quality=quality)
    plain = bank.search(x[:20], 10)
    flagged = bank.search(x[:20], 10, quality_threshold=0.5)
    np.testing.assert_array_equal(plain.I, flagged.I)
    np.testing.assert_array_equal(flagged.low_quality, quality[flagged.I] < 0.5)
    assert flagged.low_quality.any() and not flagged.low_quality.all()


def test_mmr_lambda_one_is_plain_search_and_lower_lambda_diversifies(small):
    x = small[0]
    dup = np.concatenate([x, np.repeat(x[:1], 5, axis=0)])  # five copies of entry 0
    n = len(dup)
    bank = MemoryBank(dup, np.zeros(n, int), np.zeros(n, int), np.zeros(n, int))
    plain = bank.search(dup[:1], 6)
    np.testing.assert_array_equal(bank.search(dup[:1], 6, mmr_lambda=1.0).I, plain.I)
    assert set(plain.I[0, :6]) == {0, 2000, 2001, 2002, 2003, 2004}
    diverse = bank.search(dup[:1], 6, mmr_lambda=0.5)
    copies = {0, 2000, 2001, 2002, 2003, 2004}
    assert diverse.I[0, 0] in copies  # the first pick is still the most similar
    assert diverse.I[0, 1] not in copies  # then a copy scores 0.5 * 1 - 0.5 * 1 = 0 and loses
    assert len(copies & set(diverse.I[0])) < 6
    np.testing.assert_allclose(diverse.D[0], (dup[diverse.I[0]] @ dup[0]), atol=1e-5)


def test_add_is_searchable_immediately_and_ids_continue(small):
    bank = make_bank(small, spec=IVF)
    new = clustered(50, 16, seed=99, n_clusters=3)
    ids = bank.add(new, np.full(50, 5), np.full(50, 1_000), np.arange(50))
    np.testing.assert_array_equal(ids, np.arange(2_000, 2_050))
    assert len(bank) == 2_050 and bank.index.ntotal == 2_050
    result = bank.search(new, 1)
    np.testing.assert_array_equal(result.I[:, 0], ids)
    assert (result.users == 1_000).all()
    for _ in range(30):  # many small adds grow the columns geometrically
        bank.add(new[:1], [1], [1], [1])
    assert len(bank) == 2_080


def test_remove_hides_entries_and_rebuild_keeps_ids(small):
    x, targets, *_ = small
    bank = make_bank(small, spec=IVF)
    first = bank.search(x[:5], 3).I
    assert bank.remove(first[:, 0]) == len(set(first[:, 0]))
    assert bank.remove(first[:, 0]) == 0  # already removed: idempotent
    after = bank.search(x[:5], 3)
    assert not np.isin(after.I, first[:, 0]).any()
    rebuilt = bank.rebuild()
    assert len(rebuilt) == len(bank) == 2_000 - len(set(first[:, 0]))
    again = rebuilt.search(x[:5], 3)
    np.testing.assert_array_equal(again.targets, targets[again.I])
    with pytest.raises(UnknownEntries, match="not in the bank"):
        bank.remove([5_000])


def test_update_quality_is_an_ema_with_duplicates_averaged(small):
    bank = make_bank(small, quality=np.full(2_000, 0.5, np.float32))
    bank.update_quality([3, 3, 4], [1.0, 0.0, 1.0], momentum=0.8)
    result = bank.search(small[0][[3, 4, 5]], 1)
    np.testing.assert_allclose(result.quality[:, 0], [0.5, 0.8 * 0.5 + 0.2 * 1.0, 0.5], rtol=1e-6)
    with pytest.raises(InvalidParameter, match="momentum"):
        bank.update_quality([3], [1.0], momentum=1.5)


def test_concurrent_adds_and_searches(small):
    x, *_ = small
    bank = make_bank(small, spec=IVF)
    errors = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                result = bank.search(x[:64], 10)
                assert (result.I >= 0).all()
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(40):
        bank.add(x[i : i + 5] + 0.01, [0] * 5, [0] * 5, [0] * 5)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and len(bank) == 2_200


def test_bad_inputs_raise_specific_errors(small):
    x, targets, users, positions = small
    bank = make_bank(small)
    with pytest.raises(DimensionMismatch, match="dimension 8, expected 16"):
        bank.search(np.ones((1, 8)), 3)
    with pytest.raises(InvalidVectors, match="NaN"):
        bank.search(np.full((1, 16), np.nan), 3)
    with pytest.raises(InvalidParameter, match="k must be positive"):
        bank.search(x[:1], 0)
    with pytest.raises(InvalidParameter, match="larger than"):
        bank.search(x[:1], 2_001)
    with pytest.raises(InvalidParameter, match=r"exclude_ids must be an integer \(Q=1, m\)"):
        bank.search(x[:1], 3, exclude_ids=np.array([1, 2]))
    with pytest.raises(InvalidParameter, match="needs exclude_user"):
        bank.search(x[:1], 3, exclude_from_position=[1])
    with pytest.raises(InvalidParameter, match="targets has length 3"):
        MemoryBank(x, targets[:3], users, positions)
    with pytest.raises(InvalidVectors, match="NaN or inf"):
        MemoryBank(np.full((3, 4), np.inf), [0] * 3, [0] * 3, [0] * 3)
    with pytest.raises(EmptyBank):
        MemoryBank(np.zeros((0, 4), np.float32), [], [], [])
    with pytest.raises(DimensionMismatch):
        bank.add(np.ones((1, 4)), [0], [0], [0])
    with pytest.raises(InvalidParameter, match="stores no values"):
        bank.add(x[:1], [0], [0], [0], values=np.ones((1, 2)))
    bank.remove(np.arange(2_000))
    with pytest.raises(EmptyBank, match="no live entries"):
        bank.search(x[:1], 1)


@pytest.mark.parametrize("spec", [None, IVF])
def test_unit_queries_skip_only_the_checks(small, spec):
    """unit_queries=True (the service's keys, already float32 unit rows) gives what the checked
    path gives for the same rows, with and without exclusions, up to float rounding (normalising
    a unit row again moves it by an ulp); anything else still goes through the checks (an empty
    batch is still refused)."""
    x, _, users, _ = small
    bank = make_bank(small, spec=spec)
    q = x[:12] + 0.05
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    for kw in ({}, {"exclude_user": users[:12]}):
        a, b = bank.search(q, 7, **kw), bank.search(q, 7, unit_queries=True, **kw)
        np.testing.assert_array_equal(a.I, b.I)
        np.testing.assert_allclose(a.D, b.D, rtol=1e-6)
    with pytest.raises(InvalidVectors):
        bank.search(np.zeros((0, q.shape[1]), dtype=np.float32), 3, unit_queries=True)
    unnormalised = bank.search(q * 3, 7, unit_queries=True)  # float32 but not unit: trusted as given
    np.testing.assert_allclose(unnormalised.D, bank.search(q, 7).D * 3, rtol=1e-5)


@pytest.mark.parametrize("spec", [None, IVF], ids=["flat", "ivf"])
def test_search_without_payload_gathers_only_ids_and_values(small, spec):
    """payload=False (a served request that explains nothing) answers with the same neighbours,
    similarities and values as a full search, one query or many, with and without exclusions
    and after removals, and leaves the rest of the payload out."""
    x, _, users, _ = small
    values = np.random.default_rng(1).standard_normal((len(x), 3)).astype(np.float32)
    bank = make_bank(small, spec=spec, values=values)
    q = np.ascontiguousarray(x[:9] + 0.03, dtype=np.float32)
    for removed in (False, True):
        if removed:
            bank.remove(bank.search(q[:1], 3).I[0])  # the nearest entries of query 0 are gone
        for rows, kw in ((slice(0, 1), {}), (slice(0, 9), {}), (slice(0, 9), {"exclude_user": users[:9]})):
            full = bank.search(q[rows], 6, **kw)
            lean = bank.search(q[rows], 6, payload=False, **kw)
            np.testing.assert_array_equal(lean.I, full.I)
            np.testing.assert_array_equal(lean.D, full.D)
            np.testing.assert_array_equal(lean.values, full.values)
            assert lean.targets is None and lean.users is None and lean.quality is None
            assert full.users is not None and full.users.shape == full.I.shape
