"""Per-epoch schedules of the retrieval-augmented stage: temperature annealing, linear
warm-ups, index-rebuild interval and progressive unfreezing with per-group learning rates.

Epochs count from 1 (``training/lifecycle.py``). Each function is pure in the epoch, so the trainer can log the value it
used and a resumed run gets the same value back.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def annealed_temperature(epoch: int, t0: float, decay: float, t_min: float) -> float:
    """max(t0 · decay^(epoch - 1), t_min): t0 at epoch 1."""
    if t0 <= 0 or t_min <= 0 or not 0 < decay <= 1:
        raise ValueError(f"need t0 > 0, t_min > 0, 0 < decay <= 1; got t0={t0}, t_min={t_min}, decay={decay}")
    return max(t0 * decay ** (epoch - 1), t_min)


def linear_warmup(epoch: int, target: float, warmup_epochs: int, start: float = 0.0) -> float:
    """start + (target - start) · min(1, epoch / warmup_epochs): target/n at epoch 1 (from start
    = 0), target from epoch warmup_epochs on. warmup_epochs = 0 gives target from epoch 1."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return target
    return start + (target - start) * min(1.0, epoch / warmup_epochs)


@dataclass(frozen=True)
class RebuildSchedule:
    """Rebuild the bank's keys at the start of an epoch: every ``early_every`` epochs during
    the first ``early_epochs`` (keys drift fastest while the query encoder is young), every
    ``late_every`` after them. Epoch 1 always builds. (``ra.rebuild_*`` hold the values.)"""

    early_every: int  # rebuild interval during the first early_epochs epochs
    early_epochs: int  # how many epochs the early regime lasts
    late_every: int  # rebuild interval after them

    def __post_init__(self) -> None:
        if self.early_every < 1 or self.late_every < 1 or self.early_epochs < 0:
            raise ValueError(f"rebuild intervals must be >= 1 and early_epochs >= 0, got {self}")

    def should_rebuild(self, epoch: int) -> bool:
        done = epoch - 1  # epochs before this one
        if done < self.early_epochs:
            return done % self.early_every == 0
        return (done - self.early_epochs) % self.late_every == 0


# ---------------------------------------------------------------- progressive unfreezing


@dataclass(frozen=True)
class Phase:
    until_epoch: int  # the phase covers the epochs up to this one (after the previous phase)
    train: tuple[str, ...]  # dotted names of submodules that train; "" is the whole model
    lr_mult: float = 1.0  # multiplies each group's learning rate

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phase:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown phase key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(
            until_epoch=int(d["until_epoch"]), train=tuple(d["train"]), lr_mult=float(d.get("lr_mult", 1.0))
        )


def parse_phases(phases: Iterable[Phase | dict[str, Any]]) -> list[Phase]:
    out = [p if isinstance(p, Phase) else Phase.from_dict(p) for p in phases]
    if not out:
        raise ValueError("progressive unfreezing needs at least one phase")
    ends = [p.until_epoch for p in out]
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise ValueError(f"phase until_epoch values must increase, got {ends}")
    return out


def validate_phases(model: nn.Module, phases: Sequence[Phase]) -> None:
    """Raise ValueError naming any module a phase lists that the model does not have.
    Run it before training, so a typo fails at setup rather than at epoch 20."""
    names = dict(model.named_modules())
    for i, phase in enumerate(phases):
        for name in phase.train:
            if name not in names:
                raise ValueError(f"phase {i} (until_epoch={phase.until_epoch}) names unknown module {name!r}")


def phase_index(phases: Sequence[Phase], epoch: int) -> int:
    """Index of the phase that covers epoch; past the last phase, the last one stays in force."""
    for i, phase in enumerate(phases):
        if epoch <= phase.until_epoch:
            return i
    return len(phases) - 1


def apply_unfreezing(
    model: nn.Module,
    phases: Sequence[Phase],
    epoch: int,
    base_lr: float,
    module_lr: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Set requires_grad for the epoch's phase and return optimizer param groups.

    One group per trained module name, {"name", "params", "lr"}; lr = module_lr.get(name,
    base_lr) · phase.lr_mult, so e.g. module_lr={"fusion": 1e-3} gives fusion its own rate.
    A parameter under two listed names (e.g. "encoder" and "encoder.blocks.1") goes to the
    more specific one. Everything not listed is frozen. Validates every phase first.
    """
    validate_phases(model, phases)
    module_lr = module_lr or {}
    unknown_lr = set(module_lr) - {n for p in phases for n in p.train}
    if unknown_lr:
        raise ValueError(f"module_lr names module(s) no phase trains: {sorted(unknown_lr)}")
    phase = phases[phase_index(phases, epoch)]
    modules = dict(model.named_modules())

    owner: dict[int, str] = {}  # id(param) -> most specific listed name
    for name in sorted(phase.train, key=len):  # longer (more specific) names overwrite
        for param in modules[name].parameters():
            owner[id(param)] = name

    groups: dict[str, list[nn.Parameter]] = {name: [] for name in phase.train}
    for param in model.parameters():
        name = owner.get(id(param))
        param.requires_grad_(name is not None)
        if name is not None:
            groups[name].append(param)

    out = [
        {"name": name, "params": params, "lr": module_lr.get(name, base_lr) * phase.lr_mult}
        for name, params in groups.items()
        if params
    ]
    n_train = sum(p.numel() for g in out for p in g["params"])
    logger.info(
        "epoch %d: phase until_epoch=%d trains %s (%d params)",
        epoch,
        phase.until_epoch,
        list(phase.train),
        n_train,
    )
    return out


def own_group(groups: list[dict[str, Any]], module: nn.Module, name: str, lr: float) -> list[dict[str, Any]]:
    """Move ``module``'s trainable parameters out of ``groups`` into a group of their own
    {"name": name, "params": ..., "lr": lr}; groups left empty are dropped. Frozen
    parameters stay out (a phase that does not train the module gets no such group)."""
    mine = {id(p) for p in module.parameters() if p.requires_grad}
    out, moved = [], []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in mine]
        moved += [p for p in group["params"] if id(p) in mine]
        if kept:
            out.append({**group, "params": kept})
    if moved:
        out.append({"name": name, "params": moved, "lr": lr})
    return out
