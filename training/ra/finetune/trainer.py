"""Stage 2: retrieval-augmented fine-tuning of a finished DuoRec run.

    ragrec train --config configs/ml100k-ra-finetune.yaml --out runs/ml100k-ra-ft --set ra.pretrained=runs/ml100k [--resume]

The run directory holds ``config.yaml``, ``items.json``, ``model.pt`` (the best encoder, in
the DuoRec model format, so ``ragrec evaluate`` and the service read it), ``ra.pt`` (the
whole RA model at its best epoch), ``last.pt`` (the state after the latest epoch, for
``--resume``), ``metrics.jsonl`` (per epoch: losses, schedules, fusion and retrieval
diagnostics on training batches and on validation users, bank hygiene, timings, validation
with and without retrieval), ``metrics.json`` (valid/test with and without retrieval and
the paired-bootstrap test delta) and ``ranks.npz`` (each user's target rank, both ways, for
pooling seeds in ``ragrec ablate``).

Leakage rules (DESIGN.md §3), enforced here:
- a training query searches with ``exclude_user`` / ``exclude_from_position`` = its own
  (user, target position): neither itself nor anything later of its user comes back;
- the validation bank holds training examples only, the test bank training + validation
  examples; ``check_bank`` refuses a bank holding an entry at or after a query's position
  for the query's user (that entry's target is the held-out item or a later one).

``train.mode``: "prefix" (every training prefix one sample) or "window" (every position of
each user's shifted windows, inputs cut at the window start: far fewer encoder passes).
A resumed run continues bit for bit on CPU: the checkpoint carries the bank's keys between
rebuilds, the usefulness of every entry and both random generators.
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

from retriever import MemoryBank
from training import distributed
from training.atomic import append_jsonl, atomic_write, atomic_write_json
from training.checkpoints import MODEL_FORMAT, RunError, atomic_torch_save, save_model_file
from training.config import RunConfig, dump_config
from training.data.batches import iterate_batches, prefix_plan, window_plan
from training.data.sequences import (
    DataError,
    Vocabulary,
    gather_items,
    item_popularity,
    leave_one_out,
    pad_prefixes,
)
from training.data.source import load_run_data
from training.evaluate import EvalResult, evaluate_scorer, paired_bootstrap
from training.lifecycle import autocast, build_model, resolve_device
from training.model import SequenceEncoder
from training.ra.encode import encode_prefixes
from training.ra.finetune.diagnostics import RunningMean, neighbour_stats, parameter_drift, snapshot
from training.ra.finetune.entries import BankEntries, entry_usefulness, retrieval_quality
from training.ra.finetune.losses import USEFULNESS, ra_loss, usefulness_log_probs
from training.ra.finetune.model import Bank, RAModel, build_ra_model, search_neighbours
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
from training.ra.finetune.warmup import warm_up_retriever
from training.tracking import ScalarLog

log = logging.getLogger(__name__)

RA_FORMAT = "ragrec.ra_model.v1"
RA_CHECKPOINT_FORMAT = "ragrec.ra_checkpoint.v1"
# ra settings a resumed run may change: they decide when it stops, not what an epoch does
RESUMABLE_CHANGES = {"epochs", "patience"}


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
    """setup() -> train() -> cleanup(); one explicit loop, schedules applied per epoch,
    ``save_checkpoint`` after every epoch."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None):
        if not cfg.ra.enabled or not cfg.ra.pretrained:
            raise RunError("RATrainer needs ra.enabled=true and ra.pretrained")
        self.cfg = cfg
        self.ra = cfg.ra
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.start_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.stopped = False  # early stop or time limit reached: a resume goes straight to finish()
        self.warmup_history: list[dict[str, float]] = []

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, ra = self.cfg, self.ra
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.rng = np.random.default_rng(cfg.train.seed)
        self.world = distributed.world()
        self.device = distributed.rank_device(resolve_device(cfg.train.device))
        self.data = load_run_data(cfg)
        self.split = leave_one_out(self.data)
        if len(self.split.train_users) == 0 or len(self.split.valid_users) == 0:
            raise DataError(f"{cfg.data.path}: needs training examples and users with >= 3 interactions")

        # Everything that can fail on bad input happens before the run directory is touched.
        encoder = build_model(cfg, self.data.n_items)
        self.pretrained = load_pretrained(ra.pretrained, encoder, self.data.item_vocab)
        self.model: RAModel = build_ra_model(encoder, ra.model_dump()).to(self.device)
        if self.world.size > 1:  # every rank starts from rank 0's weights, with its own dropout masks
            distributed.sync_from_main(self.model)
            torch.manual_seed(cfg.train.seed + self.world.rank)
        phases = [p.model_dump() for p in ra.unfreeze] or [{"until_epoch": ra.epochs + 1, "train": [""]}]
        self.phases = parse_phases(phases)
        try:
            validate_phases(self.model, self.phases)  # a typo fails now, not at epoch 20
        except ValueError as exc:
            known = sorted(n for n, m in self.model.named_children())
            raise RunError(f"ra.unfreeze: {exc}; modules: {known} (dotted sub-modules too, '' = all)") from None
        modules = dict(self.model.named_modules())
        for i, phase in enumerate(self.phases):
            if not any(True for name in phase.train for _ in modules[name].parameters()):
                raise RunError(f"ra.unfreeze phase {i} trains {list(phase.train)}, which hold no parameters "
                               f"with fusion={ra.fusion!r}")
        self.rebuild = RebuildSchedule(ra.rebuild_every_early, ra.rebuild_switch_epoch, ra.rebuild_every_late)
        s = self.split
        self.entries = BankEntries.for_examples(s.train_positions, ra.bank_min_prefix)
        held = int(self.entries.alive.sum())
        if held == 0:
            raise RunError(f"the memory bank is empty: no training example has a prefix of "
                           f"ra.bank_min_prefix={ra.bank_min_prefix} items (longest: {int(s.train_positions.max())})")
        if ra.k > held:
            raise RunError(f"ra.k={ra.k} is larger than the memory bank ({held} training examples"
                           f"{' after ra.bank_min_prefix' if ra.bank_min_prefix > 1 else ''}); lower ra.k")
        if self.world.is_main:  # only rank 0 touches the run directory
            self._prepare_out_dir()

        L = cfg.data.max_seq_len
        self.train_targets = gather_items(self.data, s.train_users, s.train_positions)
        self.popularity = item_popularity(self.data, self.split)
        self.eval_sets = {
            name: (u, p, pad_prefixes(self.data, u, p, L)[0], gather_items(self.data, u, p))
            for name, u, p in (("valid", s.valid_users, s.valid_positions), ("test", s.test_users, s.test_positions))
        }
        if cfg.train.mode == "prefix":  # fixed: one pass per head window / long prefix
            self.plan = prefix_plan(s.train_users, s.train_positions, L)
            self.windows = pad_prefixes(self.data, self.plan.unit_users, self.plan.unit_ends, L)[0]
        self.usefulness = USEFULNESS[ra.usefulness]
        self.fusion_init = snapshot(self.model.fusion)
        self.retrieval_init = snapshot(self.model.retrieval)
        self.retriever_init = snapshot(self.model.retriever)
        self.bank: Bank | None = None
        self.phase = -1
        if self.resume:
            self._load_checkpoint(self.out / "last.pt")
        self.scalars = ScalarLog(self.out / "tb", enabled=cfg.train.tensorboard and self.world.is_main)
        log.info("RA stage from %s: %d items, %d training examples, %d in the bank, fusion=%s retrieval=%s "
                 "values=%s k=%d, %s mode", ra.pretrained, self.data.n_items, len(self.train_targets), held,
                 ra.fusion, ra.retrieval, ra.values, ra.k, cfg.train.mode)

    def _prepare_out_dir(self) -> None:
        if self.resume:
            if not (self.out / "last.pt").is_file():
                raise RunError(f"--resume: no checkpoint at {self.out / 'last.pt'}")
        elif self.out.exists() and any(self.out.iterdir()):
            raise RunError(f"run directory {self.out} is not empty; pass --resume to continue it or choose a new --out")
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
        with autocast(self.device, self.cfg.train.precision):
            h = encode_prefixes(self.model.encoder, self.data, users, positions, self.cfg.data.max_seq_len,
                                batch_size=self.cfg.eval.batch_size, device=self.device)
        if recenter:
            self.model.retriever.center.copy_(h.mean(dim=0))
        with autocast(self.device, self.cfg.train.precision):
            keys = torch.cat([self.model.retriever(part).float() for part in h.split(self.cfg.eval.batch_size)])
        return h, keys

    def build_bank(self, users: np.ndarray, positions: np.ndarray, *, recenter: bool = False,
                   quality: np.ndarray | None = None, examples: np.ndarray | None = None,
                   shared: bool = False) -> Bank:
        """A bank of examples (user, position): key = retriever(h of the prefix), payload target =
        the item at that position, quality (default 1.0 each). recenter: see ``encode``
        (training rebuilds only). examples: each entry's training-example index (-1 = none)."""
        users, positions = np.asarray(users, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        if shared and distributed.active():  # a training bank under torchrun: rank 0 encodes, once
            h, keys, center = distributed.computed_on_main(
                lambda: (*self.encode(users, positions, recenter=recenter), self.model.retriever.center), self.device)
            self.model.retriever.center.copy_(center)  # every rank builds the same index from the same keys
        else:
            h, keys = self.encode(users, positions, recenter=recenter)
        return self._bank_from(users, positions, keys, h if self.ra.values != "target" else None, quality, examples)

    def _bank_from(self, users, positions, keys, values, quality, examples) -> Bank:
        targets = gather_items(self.data, users, positions)
        index = MemoryBank(keys.cpu().numpy(), targets, users, positions, quality=quality)
        if examples is None:
            examples = np.full(len(users), -1, dtype=np.int64)
        return Bank(index=index, keys=keys, values=values, users=users, positions=positions, examples=examples)

    def train_bank(self) -> Bank:
        """The training examples the bank holds now, re-encoded; the retriever's center moves to
        their mean h. Training queries search it with their own user's present and future excluded."""
        ids = self.entries.ids
        return self.build_bank(self.split.train_users[ids], self.split.train_positions[ids], recenter=True,
                               quality=self.entries.quality[ids], examples=ids, shared=True)

    def eval_bank(self, split: str) -> Bank:
        """Validation: the training examples the bank holds (same usefulness). Test: those plus
        the validation examples (quality 1.0: never retrieved in training)."""
        s = self.split
        ids = self.entries.ids
        users, positions = s.train_users[ids], s.train_positions[ids]
        quality, examples = self.entries.quality[ids], ids
        if split == "test":
            n = len(s.valid_users)
            users = np.concatenate([users, s.valid_users])
            positions = np.concatenate([positions, s.valid_positions])
            quality = np.concatenate([quality, np.ones(n, dtype=np.float32)])
            examples = np.concatenate([examples, np.full(n, -1, dtype=np.int64)])
        elif split != "valid":
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        bank = self.build_bank(users, positions, quality=quality, examples=examples)
        qu, qp = self.eval_sets[split][:2]
        check_bank(bank.users, bank.positions, qu, qp, split)
        return bank

    def eval_banks(self) -> dict[str, Bank]:
        """Both evaluation banks from one encoding: the test bank is the validation bank plus
        the validation examples, so their keys are encoded once."""
        test = self.eval_bank("test")
        m = int(self.entries.alive.sum())  # the training entries come first
        valid = self._bank_from(test.users[:m], test.positions[:m], test.keys[:m],
                                None if test.values is None else test.values[:m], self.entries.quality[self.entries.ids],
                                test.examples[:m])
        check_bank(valid.users, valid.positions, *self.eval_sets["valid"][:2], "valid")
        return {"valid": valid, "test": test}

    def _absorb_bank_quality(self) -> None:
        """Carry the training bank's usefulness EMAs back to the entries (before a rebuild or an eval bank)."""
        if self.bank is not None:
            with self.bank.index.read_locked() as cols:
                self.entries.absorb(self.bank.examples, cols["quality"].copy())

    # -------------------------------------------------------------- warm-up

    def warm_up(self) -> list[dict[str, float]]:
        """Contrastive warm-up of the retriever on frozen h of every training prefix (ra_warmup)."""
        ra, s = self.ra, self.split
        h, _ = self.encode(s.train_users, s.train_positions, recenter=True)
        for p in self.model.retriever.parameters():
            p.requires_grad_(True)
        return warm_up_retriever(self.model.retriever, h, self.train_targets, epochs=ra.retriever_warmup_epochs,
                                 tau=ra.retriever_warmup_tau, lr=ra.retriever_warmup_lr or ra.lr,
                                 batch_size=max(self.cfg.train.batch_size, 2), rng=self.rng)

    # -------------------------------------------------------------- one epoch

    def _set_phase(self, epoch0: int) -> None:
        i = phase_index(self.phases, epoch0)
        if i != self.phase:  # a new phase: new trainable set, fresh optimizer over it
            groups = apply_unfreezing(self.model, self.phases, epoch0, self.ra.lr)
            if self.ra.fusion_lr is not None:  # its own group and rate, whatever the phase lists
                groups = own_group(groups, self.model.fusion, "fusion", self.ra.fusion_lr)
            self.optimizer = torch.optim.Adam(groups, weight_decay=self.cfg.train.weight_decay)
            self.phase = i

    def train_epoch(self, epoch0: int) -> dict[str, float]:
        cfg, ra = self.cfg, self.ra
        assert self.bank is not None
        # warm-ups count the epoch being trained: the first RA epoch already uses retrieval
        enhanced_weight = linear_warmup(epoch0 + 1, ra.enhanced_weight, ra.alpha_warmup_epochs)
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
                       desc=f"ra epoch {epoch0}", leave=False, dynamic_ncols=True,
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
            use_log = usefulness_log_probs(teacher, ret.mask, ra.usefulness_temperature)
            gate_quality = None
            if ra.loss_gate_threshold is not None:
                by = ret.sim if ra.loss_gate_by == "similarity" else nb.quality
                gate_quality = retrieval_quality(ret.weights.detach().float(), by.detach().float(), ret.mask)
            losses = ra_loss(out.scores_h.float(), out.scores_fused.float(), targets,
                             retrieval_log=ret.log_weights.float(), usefulness_log=use_log, mask=ret.mask,
                             enhanced_weight=enhanced_weight, kl_weight=ra.kl_weight, direction=ra.kl_direction,
                             quality=gate_quality, quality_threshold=ra.loss_gate_threshold)
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
            diag["retrieval_temperature"] = float(ret.temperature.mean())
            if gate_quality is not None:
                diag["loss_gated"] = float((gate_quality < ra.loss_gate_threshold).float().mean())
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
        self._absorb_bank_quality()
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

    @torch.no_grad()
    def diagnose(self, split: str, bank: Bank) -> dict[str, float]:
        """Fusion and neighbour statistics over the split's users (one query each), eval mode:
        alpha/gate mean and std ACROSS users, ‖h‖/‖r‖, cos(h, fused), neighbour similarity,
        fraction of neighbours whose target is the user's true next item, fraction masked."""
        self.model.eval()
        _, _, prefixes, targets = self.eval_sets[split]
        alphas, means = [], RunningMean()
        for start in range(0, len(prefixes), self.cfg.eval.batch_size):
            seq = torch.from_numpy(prefixes[start : start + self.cfg.eval.batch_size]).to(self.device)
            with autocast(self.device, self.cfg.train.precision):
                h = self.model.encoder(seq)
                nb, res = search_neighbours(self.model, bank, h, self.ra.k)
                out = self.model.fuse(h, nb)
            alphas.append(out.fusion.alpha.float().mean(dim=1).cpu())
            stats = {k: v.item() for k, v in out.fusion.stats.items() if k not in ("alpha_mean", "alpha_std")}
            stats.update(neighbour_stats(res, targets[start : start + len(seq)], out.retrieved.mask.cpu().numpy()))
            means.add(stats, len(seq))
        per_user = torch.cat(alphas)
        return {"alpha_mean": float(per_user.mean()), "alpha_std": float(per_user.std(unbiased=False)),
                **means.result()}

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

    def _rebuild_bank(self, epoch0: int) -> int:
        """Evict entries under the usefulness floor, then re-encode the bank's keys with the
        current encoder and retriever, for RA epoch ``epoch0``. Returns how many were evicted."""
        evicted = 0
        if self.ra.evict_below is not None and self.bank is not None:
            evicted = self.entries.evict(self.ra.evict_below, keep_at_least=self.ra.k)
            if evicted:
                log.info("before ra epoch %d: evicted %d bank entries under usefulness %.3g (%d so far)", epoch0,
                         evicted, self.ra.evict_below, self.entries.evicted)
        self.bank = self.train_bank()
        self.bank_fresh = True
        return evicted

    def train(self) -> dict[str, Any]:
        began = time.perf_counter()
        deadline = began + self.cfg.train.max_minutes * 60 if self.cfg.train.max_minutes else math.inf
        epoch0 = self.start_epoch - 1
        self.bank_fresh = False  # the bank's keys were encoded with the current weights
        if self.start_epoch == 0 and self.ra.retriever_warmup_epochs > 0:
            self.warmup_history = distributed.run_on_main(self.warm_up)  # once; then rank 0's retriever and rng
            distributed.sync_from_main(self.model.retriever, self.rng)
        for epoch0 in range(self.start_epoch, self.ra.epochs):
            if self.stopped:
                break
            t0 = time.perf_counter()
            sched = self.schedule(epoch0)
            self.model.set_schedule(**sched)
            self._set_phase(epoch0)
            rebuilt = self.bank is None or self.rebuild.should_rebuild(epoch0)
            evicted, rebuild_seconds = 0, 0.0
            if rebuilt and not self.bank_fresh:  # keys re-encoded by the current encoder and retriever
                evicted = self._rebuild_bank(epoch0)
                rebuild_seconds = time.perf_counter() - t0
            stats = self.train_epoch(epoch0)
            self.bank_fresh = False
            self.train_seconds += stats["seconds"]
            t1 = time.perf_counter()
            if epoch0 + 1 < self.ra.epochs and self.rebuild.should_rebuild(epoch0 + 1):
                # the next epoch's bank, encoded now, is also this epoch's validation bank: same
                # entries, same weights; one encoding instead of two
                evicted += self._rebuild_bank(epoch0 + 1)
                rebuild_seconds += time.perf_counter() - t1
                t1 = time.perf_counter()
                valid_bank = self.bank
                check_bank(valid_bank.users, valid_bank.positions, *self.eval_sets["valid"][:2], "valid")
            elif self.world.is_main:
                valid_bank = self.eval_bank("valid")
            if not self.world.is_main:  # rank 0 evaluates, writes and decides to stop; the others follow
                self.stopped = distributed.broadcast_object(None)
                continue
            with_r, without_r = self.dual_evaluate("valid", valid_bank)
            diagnostics = self.diagnose("valid", valid_bank)
            eval_seconds = time.perf_counter() - t1
            score = with_r.metrics["NDCG@10"]
            if score > self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch0, 0
                self._save_model(epoch0)
            else:
                self.bad_epochs += 1
            quality = self.entries.quality[self.entries.ids]
            record = {
                "epoch": epoch0,
                "schedule": {**sched, "phase": self.phase, "rebuilt": rebuilt,
                             "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}},
                "train": stats,
                "valid": {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics},
                "valid_diagnostics": diagnostics,
                "bank": {"evicted": evicted, "size": len(quality), "evicted_total": self.entries.evicted,
                         "quality_mean": float(quality.mean()), "quality_std": float(quality.std()),
                         "quality_min": float(quality.min())},
                "fusion_params": parameter_drift(self.model.fusion, self.fusion_init),
                "retrieval_params": parameter_drift(self.model.retrieval, self.retrieval_init),
                "retriever_params": parameter_drift(self.model.retriever, self.retriever_init),
                "seconds": {"rebuild": rebuild_seconds, "train": stats["seconds"], "eval": eval_seconds,
                            "epoch": time.perf_counter() - t0},
                "wall_seconds": time.perf_counter() - began,
            }
            if epoch0 == 0 and self.warmup_history:
                record["retriever_warmup"] = self.warmup_history
            append_jsonl(self.out / "metrics.jsonl", record)
            self.scalars.write(record, step=epoch0)
            log.info("ra epoch %d  loss %.4f  alpha %.3f  valid NDCG@10 %.4f with / %.4f without retrieval  "
                     "(%.0f s)", epoch0, stats["loss"], stats.get("alpha_mean", float("nan")), score,
                     without_r.metrics["NDCG@10"], record["seconds"]["epoch"])
            if self.bad_epochs >= self.ra.patience:
                log.info("early stop: no better validation NDCG@10 for %d epochs", self.bad_epochs)
                self.stopped = True
            elif time.perf_counter() > deadline:
                log.info("stopping: train.max_minutes=%s reached", self.cfg.train.max_minutes)
                self.stopped = True
            distributed.broadcast_object(self.stopped)  # rank 0's side of the broadcast the others wait in
            self.save_checkpoint(epoch0)
        return distributed.run_on_main(lambda: self.finish(epochs_run=epoch0 + 1))

    def finish(self, epochs_run: int) -> dict[str, Any]:
        """Reload the best epoch, evaluate valid and test both ways, write ``metrics.json`` and
        ``ranks.npz``."""
        blob = torch.load(self.out / "ra.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(blob["model"], strict=True)
        self.model.set_schedule(**blob["schedule"])
        self.entries = BankEntries.from_state(blob["entries"]) if "entries" in blob else self.entries
        result: dict[str, Any] = {}
        ranks: dict[str, np.ndarray] = {}
        banks = self.eval_banks()
        for split in ("valid", "test"):
            with_r, without_r = self.dual_evaluate(split, banks[split])
            result[split] = {"with_retrieval": with_r.metrics, "without_retrieval": without_r.metrics}
            ranks[f"{split}_with_retrieval"], ranks[f"{split}_without_retrieval"] = with_r.ranks, without_r.ranks
        # per-user NDCG@10 with minus without retrieval, on the test split just evaluated
        result["test"]["delta_ndcg10_bootstrap"] = paired_bootstrap(
            with_r.per_example(10), without_r.per_example(10), seed=self.cfg.train.seed)
        result.update(best_epoch=self.best_epoch, epochs_run=epochs_run, train_seconds=self.train_seconds,
                      pretrained=str(self.ra.pretrained), pretrained_checksum=self.pretrained.get("checksum"),
                      model_checksum=blob["checksum"], evicted_total=self.entries.evicted,
                      retriever_warmup=self.warmup_history)
        buf = io.BytesIO()
        np.savez(buf, users=self.split.test_users, **ranks)
        atomic_write(self.out / "ranks.npz", lambda fh: fh.write(buf.getbuffer()))
        atomic_write_json(self.out / "metrics.json", result)
        return result

    # -------------------------------------------------------------- checkpoints

    def _save_model(self, epoch0: int) -> None:
        """``model.pt`` (the encoder, DuoRec format) and ``ra.pt`` (the whole RA model) of the best epoch."""
        encoder = self.model.encoder
        checksum = save_model_file(encoder, self.out / "model.pt", epoch=epoch0)
        atomic_torch_save({
            "format": RA_FORMAT, "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": encoder.cfg.to_dict(), "ra_config": self.ra.model_dump(), "epoch": epoch0,
            "schedule": {"temperature": self.model.temperature, "alpha_max": float(self.model.fusion.alpha_max)},
            "checksum": checksum, "entries": self.entries.state(),
        }, self.out / "ra.pt")

    def save_checkpoint(self, epoch0: int) -> None:
        """``last.pt``: everything the next epoch needs. The bank's keys are kept only when the
        next epoch will not rebuild them (so a resumed run searches the same stale keys)."""
        done = epoch0 + 1 >= self.ra.epochs or self.bad_epochs >= self.ra.patience
        keep_bank = not done and not self.rebuild.should_rebuild(epoch0 + 1) and self.bank is not None
        bank = None
        if keep_bank:
            assert self.bank is not None
            bank = {"keys": self.bank.keys.detach().cpu(), "examples": torch.from_numpy(self.bank.examples),
                    "values": None if self.bank.values is None else self.bank.values.detach().cpu()}
        blob = {
            "format": RA_CHECKPOINT_FORMAT, "epoch": epoch0, "stopped": self.stopped,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "phase": self.phase,
            "model_config": self.model.encoder.cfg.to_dict(), "ra_config": self.ra.model_dump(),
            "best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds, "entries": self.entries.state(), "bank": bank,
            "warmup": self.warmup_history, "fusion_init": self.fusion_init, "retrieval_init": self.retrieval_init,
            "retriever_init": self.retriever_init,
            "torch_rng": torch.get_rng_state(), "numpy_rng": self.rng.bit_generator.state,
        }
        atomic_torch_save(blob, self.out / "last.pt")

    def _load_checkpoint(self, path: Path) -> None:
        blob = torch.load(path, map_location=self.device, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != RA_CHECKPOINT_FORMAT:
            raise RunError(f"{path} is not a checkpoint of the retrieval-augmented stage")
        if not self.model.encoder.cfg.matches(blob["model_config"]):
            raise RunError(f"{path} was trained with a different model shape or vocabulary; "
                           "resume with the same config and data")
        changed = sorted(k for k, v in self.ra.model_dump().items()
                         if k not in RESUMABLE_CHANGES and blob["ra_config"].get(k) != v)
        if changed:
            raise RunError(f"{path} was trained with other ra settings ({', '.join(changed)}); resume with the "
                           f"same config (only {sorted(RESUMABLE_CHANGES)} may change)")
        self.model.load_state_dict(blob["model"], strict=True)
        epoch0 = int(blob["epoch"])
        self._set_phase(epoch0)  # the optimizer over the same groups, then its state
        self.optimizer.load_state_dict(blob["optimizer"])
        self.start_epoch = epoch0 + 1
        self.best_score, self.best_epoch = float(blob["best_score"]), int(blob["best_epoch"])
        self.bad_epochs, self.train_seconds = int(blob["bad_epochs"]), float(blob["train_seconds"])
        # a run stopped by the time limit goes on; one out of epochs or patience (as now set) does not
        self.stopped = self.start_epoch >= self.ra.epochs or self.bad_epochs >= self.ra.patience
        self.entries = BankEntries.from_state(blob["entries"])
        self.warmup_history = list(blob["warmup"])
        self.fusion_init, self.retrieval_init = blob["fusion_init"], blob["retrieval_init"]
        self.retriever_init = blob["retriever_init"]
        if blob["bank"] is not None:  # the next epoch searches the keys of the last rebuild
            ex = blob["bank"]["examples"].numpy()
            s = self.split
            self.bank = self._bank_from(s.train_users[ex], s.train_positions[ex], blob["bank"]["keys"].to(self.device),
                                        None if blob["bank"]["values"] is None else blob["bank"]["values"].to(self.device),
                                        self.entries.quality[ex], ex)
        torch.set_rng_state(blob["torch_rng"])
        self.rng.bit_generator.state = blob["numpy_rng"]
        log.info("resumed %s after RA epoch %d", self.out, epoch0)

    def cleanup(self) -> None:
        self.bank = None
        self.scalars.close()


def run_ra_training(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                    progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune in this process, or, started by torchrun, as one rank of a data-parallel run."""
    with distributed.process_group(resolve_device(cfg.train.device)):
        trainer = RATrainer(cfg, out_dir, resume=resume, progress=progress)
        trainer.setup()
        try:
            return trainer.train()
        finally:
            trainer.cleanup()
