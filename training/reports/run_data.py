"""Reading one run folder for ``ragrec report``: ``metrics.jsonl`` (one record per epoch, a
resumed epoch's later record wins), ``metrics.json`` and ``config.yaml`` when present, and
the per-epoch series the plots draw."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.reports.plotting import ReportError, ReportFileNotFoundError

WITH, WITHOUT = "with_retrieval", "without_retrieval"


# ------------------------------------------------------------------ reading


@dataclass
class RunData:
    run_dir: Path
    epochs: list[dict[str, Any]]
    final: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_ra(self) -> bool:
        return any(isinstance(r.get("valid"), dict) and WITH in r["valid"] for r in self.epochs)


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse one record per line, sorted by epoch; a later record for the same epoch (a resume) wins."""
    if not path.is_file():
        raise ReportFileNotFoundError(f"{path}: no such file (is this a training run folder?)")
    text = path.read_text(encoding="utf-8", errors="replace")
    by_epoch: dict[float, dict[str, Any]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise ReportError(f"{path}, line {n}: empty line (metrics.jsonl holds one JSON record per line)")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}, line {n}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
        epoch = rec.get("epoch")
        if not isinstance(epoch, int | float) or isinstance(epoch, bool):
            raise ReportError(f"{path}, line {n}: record has no numeric 'epoch' field")
        for key in ("train", "valid", "schedule"):
            if key in rec and not isinstance(rec[key], dict):
                raise ReportError(f"{path}, line {n}: '{key}' should be an object, got {type(rec[key]).__name__}")
        by_epoch[epoch] = rec
    if not by_epoch:
        raise ReportError(f"{path}: empty, no epoch records (did the run finish its first epoch?)")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportFileNotFoundError(f"{run_dir}: run folder does not exist")
    data = RunData(run_dir=run_dir, epochs=read_metrics_jsonl(run_dir / "metrics.jsonl"))
    final = run_dir / "metrics.json"
    if final.is_file():
        obj = _read_json(final)
        if not isinstance(obj, dict):
            raise ReportError(f"{final}: expected a JSON object, got {type(obj).__name__}")
        data.final = obj
    else:
        data.notes.append("no metrics.json: the run has not finished (per-epoch plots only).")
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            import yaml

            obj = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            data.config = obj if isinstance(obj, dict) else None
        except Exception as e:  # the config only labels the phase plot; a bad one is not fatal
            data.notes.append(f"config.yaml could not be read ({type(e).__name__}); phase names omitted.")
    return data


# ------------------------------------------------------------------ series helpers


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def get_path(rec: dict[str, Any], *path: str) -> float:
    cur: Any = rec
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return math.nan
        cur = cur[p]
    return float(cur) if is_num(cur) else math.nan


def series(epochs: Sequence[dict[str, Any]], *path: str) -> list[float] | None:
    """Values along ``path`` per epoch (NaN where missing), or None when no epoch has a number there."""
    ys = [get_path(r, *path) for r in epochs]
    return ys if any(not math.isnan(y) for y in ys) else None


def loss_keys(epochs: Sequence[dict[str, Any]]) -> list[str]:
    """Train keys that are loss components: ``loss``, ``ce``, ``cl_*``, ``loss_*`` (in first-seen order)."""
    keys: list[str] = []
    for r in epochs:
        for k, v in (r.get("train") or {}).items():
            if is_num(v) and (k in ("loss", "ce") or k.startswith(("cl_", "loss_"))) and k not in keys:
                keys.append(k)
    # the total last so it is drawn on top, dashed
    return sorted(keys, key=lambda k: k == "loss")


def phase_labels(config: dict[str, Any] | None) -> dict[int, str]:
    """``{phase index: "retriever+fusion"}`` from ``ra.unfreeze`` in config.yaml (``''`` means the whole model)."""
    try:
        phases = config["ra"]["unfreeze"]  # type: ignore[index]
        out = {}
        for i, p in enumerate(phases):
            names = ["all" if n == "" else str(n) for n in p.get("train", [])]
            out[i] = "+".join(names) if names else "?"
        return out
    except (TypeError, KeyError, AttributeError):
        return {}
