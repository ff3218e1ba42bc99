"""``ragrec ablate`` on a tiny synthetic grid (2 cells x 2 seeds) and its report."""

import json

import numpy as np
import pytest
import yaml

from training.config import load_config
from training.data.synthetic import generate_interactions, write_inter
from training.evaluate import ndcg_at, paired_bootstrap
from training.reports.ablation import DEFAULT_GRID, AblationError, make_cells, parse_grid
from training.trainer import run_training

TINY = {"data.max_seq_len": 10, "model.dim": 16, "model.inner": 32, "model.dropout": 0.1,
        "model.attn_dropout": 0.1, "train.batch_size": 64, "loss.contrastive": "none", "train.lr": 0.005}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(RA config file, DuoRec run dir) on tiny generated data."""
    root = tmp_path_factory.mktemp("ablate")
    data = root / "syn.inter"
    write_inter(generate_interactions(80, 40, mean_length=12, seed=11), data)
    duorec = root / "duorec"
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    run_training(load_config(None, [f"data.path={data}", *overrides, "train.epochs=2"]), duorec, progress=False)
    cfg = {"train": {"batch_size": 64, "seed": 3},  # data and model come from the pretrained run
           "ra": {"enabled": True, "pretrained": str(duorec), "epochs": 1, "k": 3,
                  "unfreeze": [{"until_epoch": 1, "train": ["query_encoder", "fusion"]}]}}
    config = root / "ra.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, duorec


def test_grid_parsing_and_cells():
    grid = parse_grid(["fusion=fixed,gated", "ra.k=5,10"], defaults=True)
    assert grid["ra.fusion"] == ["fixed", "gated"] and grid["ra.k"] == ["5", "10"]
    assert grid["ra.kl_direction"] == DEFAULT_GRID["ra.kl_direction"]
    assert parse_grid(["anneal=off"], defaults=False) == {"anneal": ["off"]}
    for bad, message in (("fusion", "AXIS=V1"), ("fusion=a,a", "repeated"), ("unfreeze=maybe", "on/off"),
                         ("fusoin=fixed", "unknown axis")):
        with pytest.raises(AblationError, match=message):
            parse_grid([bad])
    with pytest.raises(AblationError, match="empty"):
        parse_grid([], defaults=False)

    base = load_config(None, ["ra.temperature_decay=0.8"])  # no unfreeze schedule of its own
    cells = make_cells(parse_grid(["unfreeze=on,off", "anneal=on,off", "kl=js"], defaults=False), base)
    assert [c.name for c in cells] == ["unfreeze-on__anneal-on__kl_direction-js",
                                       "unfreeze-on__anneal-off__kl_direction-js",
                                       "unfreeze-off__anneal-on__kl_direction-js",
                                       "unfreeze-off__anneal-off__kl_direction-js"]
    by = {c.name: c.overrides for c in cells}
    assert by["unfreeze-off__anneal-off__kl_direction-js"] == ["ra.unfreeze=[]", "ra.temperature_decay=1.0",
                                                              "ra.kl_direction=js"]
    on = by["unfreeze-on__anneal-on__kl_direction-js"]
    assert on[0].startswith("ra.unfreeze=[{") and on[1:] == ["ra.kl_direction=js"]  # the config's 0.8 decay kept
    full = make_cells(parse_grid([]), base)
    assert len(full) == len(DEFAULT_GRID["ra.fusion"]) * 3 * 2 * 2


@pytest.mark.slow
def test_tiny_ablation_end_to_end(tmp_path, setup):
    from typer.testing import CliRunner

    from app.cli import app

    config, duorec = setup
    out = tmp_path / "abl"
    args = ["ablate", "--config", str(config), "--out", str(out), "--grid", "fusion=fixed,gated", "--only-grid",
            "--seeds", "2", "--set", "ra.alpha_warmup_epochs=0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["runs_finished"] == summary["runs_total"] == 4 and not summary["failures"]
    assert summary["seeds"] == [3, 4]
    cells = summary["cells"]
    assert {c["name"] for c in cells} == {"fusion-fixed", "fusion-gated"}

    # recompute every number from the runs' own files
    for c in cells:
        runs = [out / c["name"] / f"seed-{s}" for s in (3, 4)]
        finals = [json.loads((r / "metrics.json").read_text()) for r in runs]
        for split in ("valid", "test"):
            for side in ("with_retrieval", "without_retrieval"):
                for m in ("NDCG@10", "HR@10"):
                    vals = [f[split][side][m] for f in finals]
                    assert c[split][side][m]["mean"] == pytest.approx(np.mean(vals))
                    assert c[split][side][m]["std"] == pytest.approx(np.std(vals, ddof=1))
        assert c["delta_test_ndcg10"]["mean"] == pytest.approx(
            c["test"]["with_retrieval"]["NDCG@10"]["mean"] - c["test"]["without_retrieval"]["NDCG@10"]["mean"])
        per = [np.load(r / "ranks.npz") for r in runs]
        want = paired_bootstrap(np.mean([ndcg_at(z["test_with_retrieval"], 10) for z in per], axis=0),
                                np.mean([ndcg_at(z["test_without_retrieval"], 10) for z in per], axis=0), seed=3)
        assert c["delta_test_ndcg10_bootstrap"] == pytest.approx(want)
        assert yaml.safe_load((runs[0] / "config.yaml").read_text())["ra"]["fusion"] == c["settings"]["ra.fusion"]
        assert c["seconds_per_epoch"] > 0
    # sorted by validation, best chosen on validation
    valid = [c["valid"]["with_retrieval"]["NDCG@10"]["mean"] for c in cells]
    assert valid == sorted(valid, reverse=True) and summary["best"] == cells[0]["name"]
    assert summary["best_check"]["cell"] == cells[0]["name"]
    assert summary["pretrained_metrics"]["test"]["NDCG@10"] == json.loads(
        (duorec / "metrics.json").read_text())["test"]["NDCG@10"]
    table = (out / "ablation.md").read_text()
    assert "fusion-fixed" in table and "fusion-gated" in table and "Best on validation" in table

    # a rerun skips what is finished; a run cut short before its first epoch starts over
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")}
    broken = out / "fusion-gated" / "seed-4"
    for name in ("metrics.json", "ranks.npz", "last.pt"):
        (broken / name).unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for p, t in stamps.items():
        assert (p.stat().st_mtime_ns == t) == (broken not in p.parents), p
    assert json.loads((out / "ablation.json").read_text())["runs_finished"] == 4

    # the report: a PNG bar chart embedded in report.md
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    report = out / "report" / "report.md"
    png = out / "report" / "ablation_ndcg10.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![NDCG@10 with and without retrieval per cell](ablation_ndcg10.png)" in report.read_text()


@pytest.mark.slow
def test_ablation_refuses_bad_cells_before_running(tmp_path, setup):
    from training.reports.ablation import run_ablation

    config, _ = setup
    with pytest.raises(AblationError, match=r"cell fusion-fixed__k_direction-x"):
        run_ablation(config, ["fusion=fixed", "ra.k_direction=x"], tmp_path / "a", seeds=1, defaults=False)
    with pytest.raises(AblationError, match=r"ra\.pretrained: /nonexistent is not a finished run"):
        run_ablation(config, ["fusion=fixed"], tmp_path / "b", seeds=1, defaults=False,
                     overrides=["ra.pretrained=/nonexistent"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
