"""A tiny base run on generated data, shared by the retrieval-stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config
from training.data.synthetic import generate_interactions, write_inter
from training.trainer import run_training


@pytest.fixture(scope="package")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ra-stage")
    data = root / "syn.inter"
    write_inter(generate_interactions(120, 60, mean_length=14, seed=5), data)
    run_training(load_config(None, [f"data.path={data}", "data.max_seq_len=10", "model.dim=16", "model.inner=32",
                                    "model.n_layers=1", "loss.contrastive=none", "train.batch_size=128",
                                    "train.seed=2", "train.lr=0.005", "train.epochs=2", "train.threads=1"]),
                 root / "base", progress=False)
    return root / "base"
