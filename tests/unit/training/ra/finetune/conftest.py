"""Fixtures of the fine-tuning stage's tests: one tiny DuoRec run on generated data, and
configs and set-up trainers around it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from training.config import RunConfig, load_config
from training.data.synthetic import generate_interactions, write_inter
from training.ra.finetune.trainer import RATrainer
from training.trainer import run_training

BASE = ["data.max_seq_len=10", "model.dim=16", "model.inner=32", "model.dropout=0.1", "model.attn_dropout=0.1",
        "train.batch_size=64", "train.seed=7", "loss.contrastive=none", "train.lr=0.005"]


@pytest.fixture(scope="package")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(data path, DuoRec run dir): 3 epochs on 120 generated users, 60 items."""
    root = tmp_path_factory.mktemp("pretrained")
    path = root / "syn.inter"
    write_inter(generate_interactions(120, 60, mean_length=14, seed=3), path)
    run = root / "duorec"
    run_training(load_config(None, [f"data.path={path}", *BASE, "train.epochs=3"]), run, progress=False)
    return path, run


@pytest.fixture
def ra_config(pretrained) -> Callable[..., RunConfig]:
    """ra_config(*overrides): a fine-tuning config on ``pretrained`` (2 epochs, k=5)."""
    _, run = pretrained

    def make(*extra: str) -> RunConfig:
        return load_config(None, ["ra.enabled=true", f"ra.pretrained={run}", "ra.epochs=2", "ra.k=5",
                                  "train.batch_size=64", "train.seed=7", *extra])

    return make


@pytest.fixture
def ready_trainer(ra_config) -> Callable[..., RATrainer]:
    """ready_trainer(out, *overrides): an RATrainer after setup()."""

    def make(out: Path, *extra: str) -> RATrainer:
        trainer = RATrainer(ra_config(*extra), out, progress=False)
        trainer.setup()
        return trainer

    return make
