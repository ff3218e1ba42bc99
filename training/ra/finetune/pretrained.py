"""The pretrained DuoRec run a fine-tuning run starts from, and the config it implies.

A fine-tuning run takes its ``data`` and ``model`` sections from ``ra.pretrained``'s
``config.yaml`` and its item ids from that run's ``items.json``, so the encoder and the data
fit by construction. Keys this stage would ignore are errors that name them
(``stage_config``): a ``data.*`` or ``model.*`` value other than the pretrained run's, a
``loss.*`` value other than the default (the stage has its own losses, ``losses.py``) and
the ``train`` keys that its ``ra`` section replaces (``IGNORED_TRAIN``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoints import load_model_file, require_finished_run
from training.config import ConfigError, RunConfig, load_config
from training.data.sequences import Vocabulary
from training.model import SequenceEncoder

# train keys with a counterpart in the ra section (ra.epochs, ra.lr, ra.patience) or no use
# in this stage (its optimizer is Adam over per-phase groups; no weight average, no lr plateau)
IGNORED_TRAIN = ("epochs", "lr", "patience", "optimizer", "ema", "lr_patience", "lr_decay", "shuffle_targets")


@dataclass
class PretrainedRun:
    run_dir: Path
    config: RunConfig
    vocab: Vocabulary
    encoder: SequenceEncoder
    blob: dict[str, Any]  # the model.pt dict (checksum, epoch, ...)


def pretrained_dir(path: str | Path) -> Path:
    """``ra.pretrained`` (a run directory or its model.pt) as a finished run's directory."""
    p = Path(path)
    return require_finished_run(p.parent if p.suffix == ".pt" else p, what="ra.pretrained")


def stage_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the pretrained run's data and model sections; ConfigError naming every key
    the stage would ignore."""
    if not cfg.ra.enabled or not cfg.ra.pretrained:
        raise ConfigError("the fine-tuning stage needs ra.enabled=true and ra.pretrained")
    run = pretrained_dir(cfg.ra.pretrained)
    base, default = load_config(run / "config.yaml"), RunConfig()
    ignored = []
    for section, ref in (("data", base.data), ("model", base.model), ("loss", default.loss)):
        mine = getattr(cfg, section)
        ignored += [f"{section}.{k}" for k in sorted(mine.model_fields_set) if getattr(mine, k) != getattr(ref, k)]
    ignored += [f"train.{k}" for k in IGNORED_TRAIN
                if k in cfg.train.model_fields_set and getattr(cfg.train, k) != getattr(default.train, k)]
    if ignored:
        raise ConfigError(f"the fine-tuning stage takes data and model from ra.pretrained ({run}), has its own "
                          f"losses and sets its loop with ra.epochs, ra.lr, ra.patience; it would ignore "
                          f"{', '.join(ignored)}: remove them")
    return cfg.model_copy(update={"data": base.data, "model": base.model})


def open_pretrained(cfg: RunConfig) -> PretrainedRun:
    """The pretrained run of a ``stage_config``: its encoder (CPU), vocabulary and model.pt."""
    run = pretrained_dir(cfg.ra.pretrained)  # type: ignore[arg-type]
    encoder, blob = load_model_file(run / "model.pt")
    return PretrainedRun(run, load_config(run / "config.yaml"), Vocabulary.load(run / "items.json"), encoder, blob)
