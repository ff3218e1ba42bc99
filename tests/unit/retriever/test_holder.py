import threading
import time

import numpy as np
import pytest

from retriever.bank import MemoryBank
from retriever.errors import EmptyBank, ValidationFailed
from retriever.holder import BankHolder, validate_bank
from retriever.index import IndexSpec, build_index
from retriever.store import ArtifactStore
from retriever.synthetic import clustered

X = clustered(2_000, 16, seed=31)


def bank_for(tag: int, spec=None) -> MemoryBank:
    """Every entry's target and user carry ``tag``, so an answer shows which bank gave it."""
    n = len(X)
    return MemoryBank(X, np.full(n, tag), np.full(n, tag), np.arange(n), spec=spec)


def test_validate_reports_recall_and_checks_size_and_dim():
    report = validate_bank(bank_for(1, IndexSpec(kind="ivf_flat", exact_below=0)))
    assert report["size"] == 2_000 and report["dim"] == 16 and report["recall"] >= 0.9
    with pytest.raises(ValidationFailed, match="expected 32"):
        validate_bank(bank_for(1), expected_dim=32)
    with pytest.raises(ValidationFailed, match="fewer than min_size=5000"):
        validate_bank(bank_for(1), min_size=5_000)


def test_validate_refuses_an_index_over_the_wrong_vectors():
    bank = bank_for(1)
    bank.index = build_index(clustered(2_000, 16, seed=99))  # same size and dim, wrong content
    with pytest.raises(ValidationFailed, match="recall@10 against exact search"):
        validate_bank(bank)


def test_failed_swap_keeps_serving_the_old_bank():
    holder = BankHolder(bank_for(1), expected_dim=16)
    holder.swap(bank_for(2), "v2")
    bad = bank_for(3)
    bad.index = build_index(clustered(2_000, 16, seed=98))
    with pytest.raises(ValidationFailed):
        holder.swap(bad, "v3")
    assert holder.version == "v2"
    assert (holder.search(X[:3], 4).targets == 2).all()


def test_empty_holder_says_so():
    with pytest.raises(EmptyBank, match="no memory bank has been loaded"):
        BankHolder().search(X[:1], 1)


@pytest.mark.slow
def test_load_test_four_searchers_twenty_swaps(tmp_path):
    """4 threads search non-stop while 20 new versions are saved, loaded, validated and swapped in:
    no errors, and every answer is whole and comes from the bank its version names."""
    store = ArtifactStore(tmp_path)
    holder = BankHolder(expected_dim=16)
    holder.load(store_first(store))
    stop = threading.Event()
    errors, answered, versions_seen = [], [0] * 4, [set() for _ in range(4)]
    rows = np.arange(0, 2_000, 97)

    def searcher(i):
        while not stop.is_set():
            try:
                result = holder.search(X[rows], 10)
                tag = int(result.version[1:])
                assert (result.I >= 0).all(), "incomplete answer"
                assert (result.targets == tag).all(), "payload from another version"
                np.testing.assert_array_equal(result.I[:, 0], rows)  # each stored vector finds itself
                answered[i] += 1
                versions_seen[i].add(tag)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        n = len(store.versions()) + 1
        store.save(bank_for(n, IndexSpec(kind="ivf_flat", exact_below=0)))
        holder.load(store)
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert holder.version == "v000021" and holder.swaps == 21
    assert all(count > 0 for count in answered)
    assert len(set().union(*versions_seen)) > 1


def store_first(store: ArtifactStore) -> ArtifactStore:
    store.save(bank_for(1))
    return store
