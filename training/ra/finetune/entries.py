"""Bank hygiene of the fine-tuning stage: which training examples its bank holds, and their usefulness.

- ``BankEntries``: which training examples the bank holds (minimum prefix length, evictions)
  and each one's usefulness, carried across rebuilds.
- ``entry_usefulness``: the value a retrieved entry's usefulness EMA moves toward.

Shapes: M examples, B queries, K neighbours, D hidden size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class BankEntries:
    """Per training example: is it in the bank, and its usefulness (the bank's ``quality`` payload in ``MemoryBank``).

    Entries start at usefulness 1.0 (neutral: ``MemoryBank``'s default, and a fair share under
    ``entry_usefulness``). An evicted entry never returns. Positions below ``min_prefix``
    never enter: their prefix is too short to say much about the next item.
    """

    alive: np.ndarray  # (M,) bool
    usefulness: np.ndarray  # (M,) float32
    evicted: int = 0  # total so far

    @classmethod
    def for_examples(cls, positions: np.ndarray, min_prefix: int = 1) -> BankEntries:
        positions = np.asarray(positions)
        return cls(alive=positions >= min_prefix, usefulness=np.ones(len(positions), dtype=np.float32))

    @property
    def ids(self) -> np.ndarray:
        """(m,) int64 indices of the examples the bank holds now."""
        return np.flatnonzero(self.alive)

    def absorb(self, examples: np.ndarray, usefulness: np.ndarray) -> None:
        """Take the bank's current usefulness back: examples (n,) int64 (-1 = not a training
        example, skipped), usefulness (n,) float32 in the same order."""
        own = examples >= 0
        self.usefulness[examples[own]] = usefulness[own]

    def evict(self, floor: float, keep_at_least: int) -> int:
        """Drop live entries whose usefulness is below ``floor``, the worst first, leaving at
        least ``keep_at_least`` entries. Returns how many were dropped now."""
        alive = self.ids
        bad = alive[self.usefulness[alive] < floor]
        room = max(len(alive) - keep_at_least, 0)
        if len(bad) > room:
            log.warning("%d bank entries are under the usefulness floor %.3g; evicting only the worst %d "
                        "so that %d remain", len(bad), floor, room, keep_at_least)
            bad = bad[np.argsort(self.usefulness[bad], kind="stable")[:room]]
        self.alive[bad] = False
        self.evicted += len(bad)
        return len(bad)

    def state(self) -> dict[str, object]:
        return {"alive": torch.from_numpy(self.alive.copy()), "usefulness": torch.from_numpy(self.usefulness.copy()),
                "evicted": self.evicted}

    @classmethod
    def from_state(cls, state: dict) -> BankEntries:
        return cls(alive=state["alive"].numpy().astype(bool), usefulness=state["usefulness"].numpy().astype(np.float32),
                   evicted=int(state["evicted"]))


def entry_usefulness(usefulness_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) the value each used neighbour's usefulness EMA moves toward: n_used · p_use, the
    teacher's probability relative to a uniform share (1 = average, 0 = useless). Masked
    slots hold 0 and must not be written back."""
    n_used = mask.sum(dim=1, keepdim=True).to(usefulness_log.dtype)
    return (usefulness_log.exp() * n_used).masked_fill(~mask, 0.0)


def gate_score(weights: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) attention-weighted mean of per-neighbour values (similarity or entry usefulness) over
    the used neighbours; -inf for a query with none (the loss gate then drops it)."""
    q = (weights * values.masked_fill(~mask, 0.0)).sum(dim=1)
    return q.masked_fill(~mask.any(dim=1), float("-inf"))
