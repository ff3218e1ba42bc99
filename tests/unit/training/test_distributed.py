"""Data-parallel training: batch sharding, and real ``torchrun`` runs (2 processes, gloo)
checked against one process on the same global batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import distributed
from training.config import load_config
from training.data.batches import Batch, iterate_batches, prefix_plan
from training.data.sequences import leave_one_out, load_dataset
from training.data.synthetic import generate_interactions, write_inter
from training.ra.finetune.trainer import run_ra_training
from training.tracking import tensorboard_available
from training.trainer import run_training

RUN_FILES = {"config.yaml", "items.json", "last.pt", "model.pt", "metrics.json", "metrics.jsonl"}


# ------------------------------------------------------------------ sharding (no process group)


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_world() == distributed.World(0, 1, 0)
    assert distributed.world().size == 1 and distributed.is_main() and not distributed.active()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    x = torch.randn(3, 2)
    assert distributed.gather_rows(x, [3]) is x
    with distributed.process_group(torch.device("cpu")) as w:
        assert w.size == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 WORLD_SIZE=4"):
        distributed.env_world()


def test_shard_bounds_split_evenly():
    assert distributed.shard_bounds(10, 3).tolist() == [0, 3, 6, 10]
    assert distributed.shard_bounds(1, 2).tolist() == [0, 0, 1]


def batches_of(inter_path, batch_size=40):
    data = load_dataset(inter_path)
    split = leave_one_out(data)
    plan = prefix_plan(split.train_users, split.train_positions, 10)
    return list(iterate_batches(plan, data, 10, batch_size, np.random.default_rng(0)))


def example_inputs(batch: Batch) -> list[tuple[int, tuple[int, ...]]]:
    """(sample index, input prefix) of every example: what the encoder sees for it."""
    return [(int(s), tuple(batch.windows[r, : c + 1].tolist()))
            for s, r, c in zip(batch.sample_index, batch.rows, batch.cols, strict=True)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_partition_the_batch_and_keep_each_examples_input(tmp_path, world_size):
    path = tmp_path / "syn.inter"
    write_inter(generate_interactions(60, 40, mean_length=14, seed=1), path)
    for batch in batches_of(path):
        shards = [distributed.shard_batch(batch, r, world_size) for r in range(world_size)]
        assert sum(s.size for s in shards) == len(batch.rows)
        assert sum(s.weight for s in shards) == pytest.approx(world_size)
        pieces = [example_inputs(s.batch)[: s.size] for s in shards]
        assert [x for piece in pieces for x in piece] == example_inputs(batch)  # same order, same inputs
        for s in shards:
            assert (s.batch.windows[:, -1] > 0).any()  # trimmed to the widest window used


def test_a_rank_without_examples_gets_a_weightless_placeholder():
    batch = Batch(windows=np.array([[5, 6, 0]]), rows=np.array([0]), cols=np.array([1]), sample_index=np.array([9]))
    first, second = (distributed.shard_batch(batch, r, 2) for r in range(2))
    assert (first.size, first.weight) == (0, 0.0)
    assert first.batch.sample_index.tolist() == [9]  # it still runs forward and backward
    assert (second.size, second.weight) == (1, 2.0)


# ------------------------------------------------------------------ real torchrun runs


@pytest.fixture(scope="module")
def inter_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.inter"
    write_inter(generate_interactions(120, 60, mean_length=14, seed=3), path)
    return path


def overrides(path, *extra):
    # dropout 0: the only randomness left is the seeded batch plan, shared by every rank;
    # us_x: the contrastive views are gathered across ranks, so it must match too
    return [f"data.path={path}", "data.max_seq_len=10", "model.dim=16", "model.inner=32", "model.dropout=0",
            "model.attn_dropout=0", "train.batch_size=64", "train.epochs=2", "train.seed=7",
            "loss.contrastive=us_x", "train.threads=1", *extra]


def torchrun(out, sets, *args, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "app.cli", "train", "--out", str(out), *args]
    for item in sets:
        cmd += ["--set", item]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if res.returncode != 0:
        pytest.fail(f"torchrun exited with {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-8000:]}")
    return res


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, inter_path):
    out = tmp_path_factory.mktemp("single") / "run"
    run_training(load_config(None, overrides(inter_path)), out, progress=False)
    return out


def assert_same_training(run, reference):
    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(reference / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in b["model"]:
        # summation order differs (two halves + all-reduce): float noise, amplified a little by Adam
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=5e-5, rtol=1e-4, msg=k)
    ra = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ra] == [1, 2]  # one line per epoch: only rank 0 appends
    for x, y in zip(ra, rb, strict=True):
        assert x["train"]["samples"] == y["train"]["samples"]
        for k in ("ce", "cl_sup", "loss"):
            assert x["train"][k] == pytest.approx(y["train"][k], rel=1e-5), k
        for k, v in y["valid"].items():
            assert x["valid"][k] == pytest.approx(v, abs=0.01), k  # a near-tie may flip one user's rank


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, inter_path, single_run):
    out = tmp_path / "ddp"
    res = torchrun(out, overrides(inter_path))
    assert res.stdout.count('"best_epoch"') == 1  # one summary, from rank 0
    assert "rank 0 of 2" in res.stderr
    assert_same_training(out, single_run)
    expected = RUN_FILES | ({"tb"} if tensorboard_available() else set())
    assert {p.name for p in out.iterdir()} == expected
    if tensorboard_available():
        assert len(list((out / "tb").iterdir())) == 1  # one event file: rank 0's
    final = json.loads((out / "metrics.json").read_text())
    reference = json.loads((single_run / "metrics.json").read_text())
    assert final["best_epoch"] == reference["best_epoch"]
    for split in ("valid", "test"):
        for k, v in reference[split].items():
            assert final[split][k] == pytest.approx(v, abs=0.01), (split, k)
    blob = torch.load(out / "last.pt", weights_only=True)
    assert len(blob["torch_rng_ranks"]) == 2  # each rank's dropout stream, for --resume


@pytest.mark.slow
def test_torchrun_resume_continues_to_the_same_weights(tmp_path, inter_path, single_run):
    out = tmp_path / "ddp"
    torchrun(out, overrides(inter_path, "train.epochs=1"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    torchrun(out, ["train.epochs=2"], "--resume")  # the rest of the config comes from out/config.yaml
    assert_same_training(out, single_run)


@pytest.mark.slow
def test_torchrun_retrieval_augmented_stage(tmp_path, inter_path, single_run):
    """Stage 2 under torchrun: rank 0 encodes each bank and shares the keys, the ranks exchange
    usefulness updates; it follows the single-process run and writes one set of files."""
    # data, model and the DuoRec loss come from the pretrained run: only the stage's own keys here
    sets = ["ra.enabled=true", f"ra.pretrained={single_run}", "ra.epochs=2", "ra.k=5", "train.batch_size=64",
            "train.seed=7", "train.threads=1"]
    out = tmp_path / "ra"
    res = torchrun(out, sets)
    assert res.stdout.count('"best_epoch"') == 1
    assert res.stderr.count("ra epoch 1 ") == 1  # rank 0 evaluates and logs; rank 1 only trains
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    n_examples = len(leave_one_out(load_dataset(inter_path)).train_users)
    assert [r["train"]["samples"] for r in lines] == [n_examples, n_examples]  # each example once an epoch
    final = json.loads((out / "metrics.json").read_text())
    expected = RUN_FILES | {"ra.pt", "ranks.npz"} | ({"tb"} if tensorboard_available() else set())
    assert {p.name for p in out.iterdir()} == expected

    reference = tmp_path / "ra-single"
    run_ra_training(load_config(None, sets), reference, progress=False)
    a = torch.load(out / "last.pt", weights_only=True)
    b = torch.load(reference / "last.pt", weights_only=True)
    single = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(lines, single, strict=True):
        for k in ("loss_ce", "loss_ce_fused"):
            assert x["train"][k] == pytest.approx(y["train"][k], rel=1e-5), k
        # the KL is a mean over the examples that have neighbours: per slice, so weighted approximately
        assert x["train"]["loss_kl"] == pytest.approx(y["train"]["loss_kl"], rel=1e-3)
    for k in b["model"]:  # Adam lifts the float noise of near-zero gradients (the fusion gate's) to ~1e-4
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=3e-4, rtol=1e-3)
    # every rank applied every rank's usefulness updates; a near-tie may swap a neighbour or two
    moved = (a["entries"]["usefulness"] - b["entries"]["usefulness"]).abs() > 1e-4
    assert float(moved.float().mean()) < 0.02, int(moved.sum())
    # the base's side of the final metrics does not depend on the bank: the same in both runs
    want = json.loads((reference / "metrics.json").read_text())
    for split in ("valid", "test"):
        for m, v in want[split]["without_retrieval"].items():
            assert final[split]["without_retrieval"][m] == pytest.approx(v, rel=1e-3, abs=1e-4), (split, m)

    if tensorboard_available():  # the RA trainer's scalars: the records' numbers, from rank 0 only
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((out / "tb").iterdir())) == 1
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        events = acc.Scalars("valid/with_retrieval/NDCG@10")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r["valid"]["with_retrieval"]["NDCG@10"] for r in lines])
