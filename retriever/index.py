"""Index factory: exact, IVF-Flat, IVF-PQ and HNSW indexes over L2-normalised vectors.

Similarity is the inner product of unit vectors (cosine). ``build_index``
resolves the parameters left open in an ``IndexSpec`` from the collection size
and, for approximate kinds, calibrates the search effort (``nprobe`` or
``efSearch``) on a sample of the stored vectors until recall@10 against exact
search reaches ``target_recall``.

Limits:
- searches pass their parameters per call (``faiss.SearchParametersIVF`` /
  ``SearchParametersHNSW``); a shared index is never mutated by a search, so
  CPU indexes may be searched from many threads at once;
- a GPU index owns its resources object and serialises its searches and
  adds behind one lock (faiss GPU indexes and resources are not safe to use
  from several threads) and answers at most k = 2048; HNSW has no GPU
  version and stays on the CPU;
- IVF-PQ scores are approximate: callers re-score ``refine * k`` candidates
  with the stored vectors (``rescore_exact``), as ``MemoryBank`` does;
- ``read_index_mapped`` maps a saved CPU index instead of reading it, so the
  processes serving one file share its pages. The mapped arrays are read-only:
  the first ``add_vectors`` swaps in a private copy (copy-on-write).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from retriever.checks import as_float_matrix, check_k
from retriever.errors import EmptyBank, InvalidParameter, InvalidVectors

__all__ = [
    "KINDS",
    "BuiltIndex",
    "IndexSpec",
    "add_vectors",
    "auto_nlist",
    "build_index",
    "exact_knn",
    "gpu_available",
    "normalize",
    "read_index_mapped",
    "rescore_exact",
    "search",
    "to_cpu_index",
    "wrap_index",
]

logger = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
GPU_MAX_K = 2048  # faiss GPU kernels answer k <= 2048 (and nprobe <= 2048)
_CALIBRATION_K = 10
_MAX_REFINE = 32  # IVF-PQ re-scoring depth cap for the auto calibration
_ADD_CHUNK = 1 << 18  # rows per add() call: bounds the coarse-assignment buffers


@dataclass(frozen=True)
class IndexSpec:
    """What index to build. ``None`` means "choose from the collection size"."""

    kind: str = "auto"  # auto | flat | ivf_flat | ivf_pq | hnsw; auto = flat below exact_below, else ivf_flat
    nlist: int | None = None  # IVF lists; None: power of two in [4√N, 16√N] with >= 30 points per list
    nprobe: int | None = None  # IVF lists probed; None: calibrated to target_recall
    pq_m: int | None = None  # PQ sub-quantizers; None: 4 dimensions per sub-quantizer
    pq_nbits: int = 8  # bits per PQ code (8 -> 256 centroids per sub-quantizer)
    refine: int | None = None  # IVF-PQ: re-score refine * k candidates exactly; None: calibrated (4..32)
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 40  # HNSW build-time beam
    ef_search: int | None = None  # HNSW search beam; None: calibrated to target_recall
    target_recall: float = 0.95  # recall@10 the calibration aims for (on stored vectors, self excluded)
    exact_below: int = 20_000  # fewer vectors than this: every kind falls back to exact (IVF does not pay)
    train_points_per_list: int = 40  # k-means sample per centroid, clipped to FAISS's 30..256
    kmeans_iters: int = 10
    use_gpu: str | bool = "auto"  # "auto": GPU when faiss sees one; True: require one; False: CPU
    seed: int = 1234

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidParameter(f"unknown index kind {self.kind!r}; expected one of {KINDS}")
        if self.use_gpu not in ("auto", True, False):
            raise InvalidParameter(f"use_gpu must be 'auto', True or False, got {self.use_gpu!r}")
        for name in ("nlist", "nprobe", "pq_m", "ef_search"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidParameter(f"{name} must be positive, got {value}")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidParameter(f"target_recall must be in (0, 1], got {self.target_recall}")
        if (self.refine is not None and self.refine < 1) or self.pq_nbits < 1 or self.hnsw_m < 2:
            raise InvalidParameter(
                f"refine, pq_nbits must be >= 1 and hnsw_m >= 2, got {self.refine}, {self.pq_nbits}, {self.hnsw_m}"
            )


@dataclass
class BuiltIndex:
    """A faiss index plus the parameters it was resolved to and the device it lives on."""

    index: faiss.Index
    kind: str  # resolved: flat | ivf_flat | ivf_pq | hnsw
    params: dict  # resolved nlist / nprobe / pq_m / ... (JSON-serialisable)
    device: str  # "cpu" or "cuda:<n>"
    build_seconds: float = 0.0
    gpu_resources: object = None  # keeps the StandardGpuResources alive with its index
    lock: threading.Lock | None = field(default=None, repr=False)  # GPU only: serialises use
    mapped: bool = False  # CPU arrays are views of a memory-mapped file (read_index_mapped): read-only
    search_params: dict = field(default_factory=dict, repr=False, compare=False)  # see _search_params

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def max_k(self) -> int:
        """Largest k one search call can ask for."""
        return max(min(self.ntotal, GPU_MAX_K if self.device != "cpu" else self.ntotal), 1)


def normalize(x) -> np.ndarray:
    """Return a float32 copy of (N, d) ``x`` with unit-norm rows; zero rows are an error."""
    return unit_rows(as_float_matrix(x, "vectors", allow_empty=True))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``normalize`` for a matrix ``as_float_matrix`` already checked (the per-request path)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = np.flatnonzero(norms[:, 0] == 0)
        raise InvalidVectors(
            f"vectors has {bad.size} zero row(s) that cannot be normalised (first: row {int(bad[0])})"
        )
    return x / norms


def _check_unit_norm(x: np.ndarray, sample: int = 1000) -> None:
    rows = x[:: max(1, x.shape[0] // sample)]
    err = np.abs(np.linalg.norm(rows, axis=1) - 1.0).max()
    if err > 1e-3:
        raise InvalidVectors(f"vectors must be L2-normalised (norm off by {err:.3g}); call normalize() first")


def set_search_threads(n: int) -> None:
    """OpenMP threads of faiss's CPU searches in this process. Idle OpenMP threads spin-wait for
    the next parallel region: a service answering small batches beside an event loop pays that in
    CPU for nothing (bench/serve_breakdown.py: 1.0 vs 0.5 ms per request on 2 cores)."""
    faiss.omp_set_num_threads(max(1, int(n)))


def gpu_available() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def auto_nlist(n: int) -> int:
    """IVF list count for n vectors: a power of two in [4√n, 16√n] with >= 30 points per list.

    When 30 points per list cannot meet 4√n (small n), the points-per-list
    bound wins. Returns at least 1.
    """
    low, high = 4 * math.sqrt(n), min(16 * math.sqrt(n), n / 30)
    nlist = 1 << max(0, math.ceil(math.log2(max(low, 1))))
    while nlist > 1 and nlist > high:
        nlist //= 2
    return nlist


def _auto_pq_m(d: int) -> int:
    # 4 dimensions per sub-quantizer: 16 bytes per 64-d vector at 8 bits.
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


def _resolve_kind(spec: IndexSpec, n: int) -> str:
    if spec.kind == "auto":
        return "flat" if n < spec.exact_below else "ivf_flat"
    if spec.kind != "flat" and n < spec.exact_below:
        logger.info("%d vectors < exact_below=%d: using exact search instead of %s", n, spec.exact_below, spec.kind)
        return "flat"
    return spec.kind


def _add_in_chunks(index: faiss.Index, x: np.ndarray) -> None:
    for start in range(0, x.shape[0], _ADD_CHUNK):
        index.add(x[start : start + _ADD_CHUNK])


def _train_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= x.shape[0]:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=size, replace=False))
    return x[rows]


def build_index(vectors, spec: IndexSpec | None = None) -> BuiltIndex:
    """Build the index ``spec`` describes over L2-normalised (N, d) float32 ``vectors``.

    The index stores row numbers 0..N-1 (faiss' sequential ids). Training uses
    a subsample (``train_points_per_list`` per list); vectors are added in
    chunks so the 10M-vector case keeps a bounded working set.
    """
    spec = spec or IndexSpec()
    x = as_float_matrix(vectors, "vectors", allow_empty=True)
    n, d = x.shape
    if n == 0:
        raise EmptyBank("cannot build an index over zero vectors")
    _check_unit_norm(x)
    t0 = time.perf_counter()
    kind = _resolve_kind(spec, n)
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in ("ivf_flat", "ivf_pq"):
        nlist = spec.nlist or auto_nlist(n)
        if nlist > n:
            raise InvalidParameter(f"nlist={nlist} is larger than the number of vectors ({n})")
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = spec.pq_m or _auto_pq_m(d)
            if d % m:
                raise InvalidParameter(f"pq_m={m} must divide the dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT)
            params.update(pq_m=m, pq_nbits=spec.pq_nbits, refine=spec.refine or 4)
        # faiss' Python wrapper keeps `quantizer` alive as long as `index`.
        params.update(nlist=nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        params.update(hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction)
    else:  # pragma: no cover - IndexSpec validates kind
        raise InvalidParameter(f"unknown index kind {kind!r}")
    # Move to the GPU before training and adding: k-means and the coarse assignment
    # of N vectors are the bulk of a build, and the GPU does them far faster.
    built = _maybe_to_gpu(BuiltIndex(index=index, kind=kind, params=params, device="cpu"), spec.use_gpu)
    if kind in ("ivf_flat", "ivf_pq"):
        per_list = min(max(spec.train_points_per_list, 30), 256)
        ntrain = per_list * params["nlist"]
        if kind == "ivf_pq":  # the PQ codebooks want >= 39 points per code as well
            ntrain = max(ntrain, 40 * (1 << spec.pq_nbits))
        params["ntrain"] = ntrain = min(n, ntrain)
        clusterings = [built.index.cp] if hasattr(built.index, "cp") else []
        if kind == "ivf_pq" and hasattr(built.index, "pq"):
            clusterings.append(built.index.pq.cp)
        for i, cp in enumerate(clusterings):  # coarse k-means, then the PQ codebooks
            cp.niter, cp.seed = spec.kmeans_iters, spec.seed
            cp.max_points_per_centroid = 256 if i == 0 else 40  # PQ: 40 points x 256 codes is plenty
        built.index.train(_train_sample(x, ntrain, spec.seed))
    _add_in_chunks(built.index, x)
    if kind in ("ivf_flat", "ivf_pq"):
        built.params["nprobe"] = spec.nprobe or _calibrate(built, x, spec, "nprobe", params["nlist"])
    elif kind == "hnsw":
        built.params["ef_search"] = spec.ef_search or _calibrate(built, x, spec, "ef_search", 1024)
    built.build_seconds = time.perf_counter() - t0
    logger.info("built %s index over %d x %d on %s in %.2fs, params %s",
                kind, n, d, built.device, built.build_seconds, built.params)
    return built


def wrap_index(index: faiss.Index, kind: str, params: dict, use_gpu: str | bool = "auto") -> BuiltIndex:
    """Wrap a CPU faiss index read from disk, copying it to a GPU when asked and possible."""
    return _maybe_to_gpu(BuiltIndex(index=index, kind=kind, params=dict(params), device="cpu"), use_gpu)


def _maybe_to_gpu(built: BuiltIndex, use_gpu: str | bool) -> BuiltIndex:
    ngpu = gpu_available()
    if use_gpu is True and ngpu == 0:
        raise InvalidParameter("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
    if use_gpu is False or ngpu == 0:
        return built
    if built.kind == "hnsw":
        logger.info("HNSW has no faiss GPU version; the index stays on the CPU")
        return built
    # Each GPU index gets its own resources (stream, scratch memory) and lock: a
    # StandardGpuResources must not be used from two threads at once, and sharing
    # one between indexes would let validating a new bank stall searches of the old.
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = built.kind == "ivf_pq"  # half-precision PQ lookup tables; IVF-Flat keeps float32
    try:
        gpu_index = faiss.index_cpu_to_gpu(res, 0, built.index, options)
    except RuntimeError as exc:  # e.g. a PQ layout the GPU kernels do not support
        if use_gpu is True:
            raise InvalidParameter(f"cannot copy the {built.kind} index to the GPU: {exc}") from exc
        logger.warning("cannot copy the %s index to the GPU, staying on the CPU: %s", built.kind, exc)
        return built
    return BuiltIndex(index=gpu_index, kind=built.kind, params=built.params, device="cuda:0",
                      build_seconds=built.build_seconds, gpu_resources=res, lock=threading.Lock())


# faiss >= 1.10 maps the arrays of flat codes and of IVF lists (flat, IVF-Flat, IVF-PQ, HNSW storage)
# as views of the file instead of copying them. IO_FLAG_MMAP alone only maps IVF lists written as
# on-disk lists, and IO_FLAG_READ_ONLY only applies to those: neither maps a flat index.
_MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", None)


def read_index_mapped(path: str) -> tuple[faiss.Index, bool]:
    """``faiss.read_index`` with the index's arrays memory-mapped from ``path``: every process that
    maps one file shares its pages (the page cache) instead of holding a copy. Returns the index
    and whether it is mapped (False on a faiss without the flag: then it was read as usual).
    A mapped index must not be added to (faiss aborts on resizing a view): ``add_vectors`` copies
    it first. The mapping outlives the file, so a version pruned while served stays readable."""
    if _MMAP_FLAGS is None:
        return faiss.read_index(path), False
    return faiss.read_index(path, _MMAP_FLAGS), True


def to_cpu_index(built: BuiltIndex) -> faiss.Index:
    """The index as a CPU faiss index (a copy for a GPU index), e.g. for ``faiss.write_index``."""
    if built.device == "cpu":
        return built.index
    with built.lock:
        return faiss.index_gpu_to_cpu(built.index)


def _search_params(built: BuiltIndex, nprobe: int | None, ef_search: int | None):
    """The faiss parameter object for one search, made once per (kind, value) and index: a search
    only reads it, so concurrent searches share it."""
    if built.kind in ("ivf_flat", "ivf_pq"):
        key = ("nprobe", int(nprobe or built.params["nprobe"]))
    elif built.kind == "hnsw":
        key = ("efSearch", int(ef_search or built.params["ef_search"]))
    else:
        return None
    params = built.search_params.get(key)
    if params is None:
        params = (faiss.SearchParametersIVF(nprobe=key[1]) if key[0] == "nprobe"
                  else faiss.SearchParametersHNSW(efSearch=key[1]))
        built.search_params[key] = params
    return params


def search(built: BuiltIndex, queries, k: int, *, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search of L2-normalised (Q, d) ``queries``.

    Returns ``D`` (Q, k) float32 similarities and ``I`` (Q, k) int64 row
    numbers, -1 where the index has fewer than k results (IVF probes only
    ``nprobe`` lists). ``nprobe`` / ``ef_search`` override the built values
    for this call only.
    """
    xq = as_float_matrix(queries, "queries", dim=built.dim)
    return search_checked(built, xq, check_k(k, built.max_k, "what this index can return in one call"),
                          nprobe=nprobe, ef_search=ef_search)


def search_checked(built: BuiltIndex, xq: np.ndarray, k: int, *, nprobe: int | None = None,
                   ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``search`` for queries ``as_float_matrix`` already checked and a k within ``max_k``."""
    if built.lock is None:
        return built.index.search(xq, k, params=_search_params(built, nprobe, ef_search))
    with built.lock:  # GPU: one user at a time, so setting nprobe here races with nobody
        if built.kind in ("ivf_flat", "ivf_pq"):
            probe = min(int(nprobe or built.params["nprobe"]), GPU_MAX_K)
            faiss.GpuParameterSpace().set_index_parameter(built.index, "nprobe", probe)
        return built.index.search(xq, k)


def add_vectors(built: BuiltIndex, vectors: np.ndarray) -> None:
    """Append L2-normalised rows (ids continue from ``ntotal``). Not safe during searches on CPU:
    the caller excludes them (``MemoryBank`` holds its write lock)."""
    x = as_float_matrix(vectors, "vectors", dim=built.dim)
    _check_unit_norm(x)
    if built.mapped:  # copy-on-write: an owned copy of the mapped index (the file stays as it is)
        built.index = faiss.deserialize_index(faiss.serialize_index(built.index))
        built.mapped = False
        logger.info("index copied out of its memory-mapped file for its first add (%d vectors)", built.ntotal)
    if built.lock is None:
        _add_in_chunks(built.index, x)
    else:
        with built.lock:
            _add_in_chunks(built.index, x)


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int,
              chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner product over ``vectors`` (float32), scanned in chunks of rows.

    Uses faiss' BLAS kernel through a temporary ``IndexFlatIP`` per chunk,
    which is several times faster here than ``faiss.knn``.
    """
    n = vectors.shape[0]
    k_eff = min(k, n)
    parts_D, parts_I = [], []
    for start in range(0, n, chunk):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors[start : start + chunk])
        D, I = flat.search(queries, min(k_eff, flat.ntotal))
        parts_D.append(D)
        parts_I.append(np.where(I >= 0, I + start, -1))
    D, I = np.concatenate(parts_D, axis=1), np.concatenate(parts_I, axis=1)
    if len(parts_D) > 1:
        order = np.argsort(-D, axis=1, kind="stable")[:, :k_eff]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if k_eff < k:
        D = np.pad(D, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return D, I


def rescore_exact(queries: np.ndarray, vectors: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate rows ``I`` (Q, F) by exact similarity to ``queries``; keep the top ``k``.

    Missing candidates (-1) sort last with similarity -inf.
    """
    valid = I >= 0
    cand = vectors[np.where(valid, I, 0)]  # (Q, F, d)
    D = np.matmul(cand, queries[:, :, None])[:, :, 0]  # (Q, F)
    D[~valid] = -np.inf
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _recall_without_self(I: np.ndarray, I_true: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    """recall@k of I against I_true after dropping each query's own row from both."""

    def first_k_others(ids):
        keep = ids != self_rows[:, None]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -2)

    approx, truth = first_k_others(I), first_k_others(I_true)
    hits = (approx[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    return float(hits.any(axis=2).sum() / max((truth >= 0).sum(), 1))


def _calibrate(built: BuiltIndex, x: np.ndarray, spec: IndexSpec, name: str, cap: int) -> int:
    """Smallest power-of-two ``nprobe`` / ``ef_search`` reaching ``spec.target_recall``.

    Queries are up to 256 stored vectors; each one's own entry is left out of
    both result lists so recall measures its neighbours, not itself. For IVF-PQ
    with ``refine=None`` the re-scoring depth doubles (4 up to 32) whenever
    more probing stops helping: then the PQ codes, not the probing, limit recall.
    """
    n = x.shape[0]
    rng = np.random.default_rng(spec.seed + 1)
    rows = np.sort(rng.choice(n, size=min(256, n), replace=False))
    k = min(_CALIBRATION_K + 1, n)
    _, I_true = exact_knn(x[rows], x, k)
    auto_refine = built.kind == "ivf_pq" and spec.refine is None
    refine = built.params.get("refine", 1)
    value = 1 if name == "nprobe" else 16
    tried = []  # (recall, value, refine)
    while True:
        fetch = min(k * refine, n)
        _, I = search(built, x[rows], fetch, **{name: value})
        if fetch > k:
            _, I = rescore_exact(x[rows], x, I, k)
        tried.append((_recall_without_self(I, I_true, rows, k - 1), value, refine))
        if tried[-1][0] >= spec.target_recall:
            break
        same = [(r, v) for r, v, f in tried if f == refine]
        plateau = len(same) >= 3 and same[-1][0] - same[-3][0] < 0.005
        if plateau or value >= cap:
            if auto_refine and refine < _MAX_REFINE:
                refine *= 2
                value = same[-3][1] if plateau else value  # probing was saturated there
                continue
            break
        value = min(value * 2, cap)
    recall, value, refine = tried[-1]
    if recall < spec.target_recall:
        best = max(t[0] for t in tried)
        recall, value, refine = min((t for t in tried if t[0] >= best - 1e-3), key=lambda t: (t[2], t[1]))
        logger.warning("%s calibration reached recall@10 %.3f < target %.3f; using %s=%d",
                       built.kind, best, spec.target_recall, name, value)
    if built.kind == "ivf_pq":
        built.params["refine"] = refine
    built.params["calibrated_recall"] = round(recall, 4)
    logger.info("%s: %s=%d (refine %d) gives recall@10 %.3f on %d stored vectors", built.kind, name, value,
                refine, recall, rows.size)
    return value
