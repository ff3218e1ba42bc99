import pytest
import torch
from torch import nn

from training.model import ModelConfig, SequenceEncoder
from training.ra.finetune.fusion import GatedFusion
from training.ra.finetune.schedules import (
    Phase,
    RebuildSchedule,
    annealed_temperature,
    apply_unfreezing,
    linear_warmup,
    own_group,
    parse_phases,
    phase_index,
)


def test_annealed_temperature_values():
    got = [annealed_temperature(e, t0=1.0, decay=0.5, t_min=0.1) for e in range(1, 7)]
    assert got == pytest.approx([1.0, 0.5, 0.25, 0.125, 0.1, 0.1])
    assert annealed_temperature(3, t0=0.2, decay=1.0, t_min=0.05) == 0.2
    with pytest.raises(ValueError, match=r"decay=1\.5"):
        annealed_temperature(1, t0=1.0, decay=1.5, t_min=0.1)


def test_linear_warmup():
    got = [linear_warmup(e, target=0.8, warmup_epochs=4) for e in range(7)]
    assert got == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert linear_warmup(0, target=0.3, warmup_epochs=0) == 0.3
    assert linear_warmup(1, target=1.0, warmup_epochs=2, start=0.5) == pytest.approx(0.75)


def test_rebuild_more_often_early():
    sched = RebuildSchedule(early_every=2, early_epochs=10, late_every=5)
    epochs = [e for e in range(1, 27) if sched.should_rebuild(e)]
    assert epochs == [1, 3, 5, 7, 9, 11, 16, 21, 26]
    with pytest.raises(ValueError, match="late_every=0"):
        RebuildSchedule(early_every=1, early_epochs=0, late_every=0)


class TinyRA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = SequenceEncoder(ModelConfig(n_items=20, max_len=6, dim=8, n_heads=2, inner=16))
        self.query_encoder = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.fusion = GatedFusion(8)


PHASES = [
    {"until_epoch": 2, "train": ["query_encoder", "fusion"], "lr_mult": 1.0},
    {"until_epoch": 5, "train": ["query_encoder", "fusion", "encoder.blocks.1"], "lr_mult": 0.25},
    {"until_epoch": 8, "train": ["query_encoder", "fusion", "encoder", "encoder.blocks.1"], "lr_mult": 0.1},
]


def _ids(params):
    return {id(p) for p in params}


def test_unfreezing_sets_requires_grad_and_groups():
    model, phases = TinyRA(), parse_phases(PHASES)
    groups = apply_unfreezing(model, phases, epoch=1, base_lr=1e-3, module_lr={"fusion": 1e-2})
    assert [(g["name"], g["lr"]) for g in groups] == [("query_encoder", 1e-3), ("fusion", 1e-2)]
    assert _ids(p for p in model.parameters() if p.requires_grad) == _ids(
        [*model.query_encoder.parameters(), *model.fusion.parameters()]
    )
    assert not any(p.requires_grad for p in model.encoder.parameters())

    groups = apply_unfreezing(model, phases, epoch=3, base_lr=1e-3, module_lr={"fusion": 1e-2})
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder.blocks.1"]["lr"] == pytest.approx(2.5e-4)
    assert by_name["fusion"]["lr"] == pytest.approx(2.5e-3)
    assert _ids(by_name["encoder.blocks.1"]["params"]) == _ids(model.encoder.blocks[1].parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[1].parameters())
    assert not any(p.requires_grad for p in model.encoder.blocks[0].parameters())
    assert not model.encoder.item_emb.weight.requires_grad


def test_overlapping_names_give_each_param_one_group():
    model, phases = TinyRA(), parse_phases(PHASES)
    groups = apply_unfreezing(model, phases, epoch=20, base_lr=1.0)  # past the end: last phase stays
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    by_name = {g["name"]: _ids(g["params"]) for g in groups}
    assert by_name["encoder.blocks.1"] == _ids(model.encoder.blocks[1].parameters())
    assert _ids(model.encoder.blocks[0].parameters()) <= by_name["encoder"]
    torch.optim.Adam(groups)  # a valid optimizer spec: no parameter appears twice


def test_unknown_module_raises_before_training():
    bad = [*PHASES[:2], {"until_epoch": 9, "train": ["encoder.blocks.7"], "lr_mult": 0.1}]
    with pytest.raises(ValueError, match=r"'encoder\.blocks\.7'"):
        apply_unfreezing(TinyRA(), parse_phases(bad), epoch=1, base_lr=1e-3)  # phase 2 checked at epoch 1
    with pytest.raises(ValueError, match="'encodr'"):
        apply_unfreezing(TinyRA(), parse_phases(PHASES), epoch=1, base_lr=1e-3, module_lr={"encodr": 1.0})


def test_phase_parsing_and_index():
    phases = parse_phases(PHASES)
    assert phases[1] == Phase(5, ("query_encoder", "fusion", "encoder.blocks.1"), 0.25)
    assert [phase_index(phases, e) for e in (1, 2, 3, 5, 6, 8, 9, 31)] == [0, 0, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="lr_mul"):
        parse_phases([{"until_epoch": 2, "train": ["fusion"], "lr_mul": 1.0}])
    with pytest.raises(ValueError, match="increase"):
        parse_phases([PHASES[1], PHASES[0]])


def test_own_group_moves_a_module_out_of_any_group():
    model, phases = TinyRA(), parse_phases(PHASES)
    groups = own_group(apply_unfreezing(model, phases, epoch=20, base_lr=1.0), model.fusion, "fusion", 0.3)
    by_name = {g["name"]: g for g in groups}
    assert by_name["fusion"]["lr"] == 0.3  # its own rate, whatever the phase multiplier
    assert _ids(by_name["fusion"]["params"]) == _ids(model.fusion.parameters())
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    # a phase that freezes the module gives it no group; the others are untouched
    frozen = apply_unfreezing(model, parse_phases([{"until_epoch": 1, "train": ["query_encoder"]}]), 1, 1.0)
    assert [g["name"] for g in own_group(frozen, model.fusion, "fusion", 0.3)] == ["query_encoder"]
