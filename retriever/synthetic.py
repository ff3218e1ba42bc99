"""Generated clustered vectors for tests and benchmarks (not for production use).

Points are ``center + noise`` normalised to unit length. Centers are random
unit vectors; the noise has a decaying spectrum under a random rotation, so
clusters are elongated and the data has a lower intrinsic dimension than
``dim``, as learned embeddings do. Equal seeds give equal data, whether the
vectors come from ``clustered`` at once or from ``iter_clustered`` in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["clustered", "iter_clustered"]


def _geometry(dim: int, n_clusters: int, spread: float, centers_seed: int):
    rng = np.random.default_rng(centers_seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = (np.arange(1, dim + 1) ** -0.75).astype(np.float32)
    spectrum *= spread / np.linalg.norm(spectrum)  # expected noise norm = spread
    return centers, (spectrum[:, None] * rotation.T).astype(np.float32)


def iter_clustered(n: int, dim: int, *, n_clusters: int | None = None, spread: float = 0.5,
                   seed: int = 0, centers_seed: int = 0, chunk: int = 1 << 18) -> Iterator[np.ndarray]:
    """Yield (<=chunk, dim) float32 unit vectors, n in total.

    Draw queries from the same clusters with the same ``centers_seed`` and
    another ``seed``. ``n_clusters`` defaults to about √n.
    """
    n_clusters = n_clusters or max(8, round(n**0.5))
    centers, mix = _geometry(dim, n_clusters, spread, centers_seed)
    for i, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, i])
        m = min(chunk, n - start)
        x = centers[rng.integers(0, n_clusters, m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) @ mix
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def clustered(n: int, dim: int, **kwargs) -> np.ndarray:
    """(n, dim) float32 unit vectors; see ``iter_clustered`` for the arguments."""
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for x in iter_clustered(n, dim, **kwargs):
        out[start : start + len(x)] = x
        start += len(x)
    return out
