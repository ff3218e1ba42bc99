"""Input checks shared by the retriever modules.

Each function returns the array in the dtype and layout faiss wants
(C-contiguous float32 / int64) or raises a specific ``RetrieverError`` whose
message names the argument and the problem.
"""

from __future__ import annotations

import numpy as np

from retriever.errors import DimensionMismatch, InvalidParameter, InvalidVectors

__all__ = ["as_float_matrix", "as_int_vector", "check_k"]


def as_float_matrix(x, name: str, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, dim) matrix of finite values.

    Copies only when the dtype or layout has to change.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidVectors(f"{name} must be a 2-D (N, dim) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidVectors(f"{name} must hold floating-point values, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise DimensionMismatch(f"{name} has dimension {x.shape[1]}, expected {dim}")
    if x.shape[0] == 0 and not allow_empty:
        raise InvalidVectors(f"{name} is empty (shape {x.shape})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidVectors(
            f"{name} has {bad.size} row(s) with NaN or inf values (first: row {int(bad[0])})"
        )
    return x


def as_int_vector(x, name: str, n: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous int64 vector, of length ``n`` when given."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise InvalidParameter(f"{name} must be a 1-D array, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise InvalidParameter(f"{name} must hold integers, got dtype {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise InvalidParameter(f"{name} has length {x.shape[0]}, expected {n}")
    return np.ascontiguousarray(x, dtype=np.int64)


def check_k(k, limit: int, what: str = "the collection") -> int:
    """Check 1 <= k <= limit and return k as an int."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidParameter(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise InvalidParameter(f"k must be positive, got {k}")
    if k > limit:
        raise InvalidParameter(f"k={k} is larger than {what} ({limit})")
    return int(k)
