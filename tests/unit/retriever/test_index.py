import math
import threading

import numpy as np
import pytest

from retriever import index as ix
from retriever.errors import DimensionMismatch, EmptyBank, InvalidParameter, InvalidVectors
from retriever.synthetic import clustered, iter_clustered

HAS_GPU = ix.gpu_available() > 0


@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000])
def test_auto_nlist_follows_faiss_guidance(n):
    nlist = ix.auto_nlist(n)
    assert 4 * math.sqrt(n) <= nlist <= 16 * math.sqrt(n)
    assert n / nlist >= 30
    assert nlist & (nlist - 1) == 0


def test_auto_nlist_small_collections_keep_30_points_per_list():
    assert ix.auto_nlist(1_000) == 32
    assert ix.auto_nlist(10) == 1


def test_normalize_rows_and_rejects_bad_rows():
    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    out = ix.normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    with pytest.raises(InvalidVectors, match="zero row"):
        ix.normalize(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(InvalidVectors, match="NaN or inf"):
        ix.normalize(np.array([[1.0, np.nan]]))
    with pytest.raises(InvalidVectors, match="2-D"):
        ix.normalize(np.ones(3))
    with pytest.raises(InvalidVectors, match="floating"):
        ix.normalize(np.ones((2, 2), dtype=np.int64))


def test_flat_index_matches_brute_force_exactly(brute_force):
    x = clustered(3_000, 32, seed=5)
    q = clustered(50, 32, seed=6, n_clusters=55)
    built = ix.build_index(x, ix.IndexSpec(kind="flat", use_gpu=False))
    assert built.kind == "flat" and built.device == "cpu"
    D, I = ix.search(built, q, 10)
    D_true, I_true = brute_force(q, x, 10)
    np.testing.assert_array_equal(I, I_true)
    np.testing.assert_allclose(D, D_true, atol=1e-5)


def test_small_collections_fall_back_to_exact():
    x = clustered(500, 16)
    for kind in ("auto", "ivf_flat", "ivf_pq", "hnsw"):
        assert ix.build_index(x, ix.IndexSpec(kind=kind)).kind == "flat"
    assert ix.build_index(x, ix.IndexSpec(kind="ivf_flat", exact_below=0)).kind == "ivf_flat"


def test_per_call_nprobe_leaves_shared_index_untouched():
    """CPU indexes take nprobe per call (a GPU index sets it under its own lock instead)."""
    x = clustered(5_000, 16, seed=2)
    built = ix.build_index(x, ix.IndexSpec(kind="ivf_flat", exact_below=0, nprobe=1, use_gpu=False))
    before = built.index.nprobe
    D1, _ = ix.search(built, x[:20], 5)
    Dall, _ = ix.search(built, x[:20], 5, nprobe=built.params["nlist"])
    assert built.index.nprobe == before
    assert (Dall >= D1 - 1e-6).all()  # probing every list can only find better neighbours


def test_concurrent_searches_with_different_nprobe_agree_with_sequential():
    x = clustered(20_000, 32, seed=4)
    built = ix.build_index(x, ix.IndexSpec(kind="ivf_flat", exact_below=0))
    q = x[:200]
    expected = {p: ix.search(built, q, 10, nprobe=p)[1] for p in (1, 4, 32)}
    errors = []

    def worker(p):
        for _ in range(20):
            if not np.array_equal(ix.search(built, q, 10, nprobe=p)[1], expected[p]):
                errors.append(p)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (1, 4, 32, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.slow) for k in ("ivf_flat", "ivf_pq", "hnsw")]  # 100k vectors each
)
def test_approximate_kinds_reach_recall_on_100k(kind, data_100k, brute_force, recall_at):
    """recall@10 >= 0.95 at the auto-chosen parameters, against numpy brute force."""
    from retriever.bank import MemoryBank  # IVF-PQ is re-scored by the bank

    x, q = data_100k
    n = len(x)
    bank = MemoryBank(x, np.zeros(n, int), np.zeros(n, int), np.zeros(n, int), spec=ix.IndexSpec(kind=kind))
    assert bank.index.kind == kind
    result = bank.search(q, 10)
    _, I_true = brute_force(q, x, 10)
    assert recall_at(result.I, I_true) >= 0.95, bank.index.params


@pytest.mark.slow
def test_ivf_pq_without_refine_is_approximate_but_close(data_100k, brute_force, recall_at):
    x, q = data_100k
    built = ix.build_index(x[:20_000], ix.IndexSpec(kind="ivf_pq", refine=1, target_recall=0.5))
    _, I = ix.search(built, q, 10)
    _, I_true = brute_force(q, x[:20_000], 10)
    assert 0.3 < recall_at(I, I_true) < 1.0


def test_exact_knn_chunks_merge_like_one_scan(brute_force):
    x = clustered(5_000, 16, seed=8)
    q = clustered(20, 16, seed=9, n_clusters=71)
    D, I = ix.exact_knn(q, x, 7, chunk=1_000)
    D_true, I_true = brute_force(q, x, 7)
    np.testing.assert_array_equal(I, I_true)
    np.testing.assert_allclose(D, D_true, atol=1e-5)
    D, I = ix.exact_knn(q, x[:3], 5)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()


def test_rescore_exact_orders_by_true_similarity():
    x = ix.normalize(np.eye(4)[:3] + 0.1)
    q = x[[1]]
    D, I = ix.rescore_exact(q, x, np.array([[0, 2, -1, 1]]), 3)
    assert I.tolist() == [[1, 0, 2]]
    assert D[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_raise_specific_errors():
    x = clustered(1_000, 16)
    built = ix.build_index(x)
    with pytest.raises(DimensionMismatch, match="dimension 8, expected 16"):
        ix.search(built, np.ones((2, 8), np.float32), 5)
    with pytest.raises(InvalidParameter, match="k must be positive"):
        ix.search(built, x[:2], 0)
    with pytest.raises(InvalidParameter, match="larger than"):
        ix.search(built, x[:2], 1_001)
    with pytest.raises(InvalidVectors, match="NaN or inf"):
        ix.search(built, np.full((1, 16), np.inf, np.float32), 5)
    with pytest.raises(InvalidVectors, match="L2-normalised"):
        ix.build_index(x * 3)
    with pytest.raises(EmptyBank):
        ix.build_index(np.zeros((0, 16), np.float32))
    with pytest.raises(InvalidParameter, match="unknown index kind"):
        ix.IndexSpec(kind="lsh")
    with pytest.raises(InvalidParameter, match="pq_m=5 must divide"):
        ix.build_index(clustered(12_000, 16), ix.IndexSpec(kind="ivf_pq", pq_m=5, exact_below=0))


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_requiring_a_gpu_without_one_is_an_error():
    with pytest.raises(InvalidParameter, match="sees no GPU"):
        ix.build_index(clustered(100, 8), ix.IndexSpec(use_gpu=True))


def test_synthetic_chunks_equal_whole():
    whole = clustered(1_000, 8, seed=3, chunk=300)
    parts = np.concatenate(list(iter_clustered(1_000, 8, seed=3, chunk=300)))
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="faiss sees no GPU")
def test_gpu_index_matches_cpu_and_brute_force(tmp_path, brute_force, recall_at):
    from retriever.bank import MemoryBank
    from retriever.store import ArtifactStore

    x = clustered(50_000, 64, seed=11)
    q = clustered(200, 64, seed=12, n_clusters=224)
    n = len(x)
    _, I_true = brute_force(q, x, 10)
    for kind in ("flat", "ivf_flat", "ivf_pq"):
        spec = ix.IndexSpec(kind=kind, use_gpu=True, exact_below=0)
        bank = MemoryBank(x, np.arange(n), np.arange(n) // 10, np.arange(n) % 10, spec=spec)
        assert bank.device == "cuda:0", kind
        result = bank.search(q, 10)
        assert recall_at(result.I, I_true) >= (0.999 if kind == "flat" else 0.95), kind
        version = ArtifactStore(tmp_path / kind).save(bank)  # copied to the CPU for writing
        loaded = ArtifactStore(tmp_path / kind).load(version)
        assert loaded.device == "cuda:0"
        np.testing.assert_array_equal(loaded.search(q, 10).I, result.I)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="faiss sees no GPU")
def test_gpu_exclusions_past_the_k_cap_fall_back_on_the_host(brute_force):
    """A GPU answers k <= 2048; a user owning the 3,000 nearest entries still leaves k results."""
    from retriever.bank import MemoryBank

    rng = np.random.default_rng(3)
    centers = rng.standard_normal((4, 32))
    x = np.repeat(centers, 3_000, axis=0) + 0.05 * rng.standard_normal((12_000, 32))
    users = np.repeat(np.arange(4), 3_000)
    bank = MemoryBank(x, users, users, np.zeros(12_000, int), spec=ix.IndexSpec(kind="flat", use_gpu=True))
    assert bank.device == "cuda:0" and bank.index.max_k == ix.GPU_MAX_K
    rows = np.array([0, 3_000, 6_000, 9_000])
    result = bank.search(x[rows], 10, exclude_user=users[rows])
    _, I_true = brute_force(x[rows], x, 10, users[None, :] == users[rows][:, None])
    np.testing.assert_array_equal(result.I, I_true)
