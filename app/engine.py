"""Inference for the service: a trained run directory turned into ranked raw item ids.

`Engine.recommend_batch` scores many queries with one forward pass; `MicroBatcher` gathers
concurrent single requests (for at most `wait_ms` or `max_size` requests) into such a batch and
runs it in a worker thread, so the event loop keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from training.data import Vocabulary
    from training.model import SequenceEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    items: list[str]  # raw item ids, oldest first (stored history, then the request's items)
    k: int
    exclude_seen: bool = True  # drop the sequence's own items from the ranking
    exclude_items: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Recommendation:
    items: list[str]  # raw item ids, best first
    scores: list[float]
    fallback: str | None  # "popular" when the sequence had no known item
    unknown_items: list[str]  # request items not in the vocabulary, deduplicated, first-seen order
    sequence: list[str]  # the known items the model read (after truncation to max_len)


def _popularity(run_dir: Path, vocab: Vocabulary, n_items: int) -> tuple[np.ndarray, str]:
    """Training interaction counts per item, (n_items,) float64 summing to 1, and where they came from.

    Read from the run's training data when the file is still there; uniform otherwise.
    """
    from training.config import load_config
    from training.data import leave_one_out
    from training.run import item_popularity, load_run_data

    try:
        cfg = load_config(run_dir / "config.yaml")
        data = load_run_data(cfg, item_vocab=vocab, fetch=False)  # never download at service start
        counts = item_popularity(data, leave_one_out(data))[1:].astype(np.float64)
    except Exception as e:  # data moved or unreadable: the service still runs, popularity is flat
        logger.warning("popularity from training data unavailable (%s); using uniform", e)
        return np.full(n_items, 1.0 / n_items), "uniform"
    if counts.shape != (n_items,) or counts.sum() <= 0:
        logger.warning("training data does not match the model's %d items; using uniform popularity", n_items)
        return np.full(n_items, 1.0 / n_items), "uniform"
    return counts / counts.sum(), "training-data"


class Engine:
    """A loaded model, its vocabulary and item popularity. Thread-safe for inference."""

    def __init__(self, model: SequenceEncoder, vocab: Vocabulary, popularity: np.ndarray, *, model_version: str,
                 device: str = "cpu") -> None:
        n_items = model.cfg.n_items
        if len(vocab) - 1 != n_items:
            raise ValueError(f"vocabulary has {len(vocab) - 1} items but the model has {n_items}")
        if popularity.shape != (n_items,):
            raise ValueError(f"popularity must have shape ({n_items},), got {popularity.shape}")
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.device = torch.device(device)
        self.n_items = n_items
        self.max_len = model.cfg.max_len
        self.model_version = model_version
        self.index_version: str | None = None  # set once a retrieval index is served with the model
        self.popularity = torch.as_tensor(popularity, dtype=torch.float32)  # (n_items,)

    @property
    def cache_version(self) -> str:
        """Cached results are valid for one model and one index; a swap of either retires them."""
        return f"{self.model_version}|{self.index_version}"

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, device: str = "cpu") -> Engine:
        from training.data import Vocabulary
        from training.run import RunError, load_model_file

        run = Path(run_dir)
        for name in ("config.yaml", "model.pt", "items.json"):
            if not (run / name).is_file():
                raise RunError(f"{run} is not a finished run: {name} is missing")
        model, blob = load_model_file(run / "model.pt", map_location=device)
        vocab = Vocabulary.load(run / "items.json")
        popularity, source = _popularity(run, vocab, model.cfg.n_items)
        version = f"{run.name}@{str(blob.get('checksum', 'unknown'))[:12]}"
        logger.info("loaded %s: %d items, max_len %d, popularity from %s", version, model.cfg.n_items,
                    model.cfg.max_len, source)
        return cls(model, vocab, popularity, model_version=version, device=device)

    def _known_ids(self, tokens: list[str]) -> tuple[np.ndarray, list[str]]:
        """(ids > 0 in order, unknown tokens deduplicated). The padding token counts as unknown."""
        ids = self.vocab.ids(tokens) if tokens else np.zeros(0, dtype=np.int64)
        unknown = list(dict.fromkeys(t for t, i in zip(tokens, ids, strict=True) if i <= 0))
        return ids[ids > 0], unknown

    def recommend_batch(self, queries: list[Query]) -> list[Recommendation]:
        """Rank items for every query with at most one forward pass."""
        if not queries:
            return []
        seqs, unknowns, excluded = [], [], []
        for q in queries:
            if q.k < 1:
                raise ValueError(f"k must be >= 1, got {q.k}")
            ids, unknown = self._known_ids(q.items)
            seqs.append(ids[-self.max_len:])
            unknowns.append(unknown)
            excl, _ = self._known_ids(q.exclude_items)
            excluded.append(np.concatenate([ids, excl]) if q.exclude_seen else excl)

        scores = self.popularity.expand(len(queries), -1).clone()  # (B, n_items); cold rows keep these
        warm = [i for i, s in enumerate(seqs) if len(s)]
        if warm:
            width = max(len(seqs[i]) for i in warm)
            batch = torch.zeros(len(warm), width, dtype=torch.int64)  # (B', L), left-aligned
            for row, i in enumerate(warm):
                batch[row, : len(seqs[i])] = torch.from_numpy(seqs[i])
            with torch.inference_mode():
                logits = self.model.scores(self.model(batch.to(self.device)))  # (B', n_items)
            scores[warm] = logits.float().cpu()

        for row, excl in enumerate(excluded):
            if len(excl):
                scores[row, torch.from_numpy(excl - 1)] = -torch.inf  # column j is item id j + 1
        k_max = min(max(q.k for q in queries), self.n_items)
        top_scores, top_cols = torch.topk(scores, k_max, dim=1)  # (B, k_max)

        out = []
        for row, q in enumerate(queries):
            s, c = top_scores[row, : q.k], top_cols[row, : q.k]
            keep = torch.isfinite(s)  # masked items never appear, even when k exceeds what is left
            s, c = s[keep], c[keep]
            out.append(Recommendation(
                items=self.vocab.decode(c.numpy() + 1), scores=s.tolist(),
                fallback=None if len(seqs[row]) else "popular", unknown_items=unknowns[row],
                sequence=self.vocab.decode(seqs[row])))
        return out


class MicroBatcher:
    """Collects concurrent `recommend` calls into one `Engine.recommend_batch` run in a worker thread.

    A batch closes `wait_ms` after its first request arrived or when it holds `max_size` requests.
    Batches run one at a time, so a burst queues behind the running batch and is then served by one pass.
    """

    def __init__(self, engine: Engine, *, wait_ms: float = 2.0, max_size: int = 64,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_size < 1 or wait_ms < 0:
            raise ValueError(f"need max_size >= 1 and wait_ms >= 0, got {max_size}, {wait_ms}")
        self.engine = engine
        self.on_batch = on_batch  # called with (requests in the batch, seconds of inference), e.g. for metrics
        self.wait_s = wait_ms / 1000
        self.max_size = max_size
        self._queue: asyncio.Queue[tuple[Query, asyncio.Future[Recommendation]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0  # for tests and metrics: how many forward passes served requests

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def recommend(self, query: Query) -> Recommendation:
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        await self._queue.put((query, fut))
        return await fut

    async def _collect(self) -> list[tuple[Query, asyncio.Future[Recommendation]]]:
        pending = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(pending) < self.max_size:
            try:  # take what already queued up, then wait out the rest of the window
                pending.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                pending.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [(q, f) for q, f in pending if not f.cancelled()]  # callers that gave up

    async def _run(self) -> None:
        while True:
            pending = await self._collect()
            if not pending:
                continue
            start = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.engine.recommend_batch, [q for q, _ in pending])
            except Exception as e:  # handed to every waiting caller
                for _, fut in pending:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches_run += 1
            if self.on_batch is not None:
                self.on_batch(len(pending), time.perf_counter() - start)
            for (_, fut), res in zip(pending, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
