"""DiffusionNFT loss: hand-derived values, and MARBLE's amortisation identity on a tiny SD3 model.

Amortisation (MARBLE Prop. 1, research/seed_algorithms.md §6.3): the NFT loss is affine in the advantage
(``r = A / 2C + 1/2``), so for coefficients on the simplex and no active clip
``sum_k alpha_k grad l(A_k) == grad l(sum_k alpha_k A_k)``.
"""

from __future__ import annotations

import pytest
import torch

from trainers.nft import amortised_advantages, nft_loss, nft_loss_terms, nft_policy_loss, old_policy_decay


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_loss_hand_derived_values():
    # x0 = 0, x_t = 1, sigma = 1/2, v = 1, v_old = 0, beta = 1:
    #   v+ = v = 1 -> x0+ = 1/2, |err| = 1/2, L+ = (1/4) / (1/2) = 1/2
    #   v- = 2 v_old - v = -1 -> x0- = 3/2, L- = (9/4) / (3/2) = 3/2
    x0, x_t = torch.zeros(3, 2), torch.ones(3, 2)
    v, v_old = torch.ones(3, 2), torch.zeros(3, 2)
    sigma = torch.full((3,), 0.5)
    l_pos, l_neg = nft_loss_terms(v, v_old, x_t, x0, sigma, beta=1.0)
    torch.testing.assert_close(l_pos, torch.full((3,), 0.5))
    torch.testing.assert_close(l_neg, torch.full((3,), 1.5))
    # C = 5: A = 0 -> r = 1/2 -> 5 * 1 = 5; A = 5 -> r = 1 -> 2.5; A = -10 is clipped to -5 -> r = 0 -> 7.5
    for a, want in ((0.0, 5.0), (5.0, 2.5), (-10.0, 7.5)):
        got = nft_policy_loss(l_pos, l_neg, torch.full((3,), a), beta=1.0, adv_clip_max=5.0)
        torch.testing.assert_close(got, torch.tensor(want))
    loss, stats = nft_loss(v, v_old, x_t, x0, sigma, torch.tensor([5.0, 0.0, -10.0]), beta=1.0, adv_clip_max=5.0,
                           ref_velocity=torch.zeros(3, 2), kl_weight=0.1)
    torch.testing.assert_close(loss, torch.tensor((2.5 + 5.0 + 7.5) / 3 + 0.1 * 1.0))
    assert float(stats.clip_frac) == pytest.approx(2 / 3)
    assert float(stats.approx_kl) == 1.0  # mean (v - v_old)^2
    # beta scales the mixing and divides the loss: beta = 1/2 -> v+ = 1/2, x0+ = 3/4, L+ = (9/16)/(3/4) = 3/4
    l_pos, _ = nft_loss_terms(v, v_old, x_t, x0, sigma, beta=0.5)
    torch.testing.assert_close(l_pos, torch.full((3,), 0.75))


def test_a_zero_weight_removes_a_samples_pull_towards_the_old_policy():
    """A zero advantage is not "no signal" in NFT: r = 1/2 pulls v towards v_old. A sample whose reward failed
    (weight 0) contributes nothing, and still counts in the mean (as a zero advantage does in GRPO)."""
    torch.manual_seed(0)
    v_old, x0, x_t = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    v = (v_old + 0.1 * torch.randn(3, 4)).requires_grad_()
    sigma = torch.full((3,), 0.5)
    l_pos, l_neg = nft_loss_terms(v, v_old, x_t, x0, sigma, beta=1.0)
    zero = torch.zeros(3)
    (grad,) = torch.autograd.grad(nft_policy_loss(l_pos, l_neg, zero, beta=1.0, adv_clip_max=5.0), v,
                                  retain_graph=True)
    assert bool((grad.abs().sum(1) > 0).all())  # the pull of r = 1/2
    w = torch.tensor([1.0, 0.0, 1.0])
    weighted = nft_policy_loss(l_pos, l_neg, zero, beta=1.0, adv_clip_max=5.0, weight=w)
    (grad_w,) = torch.autograd.grad(weighted, v)
    assert float(grad_w[1].abs().sum()) == 0.0
    torch.testing.assert_close(grad_w[[0, 2]], grad[[0, 2]])  # the mean still divides by 3
    full = 5.0 * (0.5 * l_pos + 0.5 * l_neg)
    torch.testing.assert_close(weighted, (full[0] + full[2]) / 3)


def test_amortised_advantages_leave_a_failed_reward_out_as_the_per_reward_losses_do():
    """Amortised MARBLE's one loss on ``(A_bar, w_bar)`` equals ``sum_k alpha_k l(A_k, w_k)`` (no clip active) when
    a sample's reward failed (``w_k = 0``; its ``A_k`` is 0): before, ``A_bar = sum_k alpha_k A_k`` with weight 1
    kept that reward's ``r = 1/2`` pull towards the old policy. With every weight 1 it is MARBLE's ``A_bar``."""
    torch.manual_seed(1)
    l_pos, l_neg = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    adv = torch.randn(4, 3).clamp(-2, 2)
    w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    adv = adv * w
    alpha = torch.tensor([0.5, 0.3, 0.2])
    a_bar, w_bar = amortised_advantages(adv, w, alpha)
    want = sum(alpha[k] * nft_policy_loss(l_pos, l_neg, adv[:, k], beta=0.5, adv_clip_max=5.0, weight=w[:, k])
               for k in range(3))
    torch.testing.assert_close(nft_policy_loss(l_pos, l_neg, a_bar, beta=0.5, adv_clip_max=5.0, weight=w_bar), want)
    torch.testing.assert_close(w_bar, torch.tensor([1.0, 0.7, 0.2, 0.8]))
    full, ones = amortised_advantages(adv, torch.ones(4, 3), alpha)
    torch.testing.assert_close(full, adv @ alpha)
    torch.testing.assert_close(ones, torch.ones(4))
    none, zero = amortised_advantages(adv, torch.zeros(4, 3), alpha)
    assert torch.equal(none, torch.zeros(4)) and torch.equal(zero, torch.zeros(4))


def test_old_policy_decay_schedules():
    assert old_policy_decay(0, rate=0.001, cap=0.5) == 0.0
    assert old_policy_decay(100, rate=0.001, cap=0.5) == pytest.approx(0.1)
    assert old_policy_decay(10_000, rate=0.001, cap=0.5) == 0.5
    assert old_policy_decay(50, rate=0.0075, cap=0.999, start=75) == 0.0
    assert old_policy_decay(175, rate=0.0075, cap=0.999, start=75) == pytest.approx(0.75)


def _tiny_flow_adapter(dtype):
    from diffalign.generators import adapter_for_pipeline
    from diffalign.testing.tiny import tiny_sd3_pipeline

    adapter = adapter_for_pipeline(tiny_sd3_pipeline(seed=0))
    adapter.add_lora(rank=4, alpha=8.0)
    adapter.to(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the B = 0 start so that every LoRA matrix gets a gradient
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return adapter


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_amortisation_identity_on_tiny_sd3(dtype, tol):
    """Exact in float64 (the acceptance bound is 1e-5); float32 round-off alone reaches ~2e-5."""
    adapter = _tiny_flow_adapter(dtype)
    params = adapter.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    b, k, c, beta = 4, 3, 5.0, 0.7
    cond = adapter.encode_prompts(["a red circle", "two blue squares", "a green triangle", "a circle"])
    x0 = adapter.prepare_latents(b, 32, 32, generator=gen).to(dtype)
    noise = torch.randn(x0.shape, generator=gen, dtype=dtype)
    sigma = torch.tensor([0.9, 0.6, 0.35, 0.2], dtype=dtype)
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    t = (1000 * sigma).float()

    def velocity(x):  # the adapter's forward without predict's float32 cast
        return adapter._forward(x, t, cond, 1.0)

    with torch.no_grad():
        v_old = velocity(x_t) + 0.01 * torch.randn(x0.shape, generator=gen, dtype=dtype)
    per_reward = torch.randn(b, k, generator=gen, dtype=dtype).clamp(-2.5, 2.5)  # no active clip (|A| < C)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=dtype)

    v = velocity(x_t)
    assert v.dtype == dtype
    l_pos, l_neg = nft_loss_terms(v, v_old, x_t, x0, sigma, beta=beta)
    per_loss_grads = []
    for j in range(k):
        loss_j = nft_policy_loss(l_pos, l_neg, per_reward[:, j], beta=beta, adv_clip_max=c)
        per_loss_grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_j, params,
                                                                                     retain_graph=True)]))
    combined = sum(a * g for a, g in zip(alpha, per_loss_grads))
    loss_bar = nft_policy_loss(l_pos, l_neg, per_reward @ alpha, beta=beta, adv_clip_max=c)
    amortised = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_bar, params, retain_graph=True)])
    rel = float((combined - amortised).norm() / amortised.norm())
    assert amortised.norm() > 0 and rel < tol, rel
    # with an active clip the identity breaks (documented limit, MARBLE's pareto fallback)
    big = per_reward.clone()
    big[0, 0] = 40.0
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nft_policy_loss(l_pos, l_neg, big[:, j], beta=beta, adv_clip_max=c), params, retain_graph=True)])
        for j in range(k)]
    clipped_bar = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nft_policy_loss(l_pos, l_neg, big @ alpha, beta=beta, adv_clip_max=c), params)])
    assert float((sum(a * g for a, g in zip(alpha, grads)) - clipped_bar).norm() / clipped_bar.norm()) > 1e-3
