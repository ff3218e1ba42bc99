"""The retrieval stage end to end on a tiny base: config errors, bad input refused before
anything is written, and a written run that the service's loader reads back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training.checkpoints import RunError, load_model_file, save_model_file
from training.config import ConfigError
from training.ra.bundle import load_bundle
from training.ra.config import load_retrieval_config
from training.ra.runner import run_retrieval_stage

pytestmark = pytest.mark.slow  # every case fits the retrieval stage


def _cfg(base, **section):
    section.setdefault("vote", {"k": 6})
    return load_retrieval_config(raw={"retrieval": {"base": str(base), "k_search": 6, "k_train": 6, **section}})


def test_unknown_and_ignored_keys_are_errors_that_name_them(tiny_base):
    with pytest.raises(ConfigError, match=r"unknown key 'retrieval\.vote\.kk'"):
        load_retrieval_config(raw={"retrieval": {"vote": {"kk": 3}}})
    with pytest.raises(ConfigError, match=r"ignores loss\.\*, train\.\*"):
        load_retrieval_config(raw={"retrieval": {}, "train": {"lr": 0.1}, "loss": {"tau": 1}})
    with pytest.raises(ConfigError, match="k_search"):
        load_retrieval_config(raw={"retrieval": {"k_search": 5, "vote": {"k": 10}}})


def test_bad_input_is_refused_before_the_run_directory_is_touched(tiny_base, tmp_path):
    out = tmp_path / "out"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_base, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(RunError, match=r"retrieval\.base: .*unfinished is not a finished run: metrics\.json is missing"):
        run_retrieval_stage(_cfg(unfinished), out)
    with pytest.raises(RunError, match="larger than"):
        run_retrieval_stage(load_retrieval_config(raw={"retrieval": {"base": str(tiny_base), "k_search": 10**6,
                                                                     "k_train": 6}}), out)
    assert not out.exists()


@pytest.mark.parametrize("design", ["vote", "head"])
def test_a_run_is_written_and_loads_as_a_bundle(tiny_base, tmp_path, design):
    out = tmp_path / design
    metrics = run_retrieval_stage(_cfg(tiny_base, design=design, vote={"k": 6, "tune_lam": [0.0, 0.3]},
                                       head={"k": 6, "epochs": 1}), out)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "items.json", "model.pt", "retrieval.pt",
                                               "retrieval.yaml", "metrics.json"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["with"]["NDCG@10"] == pytest.approx(metrics["test"]["with"]["NDCG@10"])
    lo, hi = saved["test"]["delta_ndcg10_ci95"]
    assert lo <= saved["test"]["with"]["NDCG@10"] - saved["test"]["without"]["NDCG@10"] + 1e-9
    assert hi >= lo
    bundle = load_bundle(out)
    assert bundle.design == design and (bundle.head is not None) == (design == "head")
    # the base inside the run is the untouched base: "without retrieval" is the model we would serve
    assert (out / "model.pt").read_bytes() == (tiny_base / "model.pt").read_bytes()
    other, _ = load_model_file(out / "model.pt")
    with torch.no_grad():
        other.item_emb.weight.add_(0.01)
    save_model_file(other, out / "model.pt")  # a valid model file, but not this stage's base
    with pytest.raises(RunError, match="not the base"):
        load_bundle(out)
