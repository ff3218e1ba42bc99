"""Inference for the service: a trained run directory turned into ranked raw item ids.

`Engine.recommend_batch` scores many queries with one forward pass; `MicroBatcher`
(app/batcher.py, also importable from here) gathers concurrent single requests into such a
batch and runs it on its inference thread, so the event loop keeps serving while the model computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.batcher import MicroBatcher  # noqa: F401  (re-exported: callers import it from here)

if TYPE_CHECKING:
    from app.index import IndexManager
    from app.onnx_encoder import OnnxEncoder
    from retriever import MemoryBank, SearchResult
    from training.data.sequences import Vocabulary
    from training.model import SequenceEncoder
    from training.ra.bundle import RetrievalBundle, Scored

logger = logging.getLogger(__name__)
_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_IDS.flags.writeable = False  # shared: nobody may write into it


@dataclass(frozen=True)
class Query:
    items: list[str]  # raw item ids, oldest first (stored events, then the request's items)
    k: int
    exclude_seen: bool = True  # drop the sequence's own items from the ranking
    exclude_items: list[str] = field(default_factory=list)
    user_id: str | None = None  # its training-data history comes first; its own bank entries are skipped
    use_retrieval: bool = True
    explain: bool = False


@dataclass(frozen=True)
class Recommendation:
    items: list[str]  # raw item ids, best first
    scores: list[float]
    fallback: str | None  # "popular" when the sequence had no known item
    unknown_items: list[str]  # request items not in the vocabulary, deduplicated, first-seen order
    sequence: list[str]  # with explain: the known items the model read (after truncation to max_len)
    retrieval_used: bool = False
    index_version: str | None = None
    neighbours: list[dict] | None = None  # with explain and retrieval: the neighbours used, best first
    fusion: dict | None = None  # with explain and retrieval: the retrieval side's share of the output


@dataclass
class RunFiles:
    """What the service reads from a run directory besides the model."""

    popularity: np.ndarray  # (n_items,) float64 summing to 1
    histories: dict[str, np.ndarray]  # training-data user -> known item ids, oldest first
    source: str


def read_run_data(run_dir: Path, vocab: Vocabulary, n_items: int) -> RunFiles:
    """Item popularity and users' training-data histories from the run's dataset.

    When the file is gone or unreadable the service still runs: popularity is uniform and no
    user has a training-data history (only events posted to the service count).
    """
    from training.config import load_config
    from training.data.sequences import item_popularity, leave_one_out
    from training.data.source import load_run_data

    uniform = RunFiles(np.full(n_items, 1.0 / n_items), {}, "uniform")
    try:
        cfg = load_config(run_dir / "config.yaml")
        data = load_run_data(cfg, item_vocab=vocab, fetch=False)  # never download at service start
        counts = item_popularity(data, leave_one_out(data))[1:].astype(np.float64)
    except Exception as e:  # data moved or unreadable
        logger.warning("training data unavailable (%s): uniform popularity, no stored histories", e)
        return uniform
    if counts.shape != (n_items,) or counts.sum() <= 0:
        logger.warning("training data does not match the model's %d items; ignoring it", n_items)
        return uniform
    histories = dict(zip(data.users, data.sequences, strict=True))
    return RunFiles(counts / counts.sum(), histories, "training-data")


class Engine:
    """A loaded model, its vocabulary, item popularity and, for a retrieval run, its retrieval
    bundle and the serving index. Without retrieval a request is answered by the base model
    alone, the one the bundle was fitted on. Thread-safe for inference."""

    def __init__(self, model: SequenceEncoder, vocab: Vocabulary, popularity: np.ndarray, *, model_version: str,
                 device: str = "cpu", ra: RetrievalBundle | None = None,
                 histories: dict[str, np.ndarray] | None = None, run_dir: Path | None = None,
                 inference: str = "auto") -> None:
        n_items = model.cfg.n_items
        if len(vocab) - 1 != n_items:
            raise ValueError(f"vocabulary has {len(vocab) - 1} items but the model has {n_items}")
        if popularity.shape != (n_items,):
            raise ValueError(f"popularity must have shape ({n_items},), got {popularity.shape}")
        if ra is not None and ra.encoder is not model:
            raise ValueError("the retrieval bundle must wrap the served encoder")
        self.model = model.to(device).eval()
        self.ra = ra
        self.vocab = vocab
        self.device = torch.device(device)
        self.n_items = n_items
        self.max_len = model.cfg.max_len
        self.model_version = model_version
        self.histories = histories or {}
        self.run_dir = run_dir  # where the model came from (evaluation jobs read its data)
        self.index: IndexManager | None = None  # set by the service once it serves a bank
        self.popularity = torch.as_tensor(popularity, dtype=torch.float32)  # (n_items,)
        self.on_stage: Callable[[str, float], None] | None = None  # (stage, seconds): model/search/fusion
        self.onnx = self._onnx_encoder(inference)  # the encoder as an ONNX Runtime session, or None

    def _onnx_encoder(self, inference: str) -> OnnxEncoder | None:
        """The ONNX Runtime encoder for inference "onnx" (an error when it cannot run), or for
        "auto" where it can (CPU, onnxruntime installed); None: eager PyTorch."""
        if inference not in ("auto", "torch", "onnx"):
            raise ValueError(f"inference must be 'auto', 'torch' or 'onnx', got {inference!r}")
        if inference == "torch":
            return None
        if self.device.type != "cpu":
            if inference == "onnx":
                raise ValueError(f"inference 'onnx' runs on CPU; this engine serves on {self.device}")
            return None
        from app.onnx_encoder import OnnxEncoder, onnx_available

        if inference == "auto" and not onnx_available():
            return None
        keys = {} if self.ra is None else {"key_center": self.ra.center, "key_proj": self.ra.proj}
        return OnnxEncoder(self.model, threads=torch.get_num_threads(), **keys)

    @property
    def index_version(self) -> str | None:
        serving = self.index.serving if self.index is not None else None
        return None if serving is None else serving.version

    @property
    def cache_version(self) -> str:
        """Cached results are valid for one model and one index; a swap of either retires them."""
        return f"{self.model_version}|{self.index_version}"

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, device: str = "cpu", histories: bool = True,
                     inference: str = "auto") -> Engine:
        """Load a finished run: ``model.pt``, and ``retrieval.pt`` for a retrieval run.
        histories: read users' training-data histories (requests by user_id start from them).
        inference: "torch", "onnx" (the encoder run by ONNX Runtime, CPU) or "auto" (onnx where it can)."""
        from training.checkpoints import RunError, load_model_file
        from training.data.sequences import Vocabulary
        from training.ra.bundle import load_bundle

        run = Path(run_dir)
        for name in ("config.yaml", "model.pt", "items.json"):
            if not (run / name).is_file():
                raise RunError(f"{run} is not a finished run: {name} is missing")
        ra = None
        if (run / "retrieval.pt").is_file():  # the bundle loads model.pt itself and checks it is its base
            ra = load_bundle(run, map_location=device)
            model, checksum = ra.encoder, ra.base_checksum
        else:
            model, blob = load_model_file(run / "model.pt", map_location=device)
            checksum = blob.get("checksum")
        if ra is None and (run / "ra.pt").is_file():  # the encoder fine-tuning stage (configs/ml100k-ra-finetune.yaml)
            logger.warning("%s is an encoder fine-tuning run: serving its fine-tuned encoder without retrieval "
                           "(only retrieval-stage runs, with retrieval.pt, are served with retrieval)", run)
        vocab = Vocabulary.load(run / "items.json")
        files = read_run_data(run, vocab, model.cfg.n_items)
        version = f"{run.name}@{str(checksum or 'unknown')[:12]}"
        logger.info("loaded %s (%s): %d items, max_len %d, popularity from %s", version,
                    f"retrieval: {ra.design}" if ra is not None else "base model", model.cfg.n_items,
                    model.cfg.max_len, files.source)
        return cls(model, vocab, files.popularity, model_version=version, device=device, ra=ra,
                   histories=files.histories if histories else None, run_dir=run, inference=inference)

    def _known_ids(self, tokens: list[str]) -> tuple[np.ndarray, list[str]]:
        """(ids > 0 in order, unknown tokens deduplicated). The padding token counts as unknown."""
        if not tokens:
            return _NO_IDS, []
        ids = self.vocab.ids(tokens)
        known = ids > 0
        if known.all():  # the usual case
            return ids, []
        return ids[known], list(dict.fromkeys(t for t, i in zip(tokens, ids, strict=True) if i <= 0))

    def sequence_ids(self, user_id: str | None, items: list[str]) -> tuple[np.ndarray, list[str]]:
        """The user's training-data history followed by ``items``' known ids; and the unknown items."""
        ids, unknown = self._known_ids(items)
        base = self.histories.get(user_id) if user_id is not None else None
        return (ids if base is None else np.concatenate([base, ids])), unknown

    def _timed(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(stage, now - start)
        return now

    def recommend_batch(self, queries: list[Query]) -> list[Recommendation]:
        """Rank items for every query with at most one forward pass and one bank search."""
        if not queries:
            return []
        seqs, fulls, unknowns, excluded = [], [], [], []
        for q in queries:
            if q.k < 1:
                raise ValueError(f"k must be >= 1, got {q.k}")
            ids, unknown = self.sequence_ids(q.user_id, q.items)
            seqs.append(ids[-self.max_len:])
            fulls.append(ids)  # the vote gives every item of the history nothing, as in training
            unknowns.append(unknown)
            excl, _ = self._known_ids(q.exclude_items)
            excluded.append(np.concatenate([ids, excl]) if q.exclude_seen else excl)

        warm = [i for i, s in enumerate(seqs) if len(s)]
        scores = None if len(warm) == len(queries) else self.popularity.expand(len(queries), -1).clone()
        extras: dict[int, dict] = {}  # (B, n_items) scores; cold rows keep the popularity
        if warm:
            width = max(len(seqs[i]) for i in warm)
            batch = np.zeros((len(warm), width), dtype=np.int64)  # (B', L), left-aligned
            for row, i in enumerate(warm):
                batch[row, : len(seqs[i])] = seqs[i]
            start = time.perf_counter()
            keys = None  # (B', D) retrieval keys, when the graph computes them
            if self.onnx is not None:  # numpy in and out (wrapped, not copied)
                outs = self.onnx(batch)
                h, logits = torch.from_numpy(outs[0]), torch.from_numpy(outs[1])  # (B', D), (B', n_items)
                if len(outs) > 2:
                    keys = outs[2]
            else:
                with torch.inference_mode():
                    h = self.model(torch.from_numpy(batch).to(self.device))  # (B', D)
                    logits = self.model.scores(h).float().cpu()  # (B', n_items)
                h, logits = h.clone(), logits.clone()  # plain tensors again: written in place below
            self._timed("model", start)
            extras = self._retrieve(queries, warm, [fulls[i] for i in warm], h, logits, keys)
            if scores is None:
                scores = logits
            else:
                scores[warm] = logits
        assert scores is not None

        rows = np.repeat(np.arange(len(excluded)), [len(e) for e in excluded])
        k_max = min(max(q.k for q in queries), self.n_items)
        if len(rows):  # one indexed write for the whole batch, on the tensor's memory; column j is item id j + 1
            scores.numpy()[rows, np.concatenate(excluded) - 1] = -np.inf
        top_scores, top_cols = torch.topk(scores, k_max, dim=1)  # (B, k_max)
        top_scores, top_ids = top_scores.numpy(), top_cols.numpy() + 1
        finite = np.isfinite(top_scores)  # masked items never appear, even when k exceeds what is left

        out = []
        for row, q in enumerate(queries):
            keep = finite[row, : q.k]
            s, ids = top_scores[row, : q.k][keep], top_ids[row, : q.k][keep]
            extra = extras.get(row, {})
            if "explain" in extra:
                extra.update(extra.pop("explain")(ids))
            out.append(Recommendation(
                items=self.vocab.decode(ids), scores=s.tolist(),
                fallback=None if len(seqs[row]) else "popular", unknown_items=unknowns[row],
                sequence=self.vocab.decode(seqs[row]) if q.explain else [], retrieval_used=bool(extra),
                index_version=extra.get("index_version", self.index_version),
                neighbours=extra.get("neighbours"), fusion=extra.get("fusion")))
        return out

    def seen_rows(self, seqs: list[np.ndarray]) -> np.ndarray:
        """(R, n_items) bool: the items of each sequence (the vote gives them nothing)."""
        seen = np.zeros((len(seqs), self.n_items), dtype=bool)
        if len(seqs) == 1:  # a single request: one indexed write
            seen[0, seqs[0] - 1] = True
            return seen
        rows = np.repeat(np.arange(len(seqs)), [len(x) for x in seqs])
        if len(rows):
            seen[rows, np.concatenate(seqs) - 1] = True
        return seen

    def score_with_bank(self, bank: MemoryBank, h: torch.Tensor, logits: torch.Tensor, seen: np.ndarray, *,
                        exclude_user: np.ndarray | None = None, timed: bool = False, evidence: bool = False,
                        scores_out: np.ndarray | None = None, keys: np.ndarray | None = None
                        ) -> tuple[Scored, SearchResult, np.ndarray]:
        """Search ``bank`` for h (R, D) and score with the retrieval design: (scores and
        evidence, the search result, the neighbours' next items (R, K, m)). exclude_user: (R,)
        payload users whose entries a query must not see (-1: none), used when the run's
        own-user rule is "exclude". timed: report the "search" and "fusion" stages. Without
        evidence the search result carries no payload besides ids and values.
        scores_out: (R, N) float32 memory the vote may write its scores into (the logits').
        keys: (R, D) float32 unit keys of h when the encoder's graph computed them."""
        if self.ra is None:
            raise RuntimeError("this run has no retrieval model")
        b = self.ra
        start = time.perf_counter()
        if h.dtype != torch.float32 or not h.is_cpu:
            h = h.float().cpu()
        if keys is None:
            keys = b.keys_of(h.numpy())
        if b.own_user != "exclude":
            exclude_user = None
        res = bank.search(keys, min(b.k, len(bank)), exclude_user=exclude_user, unit_queries=True, payload=evidence)
        if res.values is None:
            raise RuntimeError("the served bank has no payload values; rebuild the index")
        items, nb_h = b.unpack_values(res.values)
        if timed:
            start = self._timed("search", start)
        if logits.dtype != torch.float32 or not logits.is_cpu:
            logits = logits.float().cpu()
        out = b.score(h, logits.numpy(), res.D, res.found, items, nb_h, seen, evidence=evidence, out=scores_out)
        if timed:
            self._timed("fusion", start)
        return out, res, items

    def _retrieve(self, queries: list[Query], warm: list[int], seqs: list[np.ndarray], h: torch.Tensor,
                  logits: torch.Tensor, keys: np.ndarray | None = None) -> dict[int, dict]:
        """Replace the ``logits`` rows of queries that want retrieval by the scores with retrieval,
        in place. Returns per query: the index version that answered and, with explain, a function
        of the returned item ids that gives the neighbours and their contributions to them."""
        serving = self.index.serving if self.index is not None else None
        rows = [r for r, i in enumerate(warm) if queries[i].use_retrieval]
        if self.ra is None or serving is None or not rows:
            return {}
        own = [serving.user_rows.get(q.user_id, -1) if (q := queries[warm[r]]).user_id else -1 for r in rows]
        # anonymous queries (the usual case) have no own entries: no rule to pass to the bank
        own_users = np.array(own, dtype=np.int64) if max(own) >= 0 else None
        explain = any(queries[warm[r]].explain for r in rows)
        every = len(rows) == len(warm)  # the usual case: no row copies
        out, res, items = self.score_with_bank(serving.bank, h if every else h[rows], logits if every else logits[rows],
                                               self.seen_rows([seqs[r] for r in rows]), exclude_user=own_users, timed=True,
                                               evidence=explain, scores_out=logits.numpy() if every else None,
                                               keys=None if keys is None else keys if every else keys[rows])
        if not every:
            logits[rows] = out.scores.to(logits.dtype)
        elif out.scores is not None:  # the vote wrote into the logits; the head returns its own
            logits.copy_(out.scores)

        extras: dict[int, dict] = {}
        for j, r in enumerate(rows):
            extra: dict[str, Any] = {"index_version": serving.version}
            if queries[warm[r]].explain:
                extra["explain"] = self._explainer(serving, res, items, out, j)
            extras[warm[r]] = extra
        return extras

    def _explainer(self, serving, res: SearchResult, items: np.ndarray, out: Scored, j: int
                   ) -> Callable[[np.ndarray], dict]:
        """Evidence for query row j, given the item ids finally returned: every neighbour (user,
        its next items, similarity, weight) and what it added to each returned item's score."""
        assert out.weights is not None  # asked for with evidence=True
        weights = out.weights[j].float().numpy()
        contrib = None if out.contrib is None else out.contrib[j].float().numpy()  # (K, m)
        share = out.share[j].float()

        def explain(returned: np.ndarray) -> dict:
            wanted = {int(i) for i in returned}
            neighbours = []
            for k in range(min(len(weights), res.I.shape[1])):
                if res.I[j, k] < 0:
                    continue
                nxt = [int(x) for x in items[j, k] if x > 0]
                adds: dict[str, float] = {}
                if contrib is not None:
                    for col, item in enumerate(items[j, k, : contrib.shape[1]]):
                        if int(item) in wanted and contrib[k, col] > 0:
                            name = self.vocab.decode([int(item)])[0]
                            adds[name] = adds.get(name, 0.0) + float(contrib[k, col])
                neighbours.append({
                    "user_id": serving.user_names[int(res.users[j, k])],
                    "target_item": self.vocab.decode([nxt[0]])[0] if nxt else "",
                    "next_items": self.vocab.decode(nxt), "position": int(res.positions[j, k]),
                    "similarity": float(res.D[j, k]), "weight": float(weights[k]), "contributions": adds})
            return {"neighbours": neighbours, "fusion": {
                "kind": self.ra.design, "temperature": self.ra.vote.tau if self.ra.design == "vote" else None,
                "alpha_mean": float(share.mean()), "alpha_std": float(share.std(unbiased=False)),
                "alpha_min": float(share.min()), "alpha_max": float(share.max())}}

        return explain
