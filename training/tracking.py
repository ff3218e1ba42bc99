"""Per-epoch metrics as TensorBoard scalars, beside ``metrics.jsonl``.

The trainers write the same record to both: nested keys become tag paths
(``{"valid": {"NDCG@10": x}}`` -> ``valid/NDCG@10``); non-numeric values are skipped.
TensorBoard is optional (``pip install 'ragrec[tensorboard]'``): without it, or with
``train.tensorboard: false``, the writer does nothing.

    tensorboard --logdir runs/NAME/tb
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in a nested record; bools count as 0/1, NaN is kept."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, prefix=f"{tag}/")
        elif isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isinf(value)):
            yield tag, float(value)


class ScalarLog:
    """A SummaryWriter on ``log_dir`` when enabled and installed; otherwise every call is a no-op."""

    def __init__(self, log_dir: str | Path, *, enabled: bool) -> None:
        self.log_dir = Path(log_dir)
        self.writer = None
        if not enabled:
            return
        if not tensorboard_available():
            log.info("tensorboard is not installed: no scalars in %s (pip install 'ragrec[tensorboard]')",
                     self.log_dir)
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        log.info("tensorboard scalars in %s", self.log_dir)

    def write(self, record: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in flatten_scalars(record):
            if tag == "epoch":  # it is the step already
                continue
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # an epoch is minutes apart: make it visible to a running TensorBoard now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
