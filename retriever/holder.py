"""BankHolder: serve searches from one bank while the next is loaded, validated and swapped in.

A search reads the holder's (bank, version) pair once, as a single attribute
read, and runs on that bank to the end; a swap replaces the pair in one
assignment after the new bank passed ``validate_bank``. Searches never take
the lock that swaps hold during loading and validation, so a swap neither
fails nor blocks them, and every answer comes from one complete bank.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from retriever.bank import MemoryBank, SearchResult
from retriever.errors import EmptyBank, ValidationFailed
from retriever.index import exact_knn

__all__ = ["BankHolder", "validate_bank"]

logger = logging.getLogger(__name__)


def validate_bank(bank: MemoryBank, *, sample: int = 256, k: int = 10, min_recall: float = 0.9,
                  expected_dim: int | None = None, min_size: int = 1, seed: int = 0) -> dict:
    """Check a bank before it may serve; raise ``ValidationFailed`` naming the failed check.

    Checks the live size, the dimension, that the index holds every row, and
    recall@k of ``bank.search`` against exact numpy/faiss search, on up to
    ``sample`` stored vectors used as queries (each one's own entry excluded
    from both lists). Returns the measured figures.
    """
    size = len(bank)
    if size < min_size:
        raise ValidationFailed(f"bank has {size} live entries, fewer than min_size={min_size}")
    if expected_dim is not None and bank.dim != expected_dim:
        raise ValidationFailed(f"bank dimension is {bank.dim}, expected {expected_dim}")
    with bank.read_locked() as cols:
        rows = cols["ids"].shape[0]
        live_vectors = cols["vectors"][cols["alive"]]
        live_ids = cols["ids"][cols["alive"]]
    if bank.index.ntotal != rows:
        raise ValidationFailed(f"index holds {bank.index.ntotal} vectors but the bank has {rows} rows")
    report = {"size": size, "dim": bank.dim, "device": bank.device, "recall": None, "sample": 0}
    k = min(k, size - 1)
    if k < 1:
        return report  # one entry: nothing to compare
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(size, size=min(sample, size), replace=False))
    queries, self_ids = live_vectors[pick], live_ids[pick]
    _, I_true = exact_knn(queries, live_vectors, k + 1)
    truth = np.where(I_true >= 0, live_ids[np.maximum(I_true, 0)], -1)
    # drop each query's own entry from the exact list (it may sit anywhere among ties)
    not_self = truth != self_ids[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    truth = np.take_along_axis(truth, order, 1)
    got = bank.search(queries, k, exclude_ids=self_ids[:, None]).I
    recall = float((got[:, :, None] == truth[:, None, :]).any(axis=2).sum() / truth.size)
    report.update(recall=round(recall, 4), sample=int(pick.size))
    if recall < min_recall:
        raise ValidationFailed(f"recall@{k} against exact search is {recall:.3f} < min_recall={min_recall} "
                               f"on {pick.size} stored vectors")
    return report


@dataclass(frozen=True)
class _Serving:
    bank: MemoryBank | None
    version: str | None


class BankHolder:
    """Holds the serving bank; ``swap`` validates and replaces it without pausing searches."""

    def __init__(self, bank: MemoryBank | None = None, *, min_recall: float = 0.9, sample: int = 256,
                 expected_dim: int | None = None):
        self.min_recall = min_recall  # recall@10 a new bank must reach against exact search
        self.sample = sample  # stored vectors used as validation queries
        self.expected_dim = expected_dim  # the query encoder's output size, when known
        self._serving = _Serving(bank, bank.version if bank is not None else None)
        self._swap_lock = threading.Lock()  # serialises swappers; searches never take it
        self.swaps = 0

    @property
    def bank(self) -> MemoryBank | None:
        return self._serving.bank

    @property
    def version(self) -> str | None:
        return self._serving.version

    def search(self, queries, k: int, **kwargs) -> SearchResult:
        """``MemoryBank.search`` on the serving bank; ``result.version`` says which version answered."""
        serving = self._serving  # one read: the whole search uses this bank
        if serving.bank is None:
            raise EmptyBank("no memory bank has been loaded into the holder yet")
        result = serving.bank.search(queries, k, **kwargs)
        result.version = serving.version
        return result

    def swap(self, bank: MemoryBank, version: str | None = None, *, validate: bool = True) -> dict:
        """Validate ``bank`` (unless told not to) and make it the serving bank; returns the report.

        On ``ValidationFailed`` the serving bank is left as it was.
        """
        with self._swap_lock:
            report = {}
            if validate:
                report = validate_bank(bank, sample=self.sample, min_recall=self.min_recall,
                                       expected_dim=self.expected_dim)
            self._serving = _Serving(bank, version or bank.version)
            self.swaps += 1
        logger.info("serving version %s (%d entries, %s)", self.version, len(bank), report)
        return report

    def load(self, store, version: str | None = None, **load_kwargs) -> dict:
        """Load ``version`` (default: the store's current) from an ``ArtifactStore`` and swap it in."""
        bank = store.load(version, **load_kwargs)
        return self.swap(bank, bank.version)
