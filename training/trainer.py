"""DuoRec pretraining: one trainer class with an explicit loop.

    ragrec train --config configs/ml100k.yaml --out runs/ml100k [--set train.lr=0.002]

A run directory holds: ``config.yaml`` (resolved), ``items.json`` (vocabulary),
``last.pt`` (full state for ``--resume``), ``model.pt`` (best weights by validation
NDCG@10), ``metrics.jsonl`` (one line per epoch) and ``metrics.json`` (final valid/test).
Checkpoints hold tensors and plain values only: ``torch.load(weights_only=True)`` reads them.
With TensorBoard installed, ``tb/`` holds the per-epoch records as scalars too.

Data-parallel under torchrun (``training/distributed.py``): every rank follows the same seeded
batch plan and trains on its slice of each global batch of ``train.batch_size`` examples in a
DistributedDataParallel wrapper, so the step equals the single-process step on the global
batch. The contrastive views are all-gathered with their gradient, so InfoNCE sees the whole
global batch's negatives, as in one process. Rank 0 alone evaluates, decides when to stop and
writes the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import distributed
from training.atomic import append_jsonl, atomic_write_json
from training.checkpoints import RunError, atomic_torch_save, load_model_file, save_model_file
from training.config import RunConfig
from training.data.batches import Batch, Plan, iterate_batches, prefix_plan, same_target_partners, window_plan
from training.data.readers import DataError
from training.data.sequences import gather_items, item_popularity, leave_one_out, pad_prefixes
from training.data.source import load_run_data
from training.ema import WeightAverage
from training.evaluate import EvalResult, evaluate_scorer
from training.lifecycle import (
    autocast,
    build_model,
    epochs_after,
    prepare_out_dir,
    resolve_device,
    run_trainer,
)
from training.model import duorec_loss
from training.tracking import ScalarLog

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ragrec.duorec.v1"


# ------------------------------------------------------------------ trainer


def seen_in_input(batch, targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """(n, N) bool: the items of each example's input (its window up to its column), never its target."""
    win = torch.from_numpy(batch.windows[batch.rows])  # (n, W)
    cols = torch.from_numpy(batch.cols)
    inside = torch.arange(win.shape[1])[None, :] <= cols[:, None]
    mask = torch.zeros(len(win), n_items + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(inside, win, 0), True)
    mask[torch.arange(len(win)), targets.cpu()] = False
    return mask[:, 1:]


class Trainer:
    """setup() -> train() -> cleanup(); save_checkpoint() after every epoch."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress  # None: tqdm decides (shown on a terminal)
        self.epochs_done = 0  # epochs are numbered from 1 (training/lifecycle.py)
        self.best_score = -math.inf
        self.best_epoch = 0  # 0: none yet
        self.bad_epochs = 0
        self.train_seconds = 0.0

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        self.world = distributed.world()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.rng = np.random.default_rng(cfg.train.seed)  # the batch plan: identical on every rank
        self.device = distributed.rank_device(resolve_device(cfg.train.device))

        # Everything that can fail on bad input happens before the run directory is touched.
        self.data = load_run_data(cfg)
        self.split = leave_one_out(self.data)
        if len(self.split.train_users) == 0:
            raise DataError(f"{cfg.data.path}: no training examples after filtering (every user needs >= 2 items)")
        if len(self.split.valid_users) == 0:
            raise DataError(f"{cfg.data.path}: no user has the 3 interactions needed for validation and test")
        if self.world.is_main:
            prepare_out_dir(self.out, cfg, self.data.item_vocab, resume=self.resume)

        L = cfg.data.max_seq_len
        self.train_targets = gather_items(self.data, self.split.train_users, self.split.train_positions)
        if cfg.train.shuffle_targets:
            # Sanity mode. Shuffling targets across examples cuts the input -> target link;
            # relabelling them through a random permutation of the catalogue also removes
            # what the target marginal (popularity) would teach. Held-out targets keep their
            # true ids, so an honest pipeline must score at chance: HR@10 ~ 10 / n_items.
            relabel = np.concatenate([[0], self.rng.permutation(np.arange(1, self.data.n_items + 1))])
            self.train_targets = relabel[self.rng.permutation(self.train_targets)]
        self.popularity = item_popularity(self.data, self.split)
        self.eval_inputs = {
            name: (pad_prefixes(self.data, u, p, L)[0], gather_items(self.data, u, p))
            for name, u, p in (
                ("valid", self.split.valid_users, self.split.valid_positions),
                ("test", self.split.test_users, self.split.test_positions),
            )
        }
        self.prefix_plan: Plan | None = None
        if cfg.train.mode == "prefix":
            self.prefix_plan = prefix_plan(self.split.train_users, self.split.train_positions, L)
            self.prefix_windows = pad_prefixes(self.data, self.prefix_plan.unit_users, self.prefix_plan.unit_ends, L)[0]

        self.model = build_model(cfg, self.data.n_items).to(self.device)
        if self.world.size > 1:  # same initial weights (DDP copies rank 0's anyway), own dropout masks
            torch.manual_seed(cfg.train.seed + self.world.rank)
        self.ddp = distributed.data_parallel(self.model, self.device)
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.ema = WeightAverage(self.model, cfg.train.ema) if cfg.train.ema else None
        if self.resume:
            self._load_checkpoint(self.out / "last.pt")
        self.scalars = ScalarLog(self.out / "tb", enabled=cfg.train.tensorboard and self.world.is_main)
        log.info("data: %d users, %d items, %d training examples, %s per epoch (%s mode)",
                 self.data.n_users, self.data.n_items, len(self.train_targets),
                 f"{self.prefix_plan.n_units} passes" if self.prefix_plan else "windows drawn afresh", cfg.train.mode)
        if self.world.size > 1:
            log.info("data-parallel: rank %d of %d on %s, %d examples per global batch", self.world.rank,
                     self.world.size, self.device, cfg.train.batch_size)

    # -------------------------------------------------------------- one epoch

    def _contrastive_examples(self, batch: Batch) -> np.ndarray:
        """Sorted indices of the (global) batch's examples that take part in the contrastive
        loss: all of them in prefix mode (each example is a sequence, as in DuoRec); in window
        mode the last column of each window, so contrastive learning stays at the sequence
        level and costs one extra pass per window, not per position."""
        rows = batch.rows
        if self.cfg.train.mode == "prefix":
            cl = np.arange(len(rows))
        else:
            cl = np.flatnonzero(np.r_[rows[1:] != rows[:-1], True])  # rows are grouped per window
        return cl

    def _views(self, batch: Batch, cl: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stack the original, dropout and same-target views into ONE encoder input.

        Returns (sequences, rows, cols): the outputs come back in the order [every example |
        dropout view of the contrastive examples ``cl`` | their same-target partners].
        """
        mode = self.cfg.loss.contrastive
        windows, rows, cols = batch.windows, batch.rows, batch.cols
        parts, all_rows, all_cols = [windows], [rows], [cols]
        n_windows = len(windows)
        if mode in ("un", "us", "us_x"):
            # second dropout pass, over only the windows that hold a contrastive example
            units, local = np.unique(rows[cl], return_inverse=True)
            parts.append(windows[units])
            all_rows.append(local + n_windows)
            all_cols.append(cols[cl])
            n_windows += len(units)
        if mode in ("su", "us", "us_x"):
            partner = self.partners[batch.sample_index[cl]]
            sem, sem_len = pad_prefixes(self.data, self.split.train_users[partner],
                                        self.split.train_positions[partner], self.cfg.data.max_seq_len)
            parts.append(sem)
            all_rows.append(np.arange(len(sem)) + n_windows)
            all_cols.append(sem_len - 1)
        width = max(int((p > 0).sum(axis=1).max(initial=0)) for p in parts)  # drop all-padding columns
        stacked = np.concatenate([np.pad(p[:, :width], ((0, 0), (0, max(0, width - p.shape[1])))) for p in parts])
        to = self.device
        return (torch.from_numpy(stacked).to(to), torch.from_numpy(np.concatenate(all_rows)).to(to),
                torch.from_numpy(np.concatenate(all_cols)).to(to))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        L = cfg.data.max_seq_len
        self.model.train()
        if cfg.train.mode == "prefix":
            assert self.prefix_plan is not None
            plan, windows = self.prefix_plan, self.prefix_windows
        else:
            plan = window_plan(self.split.train_users, self.split.train_positions, L, self.rng,
                               cfg.train.window_chunk)
            windows = None
        if cfg.loss.contrastive in ("su", "us", "us_x"):
            self.partners = same_target_partners(self.train_targets, self.rng)
        targets_all = torch.from_numpy(self.train_targets).to(self.device)
        sums: dict[str, float] = {}
        n_seen, steps = 0, 0
        start = time.perf_counter()
        n_steps = math.ceil(plan.n_samples / cfg.train.batch_size)
        world = self.world
        show = self.progress if world.is_main else False  # None: tqdm decides
        batches = tqdm(iterate_batches(plan, self.data, L, cfg.train.batch_size, self.rng, windows),
                       total=n_steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                       disable=None if show is None else not show)
        for global_batch in batches:
            cl_global = self._contrastive_examples(global_batch)
            shard = distributed.shard_batch(global_batch, world.rank, world.size)
            batch = shard.batch
            # this rank's contrastive examples, and every rank's count of them (for the gather)
            cuts = np.searchsorted(cl_global, distributed.shard_bounds(shard.n_global, world.size))
            cl = cl_global[cuts[world.rank] : cuts[world.rank + 1]] - shard.lo
            seq, rows, cols = self._views(batch, cl)
            n, m = len(batch.rows), len(cl)
            targets = targets_all[torch.from_numpy(batch.sample_index).to(self.device)]
            with autocast(self.device, cfg.train.precision):
                out = self.ddp(seq, rows, cols)  # (n + views * m, D)
                h = out[:n]
                logits = self.model.scores(h)
            if cfg.loss.mask_seen:
                logits = logits.masked_fill(seen_in_input(batch, targets, logits.shape[1]).to(logits.device),
                                            float("-inf"))
            losses = {"ce": F.cross_entropy(logits.float(), targets - 1, label_smoothing=cfg.loss.label_smoothing)}
            if cfg.loss.contrastive != "none":
                mode = cfg.loss.contrastive
                counts = np.diff(cuts)
                # (m, D) per rank -> (M, D) in the global batch's order, gradient flowing back to each rank
                h_cl = distributed.gather_rows(h[torch.from_numpy(cl).to(self.device)].float(), counts)
                h_drop = (distributed.gather_rows(out[n : n + m].float(), counts)
                          if mode in ("un", "us", "us_x") else None)
                h_sem = (distributed.gather_rows(out[out.shape[0] - m :].float(), counts)
                         if mode in ("su", "us", "us_x") else None)
                cl_targets = targets_all[torch.from_numpy(global_batch.sample_index[cl_global]).to(self.device)]
                losses.update(duorec_loss(
                    h_cl, h_drop, h_sem, cl_targets, mode=mode, tau=cfg.loss.tau, sim=cfg.loss.sim,
                    lmd=cfg.loss.lmd, lmd_sem=cfg.loss.lmd_sem, mask_false_negatives=cfg.loss.mask_false_negatives,
                ))
            # CE is this rank's mean: weighted so DDP's average is the global mean's gradient. The
            # contrastive terms are already global (the same value on every rank; see gather_rows).
            loss = sum(v * shard.weight if k == "ce" else v for k, v in losses.items())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().item() * shard.size
            n_seen += shard.size
            steps += 1
            if steps % 20 == 0:
                batches.set_postfix(loss=f"{loss.detach().item():.3f}")
        batches.close()
        seconds = time.perf_counter() - start
        if world.size > 1:  # per-rank sums -> the global batch's numbers
            sums = distributed.sum_over_ranks({**sums, "_n_seen": n_seen})
            n_seen = int(sums.pop("_n_seen"))
        stats = {k: v / max(n_seen, 1) for k, v in sums.items()}
        stats["loss"] = sum(stats.values())
        stats.update(seconds=seconds, samples=n_seen, steps=steps, samples_per_s=n_seen / max(seconds, 1e-9),
                     lr=self.optimizer.param_groups[0]["lr"])
        return stats

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> EvalResult:
        self.model.eval()
        prefixes, targets = self.eval_inputs[split]

        def score(seq: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.cfg.train.precision):
                return self.model.scores(self.model(seq))

        return evaluate_scorer(score, prefixes, targets, ks=self.cfg.eval.ks, item_popularity=self.popularity,
                               mask_seen=self.cfg.eval.mask_seen, batch_size=self.cfg.eval.batch_size,
                               device=self.device)

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The weights to validate and save: the moving average when ``train.ema`` is on."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _maybe_decay_lr(self) -> None:
        """Plateau schedule (``train.lr_patience``): the rate lives in the optimizer's state, so
        ``--resume`` continues with the decayed rate."""
        every = self.cfg.train.lr_patience
        if every is None or self.bad_epochs % every:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= self.cfg.train.lr_decay
        log.info("validation flat for %d epochs: learning rate -> %.3g", self.bad_epochs,
                 self.optimizer.param_groups[0]["lr"])

    # -------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        began = time.perf_counter()
        deadline = began + cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
        epoch = self.epochs_done
        for epoch in epochs_after(self.epochs_done, cfg.train.epochs):
            stats = self.train_epoch(epoch)
            self.train_seconds += stats["seconds"]
            record: dict[str, Any] = {"epoch": epoch, "train": stats, "train_seconds_total": self.train_seconds}
            stop = False
            if self.world.is_main:
                with self._averaged():
                    valid = self.evaluate("valid").metrics
                    record["valid"] = valid
                    score = valid["NDCG@10"]
                    improved = score > self.best_score
                    if improved:
                        self._save_model(epoch, valid)
                if improved:
                    self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                else:
                    self.bad_epochs += 1
                    self._maybe_decay_lr()
                stop = self.bad_epochs >= cfg.train.patience
                log.info("epoch %d  loss %.4f  %.1fs  valid NDCG@10 %.4f HR@10 %.4f  (best %.4f @ %d)",
                         epoch, stats["loss"], stats["seconds"], score, valid["HR@10"], self.best_score,
                         self.best_epoch)
            if self.world.size > 1:  # rank 0 alone validates, so it alone decays: every rank takes its rate
                lr = distributed.broadcast_object(self.optimizer.param_groups[0]["lr"])
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            record["wall_seconds"] = time.perf_counter() - began  # this session: training + validation
            if self.world.is_main:
                append_jsonl(self.out / "metrics.jsonl", record)
                self.scalars.write(record, step=epoch)
            self.save_checkpoint(epoch)
            reason = None
            if stop:
                reason = f"early stop: no better validation NDCG@10 for {self.bad_epochs} epochs"
            elif time.perf_counter() > deadline:
                reason = f"stopping: train.max_minutes={cfg.train.max_minutes} reached"
            reason = distributed.broadcast_object(reason)  # rank 0 decides; every rank stops together
            if reason:
                log.info("%s", reason)
                break
        return self.finish(epochs_run=epoch)

    def finish(self, epochs_run: int) -> dict[str, Any]:
        """Evaluate the best model on valid and test and write ``metrics.json`` (rank 0; the
        other ranks return its result)."""
        return distributed.run_on_main(lambda: self._final_metrics(epochs_run))

    def _final_metrics(self, epochs_run: int) -> dict[str, Any]:
        model, blob = load_model_file(self.out / "model.pt", map_location=self.device)
        self.model.load_state_dict(model.state_dict())
        result = {
            "valid": self.evaluate("valid").metrics,
            "test": self.evaluate("test").metrics,
            "best_epoch": self.best_epoch,
            "epochs_run": epochs_run,
            "train_seconds": self.train_seconds,
            "model_checksum": blob["checksum"],
            "shuffle_targets": self.cfg.train.shuffle_targets,
            "chance_HR@10": 10 / self.data.n_items,
        }
        atomic_write_json(self.out / "metrics.json", result)
        return result

    # -------------------------------------------------------------- checkpoints

    def _save_model(self, epoch: int, valid: dict[str, float]) -> None:
        save_model_file(self.model, self.out / "model.pt", epoch=epoch, valid=valid)

    def save_checkpoint(self, epoch: int) -> None:
        """Rank 0 writes ``last.pt``; data-parallel, it also holds every rank's dropout RNG."""
        rank_rngs = distributed.gather_objects(torch.get_rng_state()) if self.world.size > 1 else None
        if not self.world.is_main:
            return
        blob = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_config": self.model.cfg.to_dict(),
            "run_config": self.cfg.model_dump(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state,
        }
        if rank_rngs is not None:
            blob["torch_rng_ranks"] = rank_rngs
        if self.ema is not None:
            blob["ema"] = self.ema.state_dict()
        atomic_torch_save(blob, self.out / "last.pt")

    def _load_checkpoint(self, path: Path) -> None:
        # rank 0 reads it (CPU tensors) and hands it to the others: only rank 0 needs the run directory
        blob = distributed.run_on_main(lambda: torch.load(path, map_location="cpu", weights_only=True))
        if blob.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{path} is not a ragrec training checkpoint")
        if not self.model.cfg.matches(blob["model_config"]):
            raise RunError(f"{path} was trained with a different model shape or vocabulary; "
                           "resume with the same config and data")
        self.model.load_state_dict(blob["model"], strict=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        if self.ema is not None:
            if "ema" not in blob:
                raise RunError(f"{path} was trained without train.ema; resume with the same config")
            self.ema.load_state_dict(blob["ema"])
        self.epochs_done = int(blob["epoch"])
        self.best_score = float(blob["best_score"])
        self.best_epoch = int(blob["best_epoch"])
        self.bad_epochs = int(blob["bad_epochs"])
        self.train_seconds = float(blob["train_seconds"])
        rank_rngs = blob.get("torch_rng_ranks")
        if self.world.size == 1 or (rank_rngs is not None and len(rank_rngs) == self.world.size):
            torch.set_rng_state(blob["torch_rng"] if self.world.size == 1 else rank_rngs[self.world.rank])
        else:
            log.warning("resuming with %d processes a run checkpointed with %d: dropout RNG streams restart",
                        self.world.size, len(rank_rngs) if rank_rngs else 1)
            torch.manual_seed(self.cfg.train.seed + self.world.rank + 7919 * (self.epochs_done + 1))
        self.rng.bit_generator.state = blob["numpy_rng"]
        log.info("resumed from %s after epoch %d", path, self.epochs_done)

    def cleanup(self) -> None:
        """Drop the forward wrapper and the optimizer state; the files stay."""
        self.ddp = self.model
        self.optimizer.state.clear()
        self.scalars.close()


def run_training(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                 progress: bool | None = None) -> dict[str, Any]:
    """Train in this process, or, started by torchrun, as one rank of a data-parallel run."""
    return run_trainer(Trainer, cfg, out_dir, resume=resume, progress=progress)
