"""Known-answer tests of the sampler math (research/grpo_family.md §1.2, §3.1)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from samplers import (
    ddim_step,
    flow_cps_step,
    flow_euler_step,
    flow_schedule,
    flow_schedule_from_scheduler_config,
    flow_sde_step,
    flow_sigmas,
    make_generators,
    rollout,
    scheduled_step,
    score_steps,
    vp_schedule,
)
from samplers.schedules import alphas_cumprod_from_betas


def _normal_log_prob_f64(x, mean, std):
    std64 = torch.as_tensor(std, dtype=torch.float64)
    if std64.ndim == 1:
        std64 = std64.view(-1, *([1] * (x.ndim - 1)))
    lp = torch.distributions.Normal(mean.double(), std64).log_prob(x.double())
    return lp.mean(dim=tuple(range(1, x.ndim)))


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v = torch.randn(3, 4, 5, 5, generator=g)
    return x, v


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_flow_sigmas_match_diffusers_static_shift(shift, n):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    ours = flow_schedule_from_scheduler_config(sch.config, n)
    assert torch.equal(ours.sigmas, sch.sigmas)
    assert torch.equal(ours.timesteps, sch.timesteps)


@pytest.mark.parametrize("n", [4, 20])
def test_flow_sigmas_match_diffusers_dynamic_shift(n):
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    custom = np.linspace(1.0, 1 / n, n)
    sch.set_timesteps(sigmas=custom, mu=0.8)
    ours = flow_schedule_from_scheduler_config(sch.config, n, sigmas=custom, mu=0.8)
    torch.testing.assert_close(ours.sigmas, sch.sigmas, rtol=0, atol=1e-7)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [10, 20, 50])
def test_vp_schedule_matches_ddim_scheduler(spacing, offset, n):
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=offset, timestep_spacing=spacing)
    sch.set_timesteps(n)
    if spacing == "linspace":
        with pytest.raises(ValueError, match="evenly spaced"):
            vp_schedule(sch.alphas_cumprod, n, timestep_spacing=spacing, steps_offset=offset,
                        set_alpha_to_one=False)
        return
    ours = vp_schedule(sch.alphas_cumprod, n, timestep_spacing=spacing, steps_offset=offset,
                       set_alpha_to_one=False)
    assert torch.equal(ours.timesteps.long(), sch.timesteps)
    torch.testing.assert_close(ours.alphas[:-1] ** 2, sch.alphas_cumprod[sch.timesteps], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas[-1] ** 2, sch.alphas_cumprod[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(alphas_cumprod_from_betas(), sch.alphas_cumprod)


def test_schedule_errors_name_the_value():
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        alphas_cumprod_from_betas(beta_schedule="cosine")
    with pytest.raises(ValueError, match="end in 0"):
        flow_schedule(torch.tensor([1.0, 0.5]))
    # options whose sampler is not the one diffalign runs are refused, not ignored
    for option in ("use_karras_sigmas", "invert_sigmas", "stochastic_sampling"):
        config = {**FlowMatchEulerDiscreteScheduler(shift=3.0).config, option: True}
        with pytest.raises(ValueError, match=f"scheduler option {option}=True is not supported"):
            flow_schedule_from_scheduler_config(config, 4)


# ----------------------------------------------------------------------------- steps


def test_flow_sde_noise_zero_equals_euler_exactly(state):
    x, v = state
    sig = flow_sigmas(10, shift=3.0)
    for i in range(10):
        sde = flow_sde_step(v, x, sig[i], sig[i + 1], noise_level=0.0, sigma_cap=float(sig[1]))
        ode = flow_euler_step(v, x, sig[i], sig[i + 1])
        assert torch.equal(sde.prev_sample, ode.prev_sample)
        assert sde.log_prob is None


def test_flow_cps_noise_zero_equals_euler(state):
    x, v = state
    sig = flow_sigmas(10, shift=3.0)
    for i in range(10):
        cps = flow_cps_step(v, x, sig[i], sig[i + 1], noise_level=0.0)
        ode = flow_euler_step(v, x, sig[i], sig[i + 1])
        torch.testing.assert_close(cps.prev_sample, ode.prev_sample, rtol=1e-6, atol=1e-6)


def test_ddim_eta_zero_matches_diffusers_step(state):
    x, eps = state
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(20)
    ours = vp_schedule(sch.alphas_cumprod, 20, steps_offset=1, set_alpha_to_one=False)
    for i, t in enumerate(sch.timesteps):
        ref = sch.step(eps, t, x, eta=0.0).prev_sample
        got = scheduled_step("ddim", eps, x, ours, i, noise_level=0.0)
        torch.testing.assert_close(got.prev_sample, ref, rtol=1e-5, atol=1e-6)
        assert got.log_prob is None


def test_flow_sde_mean_std_hand_computed(state):
    """Flow-GRPO SDE (grpo_family.md §1.2) written out with Python floats for single elements."""
    x, v = state
    a, s, s_next, cap = 0.7, 0.8, 0.6, 0.95
    out = flow_sde_step(v, x, s, s_next, noise_level=a, sigma_cap=cap, generator=torch.Generator().manual_seed(1))
    dt = s_next - s
    g = a * math.sqrt(s / (1 - s))
    for idx in [(0, 0, 0, 0), (2, 3, 4, 1), (1, 2, 2, 2)]:
        xe, ve = float(x[idx]), float(v[idx])
        mean = xe * (1 + g**2 * dt / (2 * s)) + ve * (1 + g**2 * (1 - s) / (2 * s)) * dt
        assert out.mean[idx].item() == pytest.approx(mean, rel=1e-6, abs=1e-6)
    assert out.std[0].item() == pytest.approx(g * math.sqrt(-dt), rel=1e-6)
    assert out.extras["g"].item() == pytest.approx(g, rel=1e-6)
    # sigma = 1 uses the cap inside 1 - sigma (Flow-GRPO's fix)
    first = flow_sde_step(v, x, 1.0, 0.9, noise_level=a, sigma_cap=cap)
    assert first.std[0].item() == pytest.approx(a * math.sqrt(1.0 / (1 - cap)) * math.sqrt(0.1), rel=1e-6)


def test_flow_sde_with_one_step_takes_the_schedules_second_sigma_as_its_cap(state):
    """A 1-step schedule (sigmas [1, 0]) has a second sigma, 0: g = a sqrt(1 / (1 - 0)) = a, as Flow-GRPO's code
    computes it. It raised "needs sigma_cap", which users cannot set."""
    x, v = state
    schedule = flow_schedule(torch.tensor([1.0, 0.0]))
    assert schedule.sigmas.tolist() == [1.0, 0.0]
    out = scheduled_step("flow_sde", v, x, schedule, 0, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert out.extras["g"].item() == pytest.approx(0.7) and out.std[0].item() == pytest.approx(0.7)
    torch.testing.assert_close(out.mean, x - v - (0.7**2 / 2) * x)


def test_ddim_mean_std_hand_computed(state):
    """DDIM with eta (grpo_family.md §3.1): sigma_t = eta sqrt((1-ab_prev)/(1-ab_t)) sqrt(1-ab_t/ab_prev)."""
    x, eps = state
    ab_t, ab_prev, eta = 0.3, 0.6, 1.0
    out = ddim_step(eps, x, math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_prev), math.sqrt(1 - ab_prev),
                    eta=eta, generator=torch.Generator().manual_seed(2))
    std = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    assert out.std[0].item() == pytest.approx(std, rel=1e-6)
    for idx in [(0, 0, 0, 0), (2, 1, 3, 4)]:
        xe, ee = float(x[idx]), float(eps[idx])
        x0 = (xe - math.sqrt(1 - ab_t) * ee) / math.sqrt(ab_t)
        mean = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - std**2) * ee
        assert out.mean[idx].item() == pytest.approx(mean, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("eta", [0.3, 0.5, 0.7, 1.0])
def test_ddim_on_a_flow_schedule_takes_the_ddpm_posterior_std_and_stays_finite(state, eta):
    """DDIM-eta on a flow schedule (alpha = 1 - sigma): std = eta x the std of q(x_next | x_t, x0), which for any
    Gaussian forward process is sigma_next / sigma * sqrt(sigma^2 - (alpha/alpha_next)^2 sigma_next^2) (VDM eq. (3)),
    at most eta * sigma_next. The VP-only form sqrt((1-ab_prev)/(1-ab_t)) sqrt(1-ab_t/ab_prev) exceeded
    sigma_next late in an SD3 schedule for eta >= 0.5, and the step's mean and log-prob were NaN."""
    x, v = state
    sig = flow_sigmas(10, shift=3.0)
    sched = flow_schedule(sig)
    for i in range(len(sig) - 1):
        s, s_next = float(sig[i]), float(sig[i + 1])
        out = scheduled_step("ddim", v, x, sched, i, noise_level=eta, generator=torch.Generator().manual_seed(i))
        a, a_next = 1 - s, 1 - s_next
        want = eta * s_next / s * math.sqrt(max(s**2 - (a / a_next) ** 2 * s_next**2, 0.0))
        assert float(out.std.reshape(-1)[0]) == pytest.approx(want, rel=1e-5, abs=1e-7), i
        assert float(out.std.reshape(-1)[0]) <= eta * s_next + 1e-7
        assert torch.isfinite(out.mean).all() and torch.isfinite(out.prev_sample).all(), i
        if out.log_prob is not None:
            assert torch.isfinite(out.log_prob).all(), i
    with pytest.raises(ValueError, match=r"DDIM eta must be in \[0, 1\], got 1.5"):
        ddim_step(v, x, 0.1, 0.9, 0.3, 0.7, eta=1.5, prediction_type="flow")  # std > s_next: the mean was NaN
    # the example the cross-check found: 0.9 -> 0.7 at eta 1 (the VP form gave std 0.733 > 0.7 and a NaN mean)
    out = ddim_step(v, x, 0.1, 0.9, 0.3, 0.7, eta=1.0, prediction_type="flow")
    assert float(out.std.reshape(-1)[0]) == pytest.approx(0.7 / 0.9 * math.sqrt(0.81 - (0.1 / 0.3) ** 2 * 0.49),
                                                          rel=1e-6)
    assert torch.isfinite(out.mean).all()


def test_cps_mean_std_hand_computed(state):
    x, v = state
    a, s, s_next = 0.8, 0.7, 0.5
    out = flow_cps_step(v, x, s, s_next, noise_level=a)
    std = s_next * math.sin(a * math.pi / 2)
    assert out.std[0].item() == pytest.approx(std, rel=1e-6)
    idx = (1, 1, 1, 1)
    xe, ve = float(x[idx]), float(v[idx])
    mean = (1 - s_next) * (xe - s * ve) + math.sqrt(s_next**2 - std**2) * (xe + (1 - s) * ve)
    assert out.mean[idx].item() == pytest.approx(mean, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["flow_sde", "flow_cps", "ddim_vp", "ddim_flow"])
def test_log_prob_matches_torch_normal_in_float64(state, kind):
    x, out = state
    gen = torch.Generator().manual_seed(3)
    if kind == "flow_sde":
        res = flow_sde_step(out, x, 0.6, 0.4, noise_level=0.7, generator=gen)
    elif kind == "flow_cps":
        res = flow_cps_step(out, x, 0.6, 0.4, noise_level=0.8, generator=gen)
    elif kind == "ddim_vp":
        res = ddim_step(out, x, 0.5, math.sqrt(0.75), 0.7, math.sqrt(0.51), eta=1.0, generator=gen)
    else:
        res = ddim_step(out, x, 0.4, 0.6, 0.6, 0.4, eta=0.5, prediction_type="flow", generator=gen)
    ref = _normal_log_prob_f64(res.prev_sample, res.mean, res.std)
    assert res.log_prob.dtype == torch.float32 and res.log_prob.shape == (3,)
    torch.testing.assert_close(res.log_prob.double(), ref, rtol=0, atol=1e-6)


def test_per_sample_sigmas_broadcast_like_scalars(state):
    x, v = state
    sig = flow_sigmas(10, shift=3.0)
    sched = flow_schedule(sig)
    per = scheduled_step("flow_sde", v, x, sched, torch.tensor([2, 2, 2]), noise_level=0.7,
                         generator=torch.Generator().manual_seed(0))
    one = scheduled_step("flow_sde", v, x, sched, 2, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(per.prev_sample, one.prev_sample)
    assert torch.equal(per.log_prob, one.log_prob)


def test_unknown_step_lists_valid_ones(state):
    x, v = state
    with pytest.raises(ValueError, match="valid steps"):
        scheduled_step("heun", v, x, flow_schedule(flow_sigmas(4)), 0, noise_level=0.5)
    with pytest.raises(ValueError, match="flow schedule"):
        sch = vp_schedule(alphas_cumprod_from_betas(), 10)
        scheduled_step("flow_sde", v, x, sch, 0, noise_level=0.5)


# ----------------------------------------------------------------------------- rollout


class TinyModel(torch.nn.Module):
    """A small conv net with a time input: enough to make batch-coupled numerics realistic."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 4, 3, padding=1)
        self.temb = torch.nn.Linear(1, 16)

    def forward(self, x, t):
        h = self.conv1(x) + self.temb(t.view(-1, 1) / 1000.0)[:, :, None, None]
        return self.conv2(torch.nn.functional.silu(h))


@pytest.mark.parametrize("step,level,vp", [("flow_sde", 0.7, False), ("flow_cps", 0.8, False), ("ddim", 1.0, True)])
def test_rescoring_reproduces_stored_log_probs_exactly(step, level, vp):
    model = TinyModel()
    if vp:
        sched = vp_schedule(alphas_cumprod_from_betas(), 10, steps_offset=1)
    else:
        sched = flow_schedule(flow_sigmas(10, shift=3.0))
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = rollout(model, sched, x, step=step, noise_level=level, generator=torch.Generator().manual_seed(1))
    last = 9 if step == "flow_sde" or vp else 8  # CPS is deterministic on its last step (sigma_next = 0)
    for j in range(last):
        res = score_steps(model, sched, traj, j)
        assert torch.equal(res.log_prob, traj.log_probs[:, j]), j  # importance ratio exactly 1.0
    # per-sample step indices give the same numbers
    idx = torch.tensor([0, 3, 5, 7])
    res = score_steps(model, sched, traj, idx)
    assert torch.equal(res.log_prob, traj.log_probs[torch.arange(4), idx])


def test_rollout_noise_zero_is_the_ode_and_window_limits_noise():
    model = TinyModel()
    sched = flow_schedule(flow_sigmas(6, shift=3.0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ode = rollout(model, sched, x, step="flow_euler", noise_level=0.0)
    sde0 = rollout(model, sched, x, step="flow_sde", noise_level=0.0)
    assert torch.equal(ode.latents, sde0.latents)
    assert not sde0.stochastic.any() and (sde0.log_probs == 0).all()
    win = rollout(model, sched, x, step="flow_sde", noise_level=0.7, window=(2, 4),
                  generator=torch.Generator().manual_seed(0))
    assert win.stochastic.tolist() == [False, False, True, True, False, False]
    assert torch.equal(win.latents[:, :3], ode.latents[:, :3])
    assert not torch.equal(win.latents[:, 3], ode.latents[:, 3])
    assert (win.log_probs[:, [0, 1, 4, 5]] == 0).all() and (win.log_probs[:, 2:4] != 0).all()
    with pytest.raises(ValueError, match="stochastic window"):
        rollout(model, sched, x, window=(4, 9))


def test_per_sample_generators_make_noise_independent_of_batch_split():
    model = lambda x, t: 0.3 * x  # noqa: E731  (elementwise, so batch splits cannot change numerics)
    sched = flow_schedule(flow_sigmas(5))
    x = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    full = rollout(model, sched, x, noise_level=0.7, generator=make_generators(7, range(4)))
    a = rollout(model, sched, x[:2], noise_level=0.7, generator=make_generators(7, [0, 1]))
    b = rollout(model, sched, x[2:], noise_level=0.7, generator=make_generators(7, [2, 3]))
    assert torch.equal(full.latents, torch.cat([a.latents, b.latents]))
    # distinct samples draw distinct noise
    noise = full.latents[:, 1] - full.latents[:, 0]
    assert not torch.allclose(noise[0], noise[1])


def test_rollout_with_grad_and_x0_store():
    model = TinyModel()
    sched = flow_schedule(flow_sigmas(3))
    x = torch.randn(2, 4, 8, 8)
    traj = rollout(model, sched, x, step="flow_sde", noise_level=0.5, requires_grad=True, store_x0=True,
                   generator=torch.Generator().manual_seed(0))
    assert traj.x0_preds.shape == (2, 3, 4, 8, 8)
    traj.final.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["flow_sde", "flow_cps", "flow_ddim", "vp_ddim_alpha_one", "vp_ddim_no_alpha_one",
                                  "vp_ddim_offset0_no_alpha_one", "flow_sde_window", "flow_euler_level"])
def test_prefetched_kernel_noise_is_bitwise_the_noise_drawn_at_use(case, monkeypatch):
    """On a GPU the rollout draws each stochastic step's noise while the model call runs (PrefetchedNoise); the
    trajectory and every generator's state afterwards equal drawing at use, also where a step draws nothing
    (CPS / DDIM into sigma 0, steps outside the window) and where a prefetched draw goes unused (a VP schedule whose
    last step has sigma_next > 0 but variance 0: the generators are rewound)."""
    import samplers.steps as steps_mod

    model = TinyModel()
    if case.startswith("vp"):
        sched = vp_schedule(alphas_cumprod_from_betas(), 6, steps_offset=0 if "offset0" in case else 1,
                            set_alpha_to_one=case == "vp_ddim_alpha_one")
        step, level = "ddim", 1.0
    else:
        sched = flow_schedule(flow_sigmas(6, shift=3.0))
        step = {"flow_sde": "flow_sde", "flow_cps": "flow_cps", "flow_ddim": "ddim",
                "flow_sde_window": "flow_sde", "flow_euler_level": "flow_euler"}[case]
        level = 0.7 if step != "ddim" else 0.9
    window = (1, 4) if case == "flow_sde_window" else None
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    real = steps_mod.PrefetchedNoise.prefetch
    monkeypatch.setattr(steps_mod.PrefetchedNoise, "prefetch",
                        lambda self, shape: (calls.append(tuple(shape)), real(self, shape))[1])
    runs = {}
    for prefetch in (False, True):
        gens = make_generators(5, [10, 11, 12])
        traj = rollout(model, sched, x, step=step, noise_level=level, window=window, generator=gens,
                       prefetch_noise=prefetch)
        runs[prefetch] = (traj, [g.get_state() for g in gens])
    (a, sa), (b, sb) = runs[False], runs[True]
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.stds, b.stds) and torch.equal(a.stochastic, b.stochastic)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb, strict=True))
    stochastic = int(a.stochastic.sum())
    if case == "flow_euler_level":
        assert stochastic == 0 and not calls
    elif case == "vp_ddim_offset0_no_alpha_one":  # the last step's draw was prefetched, unused and rewound
        assert float(sched.sigmas[-1]) > 0 and not bool(a.stochastic[-1]) and len(calls) == stochastic + 1
    else:
        assert len(calls) == stochastic > 0  # every stochastic step took a prefetched draw
    if case in ("flow_cps", "flow_ddim", "vp_ddim_alpha_one"):
        assert not bool(a.stochastic[-1])  # the last step into sigma 0 drew nothing


def test_prefetching_is_on_for_cpu_generators_on_a_gpu_only():
    from samplers.rollout import _prefetching
    from samplers.steps import PrefetchedNoise

    gens = make_generators(0, [0, 1])
    assert isinstance(_prefetching(gens, torch.device("cuda"), None), PrefetchedNoise)
    assert _prefetching(gens, torch.device("cpu"), None) is gens
    assert _prefetching(gens, torch.device("cuda"), False) is gens
    single = torch.Generator()
    assert _prefetching(single, torch.device("cuda"), None) is single
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        PrefetchedNoise(gens, torch.device("cpu")).prefetch((3, 4))


def test_a_step_that_raises_leaves_the_generators_as_drawing_at_use_would():
    """A prefetched draw is rewound also when the step raises (DDIM refuses eta above 1 inside the step), so a
    caller that catches the error continues from the same generator state either way."""
    sched = flow_schedule(flow_sigmas(2))
    x = torch.zeros(2, 2, 2)
    nxt = {}
    for prefetch in (False, True):
        gens = make_generators(3, [0, 1])
        with pytest.raises(ValueError, match="eta must be in"):
            rollout(lambda x, t: x, sched, x, step="ddim", noise_level=1.5, generator=gens, prefetch_noise=prefetch)
        nxt[prefetch] = torch.randn(4, generator=gens[0])
    assert torch.equal(nxt[False], nxt[True])
