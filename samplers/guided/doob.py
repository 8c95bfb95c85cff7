"""DOIT: training-free Doob h-transform guidance by simulation (Zhu et al., arXiv 2602.16198;
research/seed_algorithms.md §5.2).

The Doob h-transform of the pretrained reverse process towards ``p*(x0) ∝ p0(x0) exp(r(x0)/tau)`` adds
``grad_x log h_s(x)`` to the score, with ``h_s(x) = E[exp(r(X0)/tau) | X_s = x]``. DOIT estimates that
gradient by simulation through the sampler's own Gaussian kernel ``N(mu(x), std^2)``, with the
likelihood-ratio identity (the reward is never differentiated)::

    grad_x log E[h(x') | x] = E_w[grad_x log p(x' | x)] = J_mu(x)^T E_w[z] / std,   x' = mu(x) + std z

with self-normalised weights ``w_m = softmax_m(r_m / tau)`` over ``M`` simulated candidates (antithetic
pairs), ``r_m`` the reward of each candidate's one-step clean estimate. One VJP through the denoiser
gives ``g = J_mu^T sum_m w_m z_m / std``; the corrected prediction encodes the score ``score + gamma g``,
i.e. ``eps_doob = eps - gamma sigma g`` (§5.2's last two lines), in the model's own parameterisation.

It is a wrapper of the prediction function (DESIGN.md): :func:`doob_model_fn` returns a
``model_fn(x_t, t)`` that any rollout runs unchanged. With ``gamma = 0`` the wrapper calls the model and
returns its output untouched, so the guided rollout is bit-identical to the unguided one.

Why ``gamma = 1`` is the exact correction: the tilted target's noised marginals are
``p*_t(x) ∝ p_t(x) h_t(x)`` with ``h_t(x) = E[exp(r(X0)/tau) | X_t = x]`` (posterior expectation), so their
score is ``score + grad log h_t`` and every sampler of the family (DDIM for any ``eta``, the flow SDE for
any ``a``, the ODE) run on it reaches the target. With an exact lookahead value (one Gaussian and a linear
reward) the guided mean moves by exactly ``s^2 a / tau`` (``tests/test_guidance.py``). The cheap
``reuse_eps`` lookahead attributes a candidate's whole deviation to ``x0`` and so over-estimates
``grad log h`` at high noise by about ``(alpha'^2 s^2 + sigma'^2) / (alpha'^2 s^2)``; DOIT compensates with
``gamma < 1`` and a window of steps (§5.3), ``lookahead="denoise"`` with ``M`` extra forwards.

The exactness holds for the raw tilt, ``standardize=False`` (weights ``softmax(r / tau)``). The default,
``standardize=True`` (DOIT's practical form), z-scores the rewards over each sample's candidates, so the
effective temperature becomes ``tau * std(r)`` of that step: a heuristic that is scale-free but not the
exponential tilt. Its per-step pull shrinks like the kernel's std (the square root of the step) where the
tilt's shrinks like its variance, so summed over the steps it grows with their number (on the
Gaussian-mixture test, the guided mean drifts past the rewarded mode as the number of steps grows);
compare settings at a fixed ``num_steps`` and window, or use ``standardize=False`` when the target
distribution matters.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from samplers.guided.common import (
    EvalCounter,
    LatentReward,
    ModelFn,
    candidate_noise,
    check_window,
    combine_rewards,
    evaluate_reward,
    schedule_index,
)
from samplers.parametrization import expand_like, to_x0_eps, x0_eps_to_model_output
from samplers.schedules import Schedule
from samplers.steps import DETERMINISTIC_STEP, STEPS, GeneratorLike, scheduled_step

__all__ = ["doob_model_fn", "doob_weights", "doob_log_h", "one_step_x0", "LOOKAHEADS"]

#: How a simulated candidate ``x'`` is mapped to a clean estimate for the reward.
LOOKAHEADS = {
    "reuse_eps": "DOIT's cheap rollout: x0 = (x' - sigma' eps_hat(x)) / alpha' (no extra model call)",
    "denoise": "the model's x0 estimate at x' (M extra forward passes per guided step, no gradient)",
    "rollout": "x' completed by the deterministic sampler (ODE / DDIM eta 0) to the end: the reward of a real "
    "final sample, h estimated by simulation of the whole remaining path (M x remaining steps forwards)",
}


def doob_weights(
    rewards: torch.Tensor,
    temperature: float,
    *,
    standardize: bool = True,
    reward_weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """``[M, B]`` self-normalised weights over candidates from rewards ``[M, B]`` or ``[M, B, R]``.

    ``standardize`` z-scores each reward column over the ``M`` candidates of a sample before the weighted
    sum (DOIT's ``(r - mean) / (std tau)``; per column, so rewards on different scales count by their
    weights, not their units). NaN candidates get weight 0; a sample whose candidates all tie or are all
    NaN gets uniform weights (no correction).
    """
    r = rewards.float()
    if r.ndim == 2:
        r = r.unsqueeze(-1)
    if standardize:
        mean = torch.nanmean(r, dim=0, keepdim=True)
        centred = r - mean
        var = torch.nanmean(centred**2, dim=0, keepdim=True)
        std = var.sqrt()
        # a column whose candidates tie carries no signal: 0 (NaN entries stay NaN, as centred * 0 is NaN)
        r = torch.where(std > 1e-12, centred / std.clamp_min(1e-12), centred * 0)
    M, B, R = r.shape
    per_sample = torch.arange(M * B, device=r.device) % B  # each sample's M candidates are compared
    score = combine_rewards(r.reshape(M * B, R), reward_weights, per_sample).view(M, B)
    logits = torch.nan_to_num(score / temperature, nan=-float("inf"))
    all_nan = torch.isinf(logits).all(dim=0, keepdim=True)
    logits = torch.where(all_nan, torch.zeros_like(logits), logits)
    return torch.softmax(logits, dim=0)


def doob_log_h(rewards: torch.Tensor, lam: float) -> torch.Tensor:
    """``[B]`` simulated ``log h = log mean_m exp(lam r_m)`` from combined candidate rewards ``[M, B]``.

    The same simulation that gives DOIT's ``grad log h`` estimates ``h`` itself, the twist of a twisted
    sequential Monte Carlo sampler, whose particles are resampled by the ratio of ``h`` between guided steps
    (``resample_lambda`` in :func:`~samplers.guided.guided_sample`). NaN candidates (reward not applicable) are
    left out of the mean; a particle whose candidates are all NaN gets ``-inf``.
    """
    r = rewards.float()
    valid = ~r.isnan()
    logits = torch.where(valid, lam * r, torch.full_like(r, -float("inf")))
    n = valid.sum(dim=0).clamp_min(1).to(r.dtype)
    return torch.logsumexp(logits, dim=0) - n.log()


def one_step_x0(
    model_fn: ModelFn,
    schedule: Schedule,
    index_next: int,
    x_next: torch.Tensor,
    eps_hat: torch.Tensor,
    lookahead: str,
) -> torch.Tensor:
    """Clean estimates ``[N, *L]`` of states ``x_next`` ``[N, *L]`` at schedule position ``index_next``.

    ``reuse_eps`` reuses the current step's noise estimate ``eps_hat`` (``[N, *L]``), §5.2's free
    lookahead; ``denoise`` asks the model at ``x_next`` (no gradient); ``rollout`` runs the deterministic
    sampler (no gradient) from ``x_next`` to the end. At the final state the clean estimate is the state itself.
    """
    alpha, sigma = schedule.alphas[index_next], schedule.sigmas[index_next]
    if index_next >= schedule.num_steps or float(sigma) == 0.0:
        return x_next
    if lookahead == "reuse_eps":
        return schedule.clip_x0((x_next - float(sigma) * eps_hat) / float(alpha))
    if lookahead == "denoise":
        with torch.no_grad():
            t = schedule.timesteps[index_next].to(x_next.device).expand(x_next.shape[0])
            out = model_fn(x_next, t)
        return schedule.clip_x0(to_x0_eps(out, x_next, alpha, sigma, schedule.prediction_type)[0])
    if lookahead == "rollout":
        det = DETERMINISTIC_STEP[schedule.kind]
        x = x_next
        with torch.no_grad():
            for j in range(index_next, schedule.num_steps):
                t = schedule.timesteps[j].to(x.device).expand(x.shape[0])
                x = scheduled_step(det, model_fn(x, t), x, schedule, j, noise_level=0.0).prev_sample
        return x
    raise ValueError(f"lookahead must be one of {sorted(LOOKAHEADS)}, got {lookahead!r}")


def _update_pool(pool: dict, x: torch.Tensor, r: torch.Tensor, raw: Optional[torch.Tensor] = None) -> None:
    """Keep per sample the best of candidates ``x`` ``[M, B, *L]`` with combined rewards ``r`` ``[M, B]`` (and
    their raw reward rows ``raw`` ``[M, B]`` or ``[M, B, R]``, kept as ``pool["raw"]`` so that the final choice
    can compare the pool with the particles on common reward columns, see ``guided_sample``).

    NaN rewards (not applicable) never enter the pool: a sample whose candidates are all NaN keeps NaN, and
    NaN never compares as better (``pick_better``)."""
    r = r.float()
    best_r, m = torch.where(r.isnan(), -float("inf"), r).max(dim=0)
    best_r = torch.where(r.isnan().all(dim=0), float("nan"), best_r)
    cols = torch.arange(x.shape[1], device=x.device)
    best_x = x[m, cols]
    best_raw = raw[m.to(raw.device), cols.to(raw.device)].float() if raw is not None else None
    if "x" not in pool:
        pool["x"], pool["reward"] = best_x.detach().clone(), best_r.clone()
        if best_raw is not None:
            pool["raw"] = best_raw.clone()
        return
    better = pick_better(best_r, pool["reward"])
    pool["x"][better] = best_x[better].detach()
    pool["reward"] = torch.where(better, best_r, pool["reward"])
    if best_raw is not None:
        pool["raw"][better.to(best_raw.device)] = best_raw[better.to(best_raw.device)]


def pick_better(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new > old`` where a NaN ``new`` never wins and any real ``new`` beats a NaN ``old``."""
    return ~new.isnan() & (old.isnan() | (new > old))


def doob_model_fn(
    model_fn: ModelFn,
    schedule: Schedule,
    reward_fn: LatentReward,
    *,
    step: str,
    noise_level: float,
    gamma: float = 1.0,
    num_candidates: int = 16,
    temperature: float = 1.0,
    window: Optional[Tuple[int, int]] = None,
    standardize: bool = True,
    antithetic: bool = True,
    lookahead: str = "reuse_eps",
    reward_weights: Optional[Sequence[float]] = None,
    generator: GeneratorLike = None,
    counter: Optional[EvalCounter] = None,
    pool: Optional[dict] = None,
    twist: Optional[dict] = None,
) -> ModelFn:
    """Wrap ``model_fn(x_t, t)`` with the DOIT correction (module docstring; §5.2).

    Args:
        model_fn: the prediction function, output in ``schedule.prediction_type``. Wrap it with
            :func:`~samplers.guided.common.counting_model` first to count forward passes.
        schedule: the schedule the rollout runs on (the wrapper finds the step from the timestep).
        reward_fn: ``reward_fn(x0 [N, *L], sample_index [N]) -> [N] or [N, R]``, called without gradient;
            candidate ``m`` of sample ``b`` is row ``m * B + b``.
        step, noise_level: the stochastic kernel the rollout uses at the guided steps (DOIT needs
            ``noise_level > 0`` there: the estimator's noise is the kernel's std).
        gamma: strength; 0 returns the model output untouched (bitwise the unguided sampler).
        num_candidates: ``M`` simulated candidates per guided step and sample (even when antithetic).
        temperature: ``tau`` of ``softmax(r / tau)`` (of the standardised rewards when ``standardize``).
        window: ``(start, end)`` end-exclusive guided steps; ``None`` = every step. Keep it inside the
            rollout's stochastic window. A state with ``alpha = 0`` (flow at ``sigma = 1``) carries no
            information about ``x0`` and is never corrected.
        lookahead: a key of :data:`LOOKAHEADS`.
        reward_weights: weights of the reward columns when ``reward_fn`` returns ``[N, R]``.
        generator: candidate noise (a ``torch.Generator`` or one per sample); keep it separate from the
            rollout's generators so guided and unguided runs share their kernel noise.
        counter: adds VJPs and reward evaluations (model calls are counted by a counting ``model_fn``).
        pool: with ``lookahead="rollout"`` every candidate's completion is a real final sample whose reward
            is already known; a dict passed here keeps, per sample, the best of them (``pool["x"]``
            ``[B, *L]``, ``pool["reward"]`` ``[B]`` combined reward), for a final selection that costs no
            further reward evaluation (``keep_simulated`` in :func:`~samplers.guided.guided_sample`).
        twist: a dict that receives, at every guided step ``i``, ``twist["step"] = i`` and the combined
            candidate rewards ``twist["rewards"]`` ``[M, B]``, for particle resampling on the simulated ``h``
            (:func:`doob_log_h`; ``resample_lambda`` in :func:`~samplers.guided.guided_sample`).
    """
    if step not in STEPS or step == "flow_euler":
        raise ValueError(f"DOIT needs a stochastic step (flow_sde, flow_cps or ddim), got {step!r}")
    if gamma != 0 and noise_level <= 0:
        raise ValueError(f"DOIT needs noise_level > 0 (the kernel's std drives the estimator), "
                         f"got {noise_level}; set a stochastic noise level")
    if gamma != 0 and num_candidates < 2:  # gamma = 0 draws no candidates
        raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if lookahead not in LOOKAHEADS:
        raise ValueError(f"lookahead must be one of {sorted(LOOKAHEADS)}, got {lookahead!r}")
    if pool is not None and lookahead != "rollout":
        raise ValueError(f"a pool of simulated samples needs lookahead='rollout' (real final samples), got "
                         f"{lookahead!r}")
    if gamma != 0 and antithetic and num_candidates % 2:
        raise ValueError(f"antithetic sampling needs an even num_candidates, got {num_candidates}")
    start, end = check_window(window, schedule.num_steps)
    counter = counter if counter is not None else EvalCounter()

    def guided(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if gamma == 0:
            return model_fn(x_t, timestep)
        sched = schedule.to(x_t.device)
        i = schedule_index(sched.timesteps, timestep)
        alpha, sigma = sched.alphas[i], sched.sigmas[i]
        if not start <= i < end or float(alpha) <= 0.0:
            return model_fn(x_t, timestep)
        with torch.enable_grad():
            x_in = x_t.detach().float().requires_grad_(True)
            out = model_fn(x_in, timestep)
            # prev_sample is given only so that the step draws no noise (no global RNG side effect).
            res = scheduled_step(step, out, x_in, sched, i, noise_level=noise_level,
                                 prev_sample=x_in.detach())
            std = expand_like(res.std.detach(), x_in).reshape(-1)
            std = std.expand(x_in.shape[0]) if std.numel() == 1 else std
            if not bool((std > 0).any()):
                return out.detach()
            x = x_in.detach()
            x0_hat, eps_hat = to_x0_eps(out.detach(), x, alpha, sigma, sched.prediction_type)
            B = x.shape[0]
            M = num_candidates
            std_b = std.view(B, *([1] * (x.ndim - 1)))
            z = candidate_noise(M, x, generator, antithetic=antithetic)
            x_next = res.mean.detach().unsqueeze(0) + std_b.unsqueeze(0) * z
            flat = x_next.reshape(M * B, *x.shape[1:])
            eps_rep = eps_hat.repeat(M, *([1] * (x.ndim - 1)))
            x0_c = one_step_x0(model_fn, sched, i + 1, flat, eps_rep, lookahead)
            sample_index = torch.arange(B, device=x.device).repeat(M)
            raw = evaluate_reward(reward_fn, x0_c, sample_index, counter)
            combined = combine_rewards(raw, reward_weights, sample_index).view(M, B)
            if pool is not None:
                _update_pool(pool, x0_c.view(M, B, *x.shape[1:]), combined, raw.view(M, B, *raw.shape[1:]))
            if twist is not None:
                twist["step"], twist["rewards"] = i, combined.detach()
            w = doob_weights(raw.view(M, B, *raw.shape[1:]), temperature, standardize=standardize,
                             reward_weights=reward_weights)
            w = w.view(M, B, *([1] * (x.ndim - 1)))
            # E_w[grad_x log p(x'|x)] = J_mu^T E_w[z] / std; a sample without kernel noise gets no correction.
            v = torch.where(std_b > 0, (w * z).sum(0) / std_b.clamp_min(1e-30), torch.zeros_like(x))
            (g,) = torch.autograd.grad(res.mean, x_in, grad_outputs=v)
            counter.vjp_evals += B
        eps_doob = eps_hat - gamma * expand_like(sigma, x) * g.float()
        x0_doob = (x - expand_like(sigma, x) * eps_doob) / expand_like(alpha, x)
        return x0_eps_to_model_output(x0_doob, eps_doob, alpha, sigma, sched.prediction_type).detach()

    guided.__doc__ = f"DOIT-guided model_fn (gamma={gamma}, M={num_candidates}, tau={temperature})"
    return guided
