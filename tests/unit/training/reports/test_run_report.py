"""``training.reports.run_report``: plots and report.md from synthetic DuoRec and RA run folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the 'report'/'dev' extras; CI installs it")

from matplotlib.image import imread

from training.reports.plotting import ReportDependencyError, ReportError, ReportFileNotFoundError
from training.reports.run_report import PLOT_FILES, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(hr10: float, ndcg10: float) -> dict[str, float]:
    return {"HR@5": hr10 / 2, "NDCG@5": ndcg10 / 2, "HR@10": hr10, "NDCG@10": ndcg10, "Popularity@10": 210.04}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_duorec_run(root: Path, epochs: int = 4) -> Path:
    run = root / "duorec"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [
        {"epoch": e, "train": {"ce": 7.0 - 0.3 * e, "cl_unsup": 0.5 / e, "cl_sup": 0.9 / e,
                               "loss": 8.0 - 0.4 * e, "seconds": 20.0 + e, "samples": 1000, "steps": 10},
         "train_seconds_total": 21.0 * e,
         "valid": _metrics(0.1 + 0.01 * e, 0.05 + 0.005 * e), "wall_seconds": 22.0 * e}
        for e in range(1, epochs + 1)])
    (run / "metrics.json").write_text(json.dumps({
        "valid": _metrics(0.1357, 0.0642), "test": _metrics(0.1234, 0.0571),
        "best_epoch": epochs, "epochs_run": epochs, "train_seconds": 90.0}))
    return run


def make_ra_run(root: Path, epochs: int = 3) -> Path:
    run = root / "ra"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [
        {"epoch": e,
         "schedule": {"temperature": 0.1 * 0.95 ** e, "alpha_max": min(0.25 * (e + 1), 0.5),
                      "phase": 0 if e < 2 else 1, "rebuilt": e % 2 == 0},
         "train": {"loss_ce": 5.7, "loss_ce_fused": 2.8 + e, "loss_kl": 0.014, "loss": 8.5 + e,
                   "alpha_mean": 0.1 + 0.02 * e, "alpha_std": 0.01 + 0.01 * e, "neighbour_sim": 0.7 + 0.1 * e,
                   "neighbour_hit": 0.008 - 0.0001 * e, "masked_by_usefulness": 0.0, "seconds": 30.0 + e},
         "valid": {"with_retrieval": _metrics(0.144 - 0.001 * e, 0.068 - 0.0005 * e),
                   "without_retrieval": _metrics(0.1442, 0.0672)},
         "wall_seconds": 80.0 * (e + 1)}
        for e in range(epochs)])
    (run / "metrics.json").write_text(json.dumps({
        "valid": {"with_retrieval": _metrics(0.1442, 0.0681), "without_retrieval": _metrics(0.1441, 0.0672)},
        "test": {"with_retrieval": _metrics(0.1220, 0.0573), "without_retrieval": _metrics(0.1241, 0.0570),
                 "delta_ndcg10_bootstrap": {"mean": 0.00027, "low": -0.00199, "high": 0.0024}},
        "best_epoch": 0, "epochs_run": epochs, "train_seconds": 73.4, "pretrained": "runs/duorec"}))
    (run / "config.yaml").write_text(
        "ra:\n  unfreeze:\n  - until_epoch: 2\n    train: [query_encoder, fusion]\n"
        "  - until_epoch: 20\n    train: ['']\n")
    return run


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC and len(raw) > 5_000, (path, len(raw))
    img = imread(path)
    h, w = img.shape[:2]
    assert 400 <= h <= 600 and 750 <= w <= 1000, (path, img.shape)  # ~8x4.5 in at 100–120 dpi


def test_duorec_report(tmp_path: Path) -> None:
    run = make_duorec_run(tmp_path)
    report = write_report(run)
    assert report == run / "report" / "report.md"
    md = report.read_text()
    made = {"loss", "valid", "time"}
    for key in made:
        assert_png(run / "report" / PLOT_FILES[key])
        assert f"]({PLOT_FILES[key]})" in md
    for key in set(PLOT_FILES) - made:  # no RA diagnostics in a DuoRec run: no such plots
        assert not (run / "report" / PLOT_FILES[key]).exists()
        assert PLOT_FILES[key] not in md
    assert "| metric | valid | test |" in md
    assert "| NDCG@10 | 0.0642 | 0.0571 |" in md
    assert "| HR@10 | 0.1357 | 0.1234 |" in md
    assert "| Popularity@10 | 210.0 | 210.0 |" in md
    assert "best epoch: 4" in md
    assert not list((run / "report").glob("*.tmp"))  # atomic writes leave no temp files


def test_ra_report_with_out_dir(tmp_path: Path) -> None:
    run = make_ra_run(tmp_path)
    out = tmp_path / "elsewhere"
    report = write_report(run, out)
    assert report == out / "report.md"
    md = report.read_text()
    for key, name in PLOT_FILES.items():
        assert_png(out / name)
        assert f"]({name})" in md, key
    assert "valid with retrieval | valid without retrieval | test with retrieval | test without retrieval" in md
    assert "| NDCG@10 | 0.0681 | 0.0672 | 0.0573 | 0.0570 |" in md
    assert "+0.00027" in md and "[-0.00199, +0.00240]" in md
    assert not (run / "report").exists()


def test_stale_plots_are_removed(tmp_path: Path) -> None:
    run = make_duorec_run(tmp_path)
    stale = run / "report" / PLOT_FILES["alpha"]
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    write_report(run)
    assert not stale.exists()


def test_unfinished_run_without_metrics_json(tmp_path: Path) -> None:
    run = make_duorec_run(tmp_path, epochs=1)
    (run / "metrics.json").unlink()
    md = write_report(run).read_text()
    assert "No metrics.json" in md
    assert_png(run / "report" / PLOT_FILES["valid"])


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ReportFileNotFoundError, match="nope: run folder does not exist"):
        write_report(tmp_path / "nope")


def test_missing_metrics_jsonl(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl: no such file"):
        write_report(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("", "empty, no epoch records"),
    ('{"epoch": 1, "train": {}}\n\n{"epoch": 2}\n', "line 2: empty line"),
    ('{"epoch": 1}\n{"epoch": 2, "train": {"loss": 1.0\n', "line 2: not valid JSON"),
    ("[1, 2]\n", "line 1: expected a JSON object, got list"),
    ('{"train": {"loss": 1.0}}\n', "line 1: record has no numeric 'epoch'"),
    ('{"epoch": 1, "valid": 0.5}\n', "line 1: 'valid' should be an object"),
])
def test_corrupt_metrics_jsonl(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message) as info:
        write_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "report" / "report.md").exists()


def test_corrupt_metrics_json(tmp_path: Path) -> None:
    run = make_duorec_run(tmp_path)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"metrics\.json: not valid JSON"):
        write_report(run)


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_duorec_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ReportDependencyError, match=r"ragrec\[report\]"):
        write_report(run)
    assert not (run / "report").exists()
