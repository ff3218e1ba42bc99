"""Stage 2 (measured, not served): retrieval-augmented fine-tuning of a finished DuoRec run.

    ragrec train --config configs/ml100k-ra-finetune.yaml --out runs/ml100k-ra-ft --set ra.pretrained=runs/ml100k [--resume]

The run directory holds ``config.yaml`` (data and model from the pretrained run:
``pretrained.py``), ``items.json``, ``model.pt`` (the best encoder, in the common format, so
``ragrec evaluate`` and the service read it), ``ra.pt`` and ``last.pt`` (``checkpoints.py``),
``metrics.jsonl`` (per epoch, numbered from 1: losses, schedules, fusion and neighbour
diagnostics on training batches and on validation users, bank hygiene, timings, validation
with and without retrieval), ``metrics.json`` (valid/test with and without retrieval and the
paired-bootstrap test delta) and ``ranks.npz`` (each user's target rank, both ways, for
pooling seeds in ``ragrec ablate``).

Leakage (DESIGN.md §3): the evaluation banks follow ``training/ra/bank.py``'s rule
(``banks.py``); a training query searches with its own (user, position) excluded from the
position on (``search_neighbours``), so neither it nor anything later of its user comes back.

``train.mode``: "prefix" (every training prefix one sample) or "window" (every position of
each user's shifted windows, inputs cut at the window start: far fewer encoder passes).
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training import distributed
from training.atomic import append_jsonl, atomic_write, atomic_write_json
from training.checkpoints import RunError
from training.config import RunConfig
from training.data.batches import iterate_batches, prefix_plan, window_plan
from training.data.readers import DataError
from training.data.sequences import gather_items, item_popularity, leave_one_out, pad_prefixes
from training.data.source import load_run_data
from training.evaluate import EvalResult, paired_bootstrap
from training.lifecycle import autocast, epochs_after, prepare_out_dir, resolve_device, run_trainer
from training.ra.finetune import checkpoints as ckpt
from training.ra.finetune.banks import Banks, KeyedBank, search_neighbours
from training.ra.finetune.diagnostics import RunningMean, neighbour_stats, parameter_drift, snapshot
from training.ra.finetune.entries import BankEntries, entry_usefulness, gate_score
from training.ra.finetune.evaluation import Evaluator
from training.ra.finetune.losses import USEFULNESS, ra_loss, usefulness_log_probs
from training.ra.finetune.model import RAModel, build_ra_model
from training.ra.finetune.pretrained import open_pretrained, stage_config
from training.ra.finetune.schedules import (
    RebuildSchedule,
    annealed_temperature,
    apply_unfreezing,
    linear_warmup,
    own_group,
    parse_phases,
    phase_index,
    validate_phases,
)
from training.ra.finetune.warmup import warm_up_query_encoder
from training.tracking import ScalarLog

log = logging.getLogger(__name__)

TRACKED = ("fusion", "attention", "query_encoder")  # submodules whose parameter drift is logged
QUERY_WARMUP_TAU = 0.1  # InfoNCE temperature of the query encoder's warm-up


class RATrainer:
    """setup() -> train() -> cleanup(); one explicit loop, schedules applied per epoch,
    ``last.pt`` written after every epoch."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None):
        self.cfg = stage_config(cfg)  # data and model from ra.pretrained; ignored keys are errors
        self.ra = self.cfg.ra
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.epochs_done = 0  # epochs are numbered from 1 (training/lifecycle.py)
        self.best_score = -math.inf
        self.best_epoch = 0  # 0: none yet
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.stopped = False  # early stop or time limit reached: a resume goes straight to finish()
        self.warmup_history: list[dict[str, float]] = []
        self.bank_fresh = False  # the bank's keys were encoded with the current weights

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, ra = self.cfg, self.ra
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.rng = np.random.default_rng(cfg.train.seed)
        self.world = distributed.world()
        self.device = distributed.rank_device(resolve_device(cfg.train.device))
        # Everything that can fail on bad input happens before the run directory is touched.
        self.pretrained = open_pretrained(cfg)
        self.data = load_run_data(cfg, item_vocab=self.pretrained.vocab)
        self.split = s = leave_one_out(self.data)
        if len(s.train_users) == 0 or len(s.valid_users) == 0:
            raise DataError(f"{cfg.data.path}: needs training examples and users with >= 3 interactions")
        self.model: RAModel = build_ra_model(self.pretrained.encoder, ra).to(self.device)
        if self.world.size > 1:  # every rank starts from rank 0's weights, with its own dropout masks
            distributed.sync_from_main(self.model)
            torch.manual_seed(cfg.train.seed + self.world.rank)
        self.phases = parse_phases([p.model_dump() for p in ra.unfreeze]
                                   or [{"until_epoch": ra.epochs, "train": [""]}])
        self._check_phases()
        self.rebuild = RebuildSchedule(ra.rebuild_every_early, ra.rebuild_early_epochs, ra.rebuild_every_late)
        self.entries = BankEntries.for_examples(s.train_positions, ra.bank_min_prefix)
        held = len(self.entries.ids)
        if held == 0:
            raise RunError(f"the memory bank is empty: no training example has a prefix of "
                           f"ra.bank_min_prefix={ra.bank_min_prefix} items (longest: {int(s.train_positions.max())})")
        if ra.k > held:
            raise RunError(f"ra.k={ra.k} is larger than the memory bank ({held} training examples"
                           f"{' after ra.bank_min_prefix' if ra.bank_min_prefix > 1 else ''}); lower ra.k")
        if self.world.is_main:  # only rank 0 touches the run directory
            prepare_out_dir(self.out, cfg, self.data.item_vocab, resume=self.resume)

        L = cfg.data.max_seq_len
        self.banks = Banks(self.model, self.data, s, store_values=ra.values != "target", max_len=L,
                           batch_size=cfg.eval.batch_size, precision=cfg.train.precision, device=self.device)
        self.train_targets = gather_items(self.data, s.train_users, s.train_positions)
        self.popularity = item_popularity(self.data, s)
        self.eval_sets = {
            name: (pad_prefixes(self.data, u, p, L)[0], gather_items(self.data, u, p))
            for name, u, p in (("valid", s.valid_users, s.valid_positions), ("test", s.test_users, s.test_positions))
        }
        if cfg.train.mode == "prefix":  # fixed: one pass per head window / long prefix
            self.plan = prefix_plan(s.train_users, s.train_positions, L)
            self.windows = pad_prefixes(self.data, self.plan.unit_users, self.plan.unit_ends, L)[0]
        self.usefulness = USEFULNESS[ra.usefulness]
        self.evaluator = Evaluator(self.model, self.eval_sets, self.popularity, cfg, device=self.device)
        self.initial = {name: snapshot(getattr(self.model, name)) for name in TRACKED}
        self.bank: KeyedBank | None = None
        self.phase = -1
        if self.resume:
            ckpt.restore_last(self, self.out / "last.pt")
        self.scalars = ScalarLog(self.out / "tb", enabled=cfg.train.tensorboard and self.world.is_main)
        log.info("RA stage from %s: %d items, %d training examples, %d in the bank, fusion=%s attention=%s "
                 "values=%s k=%d, %s mode", ra.pretrained, self.data.n_items, len(self.train_targets), held,
                 ra.fusion, ra.attention, ra.values, ra.k, cfg.train.mode)

    def _check_phases(self) -> None:
        """A typo in ra.unfreeze fails now, not at epoch 20."""
        try:
            validate_phases(self.model, self.phases)
        except ValueError as exc:
            known = sorted(n for n, m in self.model.named_children())
            raise RunError(f"ra.unfreeze: {exc}; modules: {known} (dotted sub-modules too, '' = all)") from None
        modules = dict(self.model.named_modules())
        for i, phase in enumerate(self.phases):
            if not any(True for name in phase.train for _ in modules[name].parameters()):
                raise RunError(f"ra.unfreeze phase {i} trains {list(phase.train)}, which hold no parameters "
                               f"with fusion={self.ra.fusion!r}")

    # -------------------------------------------------------------- schedules

    def schedule(self, epoch: int) -> dict[str, float]:
        ra = self.ra
        return {
            "temperature": annealed_temperature(epoch, ra.temperature_t0, ra.temperature_decay, ra.temperature_min),
            "alpha_max": linear_warmup(epoch, ra.alpha_max, ra.alpha_warmup_epochs),
        }

    def set_phase(self, epoch: int) -> None:
        """Train the modules ``epoch``'s unfreezing phase lists, with a fresh optimizer when the phase changes."""
        i = phase_index(self.phases, epoch)
        if i != self.phase:  # a new phase: new trainable set, fresh optimizer over it
            groups = apply_unfreezing(self.model, self.phases, epoch, self.ra.lr)
            if self.ra.fusion_lr is not None:  # its own group and rate, whatever the phase lists
                groups = own_group(groups, self.model.fusion, "fusion", self.ra.fusion_lr)
            self.optimizer = torch.optim.Adam(groups, weight_decay=self.cfg.train.weight_decay)
            self.phase = i

    def _rebuild_bank(self, epoch: int) -> int:
        """Evict entries under the usefulness floor, then re-encode the bank's keys with the
        current encoder and query encoder, for ``epoch``. Returns how many were evicted."""
        evicted = 0
        if self.ra.evict_below is not None and self.bank is not None:
            evicted = self.entries.evict(self.ra.evict_below, keep_at_least=self.ra.k)
            if evicted:
                log.info("before ra epoch %d: evicted %d bank entries under usefulness %.3g (%d so far)", epoch,
                         evicted, self.ra.evict_below, self.entries.evicted)
        self.bank = self.banks.train_bank(self.entries)
        self.bank_fresh = True
        return evicted

    def warm_up(self) -> list[dict[str, float]]:
        """Contrastive warm-up of the query encoder on frozen h of every training prefix (warmup.py)."""
        ra, s = self.ra, self.split
        h, _ = self.banks.encode(s.train_users, s.train_positions, recenter=True)
        for p in self.model.query_encoder.parameters():
            p.requires_grad_(True)
        return warm_up_query_encoder(self.model.query_encoder, h, self.train_targets, epochs=ra.query_warmup_epochs,
                                     tau=QUERY_WARMUP_TAU, lr=ra.query_warmup_lr or ra.lr,
                                     batch_size=max(self.cfg.train.batch_size, 2), rng=self.rng)

    # -------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        began = time.perf_counter()
        deadline = began + self.cfg.train.max_minutes * 60 if self.cfg.train.max_minutes else math.inf
        epoch = self.epochs_done
        if self.epochs_done == 0 and self.ra.query_warmup_epochs > 0:
            self.warmup_history = distributed.run_on_main(self.warm_up)  # once; then rank 0's weights and rng
            distributed.sync_from_main(self.model.query_encoder, self.rng)
        for epoch in epochs_after(self.epochs_done, self.ra.epochs):
            if self.stopped:
                epoch -= 1
                break
            self._run_epoch(epoch, began, deadline)
        return distributed.run_on_main(lambda: self.finish(epochs_run=epoch))

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        """Apply ``epoch``'s schedules and unfreezing phase, and rebuild the bank when due (with
        evictions first), unless its keys were already encoded with the current weights."""
        t0 = time.perf_counter()
        sched = self.schedule(epoch)
        self.model.set_schedule(**sched)
        self.set_phase(epoch)
        rebuilt = self.bank is None or self.rebuild.should_rebuild(epoch)
        evicted = self._rebuild_bank(epoch) if rebuilt and not self.bank_fresh else 0
        return {"schedule": sched, "rebuilt": rebuilt, "evicted": evicted, "seconds": time.perf_counter() - t0}

    def _run_epoch(self, epoch: int, began: float, deadline: float) -> None:
        t0 = time.perf_counter()
        begun = self.begin_epoch(epoch)
        sched, rebuilt, evicted, rebuild_seconds = begun["schedule"], begun["rebuilt"], begun["evicted"], begun["seconds"]
        stats = self.train_epoch(epoch)
        self.train_seconds += stats["seconds"]
        t1 = time.perf_counter()
        valid_bank = None
        if epoch < self.ra.epochs and self.rebuild.should_rebuild(epoch + 1):
            # the next epoch's bank, encoded now, is also this epoch's validation bank: same
            # entries, same weights; one encoding instead of two
            evicted += self._rebuild_bank(epoch + 1)
            rebuild_seconds += time.perf_counter() - t1
            t1 = time.perf_counter()
            valid_bank = self.bank
        elif self.world.is_main:
            valid_bank = self.banks.eval_bank("valid", self.entries)
        if not self.world.is_main:  # rank 0 evaluates, writes and decides to stop; the others follow
            self.stopped = distributed.broadcast_object(None)
            return
        assert valid_bank is not None
        with_r, without_r = self.dual_evaluate("valid", valid_bank)
        diagnostics = self.evaluator.diagnose("valid", valid_bank)
        eval_seconds = time.perf_counter() - t1
        score = with_r.metrics["NDCG@10"]
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            ckpt.save_best(self, epoch)
        else:
            self.bad_epochs += 1
        usefulness = self.entries.usefulness[self.entries.ids]
        record = {
            "epoch": epoch,
            "schedule": {**sched, "phase": self.phase, "rebuilt": rebuilt,
                         "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}},
            "train": stats,
            "valid": {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics},
            "valid_diagnostics": diagnostics,
            "bank": {"evicted": evicted, "size": len(usefulness), "evicted_total": self.entries.evicted,
                     "usefulness_mean": float(usefulness.mean()), "usefulness_std": float(usefulness.std()),
                     "usefulness_min": float(usefulness.min())},
            **{f"{name}_params": parameter_drift(getattr(self.model, name), self.initial[name]) for name in TRACKED},
            "seconds": {"rebuild": rebuild_seconds, "train": stats["seconds"], "eval": eval_seconds,
                        "epoch": time.perf_counter() - t0},
            "wall_seconds": time.perf_counter() - began,
        }
        if epoch == 1 and self.warmup_history:
            record["query_warmup"] = self.warmup_history
        append_jsonl(self.out / "metrics.jsonl", record)
        self.scalars.write(record, step=epoch)
        log.info("ra epoch %d  loss %.4f  alpha %.3f  valid NDCG@10 %.4f with / %.4f without retrieval  "
                 "(%.0f s)", epoch, stats["loss"], stats.get("alpha_mean", float("nan")), score,
                 without_r.metrics["NDCG@10"], record["seconds"]["epoch"])
        if self.bad_epochs >= self.ra.patience:
            log.info("early stop: no better validation NDCG@10 for %d epochs", self.bad_epochs)
            self.stopped = True
        elif time.perf_counter() > deadline:
            log.info("stopping: train.max_minutes=%s reached", self.cfg.train.max_minutes)
            self.stopped = True
        distributed.broadcast_object(self.stopped)  # rank 0's side of the broadcast the others wait in
        ckpt.save_last(self, epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training examples against the current bank (``begin_epoch`` builds it)."""
        cfg, ra = self.cfg, self.ra
        assert self.bank is not None
        # warm-ups count the epoch being trained: the first RA epoch already uses retrieval
        enhanced_weight = linear_warmup(epoch, ra.enhanced_weight, ra.alpha_warmup_epochs)
        self.model.train()
        s = self.split
        if cfg.train.mode == "prefix":
            plan, windows = self.plan, self.windows
        else:
            plan = window_plan(s.train_users, s.train_positions, cfg.data.max_seq_len, self.rng, cfg.train.window_chunk)
            windows = None
        targets_all = torch.from_numpy(self.train_targets).to(self.device)
        item_emb = self.model.encoder.item_emb.weight
        means = RunningMean()
        n_seen, steps = 0, 0
        start = time.perf_counter()
        batches = tqdm(iterate_batches(plan, self.data, cfg.data.max_seq_len, cfg.train.batch_size, self.rng,
                                       windows),
                       desc=f"ra epoch {epoch}", leave=False, dynamic_ncols=True,
                       disable=None if self.progress is None else not self.progress)
        for batch in batches:
            shard = distributed.shard_batch(batch, self.world.rank, self.world.size)  # this rank's slice
            batch = shard.batch
            idx = batch.sample_index
            users, positions = s.train_users[idx], s.train_positions[idx]
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
            teacher = self.usefulness(out.scores_h.float(), nb_targets, targets, item_emb.detach())
            use_log = usefulness_log_probs(teacher, ret.mask)  # the teacher at temperature 1
            gate = None
            if ra.loss_gate_threshold is not None:
                by = ret.sim if ra.loss_gate_by == "similarity" else nb.usefulness
                gate = gate_score(ret.weights.detach().float(), by.detach().float(), ret.mask)
            losses = ra_loss(out.scores_h.float(), out.scores_fused.float(), targets,
                             retrieval_log=ret.log_weights.float(), usefulness_log=use_log, mask=ret.mask,
                             enhanced_weight=enhanced_weight, kl_weight=ra.kl_weight, direction=ra.kl_direction,
                             gate_score=gate, gate_threshold=ra.loss_gate_threshold)
            loss = sum(losses.values()) * shard.weight  # 1 in one process; see distributed.Shard
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.model.parameters())
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()

            # each used neighbour's usefulness EMA moves toward its share under the teacher
            used = ret.mask.cpu().numpy()
            used[shard.size :] = False  # a placeholder example (empty slice) updates nothing
            value = entry_usefulness(use_log, ret.mask).cpu().numpy() if used.any() else np.zeros(used.shape)
            ids, value = distributed.gather_arrays(res.I[used], value[used])  # all ranks' updates, on every rank
            if len(ids):
                self.bank.index.update_quality(ids, value, momentum=ra.usefulness_momentum)

            n = shard.size  # len(idx), or 0 for a placeholder
            diag = {f"loss_{k}": v.detach().item() for k, v in losses.items()}
            diag.update({k: v.item() for k, v in out.fusion.stats.items()})
            diag.update(neighbour_stats(res, targets.cpu().numpy(), used))
            diag["attention_temperature"] = float(ret.temperature.mean())
            if gate is not None:
                diag["loss_gated"] = float((gate < ra.loss_gate_threshold).float().mean())
            if n:
                means.add(diag, n)
            n_seen += n
            steps += 1
        batches.close()
        seconds = time.perf_counter() - start
        if self.world.size > 1:  # per-rank sums -> the global batches' numbers
            means.sums, means.counts = distributed.sum_over_ranks(means.sums), distributed.sum_over_ranks(means.counts)
            n_seen = int(sum(distributed.gather_objects(n_seen)))
        stats = means.result()
        stats["loss"] = sum(v for k, v in stats.items() if k.startswith("loss_") and k != "loss_gated")
        stats.update(seconds=seconds, samples=n_seen, steps=steps, enhanced_weight=enhanced_weight)
        with self.bank.index.read_locked() as cols:  # the usefulness EMAs go back to the entries
            self.entries.absorb(self.bank.examples, cols["quality"].copy())
        self.bank_fresh = False  # the weights moved: the bank's keys are stale now
        return stats

    # -------------------------------------------------------------- evaluation

    def evaluate(self, split: str, bank: KeyedBank | None) -> EvalResult:
        """Full-ranking metrics on ``split``: fused scores with a bank, h's scores without (evaluation.py)."""
        return self.evaluator.evaluate(split, bank)

    def dual_evaluate(self, split: str, bank: KeyedBank | None = None) -> tuple[EvalResult, EvalResult]:
        """(with retrieval, without retrieval) for the same weights."""
        bank = bank or self.banks.eval_bank(split, self.entries)
        return self.evaluator.evaluate(split, bank), self.evaluator.evaluate(split, None)

    def finish(self, epochs_run: int) -> dict[str, Any]:
        """Reload the best epoch, evaluate valid and test both ways, write ``metrics.json`` and
        ``ranks.npz``."""
        blob = ckpt.load_best(self.out / "ra.pt", self.device)
        self.model.load_state_dict(blob["model"], strict=True)
        self.model.set_schedule(**blob["schedule"])
        self.entries = BankEntries.from_state(blob["entries"])
        result: dict[str, Any] = {}
        ranks: dict[str, np.ndarray] = {}
        banks = self.banks.eval_banks(self.entries)
        for split in ("valid", "test"):
            with_r, without_r = self.dual_evaluate(split, banks[split])
            result[split] = {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics}
            ranks[f"{split}_with_retrieval"], ranks[f"{split}_without_retrieval"] = with_r.ranks, without_r.ranks
        # per-user NDCG@10 with minus without retrieval, on the test split just evaluated
        result["test"]["delta_ndcg10_bootstrap"] = paired_bootstrap(
            with_r.per_example(10), without_r.per_example(10), seed=self.cfg.train.seed)
        result.update(best_epoch=self.best_epoch, epochs_run=epochs_run, train_seconds=self.train_seconds,
                      pretrained=str(self.ra.pretrained), pretrained_checksum=self.pretrained.blob.get("checksum"),
                      model_checksum=blob["checksum"], evicted_total=self.entries.evicted,
                      query_warmup=self.warmup_history)
        buf = io.BytesIO()
        np.savez(buf, users=self.split.test_users, **ranks)
        atomic_write(self.out / "ranks.npz", lambda fh: fh.write(buf.getbuffer()))
        atomic_write_json(self.out / "metrics.json", result)
        return result

    def cleanup(self) -> None:
        self.bank = None
        self.scalars.close()


def run_ra_training(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                    progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune in this process, or, started by torchrun, as one rank of a data-parallel run."""
    return run_trainer(RATrainer, cfg, out_dir, resume=resume, progress=progress)
