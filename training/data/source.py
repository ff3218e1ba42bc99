"""The dataset a run config names, read (and for ``source: ml-100k`` fetched) once for every stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.data.movielens import fetch_ml100k
from training.data.sequences import SequenceData, Vocabulary, load_dataset

if TYPE_CHECKING:
    from training.config import RunConfig


def load_run_data(cfg: RunConfig, *, item_vocab: Vocabulary | None = None, fetch: bool = True) -> SequenceData:
    """Read the dataset named by the config; for ``source: ml-100k`` fetch it first if missing.

    With ``item_vocab`` (a run's saved ``items.json``) item ids are those the model was trained on.
    """
    path = Path(cfg.data.path)
    if fetch and cfg.data.source == "ml-100k" and not path.exists():
        path = fetch_ml100k(path.parent)
    return load_dataset(
        path,
        user_col=cfg.data.user_col,
        item_col=cfg.data.item_col,
        time_col=cfg.data.time_col,
        fmt=cfg.data.format,
        k_core=cfg.data.k_core,
        item_vocab=item_vocab,
    )
