"""Fixtures shared by the service tests: a tiny base run on generated data and retrieval runs on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import RA_MAX_LEN
from training.config import load_config
from training.data.synthetic import generate_interactions, write_inter
from training.ra.config import load_retrieval_config
from training.ra.runner import run_retrieval_stage
from training.trainer import run_training


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DuoRec (2 epochs) on 90 generated users."""
    root = tmp_path_factory.mktemp("ra-api")
    data = root / "syn.inter"
    write_inter(generate_interactions(90, 50, mean_length=12, seed=11), data)
    base = [f"data.path={data}", f"data.max_seq_len={RA_MAX_LEN}", "model.dim=16", "model.inner=32",
            "model.n_layers=1", "loss.contrastive=none", "train.batch_size=128", "train.device=cpu", "train.seed=3",
            "train.lr=0.005", "train.epochs=2"]
    run_training(load_config(None, base), root / "duorec", progress=False)
    return root / "duorec"


def retrieval_run(base: Path, out: Path, **section) -> Path:
    raw = {"retrieval": {"base": str(base), "k_search": 5, "k_train": 5, **section}}
    run_retrieval_stage(load_retrieval_config(raw=raw), out)
    return out


@pytest.fixture(scope="session")
def ra_run(base_run: Path) -> Path:
    """The neighbour vote (5 neighbours, next 2 items, a user's own entries excluded): a run
    directory with retrieval.pt."""
    return retrieval_run(base_run, base_run.parent / "ra", design="vote", own_user="exclude",
                         vote={"k": 5, "m": 2, "tau": 0.1, "lam": 0.5})


@pytest.fixture(scope="session")
def ra_head_run(base_run: Path) -> Path:
    """The learned head with the copy distribution, 2 epochs, a user's own earlier entries kept."""
    return retrieval_run(base_run, base_run.parent / "ra-head", design="head", own_user="keep",
                         head={"k": 5, "epochs": 2, "copy_items": True, "n_layers": 1})
