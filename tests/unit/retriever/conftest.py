"""Shared fixtures: generated clustered vectors and an independent brute-force search."""

import numpy as np
import pytest

from retriever.synthetic import clustered


def _brute_force(queries: np.ndarray, vectors: np.ndarray, k: int, mask: np.ndarray | None = None):
    """Exact top-k cosine by a full numpy score matrix; ``mask`` (Q, N) True = excluded."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    if mask is not None:
        scores[mask] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def _recall_at(I: np.ndarray, I_true: np.ndarray) -> float:
    k = I_true.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(I, I_true, strict=True)]))


@pytest.fixture(scope="session")
def data_100k():
    """100k clustered 64-d unit vectors and 300 fresh queries from the same clusters."""
    x = clustered(100_000, 64, seed=0)
    q = clustered(300, 64, seed=1, n_clusters=316)
    return x, q


@pytest.fixture
def small():
    """2,000 clustered 16-d vectors with payload: 200 users x 10 positions."""
    x = clustered(2_000, 16, seed=3)
    users = np.repeat(np.arange(200), 10)
    positions = np.tile(np.arange(10), 200)
    targets = np.arange(2_000) % 97
    return x, targets, users, positions


@pytest.fixture(scope="session")
def brute_force():
    """Independent truth: exact top-k cosine by a full numpy score matrix (float64)."""
    return _brute_force


@pytest.fixture(scope="session")
def recall_at():
    """recall@k of approximate ids against exact ids (k = exact width)."""
    return _recall_at
