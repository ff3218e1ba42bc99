import json

import faiss
import numpy as np
import pytest

from retriever.bank import MemoryBank
from retriever.errors import ArtifactCorrupted, ArtifactMismatch, InvalidParameter, UnknownVersion
from retriever.index import IndexSpec
from retriever.store import ArtifactStore
from retriever.synthetic import clustered


@pytest.fixture
def bank():
    x = clustered(3_000, 16, seed=21)
    n = len(x)
    values = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return MemoryBank(x, np.arange(n) % 50, np.arange(n) // 10, np.arange(n) % 10,
                      quality=np.linspace(0, 1, n), values=values,
                      spec=IndexSpec(kind="ivf_flat", exact_below=0))


def test_round_trip_keeps_arrays_index_and_results(tmp_path, bank):
    bank.remove([5, 6])
    bank.add(clustered(10, 16, seed=5), [1] * 10, [9] * 10, [0] * 10, values=np.ones((10, 2)))
    store = ArtifactStore(tmp_path)
    version = store.save(bank, producer_checksum="model-abc", extra_meta={"epoch": 3})
    assert version == "v000001" and bank.version == version and store.current() == version
    loaded = store.load()
    assert loaded.version == version and len(loaded) == len(bank) == 3_008
    assert loaded.index.kind == "ivf_flat" and loaded.index.params == bank.index.params
    q = clustered(30, 16, seed=22, n_clusters=55)
    a, b = bank.search(q, 7, quality_threshold=0.3), loaded.search(q, 7, quality_threshold=0.3)
    for field in ("D", "I", "targets", "users", "positions", "quality", "low_quality", "values"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    manifest = json.loads((tmp_path / version / "manifest.json").read_text())
    assert manifest["producer_checksum"] == "model-abc" and manifest["extra"] == {"epoch": 3}
    assert manifest["count"] == 3_008 and manifest["rows"] == 3_010 and manifest["dim"] == 16
    assert manifest["index"]["kind"] == "ivf_flat" and manifest["index"]["params"]["nlist"] > 1
    assert set(manifest["files"]) == {"index.faiss", "vectors.npy", "ids.npy", "alive.npy", "targets.npy",
                                      "users.npy", "positions.npy", "quality.npy", "values.npy"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert loaded.add(q[:1], [0], [0], [0], values=[[0.0, 0.0]])[0] == 3_010  # ids continue after a load


def test_versions_pointer_rollback_and_prune(tmp_path, bank):
    store = ArtifactStore(tmp_path)
    names = [store.save(bank) for _ in range(4)]
    assert names == ["v000001", "v000002", "v000003", "v000004"] == store.versions()
    assert store.current() == "v000004"
    assert store.rollback() == "v000003" and store.current() == "v000003"
    assert store.load().version == "v000003"
    assert store.save(bank, make_current=False) == "v000005" and store.current() == "v000003"
    removed = store.prune(keep=2)
    assert removed == ["v000001", "v000002"]  # v000003 is current: kept although old
    assert store.versions() == ["v000003", "v000004", "v000005"]
    store.set_current("v000005")
    assert store.prune(keep=1) == ["v000003", "v000004"]
    with pytest.raises(UnknownVersion, match="no version older"):
        store.rollback()
    with pytest.raises(InvalidParameter, match="keep must be"):
        store.prune(keep=0)


def test_unknown_and_missing_versions(tmp_path, bank):
    store = ArtifactStore(tmp_path)
    with pytest.raises(UnknownVersion, match="no current version"):
        store.load()
    with pytest.raises(UnknownVersion, match="no current version to roll back"):
        store.rollback()
    store.save(bank)
    with pytest.raises(UnknownVersion, match="unknown version 'v000009'"):
        store.load("v000009")
    with pytest.raises(UnknownVersion, match="not a version name"):
        store.set_current("../etc")


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _flip_byte(d / "vectors.npy", 500), "vectors.npy fails its sha256"),
        (lambda d: _flip_byte(d / "index.faiss", 100), "index.faiss fails its sha256"),
        (lambda d: (d / "users.npy").write_bytes((d / "users.npy").read_bytes()[:-8]), "users.npy has .*truncated"),
        (lambda d: (d / "alive.npy").unlink(), "alive.npy is missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    ],
    ids=["flipped-vectors", "flipped-index", "truncated", "missing-file", "bad-json", "no-manifest"],
)
def test_damaged_artifacts_are_refused(tmp_path, bank, damage, message):
    store = ArtifactStore(tmp_path)
    version = store.save(bank)
    damage(tmp_path / version)
    with pytest.raises(ArtifactCorrupted, match=message):
        store.load(version)


def test_mismatched_manifest_and_producer_are_refused(tmp_path, bank):
    store = ArtifactStore(tmp_path)
    version = store.save(bank, producer_checksum="model-1")
    with pytest.raises(ArtifactMismatch, match="produced by 'model-1', expected 'model-2'"):
        store.load(expect_producer="model-2")
    path = tmp_path / version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["count"] += 1  # consistent checksums, inconsistent content
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactCorrupted, match="live entries, manifest says"):
        store.load(version)
    manifest["version"] = "v000777"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactCorrupted, match="manifest names version"):
        store.load(version)


def test_failed_save_leaves_no_version_and_keeps_current(tmp_path, bank, monkeypatch):
    store = ArtifactStore(tmp_path)
    first = store.save(bank)

    def broken_write(index, path):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.save(bank)
    assert store.versions() == [first] and store.current() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", first]


def _mapped_file(arr: np.ndarray) -> str | None:
    """The file an array is a view of (through its base chain), None for memory of its own."""
    while arr is not None:
        if isinstance(arr, np.memmap):
            return str(arr.filename)
        arr = arr.base
    return None


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_loads_map_one_file_and_copy_on_the_first_add(tmp_path, kind):
    """Two loads of a version share its files (mapped, not read); a live add in one copies that
    one's bank and leaves the files and the other load as they were."""
    x = clustered(3_000, 16, seed=21)
    n = len(x)
    bank = MemoryBank(x, np.arange(n) % 50, np.arange(n) // 10, np.arange(n) % 10,
                      values=np.ones((n, 2), dtype=np.float32), spec=IndexSpec(kind=kind, exact_below=0))
    store = ArtifactStore(tmp_path)
    version = store.save(bank)
    a, b = store.load(version, use_gpu=False), store.load(version, use_gpu=False)
    for loaded in (a, b):
        assert loaded.index.mapped and loaded.index.kind == kind
        with loaded.read_locked() as cols:
            for name in ("vectors", "targets", "values", "alive", "quality"):
                assert _mapped_file(cols[name]) == str(tmp_path / version / f"{name}.npy"), name
    q = clustered(20, 16, seed=22, n_clusters=55)
    before = b.search(q, 5)
    np.testing.assert_array_equal(a.search(q, 5).I, before.I)

    new = clustered(3, 16, seed=9)
    ids = a.add(new, [7] * 3, [999] * 3, [0] * 3, values=np.zeros((3, 2)))
    a.update_quality(ids[:1], [0.0], momentum=0.0)
    assert not a.index.mapped and len(a) == n + 3
    hit = a.search(new, 1)
    np.testing.assert_array_equal(hit.I[:, 0], ids)  # the added entries are found, payload and all
    assert (hit.users[:, 0] == 999).all() and hit.quality[0, 0] == 0.0
    assert b.index.mapped and len(b) == n and b.index.ntotal == n  # the other load saw nothing
    np.testing.assert_array_equal(b.search(q, 5).I, before.I)
    store.verify(version)  # the files are as saved (sizes and sha256)
    assert len(store.load(version, use_gpu=False)) == n
