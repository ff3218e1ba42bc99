"""The files of a run directory: the ``model.pt`` format and the "is this run finished" rule.

Every stage and the service read a finished run through here:
- ``model.pt``: the encoder's weights (CPU tensors), its ``ModelConfig`` and a checksum, in
  format ``ragrec.model.v1``; ``torch.load(weights_only=True)`` reads it.
- a run is finished when it holds ``config.yaml``, ``model.pt``, ``items.json`` and
  ``metrics.json`` (``FINISHED_RUN_FILES``): a trainer writes ``model.pt`` at its first best
  epoch and ``metrics.json`` last, once the run is done.

Each trainer's own resume checkpoint (``last.pt``) lives with its trainer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from training.atomic import atomic_write
from training.model import ModelConfig, SequenceEncoder, model_checksum

MODEL_FORMAT = "ragrec.model.v1"
FINISHED_RUN_FILES = ("config.yaml", "model.pt", "items.json", "metrics.json")


class RunError(ValueError):
    """A run that cannot start or continue; the message says what to do."""


def is_finished_run(run_dir: str | Path) -> bool:
    return all((Path(run_dir) / name).is_file() for name in FINISHED_RUN_FILES)


def require_finished_run(run_dir: str | Path, *, what: str = "") -> Path:
    """``run_dir`` as a Path if it holds a finished run; RunError naming the missing file otherwise.

    what: the setting that named the run (``ra.pretrained``), for the message.
    """
    run = Path(run_dir)
    for name in FINISHED_RUN_FILES:
        if not (run / name).is_file():
            where = f"{what}: " if what else ""
            raise RunError(f"{where}{run} is not a finished run: {name} is missing (train it with `ragrec train`)")
    return run


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))


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


def read_model_blob(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict inside a ``model.pt`` (weights-only unpickling); RunError if it is not one."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"model file not found: {path}") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise RunError(f"{path} is not a ragrec model file (format {blob.get('format') if isinstance(blob, dict) else '?'})")
    return blob


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SequenceEncoder, dict]:
    """Load ``model.pt`` and rebuild the encoder it describes."""
    blob = read_model_blob(path, map_location)
    model = SequenceEncoder(ModelConfig(**blob["model_config"]))
    model.load_state_dict(blob["model"], strict=True)
    return model, blob
