"""Interaction data: the item vocabulary, per-user sequences and the leave-one-out split.

Readers live in ``training.data.readers`` (re-exported here). numpy/pandas only (no torch), so the service and the benchmarks can import it cheaply. Everything
here is vectorised over interactions; the only Python loops are over k-core rounds and file columns.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.atomic import atomic_output
from training.data.readers import DataError, Interactions, as_str_array, read_interactions

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ vocabulary


_SHORT = 256  # Vocabulary.ids: lists up to this long take the dict path


class Vocabulary:
    """String ↔ dense int ids. Id 0 is padding (`[PAD]`); token `tokens[i]` has id `i + 1`."""

    PAD = "[PAD]"

    def __init__(self, tokens: Sequence[str]) -> None:
        index = pd.Index([self.PAD, *tokens], dtype=object)
        if len(index) > 1 and pd.api.types.infer_dtype(index[1:], skipna=False) != "string":
            raise DataError("vocabulary tokens must all be str")
        if index.has_duplicates:
            dup = index[index.duplicated()][0]
            what = "the reserved padding token" if dup == self.PAD else "a duplicate token"
            raise DataError(f"vocabulary holds {what}: {dup!r}")
        self._index = index  # hash table for encode; position == id
        self._tokens = index.to_numpy(dtype=object)  # (V,) id -> token, for decode
        self._small: dict[str, int] | None = None  # token -> id for short lookups, built on first use

    @classmethod
    def build(cls, tokens_in_first_seen_order: Iterable[str]) -> Vocabulary:
        """A vocabulary of the distinct tokens, ids in order of first appearance."""
        return cls(pd.unique(as_str_array(tokens_in_first_seen_order)).tolist())

    def __len__(self) -> int:
        return len(self._tokens)  # includes PAD

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and np.array_equal(self._tokens, other._tokens)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self) - 1} tokens + {self.PAD})"

    @property
    def tokens(self) -> list[str]:
        """The tokens without PAD; `tokens[i]` has id `i + 1`."""
        return self._tokens[1:].tolist()

    def ids(self, tokens: Iterable[str]) -> np.ndarray:
        """(N,) int64 ids aligned with `tokens`; -1 where a token is unknown (nothing is dropped)."""
        if isinstance(tokens, str):
            raise TypeError("pass a sequence of tokens; use lookup() for a single token")
        if isinstance(tokens, list) and len(tokens) <= _SHORT and all(type(t) is str for t in tokens):
            # a request's few items: a dict lookup beats building pandas indexes (~10x at 50 tokens)
            if self._small is None:
                self._small = {t: i for i, t in enumerate(self._tokens.tolist())}
            small = self._small
            return np.fromiter((small.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
        # Factorize first: the hash lookup then runs once per distinct token, and an explicit object
        # Index keeps pandas from converting the strings to another dtype and back.
        codes, uniques = pd.factorize(as_str_array(tokens))
        distinct = self._index.get_indexer(pd.Index(uniques, dtype=object)).astype(np.int64)
        return distinct[codes] if len(codes) else np.zeros(0, dtype=np.int64)

    def encode(self, tokens: Iterable[str], unknown: str = "error") -> np.ndarray:
        """(N,) int64 ids. unknown='error' raises DataError naming the unknown tokens; 'drop' leaves them out."""
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        if isinstance(tokens, str):
            raise TypeError("pass a sequence of tokens; use lookup() for a single token")
        arr = as_str_array(tokens)
        ids = self.ids(arr)
        missing = ids < 0
        if missing.any():
            if unknown == "error":
                examples = ", ".join(repr(t) for t in pd.unique(arr[missing])[:5])
                raise DataError(
                    f"{int(missing.sum())} of {len(ids)} token(s) not in the vocabulary "
                    f"({len(self) - 1} tokens), e.g. {examples}"
                )
            ids = ids[~missing]
        return ids

    def lookup(self, token: str) -> int | None:
        """The id of one token, or None if it is unknown."""
        try:
            return int(self._index.get_loc(token))
        except (KeyError, TypeError):
            return None

    def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64).ravel()
        bad = (arr < 0) | (arr >= len(self))
        if bad.any():
            raise DataError(f"id {int(arr[bad][0])} outside the vocabulary (valid 0..{len(self) - 1})")
        return self._tokens[arr].tolist()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (temp file + rename), so a reader never sees half a vocabulary."""
        payload = {"format": "ragrec.vocabulary", "version": 1, "pad": self.PAD, "tokens": self.tokens}
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: vocabulary file not found") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable vocabulary JSON file: {exc}") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("tokens"), list):
            raise DataError(f"{path}: expected a JSON object with a 'tokens' list")
        if payload.get("pad", cls.PAD) != cls.PAD:
            raise DataError(f"{path}: padding token {payload['pad']!r} differs from {cls.PAD!r}")
        try:
            return cls(payload["tokens"])
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------------------- sequences


@dataclass(eq=False)
class SequenceData:
    """Per-user item sequences, chronological. Row i belongs to `users[i]`.

    `flat` / `offsets` hold the same ids concatenated (row i is `flat[offsets[i]:offsets[i+1]]`), for
    vectorised gathers; they are computed from `sequences` when not given.
    """

    users: list[str]
    sequences: list[np.ndarray]  # row i: (n_i,) int64 item ids in 1..n_items
    item_vocab: Vocabulary
    # Filled in by __post_init__ when not given, so never None afterwards.
    flat: np.ndarray = None  # type: ignore[assignment]  # (n_interactions,) int64
    offsets: np.ndarray = None  # type: ignore[assignment]  # (n_users + 1,) int64

    def __post_init__(self) -> None:
        if len(self.users) != len(self.sequences):
            raise ValueError(f"{len(self.users)} users but {len(self.sequences)} sequences")
        if self.flat is None or self.offsets is None:
            self.flat, self.offsets = flatten(self.sequences)
        if len(self.offsets) != len(self.sequences) + 1 or self.offsets[-1] != len(self.flat):
            raise ValueError("flat/offsets do not match sequences")
        if len(self.flat) and (self.flat.min() < 1 or self.flat.max() > self.n_items):
            raise ValueError(f"item ids must lie in 1..{self.n_items}")

    @property
    def n_items(self) -> int:
        return len(self.item_vocab) - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return len(self.flat)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def flatten(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(sequences).astype(np.int64) if len(sequences) else np.zeros(0, np.int64)
    return flat, offsets


def _k_core_mask(user_codes: np.ndarray, item_codes: np.ndarray, k: int, keep: np.ndarray) -> np.ndarray:
    """Rows kept by the iterative k-core, starting from `keep`: repeat until every kept user and item
    has >= k kept rows."""
    n_u, n_i = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    while True:
        u_count = np.bincount(user_codes[keep], minlength=n_u)
        i_count = np.bincount(item_codes[keep], minlength=n_i)
        new = keep & (u_count[user_codes] >= k) & (i_count[item_codes] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def build_sequences(
    inter: Interactions,
    *,
    k_core: int = 0,
    item_vocab: Vocabulary | None = None,
    unknown: str = "drop",
) -> SequenceData:
    """Group interactions into chronological per-user sequences.

    Ties in time keep file order (stable sort). Users are numbered in order of first appearance.
    With `item_vocab` given, items it lacks are dropped and counted in a log warning (unknown='drop') or
    raise DataError (unknown='error'); without it a vocabulary is built in first-seen order after k-core.
    """
    if k_core < 0:
        raise ValueError(f"k_core must be >= 0, got {k_core}")
    if len(inter) == 0:
        raise DataError("no interactions to build sequences from")
    # Integer codes in first-seen order; everything below works on these, not on the strings.
    user_codes, user_tokens = pd.factorize(inter.users)
    item_codes, item_tokens = pd.factorize(inter.items)
    times = inter.timestamps
    keep = np.ones(len(inter), dtype=bool)

    if item_vocab is not None:
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        vocab_ids = item_vocab.ids(item_tokens)  # (n_distinct,) -1 = unknown
        if (vocab_ids < 0).any():
            if unknown == "error":
                item_vocab.encode(item_tokens, unknown="error")  # raises, naming examples
            keep = vocab_ids[item_codes] > 0
            logger.warning("dropped %d interactions with items not in the vocabulary", int((~keep).sum()))
    if k_core > 1:
        keep = _k_core_mask(user_codes, item_codes, k_core, keep)
        logger.info("%d-core keeps %d of %d interactions", k_core, int(keep.sum()), len(keep))
    if not keep.any():
        raise DataError(
            f"no interactions left after filtering (k_core={k_core}, "
            f"{'given' if item_vocab is not None else 'built'} vocabulary); {len(inter)} before"
        )
    if not keep.all():
        # Renumber the kept rows so users and items stay in first-seen order among them.
        user_codes, kept_users = pd.factorize(user_codes[keep])
        user_tokens = user_tokens[kept_users]
        item_codes, kept_items = pd.factorize(item_codes[keep])
        item_tokens = item_tokens[kept_items]
        times = times[keep]

    if item_vocab is None:
        item_vocab = Vocabulary(item_tokens)
        item_ids = item_codes.astype(np.int64) + 1
    else:
        item_ids = item_vocab.ids(item_tokens)[item_codes]

    # Two stable sorts == sort by (user, time) with ties in file order.
    order = np.argsort(times, kind="stable")
    order = order[np.argsort(user_codes[order], kind="stable")]
    flat = item_ids[order]
    offsets = np.zeros(len(user_tokens) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_codes, minlength=len(user_tokens)), out=offsets[1:])
    sequences = np.split(flat, offsets[1:-1])  # views into flat
    return SequenceData(list(user_tokens), sequences, item_vocab, flat=flat, offsets=offsets)


def load_dataset(
    path: str | os.PathLike[str],
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    fmt: str | None = None,
    k_core: int = 0,
    item_vocab: Vocabulary | None = None,
) -> SequenceData:
    """read_interactions + build_sequences."""
    inter = read_interactions(path, user_col=user_col, item_col=item_col, time_col=time_col, fmt=fmt)
    data = build_sequences(inter, k_core=k_core, item_vocab=item_vocab)
    logger.info(
        "%s: %d users, %d items, %d interactions", path, data.n_users, data.n_items, data.n_interactions
    )
    return data


# ------------------------------------------------------------------------------------------- splitting


@dataclass(eq=False)
class Split:
    """Leave-one-out examples as (user row, target position) pairs.

    Target = sequences[u][t]; input = sequences[u][max(0, t - max_len):t].
    """

    train_users: np.ndarray  # (N_train,) int64
    train_positions: np.ndarray  # (N_train,) int64
    valid_users: np.ndarray  # (N_valid,) int64
    valid_positions: np.ndarray
    test_users: np.ndarray  # (N_test,) int64
    test_positions: np.ndarray


def leave_one_out(data: SequenceData) -> Split:
    """Last item = test, the one before = validation, positions 1..n-3 = training.

    Users with fewer than 3 items are never evaluated; their positions 1..n-1 are all training targets.
    """
    n = data.lengths
    evaluated = n >= 3
    n_train = np.where(evaluated, n - 3, np.maximum(n - 1, 0))
    train_users = np.repeat(np.arange(len(n), dtype=np.int64), n_train)
    # Position within each user's block, starting at 1.
    block_start = np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_positions = np.arange(len(train_users), dtype=np.int64) - block_start + 1
    eval_users = np.flatnonzero(evaluated).astype(np.int64)
    return Split(
        train_users=train_users,
        train_positions=train_positions,
        valid_users=eval_users,
        valid_positions=n[eval_users] - 2,
        test_users=eval_users.copy(),
        test_positions=n[eval_users] - 1,
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


def pad_prefixes(
    sequences: SequenceData | Sequence[np.ndarray],
    users: np.ndarray,
    positions: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned, zero-padded inputs for (user, position) pairs.

    Row j is sequences[users[j]][max(0, t - max_len):t] with t = positions[j], oldest kept item in column
    0, zeros after it. Returns (N, max_len) int64 prefixes and (N,) int64 lengths. 0 <= t <= n_u, so
    t = n_u gives the whole (truncated) history for next-item prediction.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if isinstance(sequences, SequenceData):
        flat, offsets = sequences.flat, sequences.offsets
    else:
        flat, offsets = flatten(sequences)
    users = np.asarray(users, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    if users.shape != positions.shape or users.ndim != 1:
        raise ValueError(f"users {users.shape} and positions {positions.shape} must be equal-length 1-d")
    n_rows = len(offsets) - 1
    if len(users) and (users.min() < 0 or users.max() >= n_rows):
        raise ValueError(f"user rows must lie in 0..{n_rows - 1}")
    seq_len = offsets[users + 1] - offsets[users]
    if np.any((positions < 0) | (positions > seq_len)):
        j = int(np.flatnonzero((positions < 0) | (positions > seq_len))[0])
        raise ValueError(f"position {positions[j]} outside 0..{seq_len[j]} for user row {users[j]}")

    lengths = np.minimum(positions, max_len)  # (N,)
    start = offsets[users] + positions - lengths  # (N,) flat index of the oldest kept item
    cols = np.arange(max_len, dtype=np.int64)
    mask = cols[None, :] < lengths[:, None]  # (N, L)
    if len(flat) == 0:
        return np.zeros(mask.shape, dtype=np.int64), lengths
    index = np.where(mask, start[:, None] + cols[None, :], 0)  # (N, L); 0 is a safe dummy index
    prefixes = flat[index]
    prefixes[~mask] = 0
    return prefixes, lengths
