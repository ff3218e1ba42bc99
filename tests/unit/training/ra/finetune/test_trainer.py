import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoints import RunError
from training.config import ConfigError, load_config
from training.evaluate import evaluate_run
from training.ra.bank import BankRuleError, check_entries
from training.ra.finetune import trainer as ra_trainer
from training.ra.finetune.banks import search_neighbours
from training.ra.finetune.fusion import FUSIONS
from training.ra.finetune.pretrained import stage_config
from training.ra.finetune.trainer import run_ra_training

pytestmark = pytest.mark.slow  # every case fine-tunes a trained run


def pairs(users, positions) -> set[tuple[int, int]]:
    return set(zip(np.asarray(users).tolist(), np.asarray(positions).tolist(), strict=True))


# ------------------------------------------------------------------ config


def test_ra_section_is_off_by_default_and_validated():
    assert load_config(None, []).ra.enabled is False
    with pytest.raises(ConfigError, match=r"ra\.pretrained"):
        load_config(None, ["ra.enabled=true"])
    with pytest.raises(ConfigError, match="must increase"):
        load_config(None, ["ra.unfreeze=[{until_epoch: 3, train: [fusion]}, {until_epoch: 2, train: ['']}]"])
    with pytest.raises(ConfigError, match=r"unknown key 'ra\.alpha'"):
        load_config(None, ["ra.alpha=0.3"])


# ------------------------------------------------------------------ end to end


def test_runs_end_to_end_and_writes_dual_metrics(tmp_path, ready_trainer, ra_config):
    out = tmp_path / "ra"
    result = run_ra_training(ra_config(), out, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    boot = saved["test"]["delta_ndcg10_bootstrap"]
    assert boot["low"] <= boot["mean"] <= boot["high"]
    assert boot["mean"] == pytest.approx(
        saved["test"]["with_retrieval"]["NDCG@10"] - saved["test"]["without_retrieval"]["NDCG@10"], abs=1e-9)

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for epoch, r in enumerate(lines, start=1):
        tr = r["train"]
        assert tr["loss"] == pytest.approx(tr["loss_ce"] + tr["loss_ce_fused"] + tr["loss_kl"])
        assert tr["masked_by_usefulness"] == 0.0  # no ra.usefulness_threshold: nothing masked
        assert -1.0 <= tr["neighbour_sim"] <= 1.0 and 0.0 <= tr["neighbour_hit"] <= 1.0
        # the defaults' schedules by hand: t0 · 0.95^(epoch - 1), alpha_max 0.5 over 2 warm-up epochs
        assert r["schedule"]["temperature"] == pytest.approx(0.1 * 0.95 ** (epoch - 1))
        assert r["schedule"]["alpha_max"] == pytest.approx(0.5 * min(1.0, epoch / 2))
        assert set(r["valid"]) == {"with_retrieval", "without_retrieval"}
    assert lines[1]["schedule"]["temperature"] < lines[0]["schedule"]["temperature"]  # annealed
    assert lines[0]["schedule"]["alpha_max"] < lines[1]["schedule"]["alpha_max"]  # warming up
    assert 0 < lines[1]["train"]["alpha_mean"] <= lines[1]["schedule"]["alpha_max"]

    # model.pt is the best encoder in the DuoRec format: the standard evaluation agrees with
    # the "without retrieval" side of the dual evaluation
    again = evaluate_run(out)
    for split in ("valid", "test"):
        assert set(again[split]) == set(saved[split]["without_retrieval"])
        for m, v in again[split].items():
            assert saved[split]["without_retrieval"][m] == pytest.approx(v, abs=1e-6), (split, m)


def test_cli_train_dispatches_to_the_ra_stage(tmp_path, pretrained):
    from typer.testing import CliRunner

    from app.cli import app

    _, run = pretrained
    args = ["train", "--out", str(tmp_path / "cli")]
    for item in ("ra.enabled=true", f"ra.pretrained={run}", "ra.epochs=1", "ra.k=3", "train.batch_size=64"):
        args += ["--set", item]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "with_retrieval" in json.loads((tmp_path / "cli" / "metrics.json").read_text())["test"]


# ------------------------------------------------------------------ leakage


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_training_queries_never_see_their_own_user_now_or_later(tmp_path, monkeypatch, mode, ready_trainer, ra_config):
    """Spy on the real training loop: every search result of every batch, matched to the
    batch's examples through the split (not through what the trainer passed to search)."""
    trainer = ready_trainer(tmp_path / "ra", "ra.k=8", f"train.mode={mode}")
    batches, results = [], []
    real_iterate, real_search = ra_trainer.iterate_batches, ra_trainer.search_neighbours

    def spy_iterate(*args, **kwargs):
        for batch in real_iterate(*args, **kwargs):
            batches.append(batch)
            yield batch

    def spy_search(*args, **kwargs):
        nb, res = real_search(*args, **kwargs)
        results.append(res)
        return nb, res

    monkeypatch.setattr(ra_trainer, "iterate_batches", spy_iterate)
    monkeypatch.setattr(ra_trainer, "search_neighbours", spy_search)
    trainer.begin_epoch(1)
    trainer.train_epoch(1)

    assert len(batches) == len(results) > 0
    same_user_earlier = 0
    for batch, res in zip(batches, results, strict=True):
        qu = trainer.split.train_users[batch.sample_index][:, None]
        qp = trainer.split.train_positions[batch.sample_index][:, None]
        found = res.found
        assert found.all()  # k results whenever k eligible entries exist
        assert not ((res.users == qu) & (res.positions >= qp) & found).any()
        same_user_earlier += int(((res.users == qu) & (res.positions < qp)).sum())
    assert same_user_earlier > 0  # the rule drops the future, not the user's whole history


def test_exclusion_matches_brute_force(tmp_path, ready_trainer, ra_config):
    trainer = ready_trainer(tmp_path / "ra", "ra.k=6")
    trainer.begin_epoch(1)
    bank = trainer.bank
    pick = np.random.default_rng(0).choice(len(bank), size=50, replace=False)
    qu, qp = trainer.split.train_users[pick], trainer.split.train_positions[pick]
    h, keys = trainer.banks.encode(qu, qp)
    with torch.no_grad():
        _, res = search_neighbours(trainer.model, bank, h, 6, exclude_user=qu, exclude_from_position=qp)
    S = keys.numpy() @ bank.keys.numpy().T  # (50, M) exact cosine
    S[(bank.users[None, :] == qu[:, None]) & (bank.positions[None, :] >= qp[:, None])] = -np.inf
    want = -np.sort(-S, axis=1)[:, :6]
    np.testing.assert_allclose(res.D, want, atol=1e-5)


def test_eval_banks_hold_no_example_of_the_split_they_evaluate(tmp_path, ready_trainer, ra_config):
    trainer = ready_trainer(tmp_path / "ra")
    s = trainer.split
    valid, test = pairs(s.valid_users, s.valid_positions), pairs(s.test_users, s.test_positions)
    valid_bank = trainer.banks.eval_bank("valid", trainer.entries)
    held = pairs(valid_bank.users, valid_bank.positions)
    assert held == pairs(s.train_users, s.train_positions)
    assert not held & valid and not held & test
    test_bank = trainer.banks.eval_bank("test", trainer.entries)
    held = pairs(test_bank.users, test_bank.positions)
    assert valid <= held and not held & test
    assert held == pairs(s.train_users, s.train_positions) | valid
    # payload targets are the items at those positions, none of them a held-out test target slot
    targets = test_bank.index.search(test_bank.keys[:5].numpy(), 3).targets
    assert (targets >= 1).all()


def test_check_entries_refuses_each_split_its_own_targets(tmp_path, ready_trainer, ra_config):
    t = ready_trainer(tmp_path / "ra")
    s = t.split
    with_valid = (np.r_[s.train_users, s.valid_users], np.r_[s.train_positions, s.valid_positions])
    check_entries(t.data, s, "valid", s.train_users, s.train_positions)
    check_entries(t.data, s, "test", *with_valid)
    with pytest.raises(BankRuleError, match=f"the valid bank leaks: {len(s.valid_users)} entries"):
        check_entries(t.data, s, "valid", *with_valid)
    with pytest.raises(BankRuleError, match="the test bank leaks: 1 entries"):
        check_entries(t.data, s, "test", s.test_users[:1], s.test_positions[:1])


def test_a_leaky_bank_scores_far_higher_and_is_refused(tmp_path, ready_trainer, ra_config):
    """Planting the test examples (their targets, under their own users) in the bank must show
    up as a jump on test: evidence that the honest numbers would expose a leak."""
    # one neighbour, mostly trusted: the planted entry (the query's own prefix) is always top-1.
    # Scores are dot products with item embeddings of unequal norms, so even a perfect
    # neighbour does not put the target first every time: the jump is ~0.2 NDCG@10, not 0.6.
    trainer = ready_trainer(tmp_path / "ra", "ra.fusion=fixed", "ra.alpha_warmup_epochs=0",
                            "ra.alpha_max=0.9", "ra.k=1")
    s = trainer.split
    trainer.begin_epoch(1)  # builds the training bank, which centres the query encoder
    honest = trainer.evaluate("test", trainer.banks.eval_bank("test", trainer.entries)).metrics["NDCG@10"]
    leaky_bank = trainer.banks.build(np.concatenate([s.train_users, s.valid_users, s.test_users]),
                                    np.concatenate([s.train_positions, s.valid_positions, s.test_positions]))
    leaky = trainer.evaluate("test", leaky_bank).metrics["NDCG@10"]
    assert leaky > honest + 0.15 and leaky > 1.3 * honest, (leaky, honest)
    # the honest bank, same weights: no jump of that kind over the model without retrieval
    without = trainer.evaluate("test", None).metrics["NDCG@10"]
    assert honest - without < 0.25 * (leaky - without), (honest, without, leaky)
    with pytest.raises(BankRuleError):
        check_entries(trainer.data, s, "test", leaky_bank.users, leaky_bank.positions)


# ------------------------------------------------------------------ checkpoint and fusions


def test_keys_the_stage_would_ignore_are_errors_that_name_them(tmp_path, pretrained, ra_config):
    _, run = pretrained
    out = tmp_path / "ra"
    with pytest.raises(ConfigError, match=r"ignore data\.max_seq_len, model\.dim, loss\.contrastive, train\.lr: remove"):
        run_ra_training(ra_config("data.max_seq_len=20", "model.dim=32", "loss.contrastive=none", "train.lr=0.1"), out)
    assert not out.exists()  # refused before the run directory was touched
    # the stage takes data and model from the pretrained run; restating its values is no error
    base = load_config(run / "config.yaml")
    cfg = stage_config(ra_config("data.max_seq_len=10", "model.dim=16"))
    assert cfg.data == base.data and cfg.model == base.model
    assert stage_config(ra_config()).data.path == base.data.path


def test_the_shipped_config_sets_only_what_the_stage_uses(pretrained):
    _, run = pretrained
    shipped = Path(__file__).resolve().parents[5] / "configs" / "ml100k-ra-finetune.yaml"
    cfg = stage_config(load_config(shipped, [f"ra.pretrained={run}"]))
    assert cfg.data == load_config(run / "config.yaml").data and cfg.ra.fusion == "entropy"


def test_an_unfinished_pretrained_run_is_refused(tmp_path, pretrained, ra_config):
    _, run = pretrained
    half = tmp_path / "half"
    shutil.copytree(run, half)
    (half / "metrics.json").unlink()  # a run still training has model.pt but no metrics.json yet
    with pytest.raises(RunError, match=r"ra\.pretrained: .*half is not a finished run: metrics\.json is missing"):
        run_ra_training(ra_config(f"ra.pretrained={half}"), tmp_path / "ra")


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_alpha_zero_reproduces_the_base_model(tmp_path, fusion, ready_trainer, ra_config):
    trainer = ready_trainer(tmp_path / "ra", f"ra.fusion={fusion}", "ra.alpha_max=0",
                            "ra.alpha_warmup_epochs=0", "ra.values=both")
    trainer.model.set_schedule(**trainer.schedule(1))
    bank = trainer.banks.eval_bank("valid", trainer.entries)
    prefixes, _ = trainer.eval_sets["valid"]
    trainer.model.eval()
    with torch.no_grad():
        seq = torch.from_numpy(prefixes)
        h = trainer.model.encoder(seq)
        nb, res = search_neighbours(trainer.model, bank, h, 5)
        out = trainer.model.fuse(h, nb)
        base = trainer.model.encoder.scores(trainer.model.encoder(seq))
    assert res.found.all()
    torch.testing.assert_close(out.scores_fused, base, rtol=0, atol=0)
    with_r, without_r = trainer.dual_evaluate("valid", bank)
    np.testing.assert_array_equal(with_r.ranks, without_r.ranks)


def test_unfreezing_phases_and_rebuild_interval_are_applied(tmp_path, ready_trainer, ra_config):
    phases = "ra.unfreeze=[{until_epoch: 1, train: [query_encoder, fusion]}, {until_epoch: 2, train: ['']}]"
    trainer = ready_trainer(tmp_path / "ra", phases, "ra.rebuild_every_early=2")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.begin_epoch(1)
    trainer.train_epoch(1)
    after = trainer.model.state_dict()
    encoder_keys = [k for k in before if k.startswith("encoder.")]
    assert all(torch.equal(before[k], after[k]) for k in encoder_keys)  # frozen in phase 0 (epoch 1)
    assert not torch.equal(before["query_encoder.up.weight"], after["query_encoder.up.weight"])
    assert not torch.equal(before["fusion.gate.weight"], after["fusion.gate.weight"])
    trainer.begin_epoch(2)
    assert all(p.requires_grad for p in trainer.model.parameters())

    out = tmp_path / "run"
    run_ra_training(ra_config(phases, "ra.rebuild_every_early=2"), out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["schedule"]["phase"] for r in lines] == [0, 1]
    assert [r["schedule"]["rebuilt"] for r in lines] == [True, False]


def test_a_phase_without_parameters_is_refused_at_setup(tmp_path, ready_trainer, ra_config):
    with pytest.raises(RunError, match="hold no parameters"):
        ready_trainer(tmp_path / "ra", "ra.fusion=fixed",
                      "ra.unfreeze=[{until_epoch: 1, train: [fusion]}]")
