import json

import pytest

from training.config import load_config
from training.data.synthetic import generate_interactions, write_inter
from training.tracking import ScalarLog, flatten_scalars, tensorboard_available
from training.trainer import run_training

needs_tensorboard = pytest.mark.skipif(not tensorboard_available(),
                                       reason="tensorboard is not installed (pip install 'ragrec[tensorboard]')")


def test_flatten_scalars_turns_nesting_into_tags():
    record = {"epoch": 3, "train": {"loss": 1.5, "steps": 7}, "valid": {"with_retrieval": {"NDCG@10": 0.25}},
              "schedule": {"rebuilt": True, "name": "x", "lr": [1, 2]}, "best": float("-inf")}
    assert dict(flatten_scalars(record)) == {"epoch": 3.0, "train/loss": 1.5, "train/steps": 7.0,
                                             "valid/with_retrieval/NDCG@10": 0.25, "schedule/rebuilt": 1.0}


def test_disabled_log_writes_nothing(tmp_path):
    log = ScalarLog(tmp_path / "tb", enabled=False)
    log.write({"train": {"loss": 1.0}}, step=1)
    log.close()
    assert not (tmp_path / "tb").exists()


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_tensorboard
def test_scalars_round_trip(tmp_path):
    log = ScalarLog(tmp_path / "tb", enabled=True)
    log.write({"epoch": 1, "train": {"loss": 2.0}}, step=1)
    log.write({"epoch": 2, "train": {"loss": 1.5}}, step=2)
    log.close()
    assert read_scalars(tmp_path / "tb") == {"train/loss": [(1, 2.0), (2, 1.5)]}


@needs_tensorboard
@pytest.mark.slow
def test_trainer_writes_the_metrics_jsonl_numbers_to_tensorboard(tmp_path):
    path = tmp_path / "syn.inter"
    write_inter(generate_interactions(60, 40, mean_length=10, seed=2), path)
    sets = [f"data.path={path}", "data.max_seq_len=8", "model.dim=16", "model.inner=32", "train.batch_size=64",
            "train.epochs=2", "loss.contrastive=none"]
    out = tmp_path / "run"
    run_training(load_config(None, sets), out, progress=False)
    scalars = read_scalars(out / "tb")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["valid/NDCG@10"]] == [1, 2]
    for tag, pick in (("valid/NDCG@10", lambda r: r["valid"]["NDCG@10"]), ("train/ce", lambda r: r["train"]["ce"])):
        assert [v for _, v in scalars[tag]] == pytest.approx([pick(r) for r in lines], rel=1e-6), tag  # float32

    off = tmp_path / "off"
    run_training(load_config(None, [*sets, "train.tensorboard=false"]), off, progress=False)
    assert (off / "metrics.jsonl").is_file() and not (off / "tb").exists()
