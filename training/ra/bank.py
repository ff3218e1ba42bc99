"""The frozen memory bank of the retrieval stage and the one neighbourhood rule.

A bank is built ONCE from the untouched base encoder in eval mode: entry m is a training
example (user v, position s) with key = the base's representation of seq[v][:s] (centred,
unit length) and payload = the next ``m_max`` items seq[v][s], seq[v][s+1], ...

Which items a query may see (``visible_next``) is the whole leakage rule, written once:
a query (user u, position t) of split S may read item seq[v][p] only if
  - p <= limit[v], the last position of v that split S may know (validation: v's last
    training target, n_v - 3; test: v's validation target, n_v - 2), and
  - v != u or p < t (nothing of the query's own present or future), and
  - with ``own_user="exclude"``, v != u at all.
An entry is retrievable when its first item is visible. Training queries use the
validation limits (training targets only), evaluation queries their split's.

Shapes: M entries, Q queries, K neighbours, D hidden size, m next items per entry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from retriever import MemoryBank
from training.data.sequences import SequenceData, Split, flatten
from training.ra.encode import encode_prefixes

log = logging.getLogger(__name__)

OwnUser = Literal["keep", "exclude"]
OWN_USER_RULES: tuple[str, ...] = ("keep", "exclude")
SPLITS = ("valid", "test")


class BankRuleError(ValueError):
    """A bank or a query set that would break the leakage rule, or an impossible request."""


def split_limits(data: SequenceData, split: Split, which: str) -> np.ndarray:
    """(n_users,) int64: the last position of each user a bank for split ``which`` may hold.

    Users never evaluated (< 3 items) contribute all their positions (they are all training).
    """
    if which not in SPLITS:
        raise BankRuleError(f"split must be one of {SPLITS}, got {which!r}")
    n = data.lengths.astype(np.int64)
    evaluated = n >= 3
    back = 3 if which == "valid" else 2
    return np.where(evaluated, n - back, n - 1)


@dataclass
class FrozenBank:
    """Entries, their unit keys and next items; plus a FAISS index over the keys."""

    users: np.ndarray  # (M,) int64 user row
    positions: np.ndarray  # (M,) int64 target position s (the prefix is seq[:s])
    h: torch.Tensor  # (M, D) float32 base representations (eval mode), uncentred
    keys: np.ndarray  # (M, D) float32 unit keys: normalize(h - center)
    center: torch.Tensor  # (D,) mean h of the bank's entries
    next_items: np.ndarray  # (M, m_max) int64 item ids, 0 = beyond the limit or the sequence
    next_pos: np.ndarray  # (M, m_max) int64 positions of those items (-1 with item 0)
    limits: np.ndarray  # (n_users,) the split limits the bank was cut at
    split: str
    index: MemoryBank
    proj: torch.nn.Module | None = None  # a trained key projection (training/ra/keys.py), None = centred h

    def __len__(self) -> int:
        return len(self.users)

    def query_keys(self, h: torch.Tensor) -> np.ndarray:
        """(Q, D) unit search vectors for representations h, the same map as the keys'."""
        return unit_keys(h, self.center, self.proj)

    def rekeyed(self, proj: torch.nn.Module | None) -> FrozenBank:
        """The same entries searched through another key map (a new index over new keys)."""
        keys = unit_keys(self.h, self.center, proj)
        index = MemoryBank(keys, self.next_items[:, 0], self.users, self.positions)
        return dataclasses.replace(self, keys=keys, index=index, proj=proj)

    @property
    def targets(self) -> np.ndarray:
        return self.next_items[:, 0]


def bank_entries(data: SequenceData, split: Split, which: str, *,
                 train_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(users, positions) of every example a bank for split ``which`` holds: training
    examples, plus validation examples for the test bank (training ones first).

    train_ids: the training examples (indices into ``split.train_*``) the bank holds; None =
    all of them. The fine-tuning stage passes the ones it keeps (``ra.bank_min_prefix``,
    evictions: ``training/ra/finetune/entries.py``); the rule is the same either way.
    """
    users, positions = split.train_users, split.train_positions
    if train_ids is not None:
        users, positions = users[train_ids], positions[train_ids]
    if which == "test":
        users = np.concatenate([users, split.valid_users])
        positions = np.concatenate([positions, split.valid_positions])
    keep = positions >= 1
    return users[keep].astype(np.int64), positions[keep].astype(np.int64)


def check_entries(data: SequenceData, split: Split, which: str, users: np.ndarray, positions: np.ndarray) -> None:
    """Refuse a bank for split ``which`` holding an entry past its user's ``split_limits``
    (that entry's item is the held-out target or later). The banks built here obey the rule
    by construction; this is the check a hand-built bank must pass before it evaluates."""
    over = positions > split_limits(data, split, which)[users]
    if over.any():
        j = int(np.flatnonzero(over)[0])
        raise BankRuleError(f"the {which} bank leaks: {int(over.sum())} entries past their user's {which} limit "
                            f"(first: user row {users[j]}, position {positions[j]})")


def next_items_of(data: SequenceData | Sequence[np.ndarray], users: np.ndarray, positions: np.ndarray,
                  limits: np.ndarray | None, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, m) items seq[v][s + j] for j < m, 0 where s + j passes limit[v] or the sequence's end
    (limits None: only the end); and their positions (-1 with item 0). ``data``: a SequenceData
    or a list of id arrays (the service's histories)."""
    if isinstance(data, SequenceData):
        flat, offsets = data.flat, data.offsets
    else:
        flat, offsets = flatten(data)
    last = np.diff(offsets) - 1
    if limits is not None:
        last = np.minimum(last, limits)
    pos = positions[:, None] + np.arange(m)[None, :]  # (M, m)
    ok = pos <= last[users][:, None]
    index = offsets[users][:, None] + np.where(ok, pos, 0)
    items = np.where(ok, flat[np.minimum(index, max(len(flat) - 1, 0))], 0).astype(np.int64)
    return items, np.where(ok, pos, -1).astype(np.int64)


@torch.no_grad()
def build_bank(encoder, data: SequenceData, split: Split, which: str, *, m_max: int = 5,
               batch_size: int = 256, device: torch.device | str = "cpu",
               h: torch.Tensor | None = None, center: torch.Tensor | None = None) -> FrozenBank:
    """Encode the bank for split ``which`` with ``encoder`` in eval mode (restored after).

    h: the entries' representations when the caller already has them (same order as
    ``bank_entries``), to skip encoding. center: the key map's centre (default: the mean h of
    these entries); every bank searched by one model must share it.
    """
    users, positions = bank_entries(data, split, which)
    limits = split_limits(data, split, which)
    if h is None:
        was = encoder.training
        encoder.eval()
        h = encode_prefixes(encoder, data, users, positions, encoder.cfg.max_len, batch_size=batch_size,
                            device=torch.device(device)).cpu()
        encoder.train(was)
    center = h.mean(dim=0) if center is None else center
    keys = unit_keys(h, center)
    items, pos = next_items_of(data, users, positions, limits, m_max)
    index = MemoryBank(keys, items[:, 0], users, positions)
    log.info("%s bank: %d entries, dim %d, next items up to %d", which, len(users), keys.shape[1], m_max)
    return FrozenBank(users, positions, h, keys, center, items, pos, limits, which, index)


def unit_keys(h: torch.Tensor | np.ndarray, center: torch.Tensor | np.ndarray,
              proj: torch.nn.Module | None = None) -> np.ndarray:
    """normalize(proj(h - center)) as float32 (M, D): post-LN representations share one large
    direction (mean pairwise cosine ~0.99), so uncentred every entry looks alike. Without a
    projection it is plain numpy: a served request computes one key, and torch's per-call
    overhead would be most of its cost (the service passes h and the center as float32 arrays)."""
    if proj is None:
        c = center if isinstance(center, np.ndarray) else center.detach().float().cpu().numpy()
        x = (h if isinstance(h, np.ndarray) else h.detach().float().cpu().numpy()) - c
    else:
        with torch.no_grad():
            x = torch.cat([proj(part) for part in (torch.as_tensor(h).float() - center).split(8192)]).numpy()
    x = x.astype(np.float32, copy=False)
    # the 2-norm as np.linalg.norm computes it (same floats), without its per-call checks
    x /= np.maximum(np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True)), np.float32(1e-12))
    return x


def check_queries(bank: FrozenBank, users: np.ndarray, positions: np.ndarray) -> None:
    """Refuse queries this bank would leak to. A query at or below its user's bank limit is a
    training query: only the validation bank (training targets only) may serve it, with its
    own present and future excluded at search time. On the test bank every query must lie
    past the limit, i.e. be a test target: a validation query there would find its target."""
    inside = positions <= bank.limits[users]
    if bank.split != "valid" and inside.any():
        j = int(np.flatnonzero(inside)[0])
        raise BankRuleError(f"the {bank.split} bank holds the target of query {j} (user row {users[j]}, "
                            f"position {positions[j]}): evaluate a split only with its own bank")


def search(bank: FrozenBank, q: np.ndarray, users: np.ndarray, positions: np.ndarray, k: int,
           own_user: OwnUser) -> tuple[np.ndarray, np.ndarray]:
    """(D, I): top-k cosine neighbours of unit queries q (Q, D) under the neighbourhood rule.

    users, positions: (Q,) the queries' own (user row, target position).
    """
    if own_user not in OWN_USER_RULES:
        raise BankRuleError(f"own_user must be one of {OWN_USER_RULES}, got {own_user!r}")
    if k > len(bank):
        raise BankRuleError(f"k={k} is larger than the {bank.split} bank ({len(bank)} entries)")
    check_queries(bank, users, positions)
    if own_user == "exclude":
        frm = np.full(len(users), np.iinfo(np.int64).min, dtype=np.int64)
    else:
        frm = positions.astype(np.int64)
    res = bank.index.search(q, k, exclude_user=users.astype(np.int64), exclude_from_position=frm)
    return res.D, res.I


def visible_next(bank: FrozenBank, I: np.ndarray, users: np.ndarray, positions: np.ndarray,
                 m: int) -> np.ndarray:
    """(Q, K, m) item ids of the neighbours' next m items that each query may see; 0 = hidden.

    I: (Q, K) entry ids (-1 = none). A query never sees its own user's items at or after its
    position (an own-user entry's later items would be the query's target or future).
    """
    ids = np.maximum(I, 0)
    items = bank.next_items[ids, :m].copy()  # (Q, K, m)
    pos = bank.next_pos[ids, :m]
    own = bank.users[ids][:, :, None] == users[:, None, None]
    items[(own & (pos >= positions[:, None, None])) | (I < 0)[:, :, None]] = 0
    return items
