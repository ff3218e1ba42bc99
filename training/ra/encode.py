"""h of many (user, position) prefixes, with one encoder pass per ``prefix_plan`` unit.

Every prefix of a user's first L items shares one causal pass, ~10x fewer passes than one
per prefix on ML-100K. Used by both retrieval stages' banks and the service's bundle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from training.data.batches import prefix_plan
from training.data.sequences import SequenceData, pad_prefixes
from training.model import SequenceEncoder


@torch.no_grad()
def encode_prefixes(encoder: SequenceEncoder, data: SequenceData | Sequence[np.ndarray], users: np.ndarray,
                    positions: np.ndarray,
                    max_len: int, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """(M, D) float32 h of each prefix seq[max(0, t - L):t] for (users[m], positions[m] = t >= 1)
    of ``data`` (a SequenceData or a list of id arrays; users index its rows),
    with the encoder in whatever mode the caller set (eval for banks). ``batch_size`` counts
    encoder passes (windows of up to L items), not prefixes."""
    users, positions = np.asarray(users, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    if len(users) == 0:
        raise ValueError("encode_prefixes needs at least one (user, position)")
    if positions.min() < 1:
        raise ValueError(f"a prefix needs position >= 1, got {int(positions.min())}")
    plan = prefix_plan(users, positions, max_len)
    windows = pad_prefixes(data, plan.unit_users, plan.unit_ends, max_len)[0]
    out = torch.empty(len(users), encoder.cfg.dim, device=device)
    for u0 in range(0, plan.n_units, batch_size):
        u1 = min(u0 + batch_size, plan.n_units)
        s0, s1 = np.searchsorted(plan.sample_unit, [u0, u1])  # samples are grouped by unit
        win = windows[u0:u1]
        width = int((win > 0).sum(axis=1).max())
        rows = torch.from_numpy(plan.sample_unit[s0:s1] - u0).to(device)
        cols = torch.from_numpy(plan.sample_col[s0:s1]).to(device)
        h = encoder(torch.from_numpy(np.ascontiguousarray(win[:, :width])).to(device), rows, cols)
        out[torch.from_numpy(plan.sample_index[s0:s1]).to(device)] = h.float()
    return out
