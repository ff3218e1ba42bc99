"""A run directory's shared pieces: reading its data, building and loading its model,
and recomputing its metrics. Used by the trainer, ``ragrec evaluate`` and the service.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import RunConfig
from training.data import SequenceData, Split, Vocabulary, leave_one_out, load_dataset, pad_prefixes
from training.evaluate import evaluate_scorer
from training.io import atomic_write
from training.model import ModelConfig, SequenceEncoder, model_checksum

MODEL_FORMAT = "ragrec.model.v1"


class RunError(ValueError):
    """A run that cannot start or continue; the message says what to do."""


# ------------------------------------------------------------------ data helpers


def load_run_data(cfg: RunConfig, *, item_vocab: Vocabulary | None = None, fetch: bool = True) -> SequenceData:
    """Read the dataset named by the config; for ``source: ml-100k`` fetch it first if missing.

    With ``item_vocab`` (a run's saved ``items.json``) item ids are those the model was trained on.
    """
    path = Path(cfg.data.path)
    if fetch and cfg.data.source == "ml-100k" and not path.exists():
        from training.movielens import fetch_ml100k

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


def gather_items(data: SequenceData, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """data.sequences[u][t] for each pair, vectorised: (N,) int64."""
    return data.flat[data.offsets[users] + positions].astype(np.int64)


def item_popularity(data: SequenceData, split: Split) -> np.ndarray:
    """Training interaction counts per item id (index 0 = padding, always 0): (n_items + 1,)."""
    counts = np.bincount(gather_items(data, split.train_users, split.train_positions),
                         minlength=data.n_items + 1)
    first_users = np.unique(split.train_users)
    counts += np.bincount(gather_items(data, first_users, np.zeros_like(first_users)),
                          minlength=data.n_items + 1)
    counts[0] = 0
    return counts


def build_model(cfg: RunConfig, n_items: int) -> SequenceEncoder:
    return SequenceEncoder(ModelConfig(n_items=n_items, max_len=cfg.data.max_seq_len, **cfg.model.model_dump()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_model_file(model: SequenceEncoder, path: str | Path, **meta: Any) -> str:
    """Write ``model.pt`` (CPU tensors, JSON-able meta) atomically; return the weights' checksum."""
    checksum = model_checksum(model)
    atomic_torch_save({
        "format": MODEL_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "checksum": checksum,
        **meta,
    }, Path(path))
    return checksum


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SequenceEncoder, dict]:
    """Load ``model.pt`` (weights-only unpickling) and rebuild the encoder it describes."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"model file not found: {path}") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise RunError(f"{path} is not a ragrec model file (format {blob.get('format') if isinstance(blob, dict) else '?'})")
    model = SequenceEncoder(ModelConfig(**blob["model_config"]))
    model.load_state_dict(blob["model"], strict=True)
    return model, blob


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))


def evaluate_run(run_dir: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Recompute valid/test metrics of a finished run from its saved files."""
    from training.config import load_config

    run = Path(run_dir)
    for name in ("config.yaml", "model.pt", "items.json"):
        if not (run / name).is_file():
            raise RunError(f"{run} is not a finished run: {name} is missing")
    cfg = load_config(run / "config.yaml")
    data = load_run_data(cfg, item_vocab=Vocabulary.load(run / "items.json"))
    split = leave_one_out(data)
    model, _ = load_model_file(run / "model.pt", map_location=device)
    model.eval()
    pop = item_popularity(data, split)
    L = cfg.data.max_seq_len
    out: dict[str, Any] = {}
    for name, u, p in (("valid", split.valid_users, split.valid_positions),
                       ("test", split.test_users, split.test_positions)):
        prefixes, _ = pad_prefixes(data, u, p, L)

        def score(seq: torch.Tensor) -> torch.Tensor:
            with autocast(torch.device(device), cfg.train.precision):
                return model.scores(model(seq))

        out[name] = evaluate_scorer(score, prefixes, gather_items(data, u, p), ks=cfg.eval.ks,
                                    item_popularity=pop, mask_seen=cfg.eval.mask_seen,
                                    batch_size=cfg.eval.batch_size, device=device).metrics
    return out
