import math

import pytest
import torch
import torch.nn.functional as F

from training.ra.finetune.fusion import masked_log_softmax
from training.ra.finetune.losses import (
    USEFULNESS,
    kl_divergence,
    ra_loss,
    retrieval_kl_loss,
    usefulness_log_probs,
)

# p = [0.5, 0.5], q = [0.9, 0.1], worked by hand:
#   KL(p‖q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)      = 0.5108256
#   KL(q‖p) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5)      = 0.3680642
#   JS      = ½ KL(p‖m) + ½ KL(q‖m), m = [0.7, 0.3]  = 0.1017492
P = torch.tensor([[0.5, 0.5]]).log()
Q = torch.tensor([[0.9, 0.1]]).log()


def test_forward_is_kl_p_q():
    torch.testing.assert_close(kl_divergence(P, Q, "forward"), torch.tensor([0.5108256]))


def test_reverse_is_kl_q_p():
    torch.testing.assert_close(kl_divergence(P, Q, "reverse"), torch.tensor([0.3680642]))


def test_forward_and_reverse_differ_and_swap():
    fwd, rev = kl_divergence(P, Q, "forward"), kl_divergence(P, Q, "reverse")
    assert not torch.allclose(fwd, rev)
    torch.testing.assert_close(kl_divergence(Q, P, "forward"), rev)


def test_js_value_symmetric_and_bounded():
    torch.testing.assert_close(kl_divergence(P, Q, "js"), torch.tensor([0.1017492]))
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(50, 6, generator=g) * 5, dim=1)
    b = torch.log_softmax(torch.randn(50, 6, generator=g) * 5, dim=1)
    js = kl_divergence(a, b, "js")
    torch.testing.assert_close(js, kl_divergence(b, a, "js"))
    assert torch.all(js >= 0) and torch.all(js <= math.log(2) + 1e-6)
    disjoint_p = torch.tensor([[1.0, 0.0]]).log()
    disjoint_q = torch.tensor([[0.0, 1.0]]).log()
    mask = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(kl_divergence(disjoint_p, disjoint_q, "js", mask), torch.tensor([math.log(2)]))


def test_matches_torch_kl_div():
    # F.kl_div(input, target) is KL(target ‖ input) — the convention the bug in this family trips on.
    a = torch.log_softmax(torch.randn(5, 4), dim=1)
    b = torch.log_softmax(torch.randn(5, 4), dim=1)
    ref = F.kl_div(b, a, reduction="none", log_target=True).sum(1)
    torch.testing.assert_close(kl_divergence(a, b, "forward"), ref)


def test_masked_entries_are_excluded_from_both():
    logits_p = torch.tensor([[0.0, 0.0, 5.0]])
    logits_q = torch.tensor([[math.log(0.9), math.log(0.1), -3.0]])
    mask = torch.tensor([[True, True, False]])
    p_log, q_log = masked_log_softmax(logits_p, mask), masked_log_softmax(logits_q, mask)
    torch.testing.assert_close(kl_divergence(p_log, q_log, "forward", mask), torch.tensor([0.5108256]))
    torch.testing.assert_close(kl_divergence(p_log, q_log, "reverse", mask), torch.tensor([0.3680642]))


def test_bad_direction_raises():
    with pytest.raises(ValueError, match="'backward'"):
        kl_divergence(P, Q, "backward")


def test_usefulness_sources():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # items 1..4
    nb_targets = torch.tensor([[4, 1, 2]])
    targets = torch.tensor([1])
    assert USEFULNESS["score"](scores, nb_targets, targets).tolist() == [[4.0, 1.0, 2.0]]
    assert USEFULNESS["match"](scores, nb_targets, targets).tolist() == [[0.0, 1.0, 0.0]]
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    sim = USEFULNESS["similarity"](scores, nb_targets, targets, emb)
    torch.testing.assert_close(sim, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_usefulness_has_no_gradient_and_kl_trains_retrieval():
    scores = torch.randn(3, 10, requires_grad=True)
    sim = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False] * 4, [True, True, False, False]])
    nb_targets = torch.randint(1, 11, (3, 4))
    use_log = usefulness_log_probs(USEFULNESS["score"](scores, nb_targets, None), mask)
    ret_log = masked_log_softmax(sim / 0.5, mask)
    for direction in ("forward", "reverse", "js"):
        sim.grad = None
        loss = retrieval_kl_loss(ret_log, use_log, mask, direction)
        loss.backward(retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()
        assert torch.all(sim.grad[1] == 0) and torch.all(sim.grad[~mask] == 0)
    assert scores.grad is None


def test_kl_loss_averages_over_examples_with_neighbours_only():
    use_log = torch.tensor([[0.5, 0.5], [0.3, 0.7]]).log()
    ret_log = torch.tensor([[0.9, 0.1], [0.3, 0.7]]).log()
    mask = torch.tensor([[True, True], [False, False]])
    loss = retrieval_kl_loss(ret_log, use_log, mask, "forward")  # KL(usefulness ‖ retrieval)
    torch.testing.assert_close(loss, torch.tensor(0.5108256))
    none = retrieval_kl_loss(ret_log, use_log, torch.zeros(2, 2, dtype=torch.bool))
    assert none.item() == 0.0


def test_ra_loss_terms_and_the_loss_gate():
    torch.manual_seed(0)
    scores_h, scores_f = torch.randn(3, 6), torch.randn(3, 6)
    targets = torch.tensor([1, 6, 3])
    mask = torch.ones(3, 2, dtype=torch.bool)
    ret_log = torch.log_softmax(torch.randn(3, 2), dim=1)
    use_log = torch.log_softmax(torch.randn(3, 2), dim=1)
    kw = {"retrieval_log": ret_log, "usefulness_log": use_log, "mask": mask, "direction": "reverse"}
    out = ra_loss(scores_h, scores_f, targets, enhanced_weight=0.5, kl_weight=0.1, **kw)
    torch.testing.assert_close(out["ce"], F.cross_entropy(scores_h, targets - 1))
    torch.testing.assert_close(out["ce_fused"], 0.5 * F.cross_entropy(scores_f, targets - 1))
    torch.testing.assert_close(out["kl"], 0.1 * kl_divergence(ret_log, use_log, "forward").mean())

    gate = torch.tensor([0.9, 0.1, 0.8])
    gated = ra_loss(
        scores_h,
        scores_f,
        targets,
        enhanced_weight=0.5,
        kl_weight=0.1,
        gate_score=gate,
        gate_threshold=0.5,
        **kw,
    )
    per = F.cross_entropy(scores_f, targets - 1, reduction="none")
    torch.testing.assert_close(gated["ce_fused"], 0.5 * (per[0] + per[2]) / 3)
    torch.testing.assert_close(gated["kl"], 0.1 * kl_divergence(ret_log, use_log, "forward")[[0, 2]].mean())
    with pytest.raises(ValueError, match="gate_score"):
        ra_loss(scores_h, scores_f, targets, enhanced_weight=0.5, kl_weight=0.1, gate_threshold=0.5, **kw)
