"""The RA stage's switchable options, resume and bad input, on tiny generated data."""

import json

import numpy as np
import pytest
import torch

from training.checkpoints import RunError
from training.config import ConfigError
from training.evaluate import metrics_from_ranks
from training.ra.bank import check_entries
from training.ra.finetune.banks import search_neighbours
from training.ra.finetune.fusion import CrossAttention, SimilarityAttention
from training.ra.finetune.trainer import RATrainer, run_ra_training

pytestmark = pytest.mark.slow  # every case fine-tunes a trained run


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


PHASES = "ra.unfreeze=[{until_epoch: 1, train: [query_encoder, fusion]}, {until_epoch: 9, train: [''], lr_mult: 0.5}]"


# ------------------------------------------------------------------ config exposure


def test_retrieval_module_entropy_gain_and_fusion_temperature_come_from_config(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "a", "ra.attention=cross_attention", "ra.fusion_temperature=0.5")
    assert isinstance(t.model.attention, CrossAttention)
    assert t.model.fusion.temperature == 0.5
    t = ready_trainer(tmp_path / "b", "ra.entropy_gain=2.0", "ra.fusion=adaptive")
    assert isinstance(t.model.attention, SimilarityAttention) and t.model.attention.entropy_gain == 2.0
    assert t.model.fusion.temperature == 0.1  # the adaptive fusion's own default when not set
    with pytest.raises(ConfigError, match="cross_attention"):
        ra_config("ra.attention=cross_attention", "ra.values=both")
    with pytest.raises(ConfigError, match=r"unknown key 'ra\.fusion_temp'"):
        ra_config("ra.fusion_temp=0.5")


def test_entropy_gain_raises_each_querys_temperature(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra", "ra.entropy_gain=1.0")
    t.begin_epoch(1)
    stats = t.train_epoch(1)
    # t0 · (1 + H) with H in (0, 1]: above t0, below 2 t0
    assert t.ra.temperature_t0 < stats["attention_temperature"] < 2 * t.ra.temperature_t0


@pytest.mark.parametrize("fusion", ["gated", "fixed"])
def test_cross_attention_with_zero_alpha_is_the_base_model(tmp_path, fusion, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra", "ra.attention=cross_attention", f"ra.fusion={fusion}",
                   "ra.alpha_max=0", "ra.alpha_warmup_epochs=0")
    t.model.set_schedule(**t.schedule(1))
    bank = t.banks.eval_bank("valid", t.entries)
    seq = torch.from_numpy(t.eval_sets["valid"][0])
    t.model.eval()
    with torch.no_grad():
        h = t.model.encoder(seq)
        out = t.model.fuse(h, search_neighbours(t.model, bank, h, 5)[0])
        torch.testing.assert_close(out.scores_fused, t.model.encoder.scores(h), rtol=0, atol=0)


def test_fusion_has_its_own_optimizer_group_and_its_weights_move(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra", PHASES, "ra.fusion_lr=0.01", "ra.lr=0.001")
    for epoch, other in ((1, "query_encoder"), (2, "")):
        t.begin_epoch(epoch)
        groups = {g["name"]: g for g in t.optimizer.param_groups}
        assert groups["fusion"]["lr"] == 0.01  # not scaled by the phase's lr_mult
        assert groups[other]["lr"] == 0.001 * (0.5 if epoch == 2 else 1.0)
        fusion_ids = {id(p) for p in t.model.fusion.parameters()}
        assert {id(p) for p in groups["fusion"]["params"]} == fusion_ids
        assert not fusion_ids & {id(p) for p in groups[other]["params"]}

    out = tmp_path / "run"
    run_ra_training(ra_config(PHASES, "ra.fusion_lr=0.01"), out, progress=False)
    recs = records(out)
    assert [r["schedule"]["lr"]["fusion"] for r in recs] == [0.01, 0.01]
    change = [r["fusion_params"]["all"]["change"] for r in recs]
    assert 0 < change[0] < change[1]  # logged, and moving
    assert {"gate.weight", "gate.bias", "norm_h.weight", "all"} <= set(recs[0]["fusion_params"])
    assert recs[0]["query_encoder_params"]["all"]["change"] > 0  # trained in both phases


def test_gated_loss_drops_the_enhanced_terms_under_the_threshold(tmp_path, ready_trainer, ra_config):
    def one_epoch(threshold):
        t = ready_trainer(tmp_path / f"ra{threshold}", f"ra.loss_gate_threshold={threshold}")
        t.begin_epoch(1)
        return t.train_epoch(1)

    closed = one_epoch(2.0)  # above any cosine similarity: every example gated
    assert closed["loss_gated"] == 1.0 and closed["loss_ce_fused"] == 0.0 and closed["loss_kl"] == 0.0
    open_ = one_epoch(-2.0)
    assert open_["loss_gated"] == 0.0 and open_["loss_ce_fused"] > 0.0 and open_["loss_kl"] > 0.0
    # gated by entry usefulness instead: entries start at 1.0 and move toward n_used · p (up to k = 5),
    # so a threshold of 1.5, above any cosine similarity, gates most examples but not all of them
    t = ready_trainer(tmp_path / "by-use", "ra.loss_gate_by=usefulness", "ra.loss_gate_threshold=1.5",
                      "train.weight_decay=0.01")
    t.begin_epoch(1)
    assert {g["weight_decay"] for g in t.optimizer.param_groups} == {0.01}  # train.weight_decay reaches Adam
    assert 0.5 < t.train_epoch(1)["loss_gated"] < 1.0  # by similarity (at most 1) 1.5 would gate them all


# ------------------------------------------------------------------ bank hygiene


def test_usefulness_ema_is_updated_and_low_entries_are_evicted_at_rebuild(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra", "ra.evict_below=0.8", "ra.usefulness_momentum=0.5",
                   "ra.bank_min_prefix=3")
    s = t.split
    assert (s.train_positions[t.entries.ids] >= 3).all() and (s.train_positions < 3).any()
    t.begin_epoch(1)
    size = len(t.bank)
    t.train_epoch(1)
    q = t.entries.usefulness[t.entries.ids]
    assert (q != 1.0).any() and (q == 1.0).any()  # retrieved entries moved, others kept their start
    assert q.min() >= 0.0
    low = set(t.entries.ids[q < 0.8].tolist())
    assert low
    evicted = t.begin_epoch(2)["evicted"]
    assert evicted == len(low) and len(t.bank) == size - evicted == int(t.entries.alive.sum())
    assert not low & set(t.bank.examples.tolist())
    # the evaluation banks follow the training bank and stay clean
    valid, test = t.banks.eval_bank("valid", t.entries), t.banks.eval_bank("test", t.entries)
    assert set(valid.examples.tolist()) == set(t.bank.examples.tolist())
    held = set(zip(test.users.tolist(), test.positions.tolist(), strict=True))
    assert set(zip(s.valid_users.tolist(), s.valid_positions.tolist(), strict=True)) <= held
    assert not held & set(zip(s.test_users.tolist(), s.test_positions.tolist(), strict=True))
    check_entries(t.data, s, "test", test.users, test.positions)
    with t.bank.index.read_locked() as cols:  # the quality payload is the entries' usefulness
        np.testing.assert_array_equal(cols["quality"], t.entries.usefulness[t.bank.examples])
    # the final evaluation encodes once for both banks: the same banks as built one by one
    both = t.banks.eval_banks(t.entries)
    for split, one in (("valid", valid), ("test", test)):
        np.testing.assert_array_equal(both[split].users, one.users)
        np.testing.assert_array_equal(both[split].positions, one.positions)
        np.testing.assert_array_equal(both[split].examples, one.examples)
        torch.testing.assert_close(both[split].keys, one.keys, rtol=1e-5, atol=1e-5)
        with both[split].index.read_locked() as a, one.index.read_locked() as b:
            np.testing.assert_array_equal(a["quality"], b["quality"])


def test_evictions_are_logged_per_epoch(tmp_path, ready_trainer, ra_config):
    out = tmp_path / "run"
    run_ra_training(ra_config("ra.evict_below=0.8", "ra.usefulness_momentum=0.5", "ra.epochs=3"), out,
                    progress=False)
    recs = records(out)
    assert sum(r["bank"]["evicted"] for r in recs) == recs[-1]["bank"]["evicted_total"] > 0
    assert recs[-1]["bank"]["size"] < recs[0]["bank"]["size"]
    assert json.loads((out / "metrics.json").read_text())["evicted_total"] <= recs[-1]["bank"]["evicted_total"]


def test_query_warm_up_trains_the_query_encoder_before_epoch_1(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra", "ra.query_warmup_epochs=2", "ra.query_warmup_lr=0.01")
    assert not t.model.query_encoder.down.weight.any()  # starts as the identity on the centred h
    encoder_before = {k: v.clone() for k, v in t.model.encoder.state_dict().items()}
    history = t.warm_up()
    assert len(history) == 2 and history[0]["pairs"] > 0
    assert t.model.query_encoder.down.weight.any()
    assert all(torch.equal(v, t.model.encoder.state_dict()[k]) for k, v in encoder_before.items())

    out = tmp_path / "run"
    result = run_ra_training(ra_config("ra.query_warmup_epochs=1", "ra.epochs=1"), out, progress=False)
    assert len(result["query_warmup"]) == 1
    assert records(out)[0]["query_warmup"] == result["query_warmup"]


# ------------------------------------------------------------------ diagnostics, ranks


def test_epoch_records_carry_diagnostics_timings_and_ranks(tmp_path, ready_trainer, ra_config):
    out = tmp_path / "run"
    result = run_ra_training(ra_config("ra.epochs=1"), out, progress=False)
    rec = records(out)[0]
    diag = rec["valid_diagnostics"]
    assert diag["alpha_std"] > 0  # across users: they do not all get one alpha
    assert 0.0 < diag["alpha_mean"] <= rec["schedule"]["alpha_max"]
    assert diag["masked_by_usefulness"] == 0.0  # no ra.usefulness_threshold: nothing masked
    seconds = rec["seconds"]
    assert seconds["epoch"] >= seconds["rebuild"] + seconds["train"] + seconds["eval"] > 0
    # one epoch, no evictions: the bank is every training example, at the usefulness the EMA left
    t = RATrainer(ra_config("ra.epochs=1"), tmp_path / "unused", progress=False)
    t.setup()
    assert rec["bank"]["size"] == len(t.split.train_users) and rec["bank"]["evicted_total"] == 0
    with np.load(out / "ranks.npz") as z:
        np.testing.assert_array_equal(z["users"], t.split.test_users)
    with np.load(out / "ranks.npz") as z:
        for split in ("valid", "test"):
            for side in ("with_retrieval", "without_retrieval"):
                got = metrics_from_ranks(z[f"{split}_{side}"], [10])
                assert got["NDCG@10"] == pytest.approx(result[split][side]["NDCG@10"], abs=1e-12)


# ------------------------------------------------------------------ resume and window mode


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, ready_trainer, ra_config):
    """Three one-epoch sessions (a tiny time limit stops each after its epoch) match one
    three-epoch run: same losses, same validation, same final metrics. Epoch 2 does not
    rebuild (its bank comes from the checkpoint); phases change at epoch 2; evictions and
    the warm-up state ride along."""
    extra = ["ra.epochs=3", "ra.rebuild_every_early=2", "ra.rebuild_early_epochs=9", "ra.evict_below=0.8",
             "ra.usefulness_momentum=0.5", "ra.query_warmup_epochs=1", "ra.fusion_lr=0.01", PHASES]
    straight = tmp_path / "straight"
    want = run_ra_training(ra_config(*extra), straight, progress=False)

    pieces = tmp_path / "pieces"
    cfg = ra_config(*extra, "train.max_minutes=0.000001")
    run_ra_training(cfg, pieces, progress=False)
    assert len(records(pieces)) == 1
    for _ in range(2):
        got = run_ra_training(cfg, pieces, resume=True, progress=False)
    a, b = records(straight), records(pieces)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert [r["schedule"]["rebuilt"] for r in b] == [True, False, True]
    for ra_, rb in zip(a, b, strict=True):
        assert ra_["train"]["loss"] == rb["train"]["loss"]
        assert ra_["valid"] == rb["valid"] and ra_["bank"] == rb["bank"]
    for split in ("valid", "test"):
        assert got[split] == want[split]
    # a finished run resumed again only re-evaluates
    again = run_ra_training(cfg, pieces, resume=True, progress=False)
    assert again["test"] == want["test"] and len(records(pieces)) == 3


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path, ready_trainer, ra_config):
    out = tmp_path / "run"
    with pytest.raises(RunError, match="no checkpoint"):
        run_ra_training(ra_config(), out, resume=True, progress=False)
    run_ra_training(ra_config("ra.epochs=1"), out, progress=False)
    with pytest.raises(RunError, match="kl_weight"):
        run_ra_training(ra_config("ra.epochs=2", "ra.kl_weight=0.5"), out, resume=True, progress=False)
    with pytest.raises(RunError, match="not empty"):
        run_ra_training(ra_config("ra.epochs=1"), out, progress=False)


def test_window_mode_trains_every_training_example_once_per_epoch(tmp_path, ready_trainer, ra_config):
    out = tmp_path / "run"
    result = run_ra_training(ra_config("train.mode=window"), out, progress=False)
    t = RATrainer(ra_config(), tmp_path / "unused", progress=False)
    t.setup()
    for rec in records(out):
        assert rec["train"]["samples"] == len(t.split.train_users)
        assert rec["train"]["steps"] < t.plan.n_samples / 64 + t.plan.n_units  # windows, not one pass per prefix
    assert set(result["test"]) >= {"with_retrieval", "without_retrieval", "delta_ndcg10_bootstrap"}


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("extra", "message"), [
    (["ra.unfreeze=[{until_epoch: 1, train: [retriver]}]"], r"unknown module 'retriver'.*modules: \["),
    (["ra.bank_min_prefix=1000"], "memory bank is empty"),
    (["ra.k=100000"], r"ra\.k=100000 is larger than the memory bank"),
])
def test_bad_input_fails_before_the_run_directory_is_touched(tmp_path, extra, message, ready_trainer, ra_config):
    out = tmp_path / "ra"
    with pytest.raises(RunError, match=message):
        run_ra_training(ra_config(*extra), out, progress=False)
    assert not out.exists()
