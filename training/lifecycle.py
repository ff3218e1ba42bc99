"""What both trainers (``training/trainer.py``, ``training/ra/finetune/trainer.py``) share
around their loops: the device, the output directory, the epoch numbering and the run wrapper.

Epochs are numbered from 1 in both trainers, in ``metrics.jsonl``, ``best_epoch`` and every
schedule setting (``ra.unfreeze[].until_epoch``, ``ra.rebuild_early_epochs``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch

from training import distributed
from training.checkpoints import RunError
from training.config import RunConfig, dump_config
from training.data.sequences import Vocabulary
from training.model import ModelConfig, SequenceEncoder

FIRST_EPOCH = 1


def epochs_after(done: int, last: int) -> range:
    """The epoch numbers still to train when ``done`` epochs are done and ``last`` is the final one."""
    return range(done + FIRST_EPOCH, last + FIRST_EPOCH)


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


def build_model(cfg: RunConfig, n_items: int) -> SequenceEncoder:
    """The encoder the config's ``model`` section describes, for ``n_items`` items."""
    return SequenceEncoder(ModelConfig(n_items=n_items, max_len=cfg.data.max_seq_len, **cfg.model.model_dump()))


def prepare_out_dir(out: Path, cfg: RunConfig, vocab: Vocabulary, *, resume: bool) -> None:
    """Create the run directory with ``config.yaml`` and ``items.json``. A fresh run needs an
    empty (or missing) folder; ``--resume`` needs the trainer's ``last.pt`` in it."""
    if resume:
        if not (out / "last.pt").is_file():
            raise RunError(f"--resume: no checkpoint at {out / 'last.pt'}")
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"run directory {out} is not empty; pass --resume to continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    vocab.save(out / "items.json")


class _Trainer(Protocol):
    def setup(self) -> None: ...
    def train(self) -> dict[str, Any]: ...
    def cleanup(self) -> None: ...


def run_trainer(make: type[_Trainer] | Any, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                progress: bool | None = None) -> dict[str, Any]:
    """setup -> train -> cleanup in this process, or, started by torchrun, as one rank of a
    data-parallel run (the process group lives for the whole run)."""
    with distributed.process_group(resolve_device(cfg.train.device)):
        trainer = make(cfg, out_dir, resume=resume, progress=progress)
        trainer.setup()
        try:
            return trainer.train()
        finally:
            trainer.cleanup()
