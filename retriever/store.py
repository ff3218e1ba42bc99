"""Versioned on-disk artifacts for memory banks, with an atomic ``current`` pointer.

Layout::

    <root>/v000001/   index.faiss, vectors.npy, ids.npy, alive.npy, targets.npy,
                      users.npy, positions.npy, quality.npy, [values.npy], [att.<name>.npy],
                      manifest.json
    <root>/CURRENT    the current version's name

A version is written into ``<root>/.tmp-*`` and renamed into place, so a
version directory is either complete or absent; ``CURRENT`` is replaced with
``os.replace``. ``load`` checks the manifest, every file's size and sha256,
and the parts' shapes before it returns a bank.

Loading maps the files instead of reading them: the payload columns with
``np.load(mmap_mode="c")`` and the faiss index with ``index.read_index_mapped``.
Every process serving one version (``ragrec serve --workers N``, replicas on one
host) then shares one copy of its pages in the page cache, and a version costs a
process only the pages it touches. The files are never written: the columns are
private copy-on-write mappings (an in-place edit such as ``remove`` or
``update_quality`` copies the pages it touches), the first ``MemoryBank.add``
copies the columns (they grow into new arrays) and the index (``add_vectors``).
So a process that takes live adds holds a private copy of its bank until the
next version replaces it; one that only searches never does. A mapping outlives
its file, so a version pruned by another process stays readable where served.

Limits: one writer per version name at a time is assumed (the rename refuses
a taken name and ``save`` moves on to the next); readers on other machines see
a new version once the filesystem shows the rename.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from retriever import index as ix
from retriever.bank import MemoryBank
from retriever.errors import (
    ArtifactCorrupted,
    ArtifactMismatch,
    InvalidParameter,
    RetrieverError,
    UnknownVersion,
)

__all__ = ["FORMAT", "ArtifactStore"]

logger = logging.getLogger(__name__)

FORMAT = 1  # manifest layout version
_MANIFEST = "manifest.json"
_POINTER = "CURRENT"
_INDEX_FILE = "index.faiss"
_COLUMNS = ("vectors", "ids", "alive", "targets", "users", "positions", "quality")
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_STALE_SECONDS = 3600  # leftover .tmp-/.trash- directories older than this are swept by prune()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class ArtifactStore:
    """Save, verify, load and switch memory-bank versions under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ----- versions and the pointer -----------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(names, key=lambda name: int(name[1:]))

    def current(self) -> str | None:
        """The version ``CURRENT`` names, or None before the first ``set_current``."""
        try:
            return (self.root / _POINTER).read_text().strip() or None
        except FileNotFoundError:
            return None

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` atomically (temp file, fsync, ``os.replace``)."""
        self._path(version)
        fd, tmp = tempfile.mkstemp(prefix=".pointer-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(version + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / _POINTER)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(self.root)
        logger.info("current version of %s is now %s", self.root, version)

    def rollback(self) -> str:
        """Point ``CURRENT`` at the version before it; returns that version."""
        current = self.current()
        if current is None:
            raise UnknownVersion(f"{self.root} has no current version to roll back from")
        older = [v for v in self.versions() if int(v[1:]) < int(current[1:])]
        if not older:
            raise UnknownVersion(f"no version older than {current} in {self.root} to roll back to")
        self.set_current(older[-1])
        return older[-1]

    def _path(self, version: str) -> Path:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise UnknownVersion(f"{version!r} is not a version name (expected e.g. 'v000001')")
        path = self.root / version
        if not path.is_dir():
            raise UnknownVersion(f"unknown version {version!r} in {self.root}; have {self.versions()}")
        return path

    # ----- save -------------------------------------------------------------------------------
    def save(self, bank: MemoryBank, *, producer_checksum: str | None = None,
             extra_meta: dict | None = None, make_current: bool = True,
             attachments: dict[str, np.ndarray] | None = None) -> str:
        """Write ``bank`` as a new version and return its name (also set as ``bank.version``).

        attachments: further arrays versioned and checksummed with the bank (e.g. the raw user
        ids its ``users`` column indexes), read back with ``load_attachment``; no object dtypes.
        A failure leaves no version directory behind and ``CURRENT`` untouched.
        """
        attachments = attachments or {}
        for name, arr in attachments.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or np.asarray(arr).dtype == object:
                raise InvalidParameter(f"attachment {name!r}: need a [A-Za-z0-9_] name and a non-object array")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            with bank.read_locked() as cols:
                files = {}
                for name, col in cols.items():
                    files[f"{name}.npy"] = np.ascontiguousarray(col)
                    np.save(tmp / f"{name}.npy", files[f"{name}.npy"], allow_pickle=False)
                for name, arr in attachments.items():
                    files[f"att.{name}.npy"] = np.ascontiguousarray(arr)
                    np.save(tmp / f"att.{name}.npy", files[f"att.{name}.npy"], allow_pickle=False)
                faiss.write_index(ix.to_cpu_index(bank.index), str(tmp / _INDEX_FILE))
                rows, live = cols["ids"].shape[0], len(bank)
            checksums = {}
            for name in [*files, _INDEX_FILE]:
                _fsync(tmp / name)
                checksums[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            manifest = {
                "format": FORMAT,
                "version": None,  # filled in once the name is claimed
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "producer_checksum": producer_checksum,
                "count": live,
                "rows": rows,
                "dim": bank.dim,
                "has_values": bank.has_values,
                "index": {"kind": bank.index.kind, "params": bank.index.params, "saved_from": bank.device},
                "spec": dataclasses.asdict(bank.spec),
                "files": checksums,
                "attachments": sorted(attachments),
                "extra": extra_meta or {},
            }
            version = self._claim(tmp, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bank.version = version
        logger.info("saved %d entries as %s/%s", live, self.root, version)
        if make_current:
            self.set_current(version)
        return version

    def _claim(self, tmp: Path, manifest: dict) -> str:
        # The rename fails if another writer took the name first: try the next one.
        for _ in range(100):
            existing = [int(v[1:]) for v in self.versions()]
            version = f"v{max(existing, default=0) + 1:06d}"
            manifest["version"] = version
            with open(tmp / _MANIFEST, "w") as f:
                json.dump(_jsonable(manifest), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync(tmp)
            try:
                os.rename(tmp, self.root / version)
            except OSError:
                if (self.root / version).exists():
                    continue
                raise
            _fsync(self.root)
            return version
        raise RetrieverError(f"could not claim a version name in {self.root} after 100 tries")

    # ----- load -------------------------------------------------------------------------------
    def manifest(self, version: str) -> dict:
        """The parsed manifest of ``version`` (no file checks)."""
        path = self._path(version) / _MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactCorrupted(f"{version}: {_MANIFEST} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactCorrupted(f"{version}: {_MANIFEST} is not valid JSON ({exc})") from None
        required = {"format", "version", "count", "rows", "dim", "index", "spec", "files", "has_values"}
        if not isinstance(manifest, dict) or not required <= manifest.keys():
            missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else "all"
            raise ArtifactCorrupted(f"{version}: {_MANIFEST} lacks fields {missing}")
        if manifest["format"] != FORMAT:
            raise ArtifactCorrupted(f"{version}: manifest format {manifest['format']}, this code reads {FORMAT}")
        if manifest["version"] != version:
            raise ArtifactCorrupted(f"{version}: manifest names version {manifest['version']!r}")
        return manifest

    def verify(self, version: str) -> dict:
        """Check that every file the manifest lists is present with its size and sha256."""
        manifest = self.manifest(version)
        path = self._path(version)
        needed = {f"{c}.npy" for c in _COLUMNS} | {_INDEX_FILE}
        if manifest["has_values"]:
            needed.add("values.npy")
        if not needed <= manifest["files"].keys():
            raise ArtifactCorrupted(f"{version}: manifest lists no {sorted(needed - manifest['files'].keys())}")
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise ArtifactCorrupted(f"{version}: file {name} is missing")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise ArtifactCorrupted(f"{version}: {name} has {size} bytes, manifest says {expected['bytes']} "
                                        "(truncated or replaced)")
            if _sha256(file) != expected["sha256"]:
                raise ArtifactCorrupted(f"{version}: {name} fails its sha256 check (corrupted)")
        return manifest

    def load(self, version: str | None = None, *, use_gpu: str | bool = "auto",
             expect_producer: str | None = None) -> MemoryBank:
        """Verify and load ``version`` (default: current) as a ``MemoryBank``.

        ``expect_producer`` refuses an artifact made by another producer
        (e.g. a different model checksum) with ``ArtifactMismatch``.
        """
        version = version or self.current()
        if version is None:
            raise UnknownVersion(f"{self.root} has no current version; save one first")
        manifest = self.verify(version)
        if expect_producer is not None and manifest.get("producer_checksum") != expect_producer:
            raise ArtifactMismatch(f"{version} was produced by {manifest.get('producer_checksum')!r}, "
                                   f"expected {expect_producer!r}")
        path = self._path(version)
        names = [*_COLUMNS, "values"] if manifest["has_values"] else list(_COLUMNS)
        try:
            # mapped, not read (module docstring); asarray: a plain ndarray view, not the memmap subclass
            cols = {name: np.asarray(np.load(path / f"{name}.npy", mmap_mode="c", allow_pickle=False))
                    for name in names}
        except ValueError as exc:
            raise ArtifactCorrupted(f"{version}: cannot read the arrays ({exc})") from None
        rows, dim = manifest["rows"], manifest["dim"]
        if cols["vectors"].shape != (rows, dim) or cols["vectors"].dtype != np.float32:
            raise ArtifactCorrupted(f"{version}: vectors are {cols['vectors'].dtype} {cols['vectors'].shape}, "
                                    f"manifest says float32 ({rows}, {dim})")
        if int(cols["alive"].sum()) != manifest["count"]:
            raise ArtifactCorrupted(f"{version}: {int(cols['alive'].sum())} live entries, "
                                    f"manifest says {manifest['count']}")
        try:
            index, mapped = ix.read_index_mapped(str(path / _INDEX_FILE))
        except RuntimeError as exc:
            raise ArtifactCorrupted(f"{version}: {_INDEX_FILE} cannot be read by faiss ({exc})") from None
        try:
            spec = ix.IndexSpec(**manifest["spec"])
            built = ix.wrap_index(index, manifest["index"]["kind"], manifest["index"]["params"], use_gpu)
            built.mapped = mapped and built.device == "cpu"  # a GPU copy owns its memory
            cols.setdefault("values", None)
            bank = MemoryBank.restore(**cols, index=built, spec=spec, version=version)
        except (TypeError, InvalidParameter) as exc:
            raise ArtifactCorrupted(f"{version}: parts do not fit together ({exc})") from None
        logger.info("loaded %s: %d entries, %s index on %s", version, len(bank), built.kind, built.device)
        return bank

    def load_attachment(self, version: str, name: str) -> np.ndarray:
        """An array saved with ``save(attachments=...)``, checked against its manifest sha256."""
        manifest = self.manifest(version)
        entry = manifest["files"].get(f"att.{name}.npy")
        if entry is None:
            raise UnknownVersion(f"{version} has no attachment {name!r}; it has {manifest.get('attachments', [])}")
        file = self._path(version) / f"att.{name}.npy"
        if not file.is_file() or _sha256(file) != entry["sha256"]:
            raise ArtifactCorrupted(f"{version}: attachment {name} is missing or fails its sha256 check")
        return np.load(file, allow_pickle=False)

    # ----- prune ------------------------------------------------------------------------------
    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one; returns the deleted.

        Also sweeps temp/trash directories left by crashed writers (older than an hour).
        """
        if keep < 1:
            raise InvalidParameter(f"keep must be >= 1, got {keep}")
        current = self.current()
        doomed = [v for v in self.versions()[:-keep] if v != current]
        for version in doomed:
            trash = self.root / f".trash-{version}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(self.root / version, trash)  # the version vanishes in one step
            shutil.rmtree(trash, ignore_errors=True)
        now = time.time()
        for leftover in self.root.glob(".t*-*"):
            if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        if doomed:
            logger.info("pruned %s from %s", doomed, self.root)
        return doomed
