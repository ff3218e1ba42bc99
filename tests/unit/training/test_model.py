import math

import pytest
import torch
import torch.nn.functional as F

from training.model import ModelConfig, SequenceEncoder, duorec_loss, info_nce


def tiny(**kw) -> SequenceEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=30, max_len=8, dim=16, n_layers=2, n_heads=2, inner=32, **kw)
    model = SequenceEncoder(cfg).eval()
    with torch.no_grad():  # a trained-looking recency bias (it starts at zero)
        for block in model.blocks:
            if block.attn.recency is not None:
                block.attn.recency.normal_(std=1.0)
    return model


positions = pytest.mark.parametrize("position", ["absolute", "relative", "both"])


@positions
def test_shapes_default_selection_is_last_real_item(position):
    model = tiny(position=position)
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    h = model(seq)
    assert h.shape == (2, 16)
    assert model.scores(h).shape == (2, 30)
    full = model.all_positions(seq)
    torch.testing.assert_close(h[0], full[0, 2])
    torch.testing.assert_close(h[1], full[1, 4])


@positions
def test_causality_later_items_never_change_earlier_outputs(position):
    model = tiny(position=position)
    seq = torch.tensor([[3, 9, 4, 17, 2, 5]])
    changed = seq.clone()
    changed[0, 4:] = torch.tensor([21, 22])
    a, b = model.all_positions(seq), model.all_positions(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@positions
def test_padding_after_prefix_does_not_matter(position):
    model = tiny(position=position)
    short = torch.tensor([[3, 9, 4]])
    padded = torch.tensor([[3, 9, 4, 0, 0, 0]])
    longer = torch.tensor([[3, 9, 4, 11, 12, 13]])
    rows, cols = torch.tensor([0]), torch.tensor([2])
    torch.testing.assert_close(model(short), model(padded))
    torch.testing.assert_close(model(short), model(longer, rows, cols))


@positions
def test_selected_rows_match_full_pass(position):
    model = tiny(position=position)
    seq = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]])
    rows = torch.tensor([0, 0, 1, 0])
    cols = torch.tensor([0, 5, 2, 3])
    full = model.all_positions(seq)
    torch.testing.assert_close(model(seq, rows, cols), full[rows, cols])


def test_recency_bias_is_used_and_trained_through_the_dropout_path():
    model = tiny(position="relative")
    assert model.pos_emb is None
    seq = torch.tensor([[3, 9, 4, 17, 2, 5]])
    before = model(seq)
    with torch.no_grad():
        model.blocks[0].attn.recency[:, 1] += 5.0  # favour the previous item
    assert not torch.allclose(before, model(seq))
    model.train()  # CPU dropout path: the bias is added to the written-out scores
    loss = model.scores(model(seq, torch.tensor([0, 0]), torch.tensor([2, 5]))).logsumexp(-1).sum()
    loss.backward()
    assert model.blocks[0].attn.recency.grad is not None
    assert model.blocks[0].attn.recency.grad.abs().sum() > 0


def test_bad_settings_raise_with_value():
    with pytest.raises(ValueError, match="n_heads=3"):
        ModelConfig(n_items=5, max_len=10, dim=16, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(n_items=5, max_len=10, dropout=1.0)
    with pytest.raises(ValueError, match="position"):
        ModelConfig(n_items=5, max_len=10, position="rotary")
    model = tiny()
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one item"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_info_nce_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    tau = 0.5
    z = torch.cat([z1, z2])
    sims = (z @ z.T) / tau
    expected = 0.0
    for i in range(4):
        pos = (i + 2) % 4
        others = [j for j in range(4) if j != i]
        expected += -(sims[i, pos] - torch.logsumexp(sims[i, others], 0))
    expected /= 4
    torch.testing.assert_close(info_nce(z1, z2, tau), expected)


def test_info_nce_label_mask_removes_false_negatives():
    z1 = torch.randn(4, 3)
    z2 = torch.randn(4, 3)
    labels = torch.tensor([1, 1, 2, 3])
    masked = info_nce(z1, z2, 1.0, labels=labels)
    # sample 0's row must ignore sample 1's two vectors: compute by hand
    z = torch.cat([z1, z2])
    sims = z @ z.T
    keep = [j for j in range(8) if j not in (0, 1, 5)]
    loss0 = -(sims[0, 4] - torch.logsumexp(sims[0, keep], 0))
    rows = []
    both = torch.cat([labels, labels])
    for i in range(8):
        partner = (i + 4) % 8
        keep_i = [j for j in range(8) if j != i and (both[j] != both[i] or j == partner)]
        rows.append(-(sims[i, partner] - torch.logsumexp(sims[i, keep_i], 0)))
    torch.testing.assert_close(rows[0], loss0)
    torch.testing.assert_close(masked, torch.stack(rows).mean())


@pytest.mark.parametrize(("mode", "keys"), [("un", {"cl_unsup"}), ("su", {"cl_sup"}), ("us", {"cl_unsup", "cl_sup"}),
                                            ("us_x", {"cl_sup"}), ("none", set())])
def test_duorec_loss_modes(mode, keys):
    h, hd, hs = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    out = duorec_loss(h, hd, hs, torch.arange(6), mode=mode, tau=1.0, sim="dot", lmd=0.3, lmd_sem=0.7,
                      mask_false_negatives=True)
    assert set(out) == keys
    if mode == "us_x":
        torch.testing.assert_close(out["cl_sup"], 0.7 * info_nce(hd, hs, 1.0, labels=torch.arange(6)))


def test_ce_at_init_is_near_uniform():
    model = tiny()
    h = model(torch.tensor([[1, 2, 3]]))
    ce = F.cross_entropy(model.scores(h), torch.tensor([4])).detach()
    assert abs(float(ce) - math.log(30)) < 0.5


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_keeps_the_right_fraction_and_mean(p):
    from training.model import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, p, training=True)
    kept = (y > 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.02 / (1 - p)
    assert torch.equal(dropout(x, p, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)
    # independent masks on consecutive calls
    assert not torch.equal(dropout(x, p, True) > 0, dropout(x, p, True) > 0)
