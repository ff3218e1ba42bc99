"""``ragrec ablate``: a grid of retrieval-augmented runs over seeds, from ONE DuoRec checkpoint.

    ragrec ablate --config configs/ml100k-ra-finetune.yaml --grid fusion=fixed,gated --grid kl=forward,js \\
        --seeds 3 --out runs/ablation-NAME [--set ra.epochs=4] [--only-grid]

Axes: any dotted config key (``--grid ra.values=target,both``), the aliases in ``ALIASES``
(``fusion``, ``kl``, ...) and two switches, ``unfreeze=on,off`` (off: everything trains from
the first epoch) and ``anneal=on,off`` (off: the retrieval temperature stays at t0). The
default grid is fusion × KL direction × unfreezing × annealing; ``--grid`` replaces an axis'
values or adds an axis, ``--only-grid`` drops the axes not given. Seed i runs with
``train.seed = base + i``: seeds vary the fine-tuning, the DuoRec checkpoint is shared.

Each (cell, seed) is a normal RA run in ``OUT/<cell>/seed-<s>/``. A rerun skips finished
runs (``metrics.json`` present), resumes interrupted ones (``last.pt``) and restarts the rest.
``ablation.json`` / ``ablation.md`` are rewritten after every run: per cell the mean ± std
over seeds of valid/test NDCG@10 and HR@10 with and without retrieval, the with − without
test delta, and a paired bootstrap of the per-user delta averaged over seeds; cells sorted
by validation NDCG@10 with retrieval, the best chosen on validation only.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from training.atomic import atomic_write_json, atomic_write_text
from training.checkpoints import RunError, is_finished_run
from training.config import ConfigError, RunConfig, load_config
from training.evaluate import ndcg_at, paired_bootstrap
from training.ra.finetune.fusion import FUSIONS
from training.ra.finetune.losses import KL_DIRECTIONS
from training.ra.finetune.pretrained import stage_config
from training.ra.finetune.trainer import run_ra_training

log = logging.getLogger(__name__)

ALIASES = {
    "fusion": "ra.fusion",
    "kl": "ra.kl_direction",
    "kl_direction": "ra.kl_direction",
    "attention": "ra.attention",
    "values": "ra.values",
    "k": "ra.k",
    "alpha_max": "ra.alpha_max",
}
SWITCHES = ("unfreeze", "anneal")
DEFAULT_GRID: dict[str, list[str]] = {
    "ra.fusion": sorted(FUSIONS),
    "ra.kl_direction": list(KL_DIRECTIONS),
    "unfreeze": ["on", "off"],
    "anneal": ["on", "off"],
}
# used when a switch is "on" but the base config has no schedule of its own
DEFAULT_UNFREEZE = "[{until_epoch: 1, train: [query_encoder, attention, fusion]}, {until_epoch: 1000, train: [''], lr_mult: 0.5}]"
DEFAULT_DECAY = 0.9
SELECTION = "valid NDCG@10 with retrieval, mean over seeds"
METRICS = ("NDCG@10", "HR@10")
SIDES = ("with_retrieval", "without_retrieval")


class AblationError(ConfigError):
    """An ablation that cannot run as asked; the message says why."""


@dataclass
class Cell:
    name: str  # directory name, e.g. "fusion-gated__kl-js"
    settings: dict[str, str]  # axis -> value, as given
    overrides: list[str] = field(default_factory=list)  # config overrides this cell adds


# ------------------------------------------------------------------ the grid


def parse_grid(specs: list[str], *, defaults: bool = True) -> dict[str, list[str]]:
    """['fusion=fixed,gated', ...] -> {axis: [values]}, axes resolved through ALIASES, on top of
    DEFAULT_GRID unless ``defaults`` is False. Raises AblationError on a malformed spec."""
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()} if defaults else {}
    for spec in specs:
        if "=" not in spec:
            raise AblationError(f"--grid {spec!r}: expected AXIS=V1,V2,...")
        axis, raw = (part.strip() for part in spec.split("=", 1))
        axis = ALIASES.get(axis, axis)
        values = [v.strip() for v in raw.split(",")]
        if not axis or not all(values):
            raise AblationError(f"--grid {spec!r}: empty axis or value")
        if len(set(values)) != len(values):
            raise AblationError(f"--grid {spec!r}: a value is repeated")
        if axis in SWITCHES and not set(values) <= {"on", "off"}:
            raise AblationError(f"--grid {spec!r}: {axis} takes on/off, got {values}")
        if axis not in SWITCHES and "." not in axis:
            raise AblationError(f"--grid {spec!r}: unknown axis {axis!r}; use a config key such as ra.k or one "
                                f"of {sorted([*ALIASES, *SWITCHES])}")
        grid[axis] = values
    if not grid:
        raise AblationError("the grid is empty: give at least one --grid AXIS=V1,V2")
    return grid


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _switch_overrides(axis: str, value: str, base: RunConfig) -> list[str]:
    ra = base.ra
    if axis == "unfreeze":
        if value == "off":
            return ["ra.unfreeze=[]"]
        return [] if ra.unfreeze else [f"ra.unfreeze={DEFAULT_UNFREEZE}"]
    # anneal
    if value == "off":
        return ["ra.temperature_decay=1.0"]
    return [] if ra.temperature_decay < 1.0 else [f"ra.temperature_decay={DEFAULT_DECAY}"]


def make_cells(grid: dict[str, list[str]], base: RunConfig) -> list[Cell]:
    """Every combination of the grid's values, in grid order."""
    cells = []
    axes = list(grid)
    for combo in itertools.product(*(grid[a] for a in axes)):
        settings = dict(zip(axes, combo, strict=True))
        overrides: list[str] = []
        for axis, value in settings.items():
            overrides += _switch_overrides(axis, value, base) if axis in SWITCHES else [f"{axis}={value}"]
        name = "__".join(f"{_short(a)}-{re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for a, v in settings.items())
        cells.append(Cell(name=name, settings=settings, overrides=overrides))
    return cells


# ------------------------------------------------------------------ running


def run_ablation(
    config: str | Path,
    grid_specs: list[str],
    out: str | Path,
    *,
    seeds: int = 3,
    overrides: list[str] | None = None,
    defaults: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or continue) the ablation in ``out``; returns the summary written to ablation.json."""
    if seeds < 1:
        raise AblationError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    overrides = [*(overrides or []), "ra.enabled=true"]
    base = load_config(config, overrides)
    grid = parse_grid(grid_specs, defaults=defaults)
    cells = make_cells(grid, base)
    seed_list = [base.train.seed + i for i in range(seeds)]
    # every cell's config is validated before the first run starts
    configs = {}
    for cell in cells:
        for s in seed_list:
            try:
                configs[cell.name, s] = stage_config(load_config(config, [*overrides, *cell.overrides,
                                                                          f"train.seed={s}"]))
            except (ConfigError, RunError) as exc:
                raise AblationError(f"cell {cell.name}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    plan = {"config": str(config), "overrides": overrides, "grid": grid, "seeds": seed_list,
            "cells": [c.__dict__ for c in cells]}
    plan_file = out / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text())["cells"] != plan["cells"]:
        log.warning("%s: the grid differs from the earlier plan.json; finished runs of matching cells are kept",
                    out)
    atomic_write_json(plan_file, plan)

    failures: dict[str, str] = {}
    began = time.perf_counter()
    total, done = len(cells) * len(seed_list), 0
    for cell in cells:
        for s in seed_list:
            run = out / cell.name / f"seed-{s}"
            done += 1
            cfg = configs[cell.name, s]
            if is_finished_run(run):
                if yaml.safe_load((run / "config.yaml").read_text()) != cfg.model_dump():
                    raise AblationError(f"{run} holds a finished run of another config; move it away or "
                                        "choose another --out")
                log.info("[%d/%d] %s seed %d: finished earlier, skipped", done, total, cell.name, s)
                continue
            resume = (run / "last.pt").is_file()
            if run.exists() and not resume:  # started but no epoch finished: start over
                shutil.rmtree(run)
            log.info("[%d/%d] %s seed %d: %s", done, total, cell.name, s, "resuming" if resume else "starting")
            try:
                run_ra_training(cfg, run, resume=resume, progress=progress)
            except (ValueError, RuntimeError) as exc:  # a bad cell must not sink the grid
                failures[f"{cell.name}/seed-{s}"] = f"{type(exc).__name__}: {exc}"
                log.error("%s seed %d failed: %s", cell.name, s, exc)
            write_summary(out, cells, seed_list, base, grid, failures, time.perf_counter() - began)
    return write_summary(out, cells, seed_list, base, grid, failures, time.perf_counter() - began)


# ------------------------------------------------------------------ summary


def _mean_std(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in arr]}


def _epoch_seconds(run: Path) -> tuple[float, float, float]:
    """(mean wall seconds per epoch incl. rebuilds and validation, mean training-loop seconds,
    total seconds of all epochs)."""
    epoch, train = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("seconds"), dict):
            epoch.append(rec["seconds"]["epoch"])
            train.append(rec["seconds"]["train"])
    if not epoch:
        return math.nan, math.nan, 0.0
    return float(np.mean(epoch)), float(np.mean(train)), float(np.sum(epoch))


def summarise_cell(out: Path, cell: Cell, seeds: list[int], boot_seed: int = 0) -> dict[str, Any] | None:
    runs = [out / cell.name / f"seed-{s}" for s in seeds]
    runs = [r for r in runs if is_finished_run(r)]
    if not runs:
        return None
    finals = [json.loads((r / "metrics.json").read_text()) for r in runs]
    row: dict[str, Any] = {"name": cell.name, "settings": cell.settings, "overrides": cell.overrides,
                           "seeds": [int(r.name.split("-", 1)[1]) for r in runs], "n": len(runs)}
    for split in ("valid", "test"):
        row[split] = {side: {m: _mean_std([f[split][side][m] for f in finals]) for m in METRICS} for side in SIDES}
    deltas = [f["test"]["with_retrieval"]["NDCG@10"] - f["test"]["without_retrieval"]["NDCG@10"] for f in finals]
    row["delta_test_ndcg10"] = _mean_std(deltas)
    without = row["test"]["without_retrieval"]["NDCG@10"]["mean"]
    row["ratio_test_ndcg10"] = row["test"]["with_retrieval"]["NDCG@10"]["mean"] / without if without else None
    # per-user NDCG@10 delta averaged over the seeds, then a paired bootstrap over users
    per_user = []
    for r in runs:
        with np.load(r / "ranks.npz") as z:
            per_user.append((ndcg_at(z["test_with_retrieval"], 10), ndcg_at(z["test_without_retrieval"], 10)))
    row["delta_test_ndcg10_bootstrap"] = paired_bootstrap(np.mean([a for a, _ in per_user], axis=0),
                                                          np.mean([b for _, b in per_user], axis=0), seed=boot_seed)
    seconds = [_epoch_seconds(r) for r in runs]
    row["seconds_per_epoch"] = float(np.mean([s[0] for s in seconds]))
    row["train_seconds_per_epoch"] = float(np.mean([s[1] for s in seconds]))
    row["run_seconds"] = float(sum(s[2] for s in seconds))
    row["epochs_run"] = [int(f["epochs_run"]) for f in finals]
    row["best_epoch"] = [int(f["best_epoch"]) for f in finals]
    return row


def _pretrained_metrics(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    p = Path(path)
    final = (p if p.is_dir() else p.parent) / "metrics.json"
    if not final.is_file():
        return None
    obj = json.loads(final.read_text())
    return {split: {m: obj[split][m] for m in METRICS} for split in ("valid", "test") if split in obj}


def write_summary(out: Path, cells: list[Cell], seeds: list[int], base: RunConfig, grid: dict[str, list[str]],
                  failures: dict[str, str], wall_seconds: float) -> dict[str, Any]:
    rows = [r for c in cells if (r := summarise_cell(out, c, seeds, base.train.seed)) is not None]
    rows.sort(key=lambda r: r["valid"]["with_retrieval"]["NDCG@10"]["mean"], reverse=True)
    summary: dict[str, Any] = {
        "selection": SELECTION, "pretrained": base.ra.pretrained,
        "pretrained_metrics": _pretrained_metrics(base.ra.pretrained), "grid": grid, "seeds": seeds,
        "runs_finished": sum(r["n"] for r in rows), "runs_total": len(cells) * len(seeds),
        "failures": failures, "wall_seconds": wall_seconds,
        "run_seconds": float(sum(r["run_seconds"] for r in rows)), "cells": rows,
        "best": rows[0]["name"] if rows else None,
    }
    if rows:
        best = rows[0]
        test_with = best["test"]["with_retrieval"]["NDCG@10"]["mean"]
        check = {"cell": best["name"], "test_with": test_with,
                 "test_without": best["test"]["without_retrieval"]["NDCG@10"]["mean"],
                 "ratio_vs_without": best["ratio_test_ndcg10"],
                 "bootstrap": best["delta_test_ndcg10_bootstrap"]}
        check["meets_1.05_vs_without"] = bool(check["ratio_vs_without"] and check["ratio_vs_without"] >= 1.05
                                              and check["bootstrap"]["low"] > 0)
        duorec = (summary["pretrained_metrics"] or {}).get("test", {}).get("NDCG@10")
        if duorec:
            check["duorec_test"] = duorec
            check["ratio_vs_duorec"] = test_with / duorec
        summary["best_check"] = check
    atomic_write_json(out / "ablation.json", summary)
    atomic_write_text(out / "ablation.md", render_markdown(summary))
    return summary


def _pm(d: dict[str, Any]) -> str:
    return f"{d['mean']:.4f} ± {d['std']:.4f}"


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Ablation", "",
             f"Pretrained DuoRec run: `{summary['pretrained']}`; seeds {summary['seeds']}; "
             f"{summary['runs_finished']}/{summary['runs_total']} runs finished; "
             f"{summary['run_seconds'] / 60:.1f} min of epochs in all ({summary['wall_seconds'] / 60:.1f} min "
             "this session).", "",
             f"Sorted by {summary['selection']} (the selection criterion; test is reported, never used to choose).",
             "Mean ± std over seeds. Δ = with − without retrieval (test NDCG@10); CI = paired bootstrap 95% "
             "interval of the per-user Δ averaged over seeds.", "",
             "| cell | valid NDCG@10 with | valid NDCG@10 without | valid HR@10 with | test NDCG@10 with "
             "| test NDCG@10 without | test HR@10 with | test HR@10 without | Δ test NDCG@10 | CI | ratio "
             "| s/epoch | n |",
             "|---|" + "---:|" * 12]
    for r in summary["cells"]:
        v, t, b = r["valid"], r["test"], r["delta_test_ndcg10_bootstrap"]
        ratio = f"{r['ratio_test_ndcg10']:.3f}" if r["ratio_test_ndcg10"] else "—"
        lines.append(
            f"| {r['name']} | {_pm(v['with_retrieval']['NDCG@10'])} | {_pm(v['without_retrieval']['NDCG@10'])} "
            f"| {_pm(v['with_retrieval']['HR@10'])} | {_pm(t['with_retrieval']['NDCG@10'])} "
            f"| {_pm(t['without_retrieval']['NDCG@10'])} | {_pm(t['with_retrieval']['HR@10'])} "
            f"| {_pm(t['without_retrieval']['HR@10'])} | {r['delta_test_ndcg10']['mean']:+.4f} "
            f"| [{b['low']:+.4f}, {b['high']:+.4f}] | {ratio} | {r['seconds_per_epoch']:.1f} | {r['n']} |")
    if summary.get("best_check"):
        c = summary["best_check"]
        lines += ["", f"**Best on validation: `{c['cell']}`.** Test NDCG@10 {c['test_with']:.4f} with retrieval vs "
                  f"{c['test_without']:.4f} without (ratio {c['ratio_vs_without']:.3f}; paired bootstrap of Δ "
                  f"[{c['bootstrap']['low']:+.4f}, {c['bootstrap']['high']:+.4f}]). "
                  f"Target ≥ 1.05 × without with the interval above 0: "
                  f"{'met' if c['meets_1.05_vs_without'] else 'not met'}."]
        if "ratio_vs_duorec" in c:
            lines.append(f"Against the DuoRec checkpoint (test NDCG@10 {c['duorec_test']:.4f}): "
                         f"ratio {c['ratio_vs_duorec']:.3f}.")
    if summary["failures"]:
        lines += ["", "## Failed runs", ""] + [f"- `{k}`: {v}" for k, v in summary["failures"].items()]
    return "\n".join(lines) + "\n"
