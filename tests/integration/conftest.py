"""Fixtures shared by the service tests: a tiny retrieval-augmented run on generated data."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config
from training.ra_trainer import run_ra_training
from training.synthetic import generate_interactions, write_inter
from training.trainer import run_training

RA_MAX_LEN = 10


@pytest.fixture(scope="session")
def ra_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DuoRec (2 epochs) then one RA epoch on 90 generated users: a run directory with ra.pt."""
    root = tmp_path_factory.mktemp("ra-api")
    data = root / "syn.inter"
    write_inter(generate_interactions(90, 50, mean_length=12, seed=11), data)
    base = [f"data.path={data}", f"data.max_seq_len={RA_MAX_LEN}", "model.dim=16", "model.inner=32",
            "model.n_layers=1", "loss.contrastive=none", "train.batch_size=128", "train.device=cpu", "train.seed=3",
            "train.lr=0.005"]
    run_training(load_config(None, [*base, "train.epochs=2"]), root / "duorec", progress=False)
    ra = root / "ra"
    run_ra_training(load_config(None, [*base, "ra.enabled=true", f"ra.pretrained={root / 'duorec'}", "ra.epochs=1",
                                       "ra.k=5", "ra.alpha_warmup_epochs=0"]), ra, progress=False)
    return ra
