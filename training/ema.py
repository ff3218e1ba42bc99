"""Exponential moving average of a model's weights (``train.ema``).

The average is updated after every optimizer step; ``swapped_in`` puts it into the model for
validation and saving and restores the live training weights afterwards. Averaging the
weights of the last few hundred steps smooths the step-to-step noise of small batches, so the
model picked by validation is less a lucky draw of the last step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        # warm start: the effective decay grows as (1 + n) / (10 + n) up to ``decay``, so early on
        # the average follows the weights closely instead of dwelling on the random init
        self.updates += 1
        weight = 1.0 - min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, avg in zip(self.params, self.shadow, strict=True):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live, strict=True):
                    p.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [t.clone() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=False)):
            raise ValueError("weight average does not match the model's parameters")
        with torch.no_grad():
            for dst, src in zip(self.shadow, shadow, strict=True):
                dst.copy_(src)
        self.updates = int(state["updates"])
