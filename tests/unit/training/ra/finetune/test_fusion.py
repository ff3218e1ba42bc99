import math

import pytest
import torch

from training.ra.finetune.fusion import (
    FUSIONS,
    CrossAttention,
    Neighbours,
    SimilarityAttention,
    build_attention,
    build_fusion,
    entropy_temperature,
    masked_log_softmax,
)

B, K, D, N = 4, 3, 8, 12


def neighbours(seed: int = 0, **kw) -> Neighbours:
    g = torch.Generator().manual_seed(seed)
    base = {
        "sim": torch.rand(B, K, generator=g) * 2 - 1,
        "target_emb": torch.randn(B, K, D, generator=g),
        "seq_repr": torch.randn(B, K, D, generator=g),
        "keys": torch.randn(B, K, D, generator=g),
        "usefulness": torch.rand(B, K, generator=g),
    }
    base.update(kw)
    return Neighbours(**base)


def test_retrieval_weights_are_softmax_of_sim_over_temperature():
    nb = neighbours()
    ret = SimilarityAttention(temperature=0.5)(torch.zeros(B, D), nb)
    torch.testing.assert_close(ret.weights, torch.softmax(nb.sim / 0.5, dim=1))
    expected_r = torch.einsum("bk,bkd->bd", ret.weights, nb.target_emb)
    torch.testing.assert_close(ret.r, expected_r)


@pytest.mark.parametrize("values", ["target", "sequence", "both"])
def test_value_sources(values):
    nb = neighbours()
    ret = SimilarityAttention(temperature=1.0, values=values)(torch.zeros(B, D), nb)
    w = torch.softmax(nb.sim, dim=1)
    t = torch.einsum("bk,bkd->bd", w, nb.target_emb)
    s = torch.einsum("bk,bkd->bd", w, nb.seq_repr)
    expected = {"target": t, "sequence": s, "both": 0.5 * (t + s)}[values]
    torch.testing.assert_close(ret.r, expected)


def test_usefulness_threshold_masks_and_all_masked_means_no_retrieval():
    usefulness = torch.tensor([[0.9, 0.1, 0.8], [0.1, 0.1, 0.1], [0.9, 0.9, 0.9], [0.2, 0.6, 0.0]])
    emb = torch.randn(B, K, D)
    emb[1] = float("nan")  # padded garbage in a fully masked row must not leak
    nb = neighbours(usefulness=usefulness, target_emb=emb)
    ret = SimilarityAttention(temperature=0.2, usefulness_threshold=0.5)(torch.zeros(B, D), nb)
    assert ret.mask.tolist() == (usefulness >= 0.5).tolist()
    assert ret.has_neighbours.tolist() == [True, False, True, True]
    assert torch.all(ret.weights[~ret.mask] == 0)
    torch.testing.assert_close(ret.weights.sum(1), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(ret.r[1], torch.zeros(D))
    # row 0 uses neighbours 0 and 2 only
    w0 = torch.softmax(nb.sim[0, [0, 2]] / 0.2, dim=0)
    torch.testing.assert_close(ret.r[0], w0 @ emb[0, [0, 2]])


def test_masked_log_softmax_all_masked_row_has_no_nan_gradient():
    logits = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_log_softmax(logits, mask)
    assert torch.isneginf(out[1]).all() and torch.isneginf(out[0, 1])
    out.exp().sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_temperature_rises_with_uncertainty():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.5], [0.9, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, False]])
    t = entropy_temperature(sim, mask, t0=0.1, gain=1.0)
    assert t[0] < t[1]
    torch.testing.assert_close(t[1], torch.tensor(0.2))  # uniform: H = 1, t = t0 · 2
    torch.testing.assert_close(t[2], torch.tensor(0.1))  # one neighbour: no uncertainty
    flatter = SimilarityAttention(temperature=0.1, entropy_gain=1.0)(
        torch.zeros(3, D), neighbours(sim=sim, target_emb=torch.randn(3, K, D))
    )
    plain = SimilarityAttention(temperature=0.1)(
        torch.zeros(3, D), neighbours(sim=sim, target_emb=torch.randn(3, K, D))
    )
    assert flatter.weights[0].max() < plain.weights[0].max()


def test_cross_attention_masks_and_learns():
    torch.manual_seed(0)
    module = CrossAttention(D, usefulness_threshold=0.5)
    usefulness = torch.ones(B, K)
    usefulness[2] = 0.0
    nb = neighbours(usefulness=usefulness)
    h = torch.randn(B, D)
    ret = module(h, nb)
    assert ret.has_neighbours.tolist() == [True, True, False, True]
    assert torch.equal(ret.r[2], torch.zeros(D))
    torch.testing.assert_close(ret.weights.sum(1), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    before = module.query.weight.detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    (ret.r * torch.randn(B, D)).sum().backward()
    opt.step()
    assert not torch.equal(before, module.query.weight)


def _inputs(name: str, ret_mask: torch.Tensor | None = None):
    torch.manual_seed(1)
    nb = neighbours(valid=ret_mask)
    ret = SimilarityAttention(temperature=0.5)(torch.zeros(B, D), nb)
    h = torch.randn(B, D, requires_grad=True)
    if FUSIONS[name].output == "scores":
        emb = torch.randn(N, D)
        return h @ emb.T, ret.r @ emb.T, ret
    return h, ret.r, ret


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusion_is_exactly_base_when_alpha_is_zero(name):
    a, b, ret = _inputs(name)
    fusion = build_fusion(name, D, alpha_max=0.0)
    out = fusion(a, b, ret)
    assert torch.equal(out.fused, a)
    assert out.stats["alpha_mean"].item() == 0.0


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusion_is_exactly_base_without_neighbours(name):
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[[0, 2]] = False  # examples 0 and 2 have no usable neighbour
    a, b, ret = _inputs(name, valid)
    b = b.clone()
    b[0] = float("nan")  # whatever sits there must not matter
    fusion = build_fusion(name, D, alpha_max=0.8)
    out = fusion(a, b, ret)
    assert torch.equal(out.fused[[0, 2]], a[[0, 2]])
    assert torch.all(out.alpha[[0, 2]] == 0)
    assert not torch.equal(out.fused[[1, 3]], a[[1, 3]])  # and it does something elsewhere
    assert out.stats["retrieval_rate"].item() == 0.5


def test_fixed_and_adaptive_alpha_values():
    a, b, ret = _inputs("fixed")
    out = build_fusion("fixed", D, alpha_max=0.25)(a, b, ret)
    torch.testing.assert_close(out.fused, 0.75 * a + 0.25 * b)
    out = build_fusion("adaptive", D, alpha_max=0.6, temperature=0.2)(a, b, ret)
    alpha = torch.sigmoid(ret.sim.mean(1) / 0.2) * 0.6
    torch.testing.assert_close(out.alpha[:, 0], alpha)
    torch.testing.assert_close(out.stats["alpha_std"], alpha.std(unbiased=False))


def test_stats_alpha_std_is_across_examples():
    a, b, ret = _inputs("gated")
    fusion = build_fusion("gated", D)
    out = fusion(a, b, ret)
    gate = out.alpha  # (B, D)
    torch.testing.assert_close(out.stats["alpha_std"], gate.mean(1).std(unbiased=False))
    torch.testing.assert_close(out.stats["alpha_dim_std"], gate.std(1, unbiased=False).mean())
    ratio = a.norm(dim=1) / b.norm(dim=1)
    torch.testing.assert_close(out.stats["norm_ratio"], ratio.mean().detach())
    assert -1.0 <= out.stats["cos_fused"].item() <= 1.0


def test_gate_layernorm_makes_gate_scale_invariant_in_r():
    a, b, ret = _inputs("gated")
    fusion = build_fusion("gated", D)
    g1 = fusion(a, b, ret).alpha
    g2 = fusion(a, 100.0 * b, ret).alpha
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_entropy_fusion_favours_the_confident_side():
    ret = SimilarityAttention()(
        torch.zeros(2, D), neighbours(sim=torch.zeros(2, K), target_emb=torch.zeros(2, K, D))
    )
    sharp = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    flat = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    out = build_fusion("entropy", D, alpha_max=1.0)(sharp, flat, ret)
    assert out.alpha[0, 0] < 0.5 < out.alpha[1, 0]
    torch.testing.assert_close(out.fused, (1 - out.alpha) * sharp + out.alpha * flat)


@pytest.mark.parametrize(("name", "param"), [("gated", "gate.weight"), ("attention", "query")])
def test_learned_fusion_params_move_after_one_step(name, param):
    a, b, ret = _inputs(name)
    fusion = build_fusion(name, D)
    before = fusion.get_parameter(param).detach().clone()
    opt = torch.optim.Adam(fusion.parameters(), lr=0.01)
    target = torch.randn(B, D)
    loss = (fusion(a.detach(), b, ret).fused - target).pow(2).sum()
    loss.backward()
    opt.step()
    assert not torch.equal(before, fusion.get_parameter(param))


def test_unknown_fusion_and_value_source_raise():
    with pytest.raises(ValueError, match="'nope'"):
        build_fusion("nope", D)
    with pytest.raises(ValueError, match="'both_x'"):
        SimilarityAttention(values="both_x")
    assert math.isclose(build_fusion("fixed", D, alpha_max=0.3).alpha_max, 0.3)


def test_build_retrieval():
    assert isinstance(build_attention("similarity", D, temperature=0.3), SimilarityAttention)
    assert isinstance(build_attention("cross_attention", D), CrossAttention)
    with pytest.raises(ValueError, match="'knn'"):
        build_attention("knn", D)
