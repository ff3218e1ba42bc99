"""MemoryBank: vectors plus payload, searched with exclusions, quality flags and MMR.

Each entry has a stable int64 id (assigned in order, never reused), a unit
vector (the key) and a payload: target item, user, position, quality score
and optionally a stored representation ("value"). The faiss index holds row
numbers; ids map to rows through the sorted ``ids`` array.

Limits:
- ``remove`` marks entries dead (a tombstone) instead of editing the index,
  which works for every index kind and on GPU; ``rebuild`` drops them;
- exclusions are applied on the host after an over-fetch that grows 4x per
  round for the queries still short, then falls back to an exact scan for the
  few that remain, so k results come back whenever k eligible entries exist;
- searches run concurrently; ``add`` / ``remove`` / ``update_quality`` wait
  for running searches and block new ones while they run.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from retriever import index as ix
from retriever.checks import as_float_matrix, as_int_vector, check_k
from retriever.errors import EmptyBank, InvalidParameter, UnknownEntries
from retriever.mmr import mmr_select

__all__ = ["MemoryBank", "SearchResult"]

logger = logging.getLogger(__name__)

_EXACT_FALLBACK_CHUNK = 32  # queries per exact-scan block: bounds the (chunk, N) score matrix
_ROWWISE_BELOW = 8  # _collect: up to this many queries, compress results row by row


@dataclass
class SearchResult:
    """Top-k neighbours per query. Missing slots have I == -1, D == -inf, payload -1 / NaN / 0."""

    D: np.ndarray  # (Q, k) float32 cosine similarity
    I: np.ndarray  # (Q, k) int64 entry ids
    # the payload; None after ``search(payload=False)``, which gathers only D, I and values
    targets: np.ndarray | None  # (Q, k) int64
    users: np.ndarray | None  # (Q, k) int64
    positions: np.ndarray | None  # (Q, k) int64
    quality: np.ndarray | None  # (Q, k) float32
    low_quality: np.ndarray | None  # (Q, k) bool: found and quality < threshold (flagged, not dropped)
    values: np.ndarray | None = None  # (Q, k, Dv) float32 when the bank stores values
    version: str | None = None  # the bank version that answered

    @property
    def found(self) -> np.ndarray:
        return self.I >= 0

    @property
    def usable(self) -> np.ndarray:
        """Found and not flagged as low quality: the mask retrieval attention should use."""
        return self.found & ~self.low_quality


class _Reading:
    __slots__ = ("lock",)

    def __init__(self, lock: _ReadWriteLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock._enter_read()

    def __exit__(self, *exc: object) -> None:
        self.lock._exit_read()


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())  # never re-entered: a plain lock is cheaper
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._reading = _Reading(self)

    def read(self) -> _Reading:
        """``with lock.read():`` (a plain context manager: searches take it once per request)."""
        return self._reading

    def _enter_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _exit_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0 and self._writers_waiting:  # only a writer waits for the readers
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _payload(n: int, targets, users, positions, quality, values, dim_values: int | None = None) -> dict:
    out = {
        "targets": as_int_vector(targets, "targets", n),
        "users": as_int_vector(users, "users", n),
        "positions": as_int_vector(positions, "positions", n),
    }
    if quality is None:
        out["quality"] = np.ones(n, dtype=np.float32)  # neutral: nothing flagged until scored
    else:
        q = np.asarray(quality, dtype=np.float32)
        if q.shape != (n,) or not np.isfinite(q).all():
            raise InvalidParameter(f"quality must be a finite ({n},) array, got shape {q.shape}")
        out["quality"] = q
    if values is not None:
        out["values"] = as_float_matrix(values, "values", dim=dim_values, allow_empty=n == 0)
        if out["values"].shape[0] != n:
            raise InvalidParameter(f"values has {out['values'].shape[0]} rows, expected {n}")
    elif dim_values is not None:
        raise InvalidParameter("this bank stores values: add() needs values too")
    return out


def _rowwise_isin(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(S, F) bool: A[s, f] in B[s, :]. Values >= -1; B's -1 entries are padding."""
    if B.shape[1] <= 4:
        return ((A[:, :, None] == B[:, None, :]) & (B[:, None, :] >= 0)).any(axis=2)
    span = int(max(A.max(initial=0), B.max(initial=0))) + 2
    row = np.arange(A.shape[0], dtype=np.int64)[:, None] * span
    keys_b = np.where(B >= 0, B + 1 + row, -1)  # padding never matches (keys are >= 0)
    return np.isin(A + 1 + row, keys_b)


class MemoryBank:
    """Vectors and payload arrays behind a faiss index; see the module docstring for limits."""

    def __init__(self, vectors, targets, users, positions, quality=None, values=None,
                 spec: ix.IndexSpec | None = None, *, version: str | None = None):
        x = ix.normalize(as_float_matrix(vectors, "vectors", allow_empty=True))
        n = x.shape[0]
        if n == 0:
            raise EmptyBank("cannot build a memory bank from zero vectors")
        payload = _payload(n, targets, users, positions, quality, values)
        built = ix.build_index(x, spec)
        self._setup(x, np.arange(n, dtype=np.int64), np.ones(n, dtype=bool), payload, built, spec, version)

    @classmethod
    def restore(cls, *, vectors: np.ndarray, ids: np.ndarray, alive: np.ndarray, targets, users, positions,
                quality, values, index: ix.BuiltIndex, spec: ix.IndexSpec | None = None,
                version: str | None = None) -> MemoryBank:
        """Rebuild a bank from saved arrays and an already built index (no training)."""
        bank = cls.__new__(cls)
        n = vectors.shape[0]
        payload = _payload(n, targets, users, positions, quality, values)
        ids = as_int_vector(ids, "ids", n)
        if n > 1 and (np.diff(ids) <= 0).any():
            raise InvalidParameter("ids must be strictly increasing")
        alive = np.asarray(alive, dtype=bool)
        if alive.shape != (n,) or index.ntotal != n or index.dim != vectors.shape[1]:
            raise InvalidParameter(
                f"inconsistent parts: {n} vectors of dim {vectors.shape[1]}, alive {alive.shape}, "
                f"index with {index.ntotal} vectors of dim {index.dim}"
            )
        bank._setup(vectors, ids, alive, payload, index, spec, version)
        return bank

    def _setup(self, x, ids, alive, payload, built, spec, version):
        self._cols = {"vectors": x, "ids": ids, "alive": alive, **payload}
        self._n = x.shape[0]
        self._n_alive = int(alive.sum())
        self._next_id = int(ids[-1]) + 1 if ids.size else 0
        self.index = built
        self.spec = spec or ix.IndexSpec()
        self.version = version
        self._lock = _ReadWriteLock()

    # ----- properties -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of live (not removed) entries."""
        return self._n_alive

    @property
    def dim(self) -> int:
        return self._cols["vectors"].shape[1]

    @property
    def has_values(self) -> bool:
        return "values" in self._cols

    @property
    def device(self) -> str:
        return self.index.device

    def _col(self, name: str) -> np.ndarray:
        return self._cols[name][: self._n]

    @contextmanager
    def read_locked(self):
        """Hold off add/remove/update_quality while the caller reads (e.g. saves) the bank.

        Yields a dict of the bank's arrays (views; do not modify).
        """
        with self._lock.read():
            yield {name: self._col(name) for name in self._cols}

    def rows_of(self, ids) -> np.ndarray:
        """Row numbers of entry ids; UnknownEntries for ids the bank never held."""
        ids = as_int_vector(np.atleast_1d(ids), "ids")
        known = self._col("ids")
        rows = np.minimum(np.searchsorted(known, ids), self._n - 1)
        bad = known[rows] != ids
        if bad.any():
            raise UnknownEntries(f"{int(bad.sum())} id(s) not in the bank (first: {int(ids[bad][0])})")
        return rows

    def vectors_of(self, I: np.ndarray) -> np.ndarray:
        """Stored unit vectors for an array of entry ids (any shape; -1 gives zeros): (*I.shape, dim)."""
        I = np.asarray(I, dtype=np.int64)
        out = np.zeros((*I.shape, self.dim), dtype=np.float32)
        found = I >= 0
        with self._lock.read():
            if found.any():
                out[found] = self._col("vectors")[self.rows_of(I[found])]
        return out

    # ----- search -----------------------------------------------------------------------------
    def search(self, queries, k: int, *, exclude_ids=None, exclude_user=None, exclude_from_position=None,
               quality_threshold: float | None = None, mmr_lambda: float | None = None,
               mmr_pool: int | None = None, nprobe: int | None = None,
               ef_search: int | None = None, unit_queries: bool = False, payload: bool = True) -> SearchResult:
        """Top-k live entries by cosine similarity for each of the (Q, dim) ``queries``.

        exclude_ids: (Q, m) int64 entry ids to drop per query (-1 = padding).
        exclude_user, exclude_from_position: (Q,) int64; drop entries of user
          ``exclude_user[q]`` at position >= ``exclude_from_position[q]``
          (every position when None; a negative user disables the rule for q).
        quality_threshold: flag (``low_quality``) found entries whose quality is below it.
        mmr_lambda: re-rank the best ``mmr_pool`` (default 4k) candidates by MMR.
        unit_queries: the caller vouches that ``queries`` is a C-contiguous float32 (Q, dim)
          array of finite unit rows (``training.ra.bank.unit_keys`` gives them), so they are
          neither checked nor normalised again (the service's per-request path).
        payload: gather targets, users, positions and quality; False leaves them None (a served
          request that explains nothing reads only D, I and values).
        """
        if unit_queries and isinstance(queries, np.ndarray) and queries.dtype == np.float32 \
                and queries.ndim == 2 and queries.shape[0] and queries.shape[1] == self.dim \
                and queries.flags.c_contiguous:
            q = queries
        else:
            q = ix.unit_rows(as_float_matrix(queries, "queries", dim=self.dim))
        nq = q.shape[0]
        excl = self._check_exclusions(nq, exclude_ids, exclude_user, exclude_from_position)
        with self._lock.read():
            if self._n_alive == 0:
                raise EmptyBank("the memory bank has no live entries")
            k = check_k(k, self._n_alive, f"the bank's {self._n_alive} live entries")
            need = k if mmr_lambda is None else min(mmr_pool or 4 * k, self._n_alive)
            if need < k:
                raise InvalidParameter(f"mmr_pool={mmr_pool} must be >= k={k}")
            refine = self.index.params.get("refine", 1)
            D, R = self._collect(q, min(need * refine, self._n_alive), excl, nprobe, ef_search)
            if refine > 1 or mmr_lambda is not None:
                D, R = ix.rescore_exact(q, self._col("vectors"), R, need)
            if mmr_lambda is not None:
                cols = mmr_select(D, self._col("vectors")[np.maximum(R, 0)], k, mmr_lambda)
                found = cols >= 0
                cols = np.maximum(cols, 0)
                D = np.where(found, np.take_along_axis(D, cols, 1), -np.inf)
                R = np.where(found, np.take_along_axis(R, cols, 1), -1)
            return self._result(D[:, :k], R[:, :k], quality_threshold, payload)

    def _check_exclusions(self, nq, exclude_ids, exclude_user, exclude_from_position) -> dict:
        excl = {}
        if exclude_ids is not None:
            E = np.asarray(exclude_ids)
            if E.ndim != 2 or E.shape[0] != nq or not np.issubdtype(E.dtype, np.integer):
                raise InvalidParameter(
                    f"exclude_ids must be an integer (Q={nq}, m) array, got {E.dtype} {E.shape}; "
                    "use ids[:, None] for one id per query"
                )
            excl["ids"] = E.astype(np.int64)
        if exclude_user is not None:
            users = as_int_vector(exclude_user, "exclude_user", nq)
            pos = (None if exclude_from_position is None
                   else as_int_vector(exclude_from_position, "exclude_from_position", nq))
            if (users >= 0).any():  # every query anonymous (-1): no rule to apply, no over-fetch for it
                excl["user"] = users
                excl["from_position"] = np.full(nq, np.iinfo(np.int64).min) if pos is None else pos
        elif exclude_from_position is not None:
            raise InvalidParameter("exclude_from_position needs exclude_user")
        return excl

    def _excluded(self, R: np.ndarray, excl: dict, sel: np.ndarray) -> np.ndarray:
        """(S, F) bool mask of rows R (>= 0) that queries ``sel`` must not see."""
        drop = ~self._col("alive")[R]
        if "ids" in excl:
            drop |= _rowwise_isin(self._col("ids")[R], excl["ids"][sel])
        if "user" in excl:
            user = excl["user"][sel][:, None]
            drop |= ((self._col("users")[R] == user) & (user >= 0)
                     & (self._col("positions")[R] >= excl["from_position"][sel][:, None]))
        return drop

    def _collect(self, q, need, excl, nprobe, ef_search) -> tuple[np.ndarray, np.ndarray]:
        """(Q, need) best eligible rows per query by index score; -1 / -inf where fewer exist."""
        nq = q.shape[0]
        if not excl and self._n_alive == self._n and need <= self.index.max_k:
            # the usual case (nothing to drop): one search; the loop below only when it comes up short
            probe = nprobe if nprobe is None else min(nprobe, self.index.params.get("nlist", nprobe), ix.GPU_MAX_K)
            D, R = ix.search_checked(self.index, q, need, nprobe=probe, ef_search=ef_search)
            if (R[0, -1] >= 0) if nq == 1 else (R[:, -1] >= 0).all():
                return D, R
        D_out = np.full((nq, need), -np.inf, dtype=np.float32)
        R_out = np.full((nq, need), -1, dtype=np.int64)
        limit = min(self.index.max_k, self._n)
        dead = self._n - self._n_alive
        # first guess: room for the dead rows' share, doubled when anything is excluded
        fetch = min(limit, int(need * self._n / max(self._n_alive, 1)) + (need if excl else 0) + 1)
        todo = np.arange(nq)
        base_nprobe = nprobe or self.index.params.get("nprobe")
        first_fetch = fetch
        while todo.size:
            # probe more IVF lists as the fetch grows: what the exclusions removed was the near lists
            probe = None if base_nprobe is None else min(
                base_nprobe * (fetch // first_fetch), self.index.params["nlist"], ix.GPU_MAX_K)
            D, R = ix.search_checked(self.index, q if todo.size == nq else q[todo], fetch, nprobe=probe,
                                     ef_search=ef_search)
            keep = R >= 0
            if excl or dead:
                keep &= ~self._excluded(np.maximum(R, 0), excl, todo)
            count = keep.sum(axis=1)
            # the index has nothing more for a query once it pads with -1 or has given every row
            dry = (R[:, -1] < 0) | (fetch >= self._n)
            done = (count >= need) | (dry & (self.index.kind == "flat"))
            if todo.size <= _ROWWISE_BELOW:  # a request or a few: compress row by row (fewer array ops)
                for j in np.flatnonzero(done):
                    cols = np.flatnonzero(keep[j])[:need]
                    D_out[todo[j], : cols.size] = D[j, cols]
                    R_out[todo[j], : cols.size] = R[j, cols]
            else:
                order = np.argsort(~keep[done], axis=1, kind="stable")[:, :need]
                width = order.shape[1]
                ok = np.take_along_axis(keep[done], order, 1)
                D_out[todo[done], :width] = np.where(ok, np.take_along_axis(D[done], order, 1), -np.inf)
                R_out[todo[done], :width] = np.where(ok, np.take_along_axis(R[done], order, 1), -1)
            short = ~done
            if short.any() and (dry[short].any() or fetch >= limit or fetch >= 16 * need + 1024):
                # the approximate index ran dry (or the over-fetch grew large): scan the rest exactly
                rest = todo[short]
                logger.debug("exact fallback for %d queries after fetching %d", rest.size, fetch)
                D_out[rest], R_out[rest] = self._exact_filtered(q[rest], need, excl, rest)
                break
            todo, fetch = todo[short], min(fetch * 4, limit)
        return D_out, R_out

    def _exact_filtered(self, q, need, excl, sel) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force version of ``_collect`` for a few queries: (len(q), need) by exact score."""
        vectors, known = self._col("vectors"), self._col("ids")
        D_out = np.full((len(q), need), -np.inf, dtype=np.float32)
        R_out = np.full((len(q), need), -1, dtype=np.int64)
        for start in range(0, len(q), _EXACT_FALLBACK_CHUNK):
            part = slice(start, start + _EXACT_FALLBACK_CHUNK)
            S = q[part] @ vectors.T  # (s, N)
            S[:, ~self._col("alive")] = -np.inf
            if "ids" in excl:
                E = excl["ids"][sel[part]]
                qi, cj = np.nonzero(E >= 0)
                rows = np.minimum(np.searchsorted(known, E[qi, cj]), self._n - 1)
                hit = known[rows] == E[qi, cj]
                S[qi[hit], rows[hit]] = -np.inf
            if "user" in excl:
                user = excl["user"][sel[part]][:, None]
                S[(self._col("users") == user) & (user >= 0)
                  & (self._col("positions") >= excl["from_position"][sel[part]][:, None])] = -np.inf
            top = (np.argpartition(-S, need - 1, axis=1)[:, :need] if need < self._n
                   else np.broadcast_to(np.arange(self._n), S.shape))
            top_D = np.take_along_axis(S, top, 1)
            order = np.argsort(-top_D, axis=1, kind="stable")
            D = np.take_along_axis(top_D, order, 1)
            D_out[part] = D
            R_out[part] = np.where(np.isfinite(D), np.take_along_axis(top, order, 1), -1)
        return D_out, R_out

    def _result(self, D, R, quality_threshold, payload: bool = True) -> SearchResult:
        found = R >= 0
        every = bool(found.all())  # the usual case: no padding to fill in
        r = R if every else np.maximum(R, 0)
        cols = self._cols  # rows of R are below self._n: no need to cut the columns to it first

        def gather(name, missing):
            return cols[name][r] if every else np.where(found, cols[name][r], missing)

        values = None
        if self.has_values:
            values = cols["values"][r]
            if not every:
                values = np.where(found[:, :, None], values, np.float32(0))
        D, ids = D.astype(np.float32, copy=False), gather("ids", -1)
        if not payload:
            return SearchResult(D=D, I=ids, targets=None, users=None, positions=None, quality=None,
                                low_quality=None, values=values, version=self.version)
        quality = gather("quality", np.float32(np.nan)).astype(np.float32, copy=False)
        low = np.zeros_like(found) if quality_threshold is None else found & (quality < quality_threshold)
        return SearchResult(D=D, I=ids, targets=gather("targets", -1), users=gather("users", -1),
                            positions=gather("positions", -1), quality=quality, low_quality=low, values=values,
                            version=self.version)

    # ----- mutation ------------------------------------------------------------------------
    def add(self, vectors, targets, users, positions, quality=None, values=None) -> np.ndarray:
        """Append entries, searchable as soon as this returns; returns their new ids.

        The index is not retrained: IVF assigns new vectors to the existing
        lists, which is fine until the data drifts (then ``rebuild``).
        """
        x = ix.normalize(as_float_matrix(vectors, "vectors", dim=self.dim))
        m = x.shape[0]
        dim_values = self._cols["values"].shape[1] if self.has_values else None
        payload = _payload(m, targets, users, positions, quality, values if self.has_values else None,
                           dim_values)
        if values is not None and not self.has_values:
            raise InvalidParameter("this bank stores no values; add() got values")
        with self._lock.write():
            new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            parts = {"vectors": x, "ids": new_ids, "alive": np.ones(m, dtype=bool), **payload}
            self._reserve(self._n + m)
            for name, part in parts.items():
                self._cols[name][self._n : self._n + m] = part
            ix.add_vectors(self.index, x)
            self._n += m
            self._n_alive += m
            self._next_id += m
        return new_ids

    def _reserve(self, n: int) -> None:
        # grow the columns geometrically so repeated small adds stay amortised O(1)
        cap = self._cols["vectors"].shape[0]
        if n <= cap:
            return
        new_cap = max(n, int(cap * 1.5) + 16)
        for name, col in self._cols.items():
            grown = np.empty((new_cap, *col.shape[1:]), dtype=col.dtype)
            grown[: self._n] = col[: self._n]
            self._cols[name] = grown

    def remove(self, ids) -> int:
        """Stop returning these entries (tombstones); returns how many were live."""
        with self._lock.write():
            rows = self.rows_of(ids)
            alive = self._cols["alive"]
            removed = int(np.unique(rows[alive[rows]]).size)
            alive[rows] = False
            self._n_alive -= removed
        return removed

    def update_quality(self, ids, values, momentum: float = 0.9) -> None:
        """quality <- momentum * quality + (1 - momentum) * value, per entry.

        Several values for one id in a call are averaged first.
        """
        if not 0.0 <= momentum <= 1.0:
            raise InvalidParameter(f"momentum must be in [0, 1], got {momentum}")
        ids = as_int_vector(np.atleast_1d(ids), "ids")
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != ids.shape or not np.isfinite(values).all():
            raise InvalidParameter(f"values must be finite and match ids ({ids.shape}), got {values.shape}")
        with self._lock.write():
            rows = self.rows_of(ids)
            uniq, inverse = np.unique(rows, return_inverse=True)
            mean = np.bincount(inverse, weights=values) / np.bincount(inverse)
            quality = self._cols["quality"]
            quality[uniq] = momentum * quality[uniq] + (1.0 - momentum) * mean

    def rebuild(self, spec: ix.IndexSpec | None = None) -> MemoryBank:
        """A new bank over the live entries (ids kept), with a freshly trained index."""
        with self._lock.read():
            alive = self._col("alive")
            cols = {name: self._col(name)[alive] for name in self._cols}
        if not alive.any():
            raise EmptyBank("cannot rebuild a bank whose entries were all removed")
        built = ix.build_index(cols["vectors"], spec or self.spec)
        return MemoryBank.restore(
            vectors=cols["vectors"], ids=cols["ids"], alive=cols["alive"], targets=cols["targets"],
            users=cols["users"], positions=cols["positions"], quality=cols["quality"],
            values=cols.get("values"), index=built, spec=spec or self.spec,
        )
