"""``ragrec report RUN_DIR``: plots and a markdown summary of one training run.

Reads ``metrics.jsonl`` (one record per epoch) and, when present, ``metrics.json`` (final metrics),
``config.yaml`` (progressive-unfreezing phase names) and ``ablation.json`` (``{name: {mean, std}}``).
Works for plain DuoRec runs and for retrieval-augmented runs (``valid`` split into
``with_retrieval`` / ``without_retrieval``). Only plots whose data exists are drawn.

matplotlib is an optional dependency (the ``report`` extra); it is imported lazily.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import atomic_output, atomic_write_text

FIGSIZE = (8.0, 4.5)
DPI = 110
NDCG = "NDCG@10"
HR = "HR@10"
WITH, WITHOUT = "with_retrieval", "without_retrieval"

# every PNG this module may write; stale ones from an earlier report are removed
PLOT_FILES = {
    "loss": "loss.png",
    "valid": "valid_metrics.png",
    "alpha": "alpha.png",
    "retrieval": "retrieval_similarity.png",
    "schedule": "schedule.png",
    "time": "epoch_time.png",
    "ablation": "ablation.png",
}


LOSS_NAMES = {
    "ce": "next-item cross-entropy",
    "cl_unsup": "unsupervised contrastive",
    "cl_sup": "supervised contrastive",
    "loss_ce": "cross-entropy on base scores",
    "loss_ce_fused": "weighted cross-entropy on fused scores",
    "loss_kl": "weighted retrieval KL",
}


class ReportError(ValueError):
    """A run folder's files are present but cannot be read as a run (corrupt, empty, wrong shape)."""


class ReportFileNotFoundError(FileNotFoundError):
    """The run folder or its ``metrics.jsonl`` does not exist."""


class ReportDependencyError(ImportError):
    """matplotlib (the ``report`` extra) is not installed."""


# ------------------------------------------------------------------ reading


@dataclass
class RunData:
    run_dir: Path
    epochs: list[dict[str, Any]]
    final: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    ablation: dict[str, dict[str, float]] | None = None
    ablation_metric: str | None = None
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


def _read_ablation(path: Path) -> tuple[dict[str, dict[str, float]], str | None]:
    """``{name: {mean, std}}``, or ``{"metric": ..., "results": {name: {mean, std}}}``."""
    raw = _read_json(path)
    metric = None
    if isinstance(raw, dict) and isinstance(raw.get("results"), dict):
        metric = raw.get("metric") if isinstance(raw.get("metric"), str) else None
        raw = raw["results"]
    if not isinstance(raw, dict) or not raw:
        raise ReportError(f"{path}: expected a non-empty object {{name: {{mean, std}}}}")
    out: dict[str, dict[str, float]] = {}
    for name, v in raw.items():
        if not isinstance(v, dict) or not _is_num(v.get("mean")):
            raise ReportError(f"{path}: entry {name!r} needs a numeric 'mean' (and optionally 'std')")
        std = v.get("std", 0.0)
        if not _is_num(std):
            raise ReportError(f"{path}: entry {name!r} has a non-numeric 'std': {std!r}")
        out[str(name)] = {"mean": float(v["mean"]), "std": float(std)}
    return out, metric


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
    abl = run_dir / "ablation.json"
    if abl.is_file():
        data.ablation, data.ablation_metric = _read_ablation(abl)
    return data


# ------------------------------------------------------------------ series helpers


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _get(rec: dict[str, Any], *path: str) -> float:
    cur: Any = rec
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return math.nan
        cur = cur[p]
    return float(cur) if _is_num(cur) else math.nan


def _series(epochs: Sequence[dict[str, Any]], *path: str) -> list[float] | None:
    """Values along ``path`` per epoch (NaN where missing), or None when no epoch has a number there."""
    ys = [_get(r, *path) for r in epochs]
    return ys if any(not math.isnan(y) for y in ys) else None


def loss_keys(epochs: Sequence[dict[str, Any]]) -> list[str]:
    """Train keys that are loss components: ``loss``, ``ce``, ``cl_*``, ``loss_*`` (in first-seen order)."""
    keys: list[str] = []
    for r in epochs:
        for k, v in (r.get("train") or {}).items():
            if _is_num(v) and (k in ("loss", "ce") or k.startswith(("cl_", "loss_"))) and k not in keys:
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


# ------------------------------------------------------------------ plotting


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ReportDependencyError(
            "ragrec report needs matplotlib, which is in the 'report' extra: "
            "pip install 'ragrec[report]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def _new_fig(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    Figure = _matplotlib()
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _style(ax: Any, title: str, ylabel: str, xlabel: str = "epoch", legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.35)
    ax.margins(x=0.06, y=0.12)  # keep end points off the frame and out from under the legend
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _save(fig: Any, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _best_epoch_line(ax: Any, data: RunData) -> None:
    best = (data.final or {}).get("best_epoch")
    if _is_num(best):
        ax.axvline(best, color="grey", linestyle=":", linewidth=1.2, label=f"best epoch ({best})")


def plot_loss(data: RunData, path: Path) -> Path | None:
    keys = loss_keys(data.epochs)
    if not keys:
        return None
    xs = [r["epoch"] for r in data.epochs]
    fig, axes = _new_fig()
    ax = axes[0, 0]
    values: list[float] = []
    for k in keys:
        ys = _series(data.epochs, "train", k)
        if ys is None:
            continue
        values += [y for y in ys if not math.isnan(y)]
        if k == "loss":
            same = [c for c in keys if c != "loss" and _series(data.epochs, "train", c) == ys]
            label = "loss (total, weighted)" + (f" = {same[0]} here" if same else "")
            ax.plot(xs, ys, "k--", marker="o", linewidth=2, label=label)
        else:
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=3 if k == "ce" else 1.5,
                    label=f"{k} ({LOSS_NAMES[k]})" if k in LOSS_NAMES else k)
    ylabel = "loss (nats per sample, train mean)"
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")
        ylabel += ", log scale"
    _style(ax, f"Training loss components per epoch — {data.run_dir.name}", ylabel)
    return _save(fig, path)


def plot_valid(data: RunData, path: Path) -> Path | None:
    xs = [r["epoch"] for r in data.epochs]
    fig, axes = _new_fig()
    ax = axes[0, 0]
    drawn = False
    colors = {NDCG: "tab:blue", HR: "tab:orange"}
    for metric in (NDCG, HR):
        if data.is_ra:
            for variant, style, label in ((WITH, "-", "with retrieval"), (WITHOUT, "--", "without retrieval")):
                ys = _series(data.epochs, "valid", variant, metric)
                if ys is not None:
                    ax.plot(xs, ys, linestyle=style, marker="o", color=colors[metric], label=f"{metric} {label}")
                    drawn = True
        else:
            ys = _series(data.epochs, "valid", metric)
            if ys is not None:
                ax.plot(xs, ys, marker="o", color=colors[metric], label=metric)
                drawn = True
    if not drawn:
        return None
    _best_epoch_line(ax, data)
    _style(ax, f"Validation {NDCG} and {HR} per epoch — {data.run_dir.name}", "metric value (fraction, 0–1)")
    return _save(fig, path)


def plot_alpha(data: RunData, path: Path) -> Path | None:
    mean = _series(data.epochs, "train", "alpha_mean")
    if mean is None:
        return None
    xs = [r["epoch"] for r in data.epochs]
    std = _series(data.epochs, "train", "alpha_std") or [0.0] * len(xs)
    fig, axes = _new_fig()
    ax = axes[0, 0]
    ax.plot(xs, mean, marker="o", color="tab:green", label="alpha mean (train)")
    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)],
                    color="tab:green", alpha=0.2, label="± 1 std across samples")
    cap = _series(data.epochs, "schedule", "alpha_max")
    if cap is not None:
        ax.plot(xs, cap, linestyle="--", color="tab:red", marker="s", markersize=4, label="alpha_max (cap)")
    ax.set_ylim(bottom=0)
    _style(ax, f"Fusion gate alpha per epoch (mean ± std) — {data.run_dir.name}",
           "alpha (weight on retrieved context, 0–1)")
    return _save(fig, path)


def plot_retrieval(data: RunData, path: Path) -> Path | None:
    sim = _series(data.epochs, "train", "neighbour_sim")
    hit = _series(data.epochs, "train", "neighbour_hit")
    if sim is None and hit is None:
        return None
    xs = [r["epoch"] for r in data.epochs]
    fig, axes = _new_fig(1, 2)
    left, right = axes[0, 0], axes[0, 1]
    if sim is not None:
        left.plot(xs, sim, marker="o", color="tab:purple", label="mean neighbour similarity")
    _style(left, "Neighbour similarity (train)", "cosine similarity (−1…1)")
    if hit is not None:
        right.plot(xs, hit, marker="o", color="tab:brown", label="neighbour target = true next item")
    masked = _series(data.epochs, "train", "masked_by_quality")
    if masked is not None and any(m > 0 for m in masked if not math.isnan(m)):
        right.plot(xs, masked, marker="s", linestyle="--", color="tab:gray", label="masked by quality gate")
    _style(right, "Neighbour hit rate (train)", "fraction of neighbours (0–1)")
    fig.suptitle(f"Retrieval quality per epoch — {data.run_dir.name}", fontsize=11)
    return _save(fig, path)


def plot_schedule(data: RunData, path: Path) -> Path | None:
    temp = _series(data.epochs, "schedule", "temperature")
    cap = _series(data.epochs, "schedule", "alpha_max")
    phase = _series(data.epochs, "schedule", "phase")
    panels = [p for p in (temp, cap, phase) if p is not None]
    if not panels:
        return None
    xs = [r["epoch"] for r in data.epochs]
    fig, axes = _new_fig(1, len(panels))
    i = 0
    if temp is not None:
        axes[0, i].plot(xs, temp, marker="o", color="tab:blue", label="retrieval temperature")
        _style(axes[0, i], "Temperature", "temperature (unitless)")
        i += 1
    if cap is not None:
        axes[0, i].plot(xs, cap, marker="o", color="tab:red", label="alpha_max")
        _style(axes[0, i], "Gate cap alpha_max", "alpha_max (0–1)")
        i += 1
    if phase is not None:
        ax = axes[0, i]
        ax.step(xs, phase, where="post", marker="o", color="tab:green", label="unfreezing phase")
        rebuilt = [x for x, r in zip(xs, data.epochs, strict=True) if (r.get("schedule") or {}).get("rebuilt")]
        if rebuilt:
            ys = [_get(r, "schedule", "phase") for r in data.epochs if (r.get("schedule") or {}).get("rebuilt")]
            ax.plot(rebuilt, ys, linestyle="none", marker="x", markersize=9, color="black",
                    label="memory bank rebuilt")
        names = phase_labels(data.config)
        seen = sorted({int(p) for p in phase if not math.isnan(p)} | set(names))
        for p in seen:  # the phase → modules key goes in the legend, not in wide tick labels
            if p in names:
                ax.plot([], [], " ", label=f"phase {p} = {names[p]}")
        ax.set_yticks(seen)
        _style(ax, "Unfrozen modules", "unfreezing phase (index)", legend=False)
        ax.set_ylim(min(seen) - 0.5, max(seen) + 0.5)
        # the phase key is wider than one panel: a figure legend under the panels, never over them
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, framealpha=0.85)
    fig.suptitle(f"RA training schedule per epoch — {data.run_dir.name}", fontsize=11)
    return _save(fig, path)


def plot_time(data: RunData, path: Path) -> Path | None:
    secs = _series(data.epochs, "train", "seconds")
    if secs is None:
        return None
    xs = [r["epoch"] for r in data.epochs]
    wall = _series(data.epochs, "wall_seconds")
    fig, axes = _new_fig()
    ax = axes[0, 0]
    ax.bar(xs, secs, color="tab:cyan", label="train seconds this epoch")
    if wall is not None:
        prev = [0.0, *wall[:-1]]
        per_epoch = [w - p for w, p in zip(wall, prev, strict=True)]
        ax.plot(xs, per_epoch, marker="o", color="tab:red", label="wall seconds this epoch (train + eval)")
    _style(ax, f"Time per epoch — {data.run_dir.name}", "seconds")
    return _save(fig, path)


def plot_ablation(data: RunData, path: Path) -> Path | None:
    if not data.ablation:
        return None
    names = list(data.ablation)
    means = [data.ablation[n]["mean"] for n in names]
    stds = [data.ablation[n]["std"] for n in names]
    fig, axes = _new_fig()
    ax = axes[0, 0]
    pos = list(range(len(names)))
    ax.bar(pos, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8, label="mean ± std over seeds")
    ax.set_xticks(pos, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    metric = data.ablation_metric or "score"
    unit = " (fraction)" if any(m in metric for m in ("NDCG", "HR", "MRR")) else ""
    _style(ax, f"Ablation — {metric}", f"{metric}{unit}", xlabel="variant")
    ax.grid(True, axis="y", alpha=0.35)
    ax.grid(False, axis="x")
    return _save(fig, path)


PLOTTERS: list[tuple[str, str, Callable[[RunData, Path], Path | None]]] = [
    ("loss", "Training loss components", plot_loss),
    ("valid", "Validation NDCG@10 / HR@10", plot_valid),
    ("alpha", "Fusion gate alpha", plot_alpha),
    ("retrieval", "Retrieval similarity", plot_retrieval),
    ("schedule", "RA schedule", plot_schedule),
    ("time", "Time per epoch", plot_time),
    ("ablation", "Ablation", plot_ablation),
]


# ------------------------------------------------------------------ markdown


def _fmt(metric: str, v: Any) -> str:
    if not _is_num(v):
        return "—"
    if metric.startswith("Popularity"):
        return f"{v:.1f}"
    return f"{v:.4f}"


def _metric_names(*dicts: Any) -> list[str]:
    names: list[str] = []
    for d in dicts:
        for k, v in (d or {}).items() if isinstance(d, dict) else ():
            if _is_num(v) and k not in names:
                names.append(k)
    return names


def metrics_table(final: dict[str, Any]) -> str:
    """Markdown table: one row per metric, columns per split (and with/without retrieval for RA runs)."""
    cols: list[tuple[str, dict[str, Any]]] = []
    for split in ("valid", "test"):
        d = final.get(split)
        if not isinstance(d, dict):
            continue
        if WITH in d or WITHOUT in d:
            for variant, label in ((WITH, "with retrieval"), (WITHOUT, "without retrieval")):
                if isinstance(d.get(variant), dict):
                    cols.append((f"{split} {label}", d[variant]))
        else:
            cols.append((split, d))
    if not cols:
        return "_metrics.json has no valid/test metrics._\n"
    rows = _metric_names(*(c for _, c in cols))
    lines = ["| metric | " + " | ".join(name for name, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m in rows:
        lines.append(f"| {m} | " + " | ".join(_fmt(m, c.get(m)) for _, c in cols) + " |")
    return "\n".join(lines) + "\n"


def _summary_lines(data: RunData) -> list[str]:
    final = data.final or {}
    out = [f"- epochs recorded in metrics.jsonl: {len(data.epochs)} "
           f"({data.epochs[0]['epoch']}–{data.epochs[-1]['epoch']})"]
    labels = {"best_epoch": "best epoch", "epochs_run": "epochs run", "train_seconds": "train seconds",
              "pretrained": "pretrained from", "model_checksum": "model checksum",
              "chance_HR@10": "chance HR@10 (random ranking)"}
    for k, label in labels.items():
        if k in final:
            v = final[k]
            out.append(f"- {label}: {v:.4g}" if isinstance(v, float) else f"- {label}: {v}")
    boot = (final.get("test") or {}).get("delta_ndcg10_bootstrap")
    if isinstance(boot, dict) and _is_num(boot.get("mean")):
        out.append(f"- test Δ NDCG@10 (with − without retrieval), paired bootstrap: mean {boot['mean']:+.5f}, "
                   f"95% CI [{_get(boot, 'low'):+.5f}, {_get(boot, 'high'):+.5f}]")
    return out


def render_markdown(data: RunData, plots: Sequence[tuple[str, Path]]) -> str:
    kind = "retrieval-augmented (RA)" if data.is_ra else "DuoRec"
    parts = [f"# Run report: `{data.run_dir.name}`", "", f"Run folder: `{data.run_dir}` — {kind} run.", ""]
    parts += _summary_lines(data)
    parts += [f"- note: {n}" for n in data.notes]
    parts += ["", "## Final metrics", ""]
    parts.append(metrics_table(data.final) if data.final else "_No metrics.json (run unfinished)._\n")
    if data.ablation:
        parts += ["## Ablation", "", "| variant | mean | std |", "|---|---:|---:|"]
        parts += [f"| {n} | {v['mean']:.4f} | {v['std']:.4f} |" for n, v in data.ablation.items()]
        parts.append("")
    parts += ["## Plots", ""]
    for title, png in plots:
        parts += [f"### {title}", "", f"![{title}]({png.name})", ""]
    return "\n".join(parts)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write PNG plots and ``report.md`` into ``out_dir`` (default ``<run_dir>/report``); return report.md's path.

    Raises ReportFileNotFoundError (a FileNotFoundError) for a missing folder or metrics.jsonl, ReportError
    (a ValueError) for unreadable input, ReportDependencyError (an ImportError) without matplotlib.
    A ``ragrec ablate`` folder (ablation.json, no metrics.jsonl) gets the ablation report instead.
    """
    if (Path(run_dir) / "ablation.json").is_file() and not (Path(run_dir) / "metrics.jsonl").is_file():
        from training.reports.ablation_report import write_ablation_report

        return write_ablation_report(run_dir, out_dir)
    data = load_run(run_dir)
    _matplotlib()  # fail on the missing extra before writing anything
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = []
    for key, title, plot in PLOTTERS:
        target = out / PLOT_FILES[key]
        made = plot(data, target)
        if made is not None:
            plots.append((title, made))
        else:
            target.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    report = out / "report.md"
    atomic_write_text(report, render_markdown(data, plots))
    return report
