"""Known-answer tests for sampler steps, schedules, guided samplers and MARBLE's balancing helpers.

Each test pins one number (or short vector) computed by hand or by diffusers itself, never by calling the
code under test a second time:

* steps: the Gaussian log-prob differentiates through the mean only (``x`` detached; per-dim MEAN
  reduction, diffalign/types.py); Flow-GRPO's SDE step at ``sigma = 1`` uses the schedule's second sigma as
  the cap, so its first std is exactly ``a`` (research/grpo_family.md §1.2).
* schedules: ``set_alpha_to_one``, ``shift_terminal`` and the linear dynamic time shift against diffusers'
  ``DDIMScheduler`` / ``FlowMatchEulerDiscreteScheduler``.
* guided samplers: DOIT's ``reuse_eps`` one-step lookahead ``x0 = (x' - sigma' eps) / alpha'``
  (research/seed_algorithms.md §5.2); FK steering's weight bookkeeping after resampling, its ESS and
  NaN filling; SVDD's ``softmax(v / alpha)`` selection (seed_algorithms.md §1, §7.12).
* MARBLE (seed_algorithms.md §6.2): the harmonised direction is ADDED to ``.grad`` (the KL gradient kept
  outside the QP survives) and Frank–Wolfe's line-search step stays in ``[0, 1]`` (iterates on the simplex).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.balance import RewardGradients, min_norm_frank_wolfe
from samplers import flow_schedule, flow_schedule_from_scheduler_config, flow_sigmas, scheduled_step, vp_schedule
from samplers.guided import baselines
from samplers.guided.doob import one_step_x0
from samplers.steps import gaussian_log_prob

# ----------------------------------------------------------------------------- steps


def test_gaussian_log_prob_gradient_flows_through_mean_only():
    # lp = mean_d[-(x - m)^2 / 2 - log 1 - log sqrt(2 pi)], x treated as a constant:
    # d lp / d m_d = (x_d - m_d) / std^2 / D = 1 / 2 for D = 2 (0 if x = m + 1 were differentiated too)
    mean = torch.zeros(1, 2, requires_grad=True)
    x = mean + 1.0
    lp = gaussian_log_prob(x, mean, torch.tensor(1.0))
    torch.testing.assert_close(lp.detach(), torch.tensor([-0.5 - 0.5 * math.log(2 * math.pi)]))
    lp.sum().backward()
    torch.testing.assert_close(mean.grad, torch.tensor([[0.5, 0.5]]))


def test_flow_sde_first_step_std_uses_second_sigma_as_cap():
    # Flow-GRPO: g = a sqrt(s / (1 - s_1)) at s = 1, std = g sqrt(s - s_1) = a sqrt((1 - s_1) / (1 - s_1)) = a
    a = 0.7
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    s1 = float(ref.sigmas[1])
    sch = flow_schedule(flow_sigmas(10, shift=3.0))
    out = scheduled_step("flow_sde", torch.zeros(1, 3), torch.zeros(1, 3), sch, 0, noise_level=a)
    g = a * math.sqrt(1.0 / (1.0 - s1))
    torch.testing.assert_close(out.std, torch.tensor([a]), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.extras["g"].reshape(-1), torch.tensor([g]), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- schedules


def test_vp_schedule_set_alpha_to_one_matches_ddim_scheduler():
    # leading spacing, 10 steps: timesteps 900..0, the last step goes to t = -100 -> final_alpha_cumprod = 1
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=True)
    ref.set_timesteps(10)
    ours = vp_schedule(ref.alphas_cumprod, 10, set_alpha_to_one=True)
    assert float(ref.final_alpha_cumprod) == 1.0
    assert float(ours.alphas[-1]) == 1.0 and float(ours.sigmas[-1]) == 0.0
    torch.testing.assert_close(ours.alphas[:-1] ** 2, ref.alphas_cumprod[ref.timesteps], rtol=1e-6, atol=0)
    # the last DDIM step (eta 0) lands on the clean estimate, as diffusers' step does
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    want = ref.step(eps, ref.timesteps[-1], x, eta=0.0).prev_sample
    got = scheduled_step("ddim", eps, x, ours, 9, noise_level=0.0).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_shift_terminal_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=0.1)
    ref.set_timesteps(10)
    ours = flow_schedule_from_scheduler_config(ref.config, 10)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-6)
    # the last nonzero sigma is the terminal value
    assert abs(float(ours.sigmas[-2]) - 0.1) < 1e-6


def test_flow_sigmas_linear_time_shift_match_diffusers():
    # linear shift: mu / (mu + 1/s - 1) (exponential would use exp(mu))
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    ref.set_timesteps(8, mu=0.8)
    ours = flow_schedule_from_scheduler_config(ref.config, 8, mu=0.8)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-6)
    # by hand at the second grid point s = 1 - (1 - 1/1000) / 7 of linspace(1, 0.001, 8)
    s = 1.0 - 0.999 / 7
    assert abs(float(ours.sigmas[1]) - 0.8 / (0.8 + 1 / s - 1)) < 1e-6


# ----------------------------------------------------------------------------- guided samplers


def test_one_step_x0_reuse_eps_divides_by_alpha():
    # sigmas [1, 0.5, 0] -> alpha_1 = 0.5, sigma_1 = 0.5: x0 = (1 - 0.5 * 0) / 0.5 = 2
    sch = flow_schedule(torch.tensor([1.0, 0.5, 0.0]))
    x0 = one_step_x0(None, sch, 1, torch.ones(2, 3), torch.zeros(2, 3), "reuse_eps")
    torch.testing.assert_close(x0, torch.full((2, 3), 2.0))
    # with eps = 1: (1 - 0.5) / 0.5 = 1
    x0 = one_step_x0(None, sch, 1, torch.ones(2, 3), torch.ones(2, 3), "reuse_eps")
    torch.testing.assert_close(x0, torch.ones(2, 3))


def test_fk_ess_and_fill_nan():
    # ESS = 1 / sum w^2: uniform over 4 -> 4; all mass on one particle -> 1 (per group, not / group_size)
    torch.testing.assert_close(baselines._ess(torch.zeros(8), 4), torch.tensor([4.0, 4.0]))
    lw = torch.tensor([0.0, -1e9, -1e9, -1e9])
    torch.testing.assert_close(baselines._ess(lw, 4), torch.tensor([1.0]))
    # NaN takes the LOWEST finite reward
    torch.testing.assert_close(baselines._fill_nan(torch.tensor([1.0, float("nan"), 3.0])),
                               torch.tensor([1.0, 1.0, 3.0]))


def test_fk_log_weights_reset_and_reindexed_after_resampling(monkeypatch):
    # 4 particles, 2 steps, potential rt (log G = lam r), resampling at both steps with a fixed permutation.
    lam = 0.5
    perm = torch.tensor([1, 2, 3, 0])
    rewards = [torch.tensor([0.0, 1.0, 3.0, 7.0]),    # step 0, per row
               torch.tensor([2.0, 0.0, 5.0, 1.0]),    # step 1
               torch.tensor([4.0, 6.0, 1.0, 2.0])]    # final samples
    calls = []

    def reward_fn(x0, index):
        calls.append(1)
        return rewards[len(calls) - 1].clone()

    def fake_resample(log_w, group_size, mask, generator):
        assert bool(mask.all())  # ess_threshold = 1 and unequal weights: every group resamples
        return perm.clone()

    monkeypatch.setattr(baselines, "_resample", fake_resample)
    sch = flow_schedule(torch.tensor([1.0, 0.5, 0.0]))
    out = baselines.fk_steering(lambda x, t: torch.zeros_like(x), sch, torch.zeros(4, 2),
                                reward_fn, group_size=4, step="flow_euler", noise_level=0.0, lam=lam,
                                potential="rt", ess_threshold=1.0, select="all")
    assert len(calls) == 3
    r0, r1, rT = rewards
    # log_prod along the ancestry: after step 0: (lam r0)[perm]; after step 1: (that + lam r1)[perm];
    # log_w is reset to 0 at each resampling, so the final weight is lam rT - log_prod
    log_prod = (lam * r0[perm] + lam * r1)[perm]
    want = lam * rT - log_prod
    # = 0.5 * ([4, 6, 1, 2] - ([3, 7, 0, 1] + [0, 5, 1, 2])) = [0.5, -3, 0, -0.5]
    torch.testing.assert_close(want, torch.tensor([0.5, -3.0, 0.0, -0.5]))
    torch.testing.assert_close(out.extras["log_weights"], want)
    assert out.extras["num_resampled_groups"] == 2


def test_svdd_selection_probabilities_are_softmax_v_over_alpha(monkeypatch):
    # two candidates valued [0, 1], alpha = 0.5: softmax([0, 2]) = [1 / (1 + e^2), e^2 / (1 + e^2)]
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)

    def reward_fn(x0, index):  # candidate m (row m for a batch of one) is worth m
        return torch.arange(x0.shape[0], dtype=torch.float32)

    sch = flow_schedule(torch.tensor([1.0, 0.5, 0.0]))
    baselines.svdd_sample(lambda x, t: torch.zeros_like(x), sch, torch.zeros(1, 3), reward_fn, step="flow_cps",
                          noise_level=0.5, num_candidates=2, alpha=0.5, window=(0, 1),
                          generator=torch.Generator().manual_seed(0),
                          select_generator=torch.Generator().manual_seed(0))
    assert len(seen) == 1
    e2 = math.exp(2.0)
    torch.testing.assert_close(seen[0], torch.tensor([[1 / (1 + e2), e2 / (1 + e2)]]))  # [0.119, 0.881]


# ----------------------------------------------------------------------------- MARBLE balancing


def test_add_to_grad_accumulates_onto_existing_grad():
    # .grad already holds the KL gradient (ones); the harmonised direction is added to it
    p = torch.nn.Parameter(torch.zeros(2, 2))
    q = torch.nn.Parameter(torch.zeros(3))
    rg = RewardGradients([p, q], 1)
    p.grad = torch.ones(2, 2)
    d = torch.arange(7, dtype=torch.float32)
    rg.add_to_grad(d)
    torch.testing.assert_close(p.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(q.grad, torch.tensor([4.0, 5.0, 6.0]))  # None before: the piece itself


def test_frank_wolfe_step_stays_on_simplex_for_dominated_gram():
    # g_k = c_k u with c = (1, 0.5, 0.25): G = c c^T, min-norm point is vertex 3 (norm 0.25).
    # From w = 1/3: d = 0.5833 u, line search to e_3 gives gamma = 0.5833 (0.5833 - 0.25) / 0.3333^2 = 1.75,
    # which must be clamped to 1 (unclamped: w = (-0.25, -0.25, 1.5), d = 0, gap 0: stuck off the simplex).
    c = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    w = min_norm_frank_wolfe(torch.outer(c, c))
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
