"""Known answers (values worked out by hand) for DOIT guidance, its pipeline glue and MARBLE's Harmonizer.

Pinned here, each against numbers derived in the comments:

* ``doob_model_fn`` on a one-dimensional flow step with a zero velocity, where the whole DOIT correction has a
  closed form: antithetic candidate pairs, the lookahead at the NEXT schedule position (``i + 1``), softmax of
  the (standardised or raw) rewards divided by ``tau``, ``v = E_w[z] / std``, ``eps_doob = eps - gamma sigma g``,
  and the end-exclusive window of guided steps.
* ``doob_weights``: population (not sample) standard deviation in the z-score; ``1 / tau`` on the logits.
* ``Harmonizer``: the coefficient EMA blended from uniform at the first solve, the tracked gradient EMA started at
  the first gradients, ``cosines`` / ``grad_norms`` of this batch versus ``tracked_cosines`` / ``gram`` of the
  averages, the logged worst / mean / pairwise / tracked cosines, and the state round trip.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.balance import Harmonizer, harmonize, log_harmonized
from samplers import flow_schedule
from samplers.guided import doob_model_fn, doob_weights

# ----------------------------------------------------------------------------------------- DOIT, closed form
#
# Flow schedule sigmas [0.75, 0.5, 0.25, 0] (timesteps 750, 500, 250), velocity v(x) = 0, 1-d latents.
# Step 0 (s = 0.75, s' = 0.5, dt = -0.25, noise level a = 1): g^2 = a^2 s / (1 - s) = 3,
#   mean = x + g^2 / (2 s) x dt = x (1 - 0.5) = 0.5 x  (so J_mu = 0.5),   std = g sqrt(-dt) = sqrt(3) / 2.
#   x0_hat = x - s v = x, eps_hat = x0_hat + v = x.
# Candidates x'_m = 0.5 x + (sqrt(3)/2) z_m, z = [z0, -z0] (M = 2, antithetic). Lookahead at step 1 (s' = 0.5,
#   alpha' = 0.5): x0_m = (x'_m - 0.5 eps_hat) / 0.5 = sqrt(3) z_m, whatever x.
# Reward r = x0: raw rewards [sqrt(3) z0, -sqrt(3) z0]; standardised (population std) [sign z0, -sign z0].
#   E_w[z] = z0 tanh(sqrt(3) z0 / tau) (raw) or |z0| tanh(1 / tau) (standardised); g = J^T E_w[z] / std
#   = E_w[z] / sqrt(3).
# Corrected output: eps_d = x - gamma 0.75 g, x0_d = (x - 0.75 eps_d) / 0.25 = x + 2.25 gamma g,
#   v_d = eps_d - x0_d = -3 gamma g.

SIGMAS = torch.tensor([0.75, 0.5, 0.25, 0.0])
SEEDS = (11, 12)


def _z0():
    return torch.stack([torch.randn((1, 1), generator=torch.Generator().manual_seed(s))[0, 0] for s in SEEDS])


def _guided(**kw):
    sched = flow_schedule(SIGMAS)
    seen = []

    def reward(x0, idx):
        seen.append(x0.clone())
        return x0[:, 0]

    fn = doob_model_fn(lambda x, t: torch.zeros_like(x), sched, reward, step="flow_sde", noise_level=1.0,
                       num_candidates=2, generator=[torch.Generator().manual_seed(s) for s in SEEDS], **kw)
    return fn, seen


X = torch.tensor([[0.3], [-1.2]])
T0 = torch.full((2,), 750.0)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_doob_correction_closed_form_standardised(tau):
    fn, seen = _guided(gamma=0.5, temperature=tau, lookahead="reuse_eps")
    out = fn(X, T0)
    z0 = _z0()
    # lookahead inputs: row m * B + b is sqrt(3) z_m of sample b (antithetic pair)
    torch.testing.assert_close(seen[0][:, 0], math.sqrt(3) * torch.cat([z0, -z0]), atol=1e-5, rtol=1e-5)
    want = -3 * 0.5 * z0.abs() * math.tanh(1 / tau) / math.sqrt(3)
    torch.testing.assert_close(out[:, 0], want, atol=1e-5, rtol=1e-5)


def test_doob_correction_closed_form_raw_tilt():
    tau, gamma = 1.5, 1.0
    fn, _ = _guided(gamma=gamma, temperature=tau, standardize=False, lookahead="reuse_eps")
    out = fn(X, T0)
    z0 = _z0()
    want = -3 * gamma * z0 * torch.tanh(math.sqrt(3) * z0 / tau) / math.sqrt(3)
    torch.testing.assert_close(out[:, 0], want, atol=1e-5, rtol=1e-5)


def test_doob_window_is_end_exclusive():
    fn, seen = _guided(gamma=1.0, window=(0, 1))
    # step 1 (t = 500) is outside window (0, 1): the model output (zeros) comes back untouched, no reward call
    out = fn(X, torch.full((2,), 500.0))
    assert torch.equal(out, torch.zeros_like(X)) and not seen
    fn(X, T0)  # step 0 is inside
    assert len(seen) == 1


# ----------------------------------------------------------------------------------------- DOIT weights


def test_doob_weights_population_std_and_temperature():
    r = torch.tensor([[0.0], [1.0]])  # M = 2, B = 1
    # population std 0.5 -> z = [-1, 1]; tau = 0.5 -> logits [-2, 2]; w = [1, e^4] / (1 + e^4)
    w = doob_weights(r, 0.5)
    e4 = math.exp(4.0)
    torch.testing.assert_close(w[:, 0], torch.tensor([1 / (1 + e4), e4 / (1 + e4)]))
    # raw tilt: logits [0, 2]
    w = doob_weights(r, 0.5, standardize=False)
    e2 = math.exp(2.0)
    torch.testing.assert_close(w[:, 0], torch.tensor([1 / (1 + e2), e2 / (1 + e2)]))


# ----------------------------------------------------------------------------------------- Harmonizer
#
# normalize=False, rescale=False: the QP runs on the raw Gram. g1 = [1, 0], g2 = [0, 2]: G = diag(1, 4),
# alpha_1 = (G22 - G12) / (G11 + G22 - 2 G12) = 4 / 5 -> alpha = [0.8, 0.2], direction [0.8, 0.4].


def test_harmonizer_ema_from_uniform_and_state_round_trip():
    h = Harmonizer(2, rho=0.7, normalize=False, rescale=False)
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    res = h.step(grads)
    torch.testing.assert_close(res.alpha, torch.tensor([0.8, 0.2], dtype=torch.float64))
    torch.testing.assert_close(res.direction, torch.tensor([0.8, 0.4]))
    # first solve blended from uniform: 0.7 * 0.5 + 0.3 * [0.8, 0.2] = [0.59, 0.41]
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.59, 0.41], dtype=torch.float64))
    h.step(grads)  # 0.7 * [0.59, 0.41] + 0.3 * [0.8, 0.2] = [0.653, 0.347]
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.653, 0.347], dtype=torch.float64))
    state = h.state_dict()
    assert state["num_solves"] == 2
    h2 = Harmonizer(2, rho=0.7, normalize=False, rescale=False)
    h2.load_state_dict(state)
    assert h2.num_solves == 2
    h2.step(grads)  # 0.7 * 0.653 + 0.24 = 0.6971
    torch.testing.assert_close(h2.alpha_bar, torch.tensor([0.6971, 0.3029], dtype=torch.float64))
    assert h2.num_solves == 3


def test_harmonize_normalised_and_rescaled_with_a_silent_reward():
    # unit gradients e1, e2 -> alpha [0.5, 0.5], d* = [0.5, 0.5]; the zero third reward is out of the QP and of
    # the mean norm (3 + 4) / 2 = 3.5 -> direction [1.75, 1.75]; cos with each active gradient 1 / sqrt(2)
    res = harmonize(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(res.alpha, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(res.direction, torch.tensor([1.75, 1.75]))
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(res.cosines, torch.tensor([c, c, 0.0], dtype=torch.float64))


def test_harmonizer_tracked_gradients_and_logged_cosines():
    h = Harmonizer(2, rho=0.7, normalize=False, rescale=False, grad_ema=0.5)
    h.step(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # y = first gradients -> alpha [0.8, 0.2]
    torch.testing.assert_close(h.tracked_state(), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # y <- 0.5 y + 0.5 g = [[2, 0], [0, 1]]: G = diag(4, 1), alpha_1 = 1 / 5 -> [0.2, 0.8], d = [0.4, 0.8]
    res = h.step(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(h.tracked_state(), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(res.alpha, torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(res.direction, torch.tensor([0.4, 0.8]))
    torch.testing.assert_close(res.gram, torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # this batch: norms [3, 0]; cos(d, [3, 0]) = 0.4 / |d| = 1 / sqrt(5), cos with a zero gradient 0
    s5 = 1 / math.sqrt(5)
    torch.testing.assert_close(res.grad_norms, torch.tensor([3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(res.cosines, torch.tensor([s5, 0.0], dtype=torch.float64))
    # the averages: cos(d, [2, 0]) = 1 / sqrt(5), cos(d, [0, 1]) = 2 / sqrt(5)
    torch.testing.assert_close(res.tracked_cosines, torch.tensor([s5, 2 * s5], dtype=torch.float64))
    # alpha_bar: [0.59, 0.41] then 0.7 * 0.59 + 0.3 * 0.2 = 0.473
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.473, 0.527], dtype=torch.float64))
    log = log_harmonized(res, ["a", "b"])
    assert log["marble/alpha/a"] == pytest.approx(0.2) and log["marble/grad_norm/a"] == pytest.approx(3.0)
    assert log["marble/worst_cos"] == pytest.approx(0.0)
    assert log["marble/mean_cos"] == pytest.approx(s5 / 2)
    assert log["marble/worst_cos_tracked"] == pytest.approx(s5)
    assert log["marble/min_pairwise_cos"] == pytest.approx(0.0)
    h2 = Harmonizer(2, normalize=False, rescale=False, grad_ema=0.5)
    h2.load_tracked_state(h.tracked_state(), num_params=2)
    torch.testing.assert_close(h2.tracked_state(), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))


# ----------------------------------------------------------------------------------------- DOIT resampling


def test_twist_resampler_weights_are_h_ratios_to_the_reindexed_ancestor(monkeypatch):
    import samplers.guided.sample as sample_mod

    seen, picks = [], iter([torch.tensor([2, 2, 0]), torch.tensor([0, 1, 2])])

    def fake_resample(log_w, group_size, mask, generator):
        seen.append(log_w.clone())
        return next(picks)

    monkeypatch.setattr(sample_mod, "_resample", fake_resample)
    twist, extras = {}, {}
    before = sample_mod._twist_resampler(twist, 2.0, 3, None, extras)
    x, out = torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[1.0], [2.0], [3.0]])
    assert before(0, x, out) == (x, out) and not seen  # no candidates recorded at this step: untouched
    # step 1: rewards [M = 2, B = 3] equal over candidates -> log h = 2 r = [0, 2, 4]; h_0 = 1
    twist.update(step=1, rewards=torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    nx, nout = before(1, x, out)
    torch.testing.assert_close(seen[0], torch.tensor([0.0, 2.0, 4.0]))
    assert nx[:, 0].tolist() == [30.0, 30.0, 10.0] and nout[:, 0].tolist() == [3.0, 3.0, 1.0]
    # step 3: log h = log((e^2 + e^6) / 2) for every particle, over the ancestors' log h [4, 4, 0]
    twist.update(step=3, rewards=torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]))
    before(3, nx, nout)
    big = math.log((math.exp(2.0) + math.exp(6.0)) / 2)
    torch.testing.assert_close(seen[1], torch.tensor([big - 4.0, big - 4.0, big]))
    assert extras["num_resampled_steps"] == 2 and extras["ancestors"][0].tolist() == [2, 2, 0]


# ----------------------------------------------------------------------------------------- pipeline glue


def test_method_options_and_kernel_resolution():
    from types import SimpleNamespace

    from samplers.guided.pipeline import method_options, resolve_kernel

    cfg = SimpleNamespace(window=[2, 5], gamma=0.3, num_candidates=6, temperature=0.7, standardize=False,
                          antithetic=False, lookahead="denoise", select="all", keep_simulated=False,
                          resample_lambda=0.0, fk_lambda=4.0, fk_potential="max", fk_every=3,
                          fk_ess_threshold=0.25, svdd_alpha=0.1, svdd_lookahead="rollout")
    assert method_options("doob", cfg) == dict(
        gamma=0.3, num_candidates=6, temperature=0.7, window=(2, 5), standardize=False, antithetic=False,
        lookahead="denoise", select="all", keep_simulated=False, resample_lambda=0.0)
    assert method_options("fk", cfg) == dict(lam=4.0, potential="max", every=3, window=(2, 5),
                                             ess_threshold=0.25, select="all")
    assert method_options("svdd", cfg) == dict(num_candidates=6, alpha=0.1, window=(2, 5), lookahead="rollout")
    assert resolve_kernel("vp", None, None, "flow_sde", 0.7) == ("ddim", 0.7)  # the sample section's default
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"^guidance.step: got 'flow_sde', a flow-matching step, but the model is "
                                          r"a 'vp' diffusion model"):  # named explicitly: it ran DDIM silently
        resolve_kernel("vp", "flow_sde", None, "flow_euler", 0.7)
    assert resolve_kernel("flow", None, 0.3, "flow_euler", 0.7) == ("flow_sde", 0.3)
    assert resolve_kernel("flow", "flow_cps", None, "flow_sde", 0.5) == ("flow_cps", 0.5)


def test_keep_simulated_pool_and_pick_better():
    from samplers.guided.doob import _update_pool, pick_better

    nan = float("nan")
    # ties do not replace; NaN never wins; any real value beats NaN
    assert pick_better(torch.tensor([1.0, nan, 2.0, 1.0]), torch.tensor([1.0, 0.0, nan, 0.5])).tolist() == [
        False, False, True, True]
    pool = {}
    x = torch.tensor([[[10.0], [20.0]], [[11.0], [21.0]]])  # [M = 2, B = 2, 1]
    _update_pool(pool, x, torch.tensor([[1.0, nan], [3.0, nan]]))
    assert pool["x"][:, 0].tolist()[0] == 11.0 and pool["reward"][0] == 3.0 and bool(pool["reward"][1].isnan())
    _update_pool(pool, x + 100, torch.tensor([[3.0, 5.0], [0.0, nan]]))  # sample 0 ties (kept), sample 1 real
    assert pool["x"][:, 0].tolist() == [11.0, 120.0] and pool["reward"].tolist() == [3.0, 5.0]


# ----------------------------------------------------------------------------------------- rollout
#
# Same schedule (sigmas [0.75, 0.5, 0.25, 0], dt = -0.25 every step). The ODE (noise level 0) with a constant
# velocity 1 moves x by -0.25 per step; the one-step clean estimate is x - s v.


def test_rollout_ode_states_clean_estimates_and_callback():
    from samplers import rollout

    sched = flow_schedule(SIGMAS)
    seen = []
    traj = rollout(lambda x, t: torch.ones_like(x), sched, torch.tensor([[1.0]]), step="flow_sde", noise_level=0.0,
                   store_x0=True, callback=lambda i, x, res: seen.append((i, float(x[0, 0]))))
    torch.testing.assert_close(traj.latents[0, :, 0], torch.tensor([1.0, 0.75, 0.5, 0.25]))
    # x0 = x - s * 1: 1 - 0.75, 0.75 - 0.5, 0.5 - 0.25
    torch.testing.assert_close(traj.x0_preds[0, :, 0], torch.tensor([0.25, 0.25, 0.25]))
    assert seen == [(0, 1.0), (1, 0.75), (2, 0.5)]  # the state the step started from
    assert not bool(traj.stochastic.any())


def test_rollout_before_step_moves_model_output_with_the_rows():
    from samplers import rollout

    sched = flow_schedule(SIGMAS)
    flip = torch.tensor([1, 0])

    def before(i, x, out):
        return (x[flip], out[flip]) if i == 0 else (x, out)

    # v = x: rows [1, 2] swapped with their outputs -> [2 + 2 dt, 1 + 1 dt] = [1.5, 0.75]
    traj = rollout(lambda x, t: x.clone(), sched, torch.tensor([[1.0], [2.0]]), noise_level=0.0, before_step=before)
    torch.testing.assert_close(traj.latents[:, 1, 0], torch.tensor([1.5, 0.75]))


def test_rollout_flow_sde_stds_and_g():
    from samplers import rollout

    sched = flow_schedule(SIGMAS)
    # g = sqrt(s / (1 - s)) at a = 1: sqrt(3), 1, 1/sqrt(3); std = g * sqrt(0.25)
    traj = rollout(lambda x, t: torch.zeros_like(x), sched, torch.zeros(2, 1), step="flow_sde", noise_level=1.0,
                   generator=[torch.Generator().manual_seed(i) for i in range(2)])
    g = torch.tensor([math.sqrt(3), 1.0, 1 / math.sqrt(3)])
    torch.testing.assert_close(traj.extras["g"], g)
    torch.testing.assert_close(traj.stds, g / 2)
    assert traj.stochastic.tolist() == [True, True, True]
    window = rollout(lambda x, t: torch.zeros_like(x), sched, torch.zeros(2, 1), step="flow_sde", noise_level=1.0,
                     window=(1, 2), generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert window.stochastic.tolist() == [False, True, False]
    torch.testing.assert_close(window.stds, torch.tensor([0.0, 0.5, 0.0]))


def test_make_generators_do_not_collide_on_swapped_seed_and_id():
    from samplers import make_generators

    a = torch.randn(4, generator=make_generators(0, [1])[0])
    b = torch.randn(4, generator=make_generators(1, [0])[0])
    assert not torch.equal(a, b)


def test_rollout_cps_last_step_draws_no_noise_so_is_not_stochastic():
    from samplers import rollout

    # flow_cps: std = sigma_next sin(a pi / 2) -> [0.5, 0.25, 0] / sqrt(2) at a = 0.5; the last step draws nothing
    traj = rollout(lambda x, t: torch.zeros_like(x), flow_schedule(SIGMAS), torch.zeros(2, 1), step="flow_cps",
                   noise_level=0.5, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert traj.stochastic.tolist() == [True, True, False]
    torch.testing.assert_close(traj.stds, torch.tensor([0.5, 0.25, 0.0]) / math.sqrt(2))
    assert traj.extras == {}  # Flow-GRPO's g belongs to flow_sde only


# ----------------------------------------------------------------------------------------- amortised MARBLE


def test_amortised_marble_schedule_refreshes_every_n_from_step_zero():
    from types import SimpleNamespace

    from trainers.nft import NFTTrainer

    def kinds(mode, aggregation="marble", steps=7):
        cfg = SimpleNamespace(aggregation=aggregation, marble_mode=mode, marble_every=3, grad_diagnostics_every=2)
        return [NFTTrainer._step_kind(SimpleNamespace(cfg=cfg, global_step=s, num_rewards=2)) for s in range(steps)]

    T, F = True, False
    # QP at steps 0, 3, 6; per-reward diagnostics at the even steps that are not QP steps
    assert kinds("amortized") == [(T, F), (F, F), (F, T), (T, F), (F, T), (F, F), (T, F)]
    assert kinds("full") == [(T, F)] * 7
    assert kinds("full", aggregation="weighted_sum") == [(F, T), (F, F)] * 3 + [(F, T)]


# ----------------------------------------------------------------------------------------- prompt particles


def test_guided_sample_prompts_gives_particle_j_of_prompt_i_the_stream_i_stride_plus_j():
    from types import SimpleNamespace

    from samplers import make_generators
    from samplers.guided.pipeline import PARTICLE_STRIDE, guided_sample_prompts

    class Stub:
        device = "cpu"

        def encode_prompts(self, rows, negative, scale, height=None, width=None):
            return SimpleNamespace(batch_size=len(rows))

        def prepare_latents(self, n, height, width, generator):
            return torch.stack([torch.randn(1, generator=g) for g in generator])

        def make_schedule(self, num_steps, height, width):
            return flow_schedule(SIGMAS)

        def predict(self, x, t, cond, scale):
            return torch.zeros_like(x)  # v = 0: the ODE keeps the initial noise

        def decode(self, x, height, width):
            return x.view(-1, 1, 1, 1).expand(-1, 3, 1, 1)

    def reward(images, prompts, metadata):  # prompt "b" scores 10 more: checks each row's prompt
        return images.mean((1, 2, 3)) + 10.0 * torch.tensor([q == "b" for q in prompts])

    out = guided_sample_prompts(Stub(), ["a", "b"], reward, "doob", prompt_ids=[0, 1],
                                seed=3, num_steps=3, guidance_scale=1.0, negative_prompt="", height=1, width=1,
                                step="flow_sde", noise_level=0.0, group_size=2, options=dict(gamma=0.0, select="all"))
    ids = [0, 1, PARTICLE_STRIDE, PARTICLE_STRIDE + 1]  # prompt i, particle j -> i * STRIDE + j: no stream shared
    want = torch.stack([torch.randn(1, generator=g) for g in make_generators(3, ids)])[:, 0]
    torch.testing.assert_close(out.images[:, 0, 0, 0], want)
    torch.testing.assert_close(out.rewards[:, 0], want + torch.tensor([0.0, 0.0, 10.0, 10.0]))


def test_score_steps_log_prob_and_per_sample_steps_must_all_be_stochastic():
    from samplers import rollout, score_steps

    sched = flow_schedule(SIGMAS)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    traj = rollout(zero, sched, torch.tensor([[1.0], [-2.0]]), step="flow_sde", noise_level=1.0, window=(1, 2),
                   generator=[torch.Generator().manual_seed(i) for i in range(2)])
    # step 1 (s = 0.5, g = 1): mean = x (1 + g^2 / (2 s) dt) = 0.75 x, std = 0.5
    x1, x2 = traj.latents[:, 1, 0], traj.latents[:, 2, 0]
    want = -((x2 - 0.75 * x1) ** 2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(score_steps(zero, sched, traj, 1).log_prob, want)
    torch.testing.assert_close(traj.log_probs[:, 1], want)
    with pytest.raises(ValueError, match="stochastic steps"):
        score_steps(zero, sched, traj, torch.tensor([1, 0]))  # sample 1 at the deterministic step 0
