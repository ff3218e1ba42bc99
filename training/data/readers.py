"""Readers for interaction logs: RecBole atomic ``.inter`` files, CSV and Parquet.

Rows come back in file order with string ids; ordering by time and encoding happen in
``training.data.sequences``. Every problem raises ``DataError`` with one line naming the file,
column or line and what was expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMATS = {".inter": "inter", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """A data file or dataset that cannot be used; the message names the file/column and what was expected."""



@dataclass(frozen=True, eq=False)  # eq=False: == on numpy fields would be ambiguous
class Interactions:
    """A raw interaction log, rows in file order. Ids are external strings."""

    users: np.ndarray  # (N,) object, str
    items: np.ndarray  # (N,) object, str
    timestamps: np.ndarray  # (N,) float64

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", as_str_array(self.users))
        object.__setattr__(self, "items", as_str_array(self.items))
        object.__setattr__(self, "timestamps", np.asarray(self.timestamps, dtype=np.float64))
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError(
                f"Interactions columns differ in length: users {n}, items {len(self.items)}, "
                f"timestamps {len(self.timestamps)}"
            )

    def __len__(self) -> int:
        return len(self.users)


def as_str_array(values: Iterable[object]) -> np.ndarray:
    """(N,) object array of str. Numbers are turned into their decimal strings; object input is kept."""
    if not isinstance(values, np.ndarray | list | tuple | pd.Series | pd.Index):
        values = list(values)  # generators and other one-shot iterables
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d array of ids, got shape {arr.shape}")
    if arr.dtype == object:
        return arr
    return arr.astype(str).astype(object)


def read_interactions(
    path: str | os.PathLike[str],
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    fmt: str | None = None,
) -> Interactions:
    """Read a RecBole atomic `.inter` file (tab-separated, `name:type` headers), a CSV or a Parquet file.

    Only the user, item and time columns are read. `time_col=None` uses file order as time.
    Raises DataError naming the file and the problem for anything it cannot use.
    """
    path = Path(path)
    if fmt is None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                f"expected one of {sorted(FORMATS)} or pass fmt='inter'|'csv'|'parquet'"
            )
    if fmt not in ("inter", "csv", "parquet"):
        raise DataError(f"unknown data format {fmt!r}; expected 'inter', 'csv' or 'parquet'")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    wanted = [user_col, item_col] + ([time_col] if time_col else [])
    if len(set(wanted)) != len(wanted):
        raise DataError(f"user, item and time columns must differ, got {wanted}")

    try:
        frame, row_label = (_read_parquet if fmt == "parquet" else _read_text)(path, fmt, wanted)
    except DataError:
        raise
    except (ValueError, OSError, pa.ArrowException) as exc:  # pandas' ParserError, UnicodeDecodeError, ...
        raise DataError(f"{path}: not a readable {fmt} file: {exc}".rstrip()) from exc
    if len(frame) == 0:
        raise DataError(f"{path}: no interactions (the file has a header but no rows)")

    users = _id_column(frame, user_col, path, row_label)
    items = _id_column(frame, item_col, path, row_label)
    if time_col:
        timestamps = _time_column(frame, time_col, path, row_label)
    else:
        timestamps = np.arange(len(frame), dtype=np.float64)
    return Interactions(users, items, timestamps)


def _read_text(path: Path, fmt: str, wanted: list[str]) -> tuple[pd.DataFrame, str]:
    sep = "\t" if fmt == "inter" else ","
    try:
        header = pd.read_csv(path, sep=sep, nrows=0, dtype=str).columns.tolist()
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file; expected a header line with columns {wanted}") from exc
    # RecBole headers carry the field type ("user_id:token"); columns are matched without it.
    names = [h.split(":", 1)[0] for h in header] if fmt == "inter" else header
    raw = _match_columns(path, names, header, wanted)
    # All columns are parsed (not usecols) so that a row with too many fields is an error, not ignored.
    frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    return frame[list(raw.values())].rename(columns={r: w for w, r in raw.items()}), "line"


def _read_parquet(path: Path, fmt: str, wanted: list[str]) -> tuple[pd.DataFrame, str]:
    names = pq.read_schema(path).names
    raw = _match_columns(path, names, names, wanted)
    table = pq.read_table(path, columns=list(raw.values()))
    return table.to_pandas().rename(columns={r: w for w, r in raw.items()}), "row"


def _match_columns(path: Path, names: list[str], header: list[str], wanted: list[str]) -> dict[str, str]:
    """Map each wanted column name to its raw header name, or raise naming the missing one."""
    raw: dict[str, str] = {}
    for name, head in zip(names, header, strict=True):
        if name in wanted:
            if name in raw:
                raise DataError(f"{path}: column {name!r} appears twice ({raw[name]!r} and {head!r})")
            raw[name] = head
    for name in wanted:
        if name not in raw:
            raise DataError(f"{path}: missing column {name!r}; the file has columns {names}")
    return raw


def _where(row_label: str, index: int) -> str:
    # Text files: +2 turns a 0-based data row into a 1-based line number after the header.
    return f"line {index + 2}" if row_label == "line" else f"row {index}"


def _id_column(frame: pd.DataFrame, col: str, path: Path, row_label: str) -> np.ndarray:
    series = frame[col]
    if not (pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series)):
        series = series.astype(str).where(series.notna())  # numeric ids in Parquet become strings
    bad = series.isna().to_numpy() | (series.to_numpy(dtype=object) == "")
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: column {col!r} has {int(bad.sum())} empty id(s), first at {_where(row_label, first)}"
        )
    return series.to_numpy(dtype=object)


def _time_column(frame: pd.DataFrame, col: str, path: Path, row_label: str) -> np.ndarray:
    series = frame[col]
    if pd.api.types.is_datetime64_any_dtype(series):
        epoch = pd.Timestamp(0, tz=series.dt.tz)
        series = (series - epoch) / pd.Timedelta(seconds=1)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: column {col!r} must hold finite numbers (or datetimes); "
            f"{_where(row_label, first)} has {frame[col].iloc[first]!r}"
        )
    return values


