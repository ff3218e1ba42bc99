"""Shared by the RA-stage tests: a tiny DuoRec run on generated data and configs around it."""

from __future__ import annotations

from pathlib import Path

from training.config import RunConfig, load_config
from training.data.synthetic import generate_interactions, write_inter
from training.ra.finetune.trainer import RATrainer
from training.trainer import run_training


def base_overrides(path: Path, *extra: str) -> list[str]:
    return [f"data.path={path}", "data.max_seq_len=10", "model.dim=16", "model.inner=32", "model.dropout=0.1",
            "model.attn_dropout=0.1", "train.batch_size=64", "train.seed=7", "loss.contrastive=none",
            "train.lr=0.005", *extra]


def make_pretrained(root: Path, *, users: int, items: int, seed: int) -> tuple[Path, Path]:
    """(data path, DuoRec run dir): 3 epochs on generated data written under root."""
    path = root / "syn.inter"
    write_inter(generate_interactions(users, items, mean_length=14, seed=seed), path)
    run = root / "duorec"
    run_training(load_config(None, base_overrides(path, "train.epochs=3")), run, progress=False)
    return path, run


def ra_cfg(pretrained: tuple[Path, Path], *extra: str) -> RunConfig:
    path, run = pretrained
    return load_config(None, base_overrides(path, "ra.enabled=true", f"ra.pretrained={run}", "ra.epochs=2",
                                            "ra.k=5", *extra))


def ready_trainer(pretrained: tuple[Path, Path], out: Path, *extra: str) -> RATrainer:
    trainer = RATrainer(ra_cfg(pretrained, *extra), out, progress=False)
    trainer.setup()
    return trainer
