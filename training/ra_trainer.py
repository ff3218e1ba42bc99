"""Stage 2: retrieval-augmented fine-tuning of a finished DuoRec run.

    ragrec train --config configs/ml100k-ra.yaml --out runs/ml100k-ra --set ra.pretrained=runs/ml100k

The run directory holds ``config.yaml``, ``items.json``, ``model.pt`` (the best encoder, in
the DuoRec model format, so ``ragrec evaluate`` and the service read it), ``ra.pt`` (the
whole RA model at its best epoch), ``metrics.jsonl`` (per epoch: losses, schedules, fusion
and retrieval diagnostics, validation with and without retrieval) and ``metrics.json``
(valid/test with and without retrieval and the paired-bootstrap test delta).

Leakage rules (DESIGN.md §3), enforced here:
- a training query searches with ``exclude_user`` / ``exclude_from_position`` = its own
  (user, target position): neither itself nor anything later of its user comes back;
- the validation bank holds training examples only, the test bank training + validation
  examples; ``check_bank`` refuses a bank holding an entry at or after a query's position
  for the query's user (that entry's target is the held-out item or a later one).
Limits: prefix mode only (``train.mode`` is ignored); no ``--resume``; bank quality is
constant (no usefulness EMA), so ``quality_threshold`` only matters for hand-made banks.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retriever import MemoryBank
from training.batches import iterate_batches, prefix_plan
from training.config import RunConfig, dump_config
from training.data import DataError, Vocabulary, leave_one_out, pad_prefixes
from training.evaluate import EvalResult, evaluate_scorer, paired_bootstrap
from training.io import append_jsonl, atomic_write_json
from training.model import SequenceEncoder
from training.ra_losses import ra_loss, usefulness_from_scores, usefulness_log_probs
from training.ra_model import Bank, RAModel, search_neighbours
from training.run import (
    MODEL_FORMAT,
    RunError,
    atomic_torch_save,
    autocast,
    build_model,
    gather_items,
    item_popularity,
    load_run_data,
    resolve_device,
    save_model_file,
)
from training.schedules import (
    RebuildSchedule,
    annealed_temperature,
    apply_unfreezing,
    linear_warmup,
    parse_phases,
    phase_index,
    validate_phases,
)

log = logging.getLogger(__name__)

RA_FORMAT = "ragrec.ra_model.v1"


class LeakageError(RunError):
    """A memory bank holds an entry that the queries it serves must not see."""


# ------------------------------------------------------------------ helpers


def load_pretrained(path: str | Path, encoder: SequenceEncoder, vocab: Vocabulary) -> dict:
    """Load a DuoRec ``model.pt`` (or run directory) into ``encoder``, strictly.

    Refuses, before any training, a checkpoint whose keys or tensor shapes differ from the
    encoder built for this data (another vocabulary, dim or max_seq_len), and a run whose
    ``items.json`` maps items differently even at the same size.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    model_file = path / "model.pt" if path.is_dir() else path
    if not model_file.is_file():
        raise RunError(f"ra.pretrained: no model file at {model_file}")
    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise RunError(f"ra.pretrained: {model_file} is not a ragrec DuoRec model file")
    state, want = blob["model"], encoder.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise RunError(f"ra.pretrained: {model_file} does not fit this model: missing keys {missing[:5]}, "
                       f"unexpected keys {unexpected[:5]} (different n_layers?)")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want if state[k].shape != want[k].shape]
    if bad:
        hint = ""
        if "item_emb.weight" in " ".join(bad):
            hint = (f"; it was trained on {state['item_emb.weight'].shape[0] - 1} items, this data has "
                    f"{want['item_emb.weight'].shape[0] - 1} (another vocabulary)")
        raise RunError(f"ra.pretrained: {model_file} has other tensor shapes: {', '.join(bad[:3])}{hint}")
    items = run_dir / "items.json"
    if items.is_file() and Vocabulary.load(items) != vocab:
        raise RunError(f"ra.pretrained: {items} maps item ids differently from this data's vocabulary")
    encoder.load_state_dict(state, strict=True)
    return blob


def check_bank(bank_users: np.ndarray, bank_positions: np.ndarray, users: np.ndarray,
               positions: np.ndarray, what: str) -> None:
    """Raise LeakageError if any bank entry belongs to a query's user at or after its position.

    users, positions: (Q,) the queries (one per user, as in leave-one-out evaluation).
    """
    first = np.full(int(max(users.max(initial=-1), bank_users.max(initial=-1))) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, users, positions)
    leaked = bank_positions >= first[bank_users]
    if leaked.any():
        j = int(np.flatnonzero(leaked)[0])
        raise LeakageError(f"{what} bank leaks: {int(leaked.sum())} entries at or after a query's position "
                           f"(first: user row {bank_users[j]}, position {bank_positions[j]})")


# ------------------------------------------------------------------ trainer


class RATrainer:
    """setup() -> train() -> cleanup(); one explicit loop, schedules applied per epoch."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, progress: bool | None = None):
        if not cfg.ra.enabled or not cfg.ra.pretrained:
            raise RunError("RATrainer needs ra.enabled=true and ra.pretrained")
        self.cfg = cfg
        self.ra = cfg.ra
        self.out = Path(out_dir)
        self.progress = progress
        self.best_score = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_seconds = 0.0

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, ra = self.cfg, self.ra
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.rng = np.random.default_rng(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.data = load_run_data(cfg)
        self.split = leave_one_out(self.data)
        if len(self.split.train_users) == 0 or len(self.split.valid_users) == 0:
            raise DataError(f"{cfg.data.path}: needs training examples and users with >= 3 interactions")

        encoder = build_model(cfg, self.data.n_items)
        self.pretrained = load_pretrained(ra.pretrained, encoder, self.data.item_vocab)
        self.model = RAModel(encoder, fusion=ra.fusion, values=ra.values, temperature=ra.temperature_t0,
                             alpha_max=ra.alpha_max, quality_threshold=ra.quality_threshold,
                             match_norm=ra.match_norm).to(self.device)
        phases = [p.model_dump() for p in ra.unfreeze] or [{"until_epoch": ra.epochs + 1, "train": [""]}]
        self.phases = parse_phases(phases)
        validate_phases(self.model, self.phases)  # a typo fails now, not at epoch 20
        modules = dict(self.model.named_modules())
        for i, phase in enumerate(self.phases):
            if not any(True for name in phase.train for _ in modules[name].parameters()):
                raise RunError(f"ra.unfreeze phase {i} trains {list(phase.train)}, which hold no parameters "
                               f"with fusion={ra.fusion!r}")
        self.rebuild = RebuildSchedule(ra.rebuild_every_early, ra.rebuild_switch_epoch, ra.rebuild_every_late)
        self._prepare_out_dir()

        L = cfg.data.max_seq_len
        s = self.split
        self.train_targets = gather_items(self.data, s.train_users, s.train_positions)
        self.popularity = item_popularity(self.data, self.split)
        self.eval_sets = {
            name: (u, p, pad_prefixes(self.data, u, p, L)[0], gather_items(self.data, u, p))
            for name, u, p in (("valid", s.valid_users, s.valid_positions), ("test", s.test_users, s.test_positions))
        }
        self.plan = prefix_plan(s.train_users, s.train_positions, L)
        self.windows = pad_prefixes(self.data, self.plan.unit_users, self.plan.unit_ends, L)[0]
        self.bank: Bank | None = None
        self.phase = -1
        log.info("RA stage from %s: %d items, %d training examples in the bank, fusion=%s values=%s k=%d",
                 ra.pretrained, self.data.n_items, len(self.train_targets), ra.fusion, ra.values, ra.k)

    def _prepare_out_dir(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            raise RunError(f"run directory {self.out} is not empty; choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        self.data.item_vocab.save(self.out / "items.json")

    # -------------------------------------------------------------- banks

    @torch.no_grad()
    def encode(self, users: np.ndarray, positions: np.ndarray, *, recenter: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, key) of each example's prefix with the current weights: two (M, D) float tensors.
        recenter: first set the retriever's center to the mean h of these examples."""
        self.model.eval()
        prefixes = pad_prefixes(self.data, users, positions, self.cfg.data.max_seq_len)[0]
        hs = []
        for start in range(0, len(prefixes), self.cfg.eval.batch_size):
            seq = torch.from_numpy(prefixes[start : start + self.cfg.eval.batch_size]).to(self.device)
            with autocast(self.device, self.cfg.train.precision):
                hs.append(self.model.encoder(seq).float())
        h = torch.cat(hs)
        if recenter:
            self.model.retriever.center.copy_(h.mean(dim=0))
        with autocast(self.device, self.cfg.train.precision):
            keys = torch.cat([self.model.retriever(part).float() for part in h.split(self.cfg.eval.batch_size)])
        return h, keys

    def build_bank(self, users: np.ndarray, positions: np.ndarray, *, recenter: bool = False) -> Bank:
        """A bank of examples (user, position): key = retriever(h of the prefix), payload target =
        the item at that position. recenter: see ``encode`` (training rebuilds only)."""
        users, positions = np.asarray(users, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        h, keys = self.encode(users, positions, recenter=recenter)
        targets = gather_items(self.data, users, positions)
        index = MemoryBank(keys.cpu().numpy(), targets, users, positions)
        values = h if self.ra.values != "target" else None
        return Bank(index=index, keys=keys, values=values, users=users, positions=positions)

    def train_bank(self) -> Bank:
        """The training examples, re-encoded now; the retriever's center moves to their mean h.
        Training queries search it with their own user's present and future excluded."""
        return self.build_bank(self.split.train_users, self.split.train_positions, recenter=True)

    def eval_bank(self, split: str) -> Bank:
        """Validation: training examples only. Test: training + validation examples."""
        s = self.split
        users, positions = s.train_users, s.train_positions
        if split == "test":
            users = np.concatenate([users, s.valid_users])
            positions = np.concatenate([positions, s.valid_positions])
        elif split != "valid":
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        bank = self.build_bank(users, positions)
        qu, qp = self.eval_sets[split][:2]
        check_bank(bank.users, bank.positions, qu, qp, split)
        return bank

    # -------------------------------------------------------------- one epoch

    def _set_phase(self, epoch0: int) -> None:
        i = phase_index(self.phases, epoch0)
        if i != self.phase:  # a new phase: new trainable set, fresh optimizer over it
            groups = apply_unfreezing(self.model, self.phases, epoch0, self.ra.lr)
            self.optimizer = torch.optim.Adam(groups, weight_decay=self.cfg.train.weight_decay)
            self.phase = i

    def train_epoch(self, epoch0: int) -> dict[str, float]:
        cfg, ra = self.cfg, self.ra
        assert self.bank is not None
        # warm-ups count the epoch being trained: the first RA epoch already uses retrieval
        enhanced_weight = linear_warmup(epoch0 + 1, ra.enhanced_weight, ra.alpha_warmup_epochs)
        self.model.train()
        targets_all = torch.from_numpy(self.train_targets).to(self.device)
        sums: dict[str, float] = {}
        n_seen, steps = 0, 0
        start = time.perf_counter()
        batches = tqdm(iterate_batches(self.plan, self.data, cfg.data.max_seq_len, cfg.train.batch_size,
                                       self.rng, self.windows),
                       desc=f"ra epoch {epoch0}", leave=False, dynamic_ncols=True,
                       disable=None if self.progress is None else not self.progress)
        for batch in batches:
            idx = batch.sample_index
            users, positions = self.split.train_users[idx], self.split.train_positions[idx]
            targets = targets_all[torch.from_numpy(idx).to(self.device)]
            seq, rows, cols = (torch.from_numpy(x).to(self.device) for x in (batch.windows, batch.rows, batch.cols))
            with autocast(self.device, cfg.train.precision):
                h = self.model.encoder(seq, rows, cols)  # (B, D)
                # a query never sees itself nor its user's entries at the same or a later position
                nb, res = search_neighbours(self.model, self.bank, h, ra.k, exclude_user=users,
                                            exclude_from_position=positions)
                out = self.model.fuse(h, nb)
            ret = out.retrieved
            nb_targets = torch.from_numpy(res.targets).to(self.device)
            use_log = usefulness_log_probs(usefulness_from_scores(out.scores_h.float(), nb_targets, targets),
                                           ret.mask)
            losses = ra_loss(out.scores_h.float(), out.scores_fused.float(), targets,
                             retrieval_log=ret.log_weights.float(), usefulness_log=use_log, mask=ret.mask,
                             enhanced_weight=enhanced_weight, kl_weight=ra.kl_weight, direction=ra.kl_direction)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()

            n = len(idx)
            found = res.found
            diag = {f"loss_{k}": v.detach().item() for k, v in losses.items()}
            diag.update({k: v.item() for k, v in out.fusion.stats.items()})
            diag["neighbour_sim"] = float(res.D[found].mean()) if found.any() else float("nan")
            diag["neighbour_hit"] = float((res.targets == targets.cpu().numpy()[:, None])[found].mean()
                                          ) if found.any() else 0.0
            diag["masked_by_quality"] = float((found & ~ret.mask.cpu().numpy()).sum() / max(found.sum(), 1))
            for k, v in diag.items():
                if not math.isnan(v):
                    sums[k] = sums.get(k, 0.0) + v * n
                    sums[f"_n_{k}"] = sums.get(f"_n_{k}", 0.0) + n
            n_seen += n
            steps += 1
        batches.close()
        seconds = time.perf_counter() - start
        stats = {k: v / sums[f"_n_{k}"] for k, v in sums.items() if not k.startswith("_n_")}
        stats["loss"] = sum(v for k, v in stats.items() if k.startswith("loss_"))
        stats.update(seconds=seconds, samples=n_seen, steps=steps, enhanced_weight=enhanced_weight)
        return stats

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, split: str, bank: Bank | None) -> EvalResult:
        """Full-ranking metrics on ``split``; with a bank the fused scores, without it h's scores.

        The bank must already be clean for this split (``eval_bank`` checks it); no
        exclusion is applied at search time, so a leaky bank passed here shows its leak.
        """
        self.model.eval()
        _, _, prefixes, targets = self.eval_sets[split]

        def score(seq: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.cfg.train.precision):
                h = self.model.encoder(seq)
                if bank is None:
                    return self.model.encoder.scores(h)
                nb, _ = search_neighbours(self.model, bank, h, self.ra.k)
                return self.model.fuse(h, nb).scores_fused

        return evaluate_scorer(score, prefixes, targets, ks=self.cfg.eval.ks, item_popularity=self.popularity,
                               mask_seen=self.cfg.eval.mask_seen, batch_size=self.cfg.eval.batch_size,
                               device=self.device)

    def dual_evaluate(self, split: str, bank: Bank | None = None) -> tuple[EvalResult, EvalResult]:
        """(with retrieval, without retrieval) for the same weights."""
        bank = bank or self.eval_bank(split)
        return self.evaluate(split, bank), self.evaluate(split, None)

    # -------------------------------------------------------------- loop

    def schedule(self, epoch0: int) -> dict[str, float]:
        ra = self.ra
        return {
            "temperature": annealed_temperature(epoch0, ra.temperature_t0, ra.temperature_decay,
                                                ra.temperature_min),
            "alpha_max": linear_warmup(epoch0 + 1, ra.alpha_max, ra.alpha_warmup_epochs),
        }

    def train(self) -> dict[str, Any]:
        began = time.perf_counter()
        epoch0 = 0
        for epoch0 in range(self.ra.epochs):
            sched = self.schedule(epoch0)
            self.model.set_schedule(**sched)
            self._set_phase(epoch0)
            rebuilt = self.bank is None or self.rebuild.should_rebuild(epoch0)
            if rebuilt:  # keys re-encoded by the current encoder and retriever
                self.bank = self.train_bank()
            stats = self.train_epoch(epoch0)
            self.train_seconds += stats["seconds"]
            # the training bank is exactly the validation bank's contents, re-encoded now
            with_r, without_r = self.dual_evaluate("valid")
            score = with_r.metrics["NDCG@10"]
            if score > self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch0, 0
                self._save_model(epoch0)
            else:
                self.bad_epochs += 1
            append_jsonl(self.out / "metrics.jsonl", {
                "epoch": epoch0, "schedule": {**sched, "phase": self.phase, "rebuilt": rebuilt},
                "train": stats, "valid": {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics},
                "wall_seconds": time.perf_counter() - began,
            })
            log.info("ra epoch %d  loss %.4f  alpha %.3f  valid NDCG@10 %.4f with / %.4f without retrieval",
                     epoch0, stats["loss"], stats.get("alpha_mean", float("nan")), score,
                     without_r.metrics["NDCG@10"])
            if self.bad_epochs >= self.ra.patience:
                log.info("early stop: no better validation NDCG@10 for %d epochs", self.bad_epochs)
                break
        return self.finish(epochs_run=epoch0 + 1)

    def finish(self, epochs_run: int) -> dict[str, Any]:
        """Reload the best epoch, evaluate valid and test both ways, write ``metrics.json``."""
        blob = torch.load(self.out / "ra.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(blob["model"], strict=True)
        self.model.set_schedule(**blob["schedule"])
        result: dict[str, Any] = {}
        for split in ("valid", "test"):
            with_r, without_r = self.dual_evaluate(split)
            result[split] = {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics}
        # per-user NDCG@10 with minus without retrieval, on the test split just evaluated
        result["test"]["delta_ndcg10_bootstrap"] = paired_bootstrap(
            with_r.per_example(10), without_r.per_example(10), seed=self.cfg.train.seed)
        result.update(best_epoch=self.best_epoch, epochs_run=epochs_run, train_seconds=self.train_seconds,
                      pretrained=str(self.ra.pretrained), pretrained_checksum=self.pretrained.get("checksum"),
                      model_checksum=blob["checksum"])
        atomic_write_json(self.out / "metrics.json", result)
        return result

    # -------------------------------------------------------------- checkpoints

    def _save_model(self, epoch0: int) -> None:
        encoder = self.model.encoder
        checksum = save_model_file(encoder, self.out / "model.pt", epoch=epoch0)
        atomic_torch_save({
            "format": RA_FORMAT, "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": encoder.cfg.to_dict(), "ra_config": self.ra.model_dump(), "epoch": epoch0,
            "schedule": {"temperature": self.model.temperature, "alpha_max": float(self.model.fusion.alpha_max)},
            "checksum": checksum,
        }, self.out / "ra.pt")

    def cleanup(self) -> None:
        self.bank = None


def run_ra_training(cfg: RunConfig, out_dir: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    trainer = RATrainer(cfg, out_dir, progress=progress)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
