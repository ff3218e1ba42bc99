"""The fine-tuning stage's own files: ``ra.pt`` (the whole RA model at its best epoch) and
``last.pt`` (everything the next epoch needs, for ``--resume``). Its ``model.pt`` (the best
encoder) is the common format of ``training/checkpoints.py``, so ``ragrec evaluate`` and the
service read it like any run's.

A resumed run continues bit for bit on CPU: ``last.pt`` carries the bank's keys between
rebuilds, every entry's usefulness and both random generators.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.checkpoints import RunError, atomic_torch_save, save_model_file
from training.ra.finetune.entries import BankEntries

if TYPE_CHECKING:
    from training.ra.finetune.trainer import RATrainer

log = logging.getLogger(__name__)

RA_FORMAT = "ragrec.ra_model.v1"
RA_CHECKPOINT_FORMAT = "ragrec.ra_checkpoint.v1"
# ra settings a resumed run may change: they decide when it stops, not what an epoch does
RESUMABLE_CHANGES = {"epochs", "patience"}


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_best(t: RATrainer, epoch: int) -> None:
    """``model.pt`` (the encoder) and ``ra.pt`` (the whole RA model) of the best epoch."""
    checksum = save_model_file(t.model.encoder, t.out / "model.pt", epoch=epoch)
    atomic_torch_save({
        "format": RA_FORMAT, "model": _cpu_state(t.model), "model_config": t.model.encoder.cfg.to_dict(),
        "ra_config": t.ra.model_dump(), "epoch": epoch,
        "schedule": {"temperature": t.model.temperature, "alpha_max": float(t.model.fusion.alpha_max)},
        "checksum": checksum, "entries": t.entries.state(),
    }, t.out / "ra.pt")


def load_best(path: Path, device: torch.device) -> dict[str, Any]:
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != RA_FORMAT:
        raise RunError(f"{path} is not a model file of the fine-tuning stage")
    return blob


def save_last(t: RATrainer, epoch: int) -> None:
    """``last.pt`` after ``epoch``. The bank's keys are kept only when the next epoch will not
    rebuild them (so a resumed run searches the same stale keys)."""
    done = epoch >= t.ra.epochs or t.bad_epochs >= t.ra.patience
    bank = None
    if not done and not t.rebuild.should_rebuild(epoch + 1) and t.bank is not None:
        bank = {"keys": t.bank.keys.detach().cpu(), "examples": torch.from_numpy(t.bank.examples),
                "values": None if t.bank.values is None else t.bank.values.detach().cpu()}
    atomic_torch_save({
        "format": RA_CHECKPOINT_FORMAT, "epoch": epoch, "stopped": t.stopped,
        "model": _cpu_state(t.model), "optimizer": t.optimizer.state_dict(), "phase": t.phase,
        "model_config": t.model.encoder.cfg.to_dict(), "ra_config": t.ra.model_dump(),
        "best_score": t.best_score, "best_epoch": t.best_epoch, "bad_epochs": t.bad_epochs,
        "train_seconds": t.train_seconds, "entries": t.entries.state(), "bank": bank,
        "warmup": t.warmup_history, "initial": t.initial,
        "torch_rng": torch.get_rng_state(), "numpy_rng": t.rng.bit_generator.state,
    }, t.out / "last.pt")


def load_last(path: Path, t: RATrainer) -> dict[str, Any]:
    """Read ``last.pt`` and refuse one of another model shape or other ``ra`` settings
    (except ``RESUMABLE_CHANGES``)."""
    blob = torch.load(path, map_location=t.device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != RA_CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a checkpoint of the retrieval-augmented stage")
    if not t.model.encoder.cfg.matches(blob["model_config"]):
        raise RunError(f"{path} was trained with a different model shape or vocabulary; "
                       "resume with the same config and data")
    changed = sorted(k for k, v in t.ra.model_dump().items()
                     if k not in RESUMABLE_CHANGES and blob["ra_config"].get(k) != v)
    if changed:
        raise RunError(f"{path} was trained with other ra settings ({', '.join(changed)}); resume with the "
                       f"same config (only {sorted(RESUMABLE_CHANGES)} may change)")
    return blob


def restore_last(t: RATrainer, path: Path) -> None:
    """Bring a set-up trainer to the state ``last.pt`` holds (model, optimizer, bank, RNGs)."""
    blob = load_last(path, t)
    t.model.load_state_dict(blob["model"], strict=True)
    epoch = int(blob["epoch"])
    t.set_phase(epoch)  # the optimizer over the same groups, then its state
    t.optimizer.load_state_dict(blob["optimizer"])
    t.epochs_done = epoch
    t.best_score, t.best_epoch = float(blob["best_score"]), int(blob["best_epoch"])
    t.bad_epochs, t.train_seconds = int(blob["bad_epochs"]), float(blob["train_seconds"])
    # a run stopped by the time limit goes on; one out of epochs or patience (as now set) does not
    t.stopped = epoch >= t.ra.epochs or t.bad_epochs >= t.ra.patience
    t.entries = BankEntries.from_state(blob["entries"])
    t.warmup_history = list(blob["warmup"])
    t.initial = blob["initial"]
    if blob["bank"] is not None:  # the next epoch searches the keys of the last rebuild
        ex = blob["bank"]["examples"].numpy()
        s = t.split
        values = blob["bank"]["values"]
        t.bank = t.banks.from_keys(s.train_users[ex], s.train_positions[ex], blob["bank"]["keys"].to(t.device),
                                   None if values is None else values.to(t.device), t.entries.usefulness[ex], ex)
    torch.set_rng_state(blob["torch_rng"])
    t.rng.bit_generator.state = blob["numpy_rng"]
    log.info("resumed %s after RA epoch %d", t.out, epoch)
