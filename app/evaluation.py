"""Dual evaluation of the served run: the same sequences ranked with retrieval and by the base
model alone (the model the service would otherwise serve), side by side.

Leakage (DESIGN.md §3, one rule in ``training/ra/bank.py``): the live bank is rebuilt from every
history, so it holds the held-out targets of the run's own split. A split evaluation therefore
never uses it: the job builds a bank of the split's admissible examples (training examples for
"valid", training + validation for "test"), with each entry's next items cut at the split's
limits, and refuses queries at or below their user's limit. Supplied sequences are searched
against the live bank. Seen items are masked on both sides by default (what the service serves).
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


class Inputs:
    def __init__(self, prefixes: np.ndarray, targets: np.ndarray, histories: list[np.ndarray], bank: MemoryBank,
                 exclude_user: np.ndarray, source: dict) -> None:
        self.prefixes, self.targets, self.histories = prefixes, targets, histories
        self.bank, self.exclude_user, self.source = bank, exclude_user, source


def _split_inputs(engine: Engine, split: str) -> Inputs:
    from app.index import build_bank
    from training.checkpoints import RunError
    from training.config import load_config
    from training.data.sequences import gather_items, leave_one_out, pad_prefixes
    from training.data.source import load_run_data
    from training.ra.bank import BankRuleError, bank_entries, split_limits

    if engine.run_dir is None or engine.ra is None:
        raise RunError("the served engine has no retrieval run directory to read a split from")
    cfg = load_config(engine.run_dir / "config.yaml")
    data = load_run_data(cfg, item_vocab=engine.vocab, fetch=False)
    s = leave_one_out(data)
    users, positions = (s.valid_users, s.valid_positions) if split == "valid" else (s.test_users, s.test_positions)
    limits = split_limits(data, s, split)
    if np.any(positions <= limits[users]):  # the bank would hold a query's target
        raise BankRuleError(f"{split} queries must lie past their users' bank limits")
    bank_users, bank_positions = bank_entries(data, s, split)
    bank = build_bank(engine.ra, data.sequences, bank_users, bank_positions, limits=limits)
    prefixes = pad_prefixes(data, users, positions, engine.max_len)[0]
    histories = [data.sequences[u][:p] for u, p in zip(users, positions, strict=True)]
    source = {"kind": f"{split} split", "bank": "training examples" + (" + validation examples" if split == "test"
                                                                      else ""),
              "bank_size": len(bank), "leakage_check": "passed"}
    return Inputs(prefixes, gather_items(data, users, positions), histories, bank, users.astype(np.int64), source)


def _sequence_inputs(engine: Engine, req: EvaluateRequest) -> Inputs:
    serving = engine.index.serving if engine.index is not None else None
    if serving is None:
        raise ValueError("no index is served; rebuild it first (POST /v1/index/rebuild)")
    rows, targets, users, histories, skipped = [], [], [], [], 0
    for seq in req.sequences or []:
        ids, _ = engine.sequence_ids(None, list(seq.items))
        target = engine.vocab.ids([seq.target])[0]
        if len(ids) == 0 or target <= 0:
            skipped += 1  # nothing known to read, or a target the model cannot rank
            continue
        histories.append(ids)
        row = np.zeros(engine.max_len, dtype=np.int64)
        ids = ids[-engine.max_len:]
        row[: len(ids)] = ids
        rows.append(row)
        targets.append(target)
        users.append(serving.user_rows.get(seq.user_id, -1) if seq.user_id is not None else -1)
    if not rows:
        raise ValueError(f"none of the {skipped} sequences has a known item and a known target")
    source = {"kind": "sequences", "bank": f"live index {serving.version}", "bank_size": len(serving.bank),
              "skipped": skipped}
    return Inputs(np.stack(rows), np.asarray(targets, dtype=np.int64), histories, serving.bank,
                  np.asarray(users, dtype=np.int64), source)


def run_evaluation(engine: Engine, req: EvaluateRequest) -> dict[str, Any]:
    """Metrics with and without retrieval on the same examples, their differences and the paired
    bootstrap 95% interval of the per-example NDCG@10 difference. Runs in a worker thread."""
    from training.evaluate import metrics_from_ranks, ndcg_at, paired_bootstrap
    from training.ra.scoring import target_ranks

    if engine.ra is None:
        raise ValueError("the served run has no retrieval model; nothing to compare")
    start = time.perf_counter()
    inp = _sequence_inputs(engine, req) if req.sequences is not None else _split_inputs(engine, req.split or "test")
    ks = sorted(set(req.ks) | {10})
    ranks_with, ranks_without = [], []
    with torch.inference_mode():
        for s in range(0, len(inp.targets), 256):
            seq = torch.from_numpy(inp.prefixes[s:s + 256])
            h = engine.model(seq)
            logits = engine.model.scores(h).float()
            seen = engine.seen_rows(inp.histories[s:s + 256])
            out, _, _ = engine.score_with_bank(inp.bank, h, logits, seen, exclude_user=inp.exclude_user[s:s + 256])
            mask = seen if req.mask_seen else None
            ranks_with.append(target_ranks(out.scores, inp.targets[s:s + 256], mask))
            ranks_without.append(target_ranks(logits, inp.targets[s:s + 256], mask))
    rw, rwo = np.concatenate(ranks_with), np.concatenate(ranks_without)
    with_r, without_r = metrics_from_ranks(rw, ks), metrics_from_ranks(rwo, ks)
    delta = {m: with_r[m] - without_r[m] for m in with_r}
    bootstrap = paired_bootstrap(ndcg_at(rw, 10), ndcg_at(rwo, 10), n_resamples=req.bootstrap_resamples,
                                 seed=req.seed)
    return {"examples": len(inp.targets), "source": inp.source, "model_version": engine.model_version,
            "mask_seen": req.mask_seen, "with_retrieval": with_r, "without_retrieval": without_r, "delta": delta,
            "ndcg10_delta_bootstrap": bootstrap, "seconds": round(time.perf_counter() - start, 3)}
