"""The distillation objective against an independent float64 reference (values and gradients)."""

import math

import pytest
import torch

from kdcli.evaluate import agreement
from kdcli.losses import distillation_loss, hard_loss, logit_loss, soft_loss, soft_targets


def reference_loss(z_s, z_t, y, T, alpha):
    """Written from the paper's formula with explicit sums, no torch.nn.functional."""
    def softmax(z):
        e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)
    q, p = softmax(z_t / T), softmax(z_s / T)
    kl = (q * (torch.log(q) - torch.log(p))).sum(-1).mean()
    ce = -torch.log(softmax(z_s)[torch.arange(len(y)), y]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T", [1.0, 2.5, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_and_gradient_match_reference(T, alpha):
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    z_s = (torch.randn(16, 10, generator=g, dtype=torch.float64) * 3).requires_grad_()
    z_ref = z_s.detach().clone().requires_grad_()

    ours = distillation_loss(z_s, soft_targets(z_t.unsqueeze(0), T), y, T, alpha)
    ref = reference_loss(z_ref, z_t, y, T, alpha)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-10)
    assert torch.allclose(z_s.grad, z_ref.grad, atol=1e-10)


def test_soft_term_and_gradient_vanish_when_logits_match():
    z = torch.randn(8, 10, dtype=torch.float64) * 5
    z_s = z.clone().requires_grad_()
    loss = soft_loss(z_s, soft_targets(z.unsqueeze(0), 4.0), 4.0)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert z_s.grad.abs().max() < 1e-12


def test_high_temperature_gradient_approaches_logit_difference_over_n():
    """Paper §2.1: at high T, dL/dz_s ~ (z_s - z_t) / N for zero-mean logits (per example)."""
    g = torch.Generator().manual_seed(1)
    n_classes, T = 10, 1000.0
    z_t = torch.randn(1, n_classes, generator=g, dtype=torch.float64)
    z_t -= z_t.mean()
    z_s = torch.randn(1, n_classes, generator=g, dtype=torch.float64)
    z_s = (z_s - z_s.mean()).requires_grad_()
    soft_loss(z_s, soft_targets(z_t.unsqueeze(0), T), T).backward()
    expected = (z_s.detach() - z_t) / n_classes
    assert torch.allclose(z_s.grad, expected, rtol=1e-2, atol=1e-6)
    # and at low T it does not (the approximation is a high-T one)
    z_low = z_s.detach().clone().requires_grad_()
    soft_loss(z_low, soft_targets(z_t.unsqueeze(0), 1.0), 1.0).backward()
    assert not torch.allclose(z_low.grad, expected, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_logit_matching_is_half_the_mean_squared_difference_of_zero_meaned_logits(T):
    """Paper §2.1, written out: 1/2 sum_c (z_c - v_c)^2 / N with each example's logits centred; a constant
    added to the teacher's or the student's logits changes nothing, nor does the temperature."""
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(6, 10, generator=g, dtype=torch.float64) * 4
    z_s = torch.randn(6, 10, generator=g, dtype=torch.float64) * 4
    centred = lambda z: z - z.mean(-1, keepdim=True)
    expected = (0.5 * (centred(z_s) - centred(z_t)) ** 2).sum(-1).mean() / 10
    shifted_teacher = z_t + torch.arange(6, dtype=torch.float64).unsqueeze(1) * 7
    ours = logit_loss(z_s + 3.0, soft_targets(shifted_teacher.unsqueeze(0), T), T)
    assert torch.allclose(ours, expected, atol=1e-10)


def test_logit_matching_gradient_is_the_high_temperature_limit_of_distillation():
    g = torch.Generator().manual_seed(4)
    z_t = torch.randn(4, 10, generator=g, dtype=torch.float64)
    z_s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    grads = {}
    for match, T in (("logits", 1.0), ("soft_targets", 1000.0)):
        z = z_s.clone().requires_grad_()
        distillation_loss(z, soft_targets(z_t.unsqueeze(0), T), None, T, 1.0, match).backward()
        grads[match] = z.grad
    assert torch.allclose(grads["logits"], grads["soft_targets"], rtol=1e-2, atol=1e-6)
    assert grads["logits"].abs().max() > 1e-3  # the logits differ: a real gradient, not two zeros


def test_logit_matching_with_one_temperature_per_member():
    g = torch.Generator().manual_seed(5)
    z_t = torch.randn(1, 5, 10, generator=g, dtype=torch.float64)
    z_s = torch.randn(2, 5, 10, generator=g, dtype=torch.float64)
    temps = torch.tensor([2.0, 20.0], dtype=torch.float64)
    targets = torch.stack([soft_targets(z_t, t) for t in temps]).squeeze(1)  # (members, n, classes)
    stacked = logit_loss(z_s, targets, temps.reshape(-1, 1, 1))
    alone = sum(logit_loss(z_s[k], targets[k], temps[k].item()) for k in range(2))
    assert torch.allclose(stacked, alone, atol=1e-10)


@pytest.mark.parametrize("T", [1.0, 100.0])
def test_extreme_logits_stay_finite(T):
    z_t = torch.tensor([[50.0, -50.0] + [0.0] * 8, [-50.0] * 9 + [50.0]])
    z_s = torch.tensor([[-50.0, 50.0] + [0.0] * 8, [50.0] * 9 + [-50.0]], requires_grad=True)
    loss = distillation_loss(z_s, soft_targets(z_t.unsqueeze(0), T), torch.tensor([0, 9]), T, 0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z_s.grad).all()


def test_stacked_members_sum_their_own_batch_means():
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(3, 5, 10, generator=g)
    z_t = torch.randn(1, 5, 10, generator=g)
    y = torch.randint(0, 10, (3, 5), generator=g)
    temps = torch.tensor([1.0, 4.0, 20.0]).reshape(3, 1, 1)
    targets = torch.stack([soft_targets(z_t, t) for t in temps.flatten()])
    stacked = distillation_loss(z_s, targets, y, temps, 0.7)
    separate = sum(distillation_loss(z_s[k], targets[k], y[k], float(temps[k]), 0.7) for k in range(3))
    assert torch.allclose(stacked, separate, atol=1e-5)


def test_ensemble_combination_rules_by_hand():
    z = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])  # two members, one example
    p1 = torch.softmax(z[0, 0], -1)
    p2 = torch.softmax(z[1, 0], -1)
    arithmetic = soft_targets(z, 1.0, "mean_probs").exp()[0]
    assert torch.allclose(arithmetic, (p1 + p2) / 2)
    geometric = soft_targets(z, 1.0, "mean_logits").exp()[0]
    g = torch.sqrt(p1 * p2)
    assert torch.allclose(geometric, g / g.sum())


def test_hard_loss_is_cross_entropy():
    z = torch.tensor([[math.log(3.0), 0.0]])
    assert torch.allclose(hard_loss(z, torch.tensor([0])), torch.tensor(-math.log(0.75)))


def test_agreement_counts_disagreements_and_the_kl_from_the_reference():
    reference = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    this = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    found = agreement(this.log(), reference.log())
    assert found["n_disagree"] == 1 and found["agreement"] == 0.5 and found["n_examples"] == 2
    by_hand = sum(sum(r * math.log(r / t) for r, t in zip(rr, tt)) for rr, tt in zip(reference.tolist(), this.tolist())) / 2
    assert found["kl_from_reference"] == pytest.approx(by_hand, abs=1e-5)
