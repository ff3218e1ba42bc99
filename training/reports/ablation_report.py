"""``ragrec report OUT`` for an ablation directory (``ragrec ablate --out OUT``): a bar chart
of NDCG@10 with and without retrieval per cell, mean ± std over seeds as error bars, for
validation and test, embedded in ``report.md`` with the ablation table.

matplotlib is an optional dependency (the ``report`` extra); it is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.atomic import atomic_output, atomic_write_text
from training.reports.ablation import render_markdown
from training.reports.plotting import ReportError, ReportFileNotFoundError, pyplot

PLOT_FILE = "ablation_ndcg10.png"


def load_ablation(path: Path) -> dict[str, Any]:
    file = path / "ablation.json"
    if not file.is_file():
        raise ReportFileNotFoundError(f"{file}: no such file (is this a `ragrec ablate` folder?)")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{file}: not valid JSON ({e.msg})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("cells"), list):
        raise ReportError(f"{file}: expected the object `ragrec ablate` writes (with a 'cells' list)")
    if not summary["cells"]:
        raise ReportError(f"{file}: no finished cell yet; nothing to plot")
    return summary


def plot_ablation_bars(summary: dict[str, Any], path: Path) -> Path:
    """Per cell (sorted as in ablation.json, by validation): grouped bars with / without
    retrieval, error bars = std over seeds, one panel per split, the DuoRec checkpoint dashed;
    a third panel with the test Δ (with − without) and its paired-bootstrap 95% interval."""
    plt = pyplot()
    cells = summary["cells"]
    names = [c["name"].replace("__", "\n") for c in cells]
    xs = list(range(len(cells)))
    width = 0.38
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 1.6 * len(cells) + 5), 5.0), squeeze=False)
    axes = axes[0]
    axes[1].sharey(axes[0])
    duorec = summary.get("pretrained_metrics") or {}
    rotate = {"rotation": 45 if len(cells) > 3 else 0, "ha": "right" if len(cells) > 3 else "center"}
    for ax, split in zip(axes[:2], ("valid", "test"), strict=True):
        for offset, side, label, color in ((-width / 2, "with_retrieval", "with retrieval", "tab:blue"),
                                           (width / 2, "without_retrieval", "without retrieval", "tab:gray")):
            means = [c[split][side]["NDCG@10"]["mean"] for c in cells]
            stds = [c[split][side]["NDCG@10"]["std"] for c in cells]
            ax.bar([x + offset for x in xs], means, width, yerr=stds, capsize=3, color=color, alpha=0.85,
                   label=f"{label} (mean ± std over seeds)")
        ref = (duorec.get(split) or {}).get("NDCG@10")
        if isinstance(ref, int | float):
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="DuoRec checkpoint")
        ax.set_title(f"{split} NDCG@10")
    axes[0].set_ylabel("NDCG@10 (fraction of the ideal DCG, 0–1)")
    delta = [c["delta_test_ndcg10_bootstrap"] for c in cells]
    mean = [d["mean"] for d in delta]
    err = [[d["mean"] - d["low"] for d in delta], [d["high"] - d["mean"] for d in delta]]
    axes[2].bar(xs, mean, 0.6, yerr=err, capsize=4, color="tab:green", alpha=0.85,
                label="mean over users and seeds, 95% bootstrap CI")
    axes[2].axhline(0.0, color="black", linewidth=0.8)
    axes[2].set_title("test Δ NDCG@10 (with − without)")
    axes[2].set_ylabel("Δ NDCG@10 (absolute, fraction 0–1)")
    for ax in axes:
        ax.set_xticks(xs, names, fontsize=7, **rotate)
        ax.set_xlabel("cell (sorted by validation NDCG@10 with retrieval)", fontsize=8)
        ax.grid(True, axis="y", alpha=0.35)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Ablation: {len(cells)} cells, seeds {summary.get('seeds')}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_ablation_report(ablation_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the bar chart and ``report.md`` into ``out_dir`` (default ``<dir>/report``)."""
    ablation_dir = Path(ablation_dir)
    summary = load_ablation(ablation_dir)
    pyplot()  # fail on the missing extra before writing anything
    out = Path(out_dir) if out_dir is not None else ablation_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    png = plot_ablation_bars(summary, out / PLOT_FILE)
    text = render_markdown(summary).replace("# Ablation", f"# Ablation report: `{ablation_dir.name}`", 1)
    text += f"\n## NDCG@10 per cell\n\n![NDCG@10 with and without retrieval per cell]({png.name})\n"
    report = out / "report.md"
    atomic_write_text(report, text)
    return report
