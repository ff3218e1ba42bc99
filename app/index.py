"""The service's memory bank: built from users' sequences with the served retrieval bundle,
published as versioned artifacts, loaded and swapped under live traffic, and grown by events
between rebuilds.

An entry is one prefix of one user: key = the bundle's unit vector for the prefix, payload
target = the next item, user = an index into the version's user names (saved with it as an
attachment), position = where the target sits in that user's sequence, values = the next m
items and, for the head, the prefix's representation (``RetrievalBundle.pack_values``).

Threads: searches read ``serving`` once and keep that ``ServingIndex`` to the end; ``swap``
replaces it in one assignment; ``add_live`` mutates the serving bank under ``_names_lock`` (the
bank has its own read/write lock). Rebuilds run in worker threads, never on the event loop.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retriever import ArtifactStore, MemoryBank, validate_bank
from retriever.errors import RetrieverError, UnknownVersion

if TYPE_CHECKING:
    from training.ra.bundle import RetrievalBundle

logger = logging.getLogger(__name__)

MIN_PREFIX = 1  # an entry needs at least one item before its target


@dataclass
class ServingIndex:
    """One loaded bank version and what the service needs beside it."""

    bank: MemoryBank
    version: str
    user_names: list[str]  # bank payload user u is user_names[u]; live adds append
    built_at: str
    model_version: str | None
    user_rows: dict[str, int] = field(init=False)
    live_events: set[tuple[str, str, float]] = field(init=False, default_factory=set)  # (user, item, ts) added

    def __post_init__(self) -> None:
        self.user_rows = {name: i for i, name in enumerate(self.user_names)}

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "size": len(self.bank), "type": self.bank.index.kind,
                "device": self.bank.device, "built_at": self.built_at, "model_version": self.model_version}


def examples(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, position) whose target has at least MIN_PREFIX items before it: two (M,) int64."""
    counts = np.maximum(np.array([len(s) for s in sequences], dtype=np.int64) - MIN_PREFIX, 0)
    rows = np.repeat(np.arange(len(sequences), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)  # each row's first example
    return rows, np.arange(len(rows), dtype=np.int64) - first + MIN_PREFIX


def build_bank(bundle: RetrievalBundle, sequences: list[np.ndarray], rows: np.ndarray, positions: np.ndarray, *,
               users: np.ndarray | None = None, limits: np.ndarray | None = None) -> MemoryBank:
    """A bank of the (row, position) examples of ``sequences`` (id arrays), keyed by ``bundle``.
    users: (M,) payload user per example (default: the row); limits: (rows,) the last position a
    split's bank may know of each row (``training.ra.bank.split_limits``), None: everything."""
    from training.ra.bank import next_items_of

    if len(rows) == 0:
        raise RetrieverError("no sequence has two known items: nothing to put in the memory bank")
    h, keys = bundle.encode(sequences, rows, positions)
    nxt, _ = next_items_of(sequences, rows, positions, limits, bundle.m)
    return MemoryBank(keys, nxt[:, 0], rows if users is None else users, positions,
                      values=bundle.pack_values(nxt, h))


def build_and_publish(run_dir: str, index_root: str, histories: dict[str, np.ndarray], *, model_version: str,
                      min_recall: float, keep_versions: int, threads: int = 1, nice: int = 10) -> dict[str, Any]:
    """A whole rebuild in a child process: load the run's retrieval bundle, encode every history, build,
    validate and publish a new version (made current). Runs with ``threads`` torch threads at
    ``nice`` priority, so the serving process keeps the CPU it needs; returns ``publish``'s report."""
    import os

    import torch

    from training.ra.bundle import load_bundle

    os.nice(nice)
    torch.set_num_threads(threads)
    manager = IndexManager(load_bundle(run_dir), index_root, model_version=model_version,
                           min_recall=min_recall, keep_versions=keep_versions)
    with torch.inference_mode():
        bank, names = manager.build(histories)
    return manager.publish(bank, names)


class IndexManager:
    """Builds, publishes, loads and serves bank versions under ``root`` (an ``ArtifactStore``)."""

    def __init__(self, bundle: RetrievalBundle, root: str | Path, *, model_version: str,
                 min_recall: float = 0.9, keep_versions: int = 5) -> None:
        self.bundle = bundle
        self.store = ArtifactStore(root)
        self.model_version = model_version
        self.min_recall = min_recall
        self.keep_versions = keep_versions
        self.serving: ServingIndex | None = None
        self._names_lock = threading.Lock()
        self._publish_lock = threading.Lock()  # one build/publish in this process at a time
        self.live_added = 0

    # ------------------------------------------------------------------ build and publish

    def build(self, histories: dict[str, np.ndarray]) -> tuple[MemoryBank, list[str]]:
        """A new bank of every prefix of every user's sequence (known item ids, oldest first)."""
        names = sorted(histories)
        sequences = [histories[n] for n in names]
        rows, positions = examples(sequences)
        bank = build_bank(self.bundle, sequences, rows, positions)
        return bank, names

    def publish(self, bank: MemoryBank, user_names: list[str], *, note: str = "") -> dict[str, Any]:
        """Validate ``bank``, save it as a new version, point ``current`` at it and serve it.

        Raises ``ValidationFailed`` (nothing saved, nothing swapped) for a bank that fails validation.
        """
        with self._publish_lock:
            start = time.perf_counter()
            report = validate_bank(bank, min_recall=self.min_recall, expected_dim=self.bundle.encoder.cfg.dim)
            built_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            version = self.store.save(
                bank, producer_checksum=self.model_version, make_current=True,
                attachments={"user_names": np.asarray(user_names, dtype=np.str_)},
                extra_meta={"built_at": built_at, "model_version": self.model_version, "note": note})
            self.serving = ServingIndex(bank, version, list(user_names), built_at, self.model_version)
            self.store.prune(self.keep_versions)
            logger.info("published index %s: %d entries in %.1f s", version, len(bank), time.perf_counter() - start)
            return {"version": version, "size": len(bank), "validation": report}

    # ------------------------------------------------------------------ load and swap

    def load(self, version: str | None = None) -> ServingIndex:
        """Verify, load and validate ``version`` (default: the store's current), then serve it.

        A corrupted artifact, one made by another model, or one failing validation raises a
        ``RetrieverError`` and leaves the serving index as it was.
        """
        version = version or self.store.current()
        if version is None:
            raise RetrieverError(f"no index version in {self.store.root} yet; build one first")
        bank = self.store.load(version, expect_producer=self.model_version)
        validate_bank(bank, min_recall=self.min_recall, expected_dim=self.bundle.encoder.cfg.dim)
        names = [str(n) for n in self.store.load_attachment(version, "user_names")]
        meta = self.store.manifest(version).get("extra", {})
        serving = ServingIndex(bank, version, names, meta.get("built_at", "?"), meta.get("model_version"))
        self.serving = serving
        logger.info("serving index %s (%d entries)", version, len(bank))
        return serving

    def switch(self, version: str) -> ServingIndex:
        """Serve ``version`` and make it the artifact root's current one (only once it loaded)."""
        serving = self.load(version)
        self.store.set_current(version)
        return serving

    def rollback(self) -> ServingIndex:
        """Serve the version before the current one and make it current; refused (nothing changes)
        when there is none or it fails to load."""
        current = self.store.current()
        older = [v for v in self.store.versions() if current is None or int(v[1:]) < int(current[1:])]
        if not older:
            raise UnknownVersion(f"no version older than {current} in {self.store.root} to roll back to")
        return self.switch(older[-1])

    # ------------------------------------------------------------------ live entries

    def add_live(self, user: str, sequence: np.ndarray, positions: np.ndarray, events: list[tuple[str, float]]
                 ) -> int:
        """Add the user's (prefix, target) entries at ``positions`` of ``sequence`` (known ids) to the
        serving bank; searchable when this returns, kept until the next rebuild replaces the bank.
        events: the (item, timestamp) of each position; one already added to this bank is skipped,
        so a re-posted event is not banked twice. Returns how many entries were added."""
        serving = self.serving
        if serving is None:
            return 0
        with self._names_lock:
            fresh = [i for i, (p, e) in enumerate(zip(positions, events, strict=True))
                     if p >= MIN_PREFIX and (user, *e) not in serving.live_events]
            serving.live_events.update((user, *events[i]) for i in fresh)
        positions = positions[fresh]
        if len(positions) == 0:
            return 0
        with self._names_lock:
            row = serving.user_rows.get(user)
            if row is None:
                row = len(serving.user_names)
                serving.user_names.append(user)
                serving.user_rows[user] = row
        from training.ra.bank import next_items_of

        zeros = np.zeros(len(positions), dtype=np.int64)
        h, keys = self.bundle.encode([sequence], zeros, positions)
        nxt, _ = next_items_of([sequence], zeros, positions, None, self.bundle.m)
        serving.bank.add(keys, nxt[:, 0], np.full(len(positions), row, dtype=np.int64), positions,
                         values=self.bundle.pack_values(nxt, h))
        self.live_added += len(positions)
        return len(positions)
