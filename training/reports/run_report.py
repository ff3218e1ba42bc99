"""``ragrec report RUN_DIR``: plots and a markdown summary of one training run.

Reads ``metrics.jsonl`` (one record per epoch) and, when present, ``metrics.json`` (final metrics)
and ``config.yaml`` (progressive-unfreezing phase names). A ``ragrec ablate`` folder gets
``ablation_report.py``'s report instead.
Works for plain DuoRec runs and for retrieval-augmented runs (``valid`` split into
``with_retrieval`` / ``without_retrieval``). Only plots whose data exists are drawn.

matplotlib is an optional dependency (the ``report`` extra); it is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.atomic import atomic_output, atomic_write_text
from training.reports.ablation_report import write_ablation_report
from training.reports.plotting import (
    figure_class,
)
from training.reports.run_data import (
    WITH,
    WITHOUT,
    RunData,
    get_path,
    is_num,
    load_run,
    loss_keys,
    phase_labels,
    series,
)

FIGSIZE = (8.0, 4.5)
DPI = 110
NDCG = "NDCG@10"
HR = "HR@10"

# every PNG this module may write; stale ones from an earlier report are removed
PLOT_FILES = {
    "loss": "loss.png",
    "valid": "valid_metrics.png",
    "alpha": "alpha.png",
    "retrieval": "retrieval_similarity.png",
    "schedule": "schedule.png",
    "time": "epoch_time.png",
}


LOSS_NAMES = {
    "ce": "next-item cross-entropy",
    "cl_unsup": "unsupervised contrastive",
    "cl_sup": "supervised contrastive",
    "loss_ce": "cross-entropy on base scores",
    "loss_ce_fused": "weighted cross-entropy on fused scores",
    "loss_kl": "weighted retrieval KL",
}


# ------------------------------------------------------------------ plotting


def _new_fig(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    Figure = figure_class()
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
    if is_num(best):
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
        ys = series(data.epochs, "train", k)
        if ys is None:
            continue
        values += [y for y in ys if not math.isnan(y)]
        if k == "loss":
            same = [c for c in keys if c != "loss" and series(data.epochs, "train", c) == ys]
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
                ys = series(data.epochs, "valid", variant, metric)
                if ys is not None:
                    ax.plot(xs, ys, linestyle=style, marker="o", color=colors[metric], label=f"{metric} {label}")
                    drawn = True
        else:
            ys = series(data.epochs, "valid", metric)
            if ys is not None:
                ax.plot(xs, ys, marker="o", color=colors[metric], label=metric)
                drawn = True
    if not drawn:
        return None
    _best_epoch_line(ax, data)
    _style(ax, f"Validation {NDCG} and {HR} per epoch — {data.run_dir.name}", "metric value (fraction, 0–1)")
    return _save(fig, path)


def plot_alpha(data: RunData, path: Path) -> Path | None:
    mean = series(data.epochs, "train", "alpha_mean")
    if mean is None:
        return None
    xs = [r["epoch"] for r in data.epochs]
    std = series(data.epochs, "train", "alpha_std") or [0.0] * len(xs)
    fig, axes = _new_fig()
    ax = axes[0, 0]
    ax.plot(xs, mean, marker="o", color="tab:green", label="alpha mean (train)")
    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)],
                    color="tab:green", alpha=0.2, label="± 1 std across samples")
    cap = series(data.epochs, "schedule", "alpha_max")
    if cap is not None:
        ax.plot(xs, cap, linestyle="--", color="tab:red", marker="s", markersize=4, label="alpha_max (cap)")
    ax.set_ylim(bottom=0)
    _style(ax, f"Fusion gate alpha per epoch (mean ± std) — {data.run_dir.name}",
           "alpha (weight on retrieved context, 0–1)")
    return _save(fig, path)


def plot_retrieval(data: RunData, path: Path) -> Path | None:
    sim = series(data.epochs, "train", "neighbour_sim")
    hit = series(data.epochs, "train", "neighbour_hit")
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
    masked = series(data.epochs, "train", "masked_by_usefulness")
    if masked is not None and any(m > 0 for m in masked if not math.isnan(m)):
        right.plot(xs, masked, marker="s", linestyle="--", color="tab:gray", label="masked by quality gate")
    _style(right, "Neighbour hit rate (train)", "fraction of neighbours (0–1)")
    fig.suptitle(f"Retrieval quality per epoch — {data.run_dir.name}", fontsize=11)
    return _save(fig, path)


def plot_schedule(data: RunData, path: Path) -> Path | None:
    temp = series(data.epochs, "schedule", "temperature")
    cap = series(data.epochs, "schedule", "alpha_max")
    phase = series(data.epochs, "schedule", "phase")
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
            ys = [get_path(r, "schedule", "phase") for r in data.epochs if (r.get("schedule") or {}).get("rebuilt")]
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
    secs = series(data.epochs, "train", "seconds")
    if secs is None:
        return None
    xs = [r["epoch"] for r in data.epochs]
    wall = series(data.epochs, "wall_seconds")
    fig, axes = _new_fig()
    ax = axes[0, 0]
    ax.bar(xs, secs, color="tab:cyan", label="train seconds this epoch")
    if wall is not None:
        prev = [0.0, *wall[:-1]]
        per_epoch = [w - p for w, p in zip(wall, prev, strict=True)]
        ax.plot(xs, per_epoch, marker="o", color="tab:red", label="wall seconds this epoch (train + eval)")
    _style(ax, f"Time per epoch — {data.run_dir.name}", "seconds")
    return _save(fig, path)


PLOTTERS: list[tuple[str, str, Callable[[RunData, Path], Path | None]]] = [
    ("loss", "Training loss components", plot_loss),
    ("valid", "Validation NDCG@10 / HR@10", plot_valid),
    ("alpha", "Fusion gate alpha", plot_alpha),
    ("retrieval", "Retrieval similarity", plot_retrieval),
    ("schedule", "RA schedule", plot_schedule),
    ("time", "Time per epoch", plot_time),
]


# ------------------------------------------------------------------ markdown


def _fmt(metric: str, v: Any) -> str:
    if not is_num(v):
        return "—"
    if metric.startswith("Popularity"):
        return f"{v:.1f}"
    return f"{v:.4f}"


def _metric_names(*dicts: Any) -> list[str]:
    names: list[str] = []
    for d in dicts:
        for k, v in (d or {}).items() if isinstance(d, dict) else ():
            if is_num(v) and k not in names:
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
    if isinstance(boot, dict) and is_num(boot.get("mean")):
        out.append(f"- test Δ NDCG@10 (with − without retrieval), paired bootstrap: mean {boot['mean']:+.5f}, "
                   f"95% CI [{get_path(boot, 'low'):+.5f}, {get_path(boot, 'high'):+.5f}]")
    return out


def render_markdown(data: RunData, plots: Sequence[tuple[str, Path]]) -> str:
    kind = "retrieval-augmented (RA)" if data.is_ra else "DuoRec"
    parts = [f"# Run report: `{data.run_dir.name}`", "", f"Run folder: `{data.run_dir}` — {kind} run.", ""]
    parts += _summary_lines(data)
    parts += [f"- note: {n}" for n in data.notes]
    parts += ["", "## Final metrics", ""]
    parts.append(metrics_table(data.final) if data.final else "_No metrics.json (run unfinished)._\n")
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
        return write_ablation_report(run_dir, out_dir)
    data = load_run(run_dir)
    figure_class()  # fail on the missing extra before writing anything
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
