import json

import numpy as np
import pytest
import torch

from training.checkpoints import RunError
from training.config import load_config
from training.data.synthetic import generate_interactions, write_inter
from training.evaluate import evaluate_run
from training.model import ModelConfig, SequenceEncoder
from training.trainer import Trainer, run_training

pytestmark = pytest.mark.slow  # every case trains


@pytest.fixture(scope="module")
def inter_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.inter"
    write_inter(generate_interactions(120, 60, mean_length=14, seed=3), path)
    return path


def tiny_cfg(path, *extra):
    return load_config(None, [
        f"data.path={path}", "data.max_seq_len=10", "model.dim=16", "model.inner=32", "model.dropout=0.1",
        "model.attn_dropout=0.1", "train.batch_size=64", "train.epochs=2", "train.seed=7", *extra,
    ])


@pytest.mark.parametrize("contrastive", ["none", "us", "us_x"])
def test_run_writes_artifacts_and_evaluate_agrees(tmp_path, inter_path, contrastive):
    out = tmp_path / "run"
    result = run_training(tiny_cfg(inter_path, f"loss.contrastive={contrastive}"), out, progress=False)
    for name in ("config.yaml", "items.json", "last.pt", "model.pt", "metrics.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["valid"]) >= {"HR@10", "NDCG@10", "MRR@10", "HR@5", "NDCG@20", "Coverage@10", "Popularity@10"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    if contrastive != "none":
        assert "cl_sup" in lines[0]["train"]
    again = evaluate_run(out)
    for split in ("valid", "test"):
        for k, v in result[split].items():
            assert again[split][k] == pytest.approx(v, abs=1e-6), (split, k)
    # checkpoints load with weights_only=True: plain tensors and values, no pickled code
    torch.load(out / "last.pt", weights_only=True)
    torch.load(out / "model.pt", weights_only=True)


def test_model_learns_planted_structure(tmp_path, inter_path):
    result = run_training(tiny_cfg(inter_path, "train.epochs=8", "loss.contrastive=none", "train.lr=0.005"),
                          tmp_path / "r", progress=False)
    chance = result["chance_HR@10"]
    assert result["test"]["HR@10"] > 2 * chance


@pytest.mark.parametrize("extra", [(), ("train.ema=0.9", "train.mode=window", "train.window_chunk=4",
                                           "loss.label_smoothing=0.1")])
def test_resume_is_equivalent_to_an_uninterrupted_run(tmp_path, inter_path, extra):
    straight = tmp_path / "straight"
    run_training(tiny_cfg(inter_path, "train.epochs=3", *extra), straight, progress=False)
    split = tmp_path / "split"
    run_training(tiny_cfg(inter_path, "train.epochs=1", *extra), split, progress=False)
    run_training(tiny_cfg(inter_path, "train.epochs=3", *extra), split, resume=True, progress=False)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    ja = [json.loads(x)["valid"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    jb = [json.loads(x)["valid"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert ja == jb


def test_shuffled_targets_collapse_to_chance(tmp_path, inter_path):
    cfg = ("train.epochs=4", "loss.contrastive=none", "train.lr=0.005")
    real = run_training(tiny_cfg(inter_path, *cfg), tmp_path / "a", progress=False)
    shuffled = run_training(tiny_cfg(inter_path, *cfg, "train.shuffle_targets=true"), tmp_path / "b", progress=False)
    chance = shuffled["chance_HR@10"]
    assert real["test"]["HR@10"] > 3 * chance
    # 120 test users: allow binomial noise around chance, far below the real model
    assert shuffled["test"]["HR@10"] < 2 * chance + 0.08


def test_refuses_non_empty_out_dir_and_missing_resume(tmp_path, inter_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(RunError, match="not empty"):
        Trainer(tiny_cfg(inter_path), out).setup()
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    with pytest.raises(RunError, match="no checkpoint"):
        Trainer(tiny_cfg(inter_path), tmp_path / "fresh", resume=True).setup()


@pytest.mark.parametrize(("optimizer", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizer_and_weight_decay_come_from_the_config(tmp_path, inter_path, optimizer, cls):
    trainer = Trainer(tiny_cfg(inter_path, f"train.optimizer={optimizer}", "train.weight_decay=0.05"), tmp_path / "o")
    trainer.setup()
    try:
        assert type(trainer.optimizer) is cls
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05]
    finally:
        trainer.cleanup()


def test_window_mode_trains(tmp_path, inter_path):
    result = run_training(tiny_cfg(inter_path, "train.mode=window", "loss.contrastive=us"), tmp_path / "w",
                          progress=False)
    assert np.isfinite(result["valid"]["NDCG@10"])


def test_weight_average_is_what_gets_validated_and_saved(tmp_path, inter_path):
    out = tmp_path / "ema"
    result = run_training(tiny_cfg(inter_path, "train.ema=0.9", "train.epochs=1"), out, progress=False)
    last = torch.load(out / "last.pt", weights_only=True)
    best = torch.load(out / "model.pt", weights_only=True)
    model = SequenceEncoder(ModelConfig(**last["model_config"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shadow = dict(zip(names, last["ema"]["shadow"], strict=True))
    assert last["ema"]["updates"] > 0
    for n in names:  # model.pt (epoch 1, the only one) holds the average, not the live weights
        torch.testing.assert_close(best["model"][n], shadow[n], msg=n)
    assert any(not torch.equal(last["model"][n], shadow[n]) for n in names)
    again = evaluate_run(out)
    assert again["test"]["NDCG@10"] == pytest.approx(result["test"]["NDCG@10"], abs=1e-6)


def test_plateau_schedule_decays_the_rate_and_resume_keeps_it(tmp_path, inter_path):
    # lr 0 learns nothing: validation never improves after epoch 1, so the rate halves every epoch
    extra = ("train.lr=0.000001", "train.lr_patience=1", "train.lr_decay=0.5", "train.patience=10")
    out = tmp_path / "plateau"
    run_training(tiny_cfg(inter_path, "train.epochs=2", *extra), out, progress=False)
    run_training(tiny_cfg(inter_path, "train.epochs=4", *extra), out, resume=True, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r["valid"]["NDCG@10"] for r in lines]
    rates = [r["train"]["lr"] for r in lines]
    assert rates[0] == pytest.approx(1e-6)
    assert rates[1] == rates[0]  # the first validation is always a new best
    for i in range(1, len(lines) - 1):
        # epoch i+1 trains at half epoch i's rate when epoch i did not beat the epochs before it
        flat = scores[i] <= max(scores[:i])
        assert rates[i + 1] == pytest.approx(rates[i] * (0.5 if flat else 1.0)), i
    assert rates[-1] < rates[0]


def test_seen_in_input_masks_each_examples_own_window_but_never_its_target():
    import numpy as np
    import torch

    from training.data.batches import Batch
    from training.trainer import seen_in_input

    windows = np.array([[3, 1, 4, 0], [2, 2, 5, 6]])
    batch = Batch(windows=windows, rows=np.array([0, 0, 1]), cols=np.array([0, 2, 1]), sample_index=np.arange(3))
    targets = torch.tensor([1, 5, 2])  # example 2's target (item 2) is also in its input
    mask = seen_in_input(batch, targets, n_items=6)
    expect = np.zeros((3, 6), dtype=bool)
    expect[0, [2]] = True  # input [3]
    expect[1, [2, 0, 3]] = True  # input [3, 1, 4]
    expect[2, []] = True  # input [2, 2]: item 2 is the target, never masked
    np.testing.assert_array_equal(mask.numpy(), expect)


def test_mask_seen_trains(tmp_path):
    from training.config import load_config
    from training.data.synthetic import generate_interactions, write_inter
    from training.trainer import run_training

    data = tmp_path / "s.inter"
    write_inter(generate_interactions(40, 30, mean_length=10, seed=1), data)
    cfg = load_config(None, [f"data.path={data}", "data.max_seq_len=8", "model.dim=8", "model.inner=16",
                             "loss.contrastive=none", "loss.mask_seen=true", "train.epochs=1", "train.mode=window"])
    result = run_training(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= result["valid"]["NDCG@10"] <= 1.0
