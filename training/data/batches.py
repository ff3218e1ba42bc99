"""Turn training examples into encoder passes ("units") and batches.

A training example is (user u, target position t): input ``seq[max(0, t-L):t]``, target
``seq[t]``. A *unit* is one encoder pass over a left-aligned window; an example is a
column of a unit. Because the encoder is causal, the output at column c of a window
that starts at sequence position s is exactly the representation of the prefix
``seq[s:s+c+1]`` — so one pass serves every example whose input is a prefix of it.

- ``prefix`` plan (faithful to the every-prefix-is-a-sample protocol): all examples of a
  user with t <= L share one head window ``seq[0:max t]``; an example with t > L gets its
  own window (only its last column is supervised). Same examples, same inputs, same
  targets as one pass per example, in far fewer passes.
- ``window`` plan (SASRec's original recipe): a user's training targets are cut into
  chunks of L (or ``train.window_chunk``) consecutive positions (boundaries shifted at random
  each epoch) and every chunk position of the window ending at the chunk's last target is
  supervised. Inputs are truncated at the window start, so this is a different, cheaper
  objective, offered as an option.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from training.data.sequences import SequenceData, pad_prefixes


@dataclass
class Plan:
    unit_users: np.ndarray  # (U,) user row of each unit
    unit_ends: np.ndarray  # (U,) window = seq[max(0, end-L):end]
    sample_unit: np.ndarray  # (S,) unit of each example, examples grouped by unit (sorted)
    sample_col: np.ndarray  # (S,) column of the example inside its unit's window
    sample_index: np.ndarray  # (S,) index of the example in the split's training arrays

    @property
    def n_units(self) -> int:
        return len(self.unit_users)

    @property
    def n_samples(self) -> int:
        return len(self.sample_unit)


def _plan_from(users: np.ndarray, ends: np.ndarray, positions: np.ndarray, index: np.ndarray, max_len: int) -> Plan:
    """Build a plan given, for each example (grouped by unit), its unit's (user, end)."""
    # units are the distinct (user, end) pairs; np.unique on a combined key keeps this vectorised
    combined = users.astype(np.int64) * (int(ends.max(initial=0)) + 1) + ends
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    unit_users, unit_ends = users[first], ends[first]
    starts = np.maximum(0, unit_ends - max_len)
    cols = positions - starts[inverse] - 1
    order = np.argsort(inverse, kind="stable")
    return Plan(
        unit_users=unit_users.astype(np.int64),
        unit_ends=unit_ends.astype(np.int64),
        sample_unit=inverse[order].astype(np.int64),
        sample_col=cols[order].astype(np.int64),
        sample_index=index[order].astype(np.int64),
    )


def prefix_plan(train_users: np.ndarray, train_positions: np.ndarray, max_len: int) -> Plan:
    """One head window per user for its examples with t <= L, one window per other example."""
    users = np.asarray(train_users, dtype=np.int64)
    pos = np.asarray(train_positions, dtype=np.int64)
    index = np.arange(len(users))
    in_head = pos <= max_len
    head_end = np.zeros(int(users.max(initial=-1)) + 1, dtype=np.int64)
    np.maximum.at(head_end, users[in_head], pos[in_head])
    ends = np.where(in_head, head_end[users], pos)
    return _plan_from(users, ends, pos, index, max_len)


def window_plan(
    train_users: np.ndarray,
    train_positions: np.ndarray,
    max_len: int,
    rng: np.random.Generator,
    chunk_size: int | None = None,
) -> Plan:
    """Chunks of ``chunk_size`` (default L) consecutive training positions per user, each
    supervised in the window of L items that ends at its last target; chunk boundaries shift
    each epoch. With chunk C < L every target past the user's first C sees at least L - C + 1
    items of input, at the price of about L / C times the passes."""
    users = np.asarray(train_users, dtype=np.int64)
    pos = np.asarray(train_positions, dtype=np.int64)
    index = np.arange(len(users))
    size = max_len if chunk_size is None else chunk_size
    if not 1 <= size <= max_len:
        raise ValueError(f"chunk_size must be in [1, {max_len}], got {size}")
    offset = rng.integers(0, size, size=int(users.max(initial=-1)) + 1)
    chunk = (pos + offset[users]) // size
    # the window of a chunk ends at its largest target position
    combined = users * (int(chunk.max(initial=0)) + 1) + chunk
    _, inverse = np.unique(combined, return_inverse=True)
    chunk_end = np.zeros(inverse.max(initial=-1) + 1, dtype=np.int64)
    np.maximum.at(chunk_end, inverse, pos)
    ends = chunk_end[inverse]
    return _plan_from(users, ends, pos, index, max_len)


@dataclass
class Batch:
    windows: np.ndarray  # (B, W) int64 left-aligned unit windows, W <= L
    rows: np.ndarray  # (P,) unit row in ``windows`` of each example
    cols: np.ndarray  # (P,) column of each example
    sample_index: np.ndarray  # (P,) index into the split's training arrays


def iterate_batches(
    plan: Plan,
    sequences: SequenceData | list[np.ndarray],
    max_len: int,
    batch_size: int,
    rng: np.random.Generator,
    windows: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Shuffle units and cut them into batches of about ``batch_size`` examples.

    A unit is never split, so a batch holds at least ``batch_size`` examples unless it is
    the last one; with windows of up to L examples it exceeds it by less than L.
    """
    if windows is None:
        windows, _ = pad_prefixes(sequences, plan.unit_users, plan.unit_ends, max_len)
    counts = np.bincount(plan.sample_unit, minlength=plan.n_units)
    unit_ptr = np.concatenate([[0], np.cumsum(counts)])
    order = rng.permutation(plan.n_units)
    cum = np.cumsum(counts[order])
    start, done = 0, 0
    while start < plan.n_units:
        # close the batch at the first unit that brings it to batch_size examples
        end = min(int(np.searchsorted(cum, done + batch_size, side="left")) + 1, plan.n_units)
        done = int(cum[end - 1])
        units = order[start:end]
        start = end
        lo, hi = unit_ptr[units], unit_ptr[units + 1]
        n = hi - lo
        local = np.repeat(np.arange(len(units)), n)
        idx = np.repeat(lo - np.cumsum(np.concatenate([[0], n[:-1]])), n) + np.arange(n.sum())
        win = windows[units]
        width = int((win > 0).sum(axis=1).max())
        yield Batch(
            windows=win[:, :width],
            rows=local,
            cols=plan.sample_col[idx],
            sample_index=plan.sample_index[idx],
        )


def same_target_partners(targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each example, the index of a random *other* example with the same target.

    An example whose target is unique gets itself (its second view then differs only by
    dropout, as in DuoRec). targets: (S,) int; returns (S,) int64.
    """
    targets = np.asarray(targets)
    order = np.argsort(targets, kind="stable")
    sorted_t = targets[order]
    starts = np.searchsorted(sorted_t, sorted_t, side="left")
    ends = np.searchsorted(sorted_t, sorted_t, side="right")
    size = ends - starts
    # draw among the other size-1 members: pick r in [0, size-1) and skip over self
    self_rank = np.arange(len(order)) - starts
    r = (rng.random(len(order)) * np.maximum(size - 1, 1)).astype(np.int64)
    r = np.where(r >= self_rank, r + 1, r)
    r = np.where(size > 1, r, self_rank)
    partner_sorted = order[starts + r]
    out = np.empty(len(order), dtype=np.int64)
    out[order] = partner_sorted
    return out
