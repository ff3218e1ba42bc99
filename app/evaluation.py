"""Dual evaluation of the served model: the same sequences ranked with and without retrieval.

Leakage (DESIGN.md §3): the live bank is rebuilt from every history, so it holds the held-out
targets of the run's own split. A split evaluation therefore never uses it: the job builds a bank
of the split's admissible examples (training examples for "valid", training + validation for
"test"), checks it with the training stage's ``check_bank``, and searches that. Supplied
sequences are searched against the live bank with each named user's own entries excluded.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from app.engine import Engine
    from app.schemas import EvaluateRequest
    from retriever import MemoryBank


def _scorer(engine: Engine, bank: MemoryBank | None, exclude_user: np.ndarray | None):
    """score_fn for ``evaluate_scorer``; batches arrive in order, so a running offset finds each
    row's exclusion."""
    offset = 0

    def score(seq: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        h = engine.model(seq)
        if bank is None:
            return engine.model.scores(h)
        excl = None if exclude_user is None else exclude_user[offset : offset + len(seq)]
        offset += len(seq)
        return engine.fuse_with(bank, h, exclude_user=excl)[0].scores_fused

    return score


def _split_inputs(engine: Engine, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, MemoryBank, dict]:
    from app.index import build_bank
    from training.config import load_config
    from training.data import leave_one_out, pad_prefixes
    from training.ra_bundle import bank_stores_values
    from training.ra_trainer import check_bank
    from training.run import RunError, gather_items, item_popularity, load_run_data

    if engine.run_dir is None:
        raise RunError("the served engine has no run directory to read a split from")
    cfg = load_config(engine.run_dir / "config.yaml")
    data = load_run_data(cfg, item_vocab=engine.vocab, fetch=False)
    s = leave_one_out(data)
    users, positions = (s.valid_users, s.valid_positions) if split == "valid" else (s.test_users, s.test_positions)
    bank_users, bank_positions = s.train_users, s.train_positions
    if split == "test":
        bank_users = np.concatenate([bank_users, s.valid_users])
        bank_positions = np.concatenate([bank_positions, s.valid_positions])
    check_bank(bank_users, bank_positions, users, positions, split)  # raises LeakageError
    bank = build_bank(engine.ra, data.sequences, bank_users, bank_positions,
                      store_values=bank_stores_values(engine.ra_config))
    prefixes = pad_prefixes(data, users, positions, engine.max_len)[0]
    source = {"kind": f"{split} split", "bank": "training examples" + (" + validation examples" if split == "test"
                                                                      else ""),
              "bank_size": len(bank), "leakage_check": "passed"}
    return prefixes, gather_items(data, users, positions), item_popularity(data, s), bank, source


def _sequence_inputs(engine: Engine, req: EvaluateRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       MemoryBank, np.ndarray, dict]:
    serving = engine.index.serving if engine.index is not None else None
    if serving is None:
        raise ValueError("no index is served; rebuild it first (POST /v1/index/rebuild)")
    rows, targets, users, skipped = [], [], [], 0
    for seq in req.sequences or []:
        ids, _ = engine.sequence_ids(None, list(seq.items))
        target = engine.vocab.ids([seq.target])[0]
        if len(ids) == 0 or target <= 0:
            skipped += 1  # nothing known to read, or a target the model cannot rank
            continue
        row = np.zeros(engine.max_len, dtype=np.int64)
        ids = ids[-engine.max_len:]
        row[: len(ids)] = ids
        rows.append(row)
        targets.append(target)
        users.append(serving.user_rows.get(seq.user_id, -1) if seq.user_id is not None else -1)
    if not rows:
        raise ValueError(f"none of the {skipped} sequences has a known item and a known target")
    popularity = np.concatenate([[0.0], engine.popularity.numpy().astype(np.float64)])
    source = {"kind": "sequences", "bank": f"live index {serving.version}, each named user's own entries excluded",
              "bank_size": len(serving.bank), "skipped": skipped}
    return (np.stack(rows), np.asarray(targets, dtype=np.int64), popularity, serving.bank,
            np.asarray(users, dtype=np.int64), source)


def run_evaluation(engine: Engine, req: EvaluateRequest) -> dict[str, Any]:
    """Metrics with and without retrieval on the same examples, their differences and the paired
    bootstrap 95% interval of the per-example NDCG@10 difference. Runs in a worker thread."""
    from training.evaluate import evaluate_scorer, paired_bootstrap

    if engine.ra is None:
        raise ValueError("the served run has no retrieval model; nothing to compare")
    start = time.perf_counter()
    exclude = None
    if req.sequences is not None:
        prefixes, targets, popularity, bank, exclude, source = _sequence_inputs(engine, req)
    else:
        prefixes, targets, popularity, bank, source = _split_inputs(engine, req.split or "test")
    ks = sorted(set(req.ks) | {10})
    with torch.inference_mode():
        with_r = evaluate_scorer(_scorer(engine, bank, exclude), prefixes, targets, ks=ks,
                                 item_popularity=popularity, batch_size=256)
        without_r = evaluate_scorer(_scorer(engine, None, None), prefixes, targets, ks=ks,
                                    item_popularity=popularity, batch_size=256)
    delta = {m: with_r.metrics[m] - without_r.metrics[m] for m in with_r.metrics}
    bootstrap = paired_bootstrap(with_r.per_example(10), without_r.per_example(10),
                                 n_resamples=req.bootstrap_resamples, seed=req.seed)
    return {"examples": len(targets), "source": source, "model_version": engine.model_version,
            "with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics, "delta": delta,
            "ndcg10_delta_bootstrap": bootstrap, "seconds": round(time.perf_counter() - start, 3)}
