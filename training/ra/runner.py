"""``ragrec train --config configs/ml100k-ra.yaml --out DIR``: add retrieval to a finished base.

Fits the configured design on validation (frozen base, eval-mode bank of training
examples), scores validation and test with and without retrieval under the same seen-item
treatment, and writes a servable run directory:

    config.yaml, items.json, model.pt   the base run's files, untouched ("without retrieval")
    retrieval.yaml                      the stage's config as run
    retrieval.pt                        the chosen design (vote settings, head, key projection)
    metrics.json                        valid/test, masked and unmasked, with/without, paired CI

Everything that can fail on bad input (an unfinished base, k larger than the bank, unknown
keys) fails before ``--out`` is touched.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from training.atomic import atomic_write_json, atomic_write_text
from training.checkpoints import RunError, atomic_torch_save, require_finished_run
from training.model import model_checksum
from training.ra import stage as st
from training.ra.bank import BankRuleError
from training.ra.bundle import RetrievalBundle
from training.ra.config import RetrievalConfig
from training.ra.fit import evaluate, fit_design, flat, flat_unmasked
from training.ra.keys import fit_keys, neighbour_recall

log = logging.getLogger(__name__)

BASE_FILES = ("config.yaml", "items.json", "model.pt")


def run_retrieval_stage(cfg: RetrievalConfig, out: str | Path) -> dict[str, Any]:
    sec = cfg.retrieval
    out = Path(out)
    base = Path(sec.base)
    start = time.perf_counter()
    require_finished_run(base, what="retrieval.base")
    if out.resolve() == base.resolve():
        raise RunError("--out must differ from retrieval.base: the base run stays untouched")
    try:
        prep = st.prepare(base, k_train=sec.k_train, k_eval=sec.k_search, own_user=sec.own_user, m_max=sec.m_max,
                          input_len=sec.input_len)
    except BankRuleError as e:
        raise RunError(str(e)) from None
    proj, keys_info = None, None
    if sec.trained_keys:
        prep, proj, keys_info = fit_trained_keys(prep, sec.seed)
    state, info = fit_design([prep], sec)
    valid, test = evaluate([prep], sec, state, "valid"), evaluate([prep], sec, state, "test")
    vote = state.get("vote", sec.vote.settings())
    head = state["heads"][0].head if "heads" in state else None
    metrics = {
        "design": sec.design, "own_user": sec.own_user, "base": str(base),
        "valid": flat(valid), "valid_unmasked": flat_unmasked(valid),
        "test": flat(test), "test_unmasked": flat_unmasked(test),
        "chosen_vote": vote.as_dict(), "fit": {k: v for k, v in info.items() if k != "vote_trail"},
        "trained_keys": keys_info, "prepare_seconds": prep.seconds,
    }
    bundle = RetrievalBundle(prep.encoder, sec.model_dump(), vote, prep.banks["valid"].center, head, proj,
                             metrics=metrics, base_checksum=model_checksum(prep.encoder))
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(base / name, tmp)
        tmp.replace(out / name)
    atomic_write_text(out / "retrieval.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    atomic_torch_save(bundle.state(), out / "retrieval.pt")
    metrics["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "metrics.json", metrics)
    log.info("retrieval stage %s: valid NDCG@10 (seen masked) %.4f with / %.4f without; test %.4f / %.4f",
             sec.design, metrics["valid"]["with"]["NDCG@10"], metrics["valid"]["without"]["NDCG@10"],
             metrics["test"]["with"]["NDCG@10"], metrics["test"]["without"]["NDCG@10"])
    return metrics


def fit_trained_keys(prep: st.Prepared, seed: int, *, epochs: int = 3):
    """A key projection trained for the task (encoder frozen); the banks re-keyed with it and
    every query set searched again. Returns (prepared, projection, recall figures)."""
    import copy

    bank = prep.banks["valid"]
    before = neighbour_recall(bank.targets, prep.valid.I, prep.valid.targets, 20)

    def on_epoch(proj):
        q = copy.copy(prep.valid)
        st.search_neighbours(bank.rekeyed(proj), q, 20, prep.own_user)
        return {"valid_recall20": neighbour_recall(bank.targets, q.I, q.targets, 20)}

    proj, hist = fit_keys(prep.train.h, prep.train.users, prep.train.targets, bank.h, bank.users,
                          bank.next_items, bank.center, prep.data.n_items, m=3, epochs=epochs, seed=seed,
                          on_epoch=on_epoch)
    new = copy.copy(prep)
    new.banks = {k: b.rekeyed(proj) for k, b in prep.banks.items()}
    new.train, new.valid, new.test = (copy.copy(q) for q in (prep.train, prep.valid, prep.test))
    st.research(new, prep.own_user)
    after = neighbour_recall(bank.targets, new.valid.I, new.valid.targets, 20)
    return new, proj, {"recall20_base_keys": before, "recall20_trained_keys": after, "history": hist}
