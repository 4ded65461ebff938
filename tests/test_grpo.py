"""GRPO pure functions: advantages, loss sign, clipping, the KL estimator, aggregation, zero-variance groups."""

import math

import pytest
import torch

from nanoseek.rl.grpo import (aggregate, completion_batch, group_advantages, grpo_loss, kl_estimator,
                              token_log_probs, zero_variance_fraction)


def test_group_advantages_normalise_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 1.0, 1.0])
    a = group_advantages(r, 4)
    g1 = a[:4]
    assert g1.mean().abs() < 1e-6 and g1.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert g1[0] > 0 and (g1[1:] < 0).all()
    assert a[4:].tolist() == pytest.approx([-1, -1, 1, 1], abs=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_zero_variance_groups_get_zero_advantage_and_are_counted():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.1, 0.1, 0.1, 0.1])
    a = group_advantages(r, 3)
    assert torch.isfinite(a).all()
    assert a[:3].tolist() == [0, 0, 0] and a[9:].tolist() == [0, 0, 0]
    assert zero_variance_fraction(r, 3) == pytest.approx(0.75)  # groups 1, 2 and 4
    assert zero_variance_fraction(torch.tensor([0.0, 1.0]), 2) == 0.0


def test_kl_estimator_value_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -2.0])
    kl = kl_estimator(logp, ref)
    x = (ref - logp.detach())
    assert kl.tolist() == pytest.approx((x.exp() - x - 1).tolist())
    assert kl[0].item() == 0.0 and (kl >= 0).all()
    kl.sum().backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp): pushes logp toward ref from either side.
    assert logp.grad.tolist() == pytest.approx((1 - x.exp()).tolist())
    assert logp.grad[1] < 0 and logp.grad[2] > 0


def test_kl_estimator_is_unbiased_for_kl_pi_ref():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    est = kl_estimator(p.log()[samples], q.log()[samples]).mean()
    true = (p * (p.log() - q.log())).sum()  # KL(pi || pi_ref) with samples from pi
    assert est.item() == pytest.approx(true.item(), rel=0.03)


def _logp(B=2, T=3, requires_grad=True):
    torch.manual_seed(0)
    return (torch.randn(B, T) - 1.0).requires_grad_(requires_grad)


def test_loss_sign_follows_advantage():
    logp = _logp()
    mask = torch.ones(2, 3)
    loss, st = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, beta=0.0)
    loss.backward()
    # minimising the loss raises the log-prob of the positive-advantage row and lowers the other's
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()
    assert st.ratio_mean == pytest.approx(1.0) and st.clip_fraction == 0.0 and st.tokens == 6
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # on-policy, zero-mean advantages


def test_clipping_zeroes_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.5, -0.5, 0.05, -0.05]], requires_grad=True)  # ratios e^.5, e^-.5, ~1.05, ~0.95
    loss, st = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 4), clip_eps=0.2, beta=0.0)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0.0  # A > 0 and ratio above 1 + eps: clipped
    assert g[1] != 0.0  # A > 0 and ratio below 1 - eps: the unclipped term is the min, still pushes up
    assert g[2] != 0.0 and g[3] != 0.0
    assert st.clip_fraction == pytest.approx(0.25)
    logp.grad = None
    loss, st = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 4), clip_eps=0.2, beta=0.0)
    loss.backward()
    assert logp.grad[0, 1] == 0.0 and logp.grad[0, 0] != 0.0 and st.clip_fraction == pytest.approx(0.25)
    expected = -(torch.minimum(torch.exp(logp.detach()) * -1, torch.clamp(torch.exp(logp.detach()), 0.8, 1.2) * -1)).mean()
    assert loss.item() == pytest.approx(expected.item())


def test_beta_adds_the_kl_penalty():
    logp = _logp()
    ref = logp.detach() - 0.3
    mask = torch.ones(2, 3)
    adv = torch.zeros(2)
    loss, st = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=0.5)
    k = kl_estimator(logp.detach(), ref).mean()
    assert st.kl == pytest.approx(k.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * k.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp.detach(), adv, mask, beta=0.1)


def test_token_vs_sequence_aggregation():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(x, mask, "token").item() == pytest.approx(8 / 5)   # every token weighs the same
    assert aggregate(x, mask, "sequence").item() == pytest.approx(2.5)  # every sequence weighs the same
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "batch")
    # token-level: a long correct answer gets more total weight than a short one; sequence-level: equal.
    logp = torch.zeros(2, 4, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), mask, beta=0.0, aggregation="sequence")
    loss.backward()
    assert logp.grad[0].sum().item() == pytest.approx(logp.grad[1].sum().item())


def test_token_log_probs_and_completion_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    lp = token_log_probs(logits, targets)
    ref = torch.log_softmax(logits, -1)
    assert lp[0, 0].item() == pytest.approx(ref[0, 0, 1].item(), rel=1e-5)
    assert lp[1, 2].item() == pytest.approx(ref[1, 2, 3].item(), rel=1e-5)
    assert lp[0, 2].item() == 0.0
    ids, tg, mask = completion_batch([[5, 6, 7], [5]], [[8, 9], [10, 11, 12]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 10, 11, 0]]
    assert tg.tolist() == [[6, 7, 8, 9], [10, 11, 12, -100]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert math.isclose(float(mask.sum()), 5)
