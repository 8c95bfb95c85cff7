"""Inference-time baselines for non-differentiable rewards (research/seed_algorithms.md §7.12, §1).

* :func:`best_of_n`: ``N`` independent samples per prompt, keep the best by the final reward.
* :func:`fk_steering`: Feynman–Kac steering (Singhal et al., arXiv 2501.06848): particles resampled on the
  reward of their intermediate clean estimates, with potentials DIFF / MAX / ADD / RT and ESS-adaptive
  multinomial resampling; the last potential divides by the product of the past ones so the terminal
  target is ``p0(x0) exp(lambda r(x0))``.
* :func:`svdd_sample`: SVDD-PM (Li et al., arXiv 2408.08252): at every stochastic step, ``M`` candidates
  from the pretrained kernel, valued by the reward of their clean estimate, one kept by
  ``softmax(v / alpha)`` sampling (``alpha = 0``: argmax).

These change the particles between steps, so unlike DOIT they are sampler loops, not model wrappers;
each step is still :func:`samplers.steps.scheduled_step`. Batches are laid out as contiguous groups of
``group_size`` particles per prompt (row ``prompt * group_size + p``).
"""

from __future__ import annotations

import warnings

from typing import Optional, Sequence, Tuple

import torch

from samplers.guided.common import (
    EvalCounter,
    GuidedOutput,
    LatentReward,
    ModelFn,
    candidate_noise,
    check_window,
    combine_rewards,
    evaluate_reward,
    select_best,
)
from samplers.guided.doob import one_step_x0
from samplers.parametrization import to_x0_eps
from samplers.rollout import rollout
from samplers.schedules import Schedule
from samplers.steps import DETERMINISTIC_STEP, STEPS, GeneratorLike, scheduled_step

__all__ = ["best_of_n", "fk_steering", "svdd_sample", "FK_POTENTIALS", "FK_SELECT", "fk_log_potential"]

FK_POTENTIALS = {
    "diff": "exp(lambda (r_t - r_prev)): the increment since the last resampling step",
    "max": "exp(lambda max_{s<=t} r_s)",
    "add": "exp(lambda sum_{s<=t} r_s)",
    "rt": "exp(lambda r_t)",
}
FK_SELECT = ("best", "resample", "all")


def _groups(B: int, group_size: int) -> int:
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} is not a whole number of groups of group_size={group_size}")
    return B // group_size


def _score(reward_fn: LatentReward, x0: torch.Tensor, counter: EvalCounter,
           reward_weights: Optional[Sequence[float]], index: Optional[torch.Tensor] = None,
           groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N]`` combined rewards; ``index`` maps rows to batch samples (default: row ``n`` is sample ``n``);
    ``groups`` the rows compared with each other (:func:`combine_rewards`)."""
    index = torch.arange(x0.shape[0], device=x0.device) if index is None else index
    return combine_rewards(evaluate_reward(reward_fn, x0, index, counter), reward_weights, groups)


def _prompt_groups(n: int, group_size: int, device) -> torch.Tensor:
    """``[n]`` prompt of each row (``group_size`` contiguous particles per prompt)."""
    return torch.arange(n, device=device) // group_size


def best_of_n(
    model_fn: ModelFn,
    schedule: Schedule,
    initial_latents: torch.Tensor,
    reward_fn: LatentReward,
    *,
    group_size: int,
    step: str = "flow_euler",
    noise_level: float = 0.0,
    generator: GeneratorLike = None,
    reward_weights: Optional[Sequence[float]] = None,
    counter: Optional[EvalCounter] = None,
) -> GuidedOutput:
    """Best of ``group_size`` full samples per prompt (any sampler, the ODE included). Cost: ``N`` samples
    and ``N`` reward evaluations per prompt."""
    counter = counter if counter is not None else EvalCounter()
    _groups(initial_latents.shape[0], group_size)
    traj = rollout(model_fn, schedule, initial_latents, step=step, noise_level=noise_level,
                   generator=generator)
    final = traj.final
    r = _score(reward_fn, final, counter, reward_weights,
               groups=_prompt_groups(final.shape[0], group_size, final.device))
    best, best_r, idx = select_best(final, r, group_size)
    return GuidedOutput(best, best_r, counter, final, r, {"index": idx})


def fk_log_potential(
    kind: str, lam: float, r: torch.Tensor, state: dict
) -> torch.Tensor:
    """``log G_t`` ``[B]`` of FK potential ``kind`` at a resampling step with rewards ``r`` ``[B]``; updates
    ``state`` (per-particle ``r_prev``, ``r_max``, ``r_sum``) in place."""
    if kind == "diff":
        out = lam * (r - state["r_prev"])
    elif kind == "max":
        state["r_max"] = torch.maximum(state["r_max"], r)
        out = lam * state["r_max"]
    elif kind == "add":
        state["r_sum"] = state["r_sum"] + r
        out = lam * state["r_sum"]
    elif kind == "rt":
        out = lam * r
    else:
        raise ValueError(f"potential must be one of {sorted(FK_POTENTIALS)}, got {kind!r}")
    state["r_prev"] = r
    return out


def _fill_nan(r: torch.Tensor) -> torch.Tensor:
    """NaN rewards (not applicable) take the lowest finite reward of the batch: such particles are never
    favoured, and a batch without any finite reward is left neutral (zeros)."""
    finite = r[~torch.isnan(r)]
    low = finite.min() if finite.numel() else torch.zeros((), device=r.device)
    return torch.where(torch.isnan(r), low, r)


def multinomial_rows(probs: torch.Tensor, num: int, generator: GeneratorLike,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[R, num]`` draws (with replacement) from each row of ``probs`` ``[R, K]``, on the CPU.

    ``generator``: one CPU generator for every row, or a list with one per row. With a list, row ``r`` is drawn
    from its own generator, so its draws do not depend on which other rows share the batch (a prompt's resampling
    is the same in any batch, on any process), and ``rows`` (``[R]`` bool) limits the draws to those rows (the
    others advance nothing and get zeros)."""
    probs = probs.detach().cpu()
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, num, replacement=True, generator=generator)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows of draws; pass one per row (per "
                         "prompt for resampling, per particle for SVDD's selection)")
    out = torch.zeros(probs.shape[0], num, dtype=torch.long)
    for r in range(probs.shape[0]):
        if rows is None or bool(rows[r]):
            out[r] = torch.multinomial(probs[r], num, replacement=True, generator=generator[r])
    return out


def _resample(log_w: torch.Tensor, group_size: int, mask: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    """``[B]`` ancestor indices: multinomial within each group where ``mask`` ``[G]`` is set, else identity
    (``G`` groups of ``group_size``); ``generator``: one, or one per group (:func:`multinomial_rows`)."""
    G = mask.shape[0]
    lw = log_w.view(G, group_size)
    probs = torch.softmax(lw, dim=1)
    draw = multinomial_rows(probs, group_size, generator, rows=mask.cpu()).to(lw.device)
    keep = torch.arange(group_size, device=lw.device).expand(G, group_size)
    local = torch.where(mask.view(G, 1), draw, keep)
    return (local + torch.arange(G, device=lw.device).view(G, 1) * group_size).reshape(-1)


def _ess(log_w: torch.Tensor, group_size: int) -> torch.Tensor:
    w = torch.softmax(log_w.view(-1, group_size), dim=1)
    return 1.0 / (w**2).sum(dim=1)


def fk_steering(
    model_fn: ModelFn,
    schedule: Schedule,
    initial_latents: torch.Tensor,
    reward_fn: LatentReward,
    *,
    group_size: int,
    step: str,
    noise_level: float,
    lam: float = 2.0,
    potential: str = "max",
    every: int = 1,
    window: Optional[Tuple[int, int]] = None,
    ess_threshold: float = 0.5,
    select: str = "best",
    generator: GeneratorLike = None,
    resample_generator: GeneratorLike = None,
    reward_weights: Optional[Sequence[float]] = None,
    counter: Optional[EvalCounter] = None,
) -> GuidedOutput:
    """Feynman–Kac steering with ``group_size`` particles per prompt (module docstring).

    Args:
        lam: ``lambda``; the terminal target is ``p0 exp(lambda r)``.
        potential: a key of :data:`FK_POTENTIALS`.
        every, window: resample at steps ``start, start + every, ... < end`` (``window`` end-exclusive,
            ``None`` = all steps), on the reward of each particle's clean estimate at that step; the
            final potential is applied to the finished samples.
        ess_threshold: resample a group when its effective sample size is below ``ess_threshold *
            group_size`` (1.0 = always, 0 = never at intermediate steps).
        select: ``best`` (one sample per prompt, highest final reward), ``resample`` (every particle after
            a final multinomial resampling with the terminal weights: samples of the tilted target), or
            ``all`` (every particle, unweighted).
        generator: kernel noise (per particle slot when a list); ``resample_generator``: CPU generator of
            the multinomial draws, or a list with one per prompt (group), so that a prompt's draws do not
            depend on the batch (as :func:`samplers.guided.guided_sample` passes).

    The kernel must be stochastic (``noise_level > 0``): resampled duplicates diverge only through noise.
    """
    if potential not in FK_POTENTIALS:
        raise ValueError(f"potential must be one of {sorted(FK_POTENTIALS)}, got {potential!r}")
    if select not in FK_SELECT:
        raise ValueError(f"select must be one of {FK_SELECT}, got {select!r}")
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid steps: {sorted(STEPS)}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    counter = counter if counter is not None else EvalCounter()
    sched = schedule.to(initial_latents.device)
    T = sched.num_steps
    start, end = check_window(window, T)
    resample_at = set(range(start, end, every))
    if resample_at and ess_threshold * group_size <= 1:
        # ESS is at least 1, so a group never falls below the threshold: this is best-of-P (select="best")
        warnings.warn(f"FK steering with {group_size} particle(s) per prompt and ess_threshold={ess_threshold} "
                      f"never resamples (ESS >= 1 >= {ess_threshold} x {group_size}); its intermediate reward "
                      "evaluations are spent for nothing. Use more particles (guidance.num_particles) or a higher "
                      "ess_threshold", RuntimeWarning)
    x = initial_latents.float()
    B = x.shape[0]
    G = _groups(B, group_size)
    zeros = torch.zeros(B, device=x.device)
    state = {"r_prev": zeros, "r_max": torch.full((B,), -float("inf"), device=x.device), "r_sum": zeros}
    log_w = zeros.clone()
    log_prod = zeros.clone()  # sum of the log-potentials applied along each particle's ancestry
    n_resampled = 0
    kind = step if noise_level > 0 else DETERMINISTIC_STEP[sched.kind]
    with torch.no_grad():
        for i in range(T):
            t = sched.timesteps[i].expand(B)
            out = model_fn(x, t)
            if i in resample_at:
                x0 = sched.clip_x0(to_x0_eps(out, x, sched.alphas[i], sched.sigmas[i], sched.prediction_type)[0])
                r = _fill_nan(_score(reward_fn, x0, counter, reward_weights,
                                     groups=_prompt_groups(B, group_size, x.device)))
                log_g = fk_log_potential(potential, lam, r, state)
                log_w, log_prod = log_w + log_g, log_prod + log_g
                mask = _ess(log_w, group_size) < ess_threshold * group_size
                if bool(mask.any()):
                    idx = _resample(log_w, group_size, mask, resample_generator)
                    x, out, log_prod = x[idx], out[idx], log_prod[idx]
                    state = {k: v[idx] for k, v in state.items()}
                    log_w = torch.where(mask.repeat_interleave(group_size), zeros, log_w[idx])
                    n_resampled += int(mask.sum())
            res = scheduled_step(kind, out, x, sched, i, noise_level=noise_level, generator=generator)
            x = res.prev_sample
        r_final = _score(reward_fn, x, counter, reward_weights, groups=_prompt_groups(B, group_size, x.device))
    # terminal potential exp(lambda r_T) / prod(past potentials): the target is p0 exp(lambda r).
    log_w = log_w + lam * _fill_nan(r_final) - log_prod
    extras = {"num_resampled_groups": n_resampled, "log_weights": log_w}
    if select == "best":
        best, best_r, idx = select_best(x, r_final, group_size)
        return GuidedOutput(best, best_r, counter, x, r_final, {**extras, "index": idx})
    if select == "resample":
        every_group = torch.ones(G, dtype=torch.bool, device=x.device)
        idx = _resample(log_w, group_size, every_group, resample_generator)
        return GuidedOutput(x[idx], r_final[idx], counter, x, r_final, {**extras, "index": idx})
    return GuidedOutput(x, r_final, counter, x, r_final, extras)


def svdd_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    initial_latents: torch.Tensor,
    reward_fn: LatentReward,
    *,
    step: str,
    noise_level: float,
    num_candidates: int = 8,
    alpha: float = 0.0,
    window: Optional[Tuple[int, int]] = None,
    lookahead: str = "denoise",
    group_size: int = 1,
    generator: GeneratorLike = None,
    select_generator: GeneratorLike = None,
    reward_weights: Optional[Sequence[float]] = None,
    counter: Optional[EvalCounter] = None,
    kernel_generator: GeneratorLike = None,
) -> GuidedOutput:
    """SVDD-PM per-step candidate selection (module docstring).

    Args:
        num_candidates: ``M`` candidates per step and sample, drawn from the step's own kernel.
        alpha: selection temperature; 0 keeps the argmax (greedy), ``> 0`` samples ``softmax(v / alpha)``.
        window: ``(start, end)`` steps with selection; other steps are plain steps of the same kernel.
        lookahead: ``denoise`` (SVDD-PM: the model's clean estimate at each candidate; the chosen
            candidate's prediction is reused at the next step, so a step costs ``M`` forwards) or
            ``reuse_eps`` (the current noise estimate, no extra forward).
        group_size: particles per prompt; the final output keeps the best of each group.
        generator: candidate noise (one per sample when a list); ``select_generator``: the draws of
            ``alpha > 0`` (one CPU generator, or one per sample); ``kernel_generator``: the noise of the plain
            steps outside the window (default: ``generator``); pass the unguided sampler's to share its noise
            there, as :func:`samplers.guided.guided_sample` does (a selecting step draws from it too, unused, so
            the steps after the window get the unguided sampler's noise of the same step).
    """
    if step not in STEPS or step == "flow_euler":
        raise ValueError(f"SVDD needs a stochastic step (flow_sde, flow_cps or ddim), got {step!r}")
    if noise_level <= 0:
        raise ValueError(f"SVDD needs noise_level > 0, got {noise_level}")
    if num_candidates < 1 or alpha < 0:
        raise ValueError(f"need num_candidates >= 1 and alpha >= 0, got {num_candidates} and {alpha}")
    counter = counter if counter is not None else EvalCounter()
    sched = schedule.to(initial_latents.device)
    T = sched.num_steps
    start, end = check_window(window, T)
    x = initial_latents.float()
    B, M = x.shape[0], num_candidates
    _groups(B, group_size)
    rows = torch.arange(B, device=x.device)
    lat_ones = [1] * (x.ndim - 1)
    r_last = torch.full((B,), float("nan"), device=x.device)
    raw_last = None  # the chosen candidates' raw reward rows, recombined per prompt for the final choice
    selected_at = -1  # the last step that selected among candidates
    out = None
    with torch.no_grad():
        for i in range(T):
            if out is None:
                out = model_fn(x, sched.timesteps[i].expand(B))
            res = scheduled_step(step, out, x, sched, i, noise_level=noise_level, prev_sample=x)
            if not start <= i < end or not bool((res.std > 0).any()):
                # outside the window (or where the kernel has no noise): the plain base sampler
                res = scheduled_step(step, out, x, sched, i, noise_level=noise_level,
                                     generator=generator if kernel_generator is None else kernel_generator)
                x = res.prev_sample
                out = None
                continue
            if kernel_generator is not None:  # keep the kernel streams in step with the unguided sampler's
                scheduled_step(step, out, x, sched, i, noise_level=noise_level, generator=kernel_generator)
            std = res.std.reshape(-1).expand(B).view(B, *lat_ones) if res.std.numel() == 1 else \
                res.std.view(B, *lat_ones)
            z = candidate_noise(M, x, generator, antithetic=False)
            cand = res.mean.unsqueeze(0) + std.unsqueeze(0) * z
            flat = cand.reshape(M * B, *x.shape[1:])
            out_c = None
            if lookahead == "denoise" and i + 1 < T and float(sched.sigmas[i + 1]) > 0:
                out_c = model_fn(flat, sched.timesteps[i + 1].expand(M * B))
                a_n, s_n = sched.alphas[i + 1], sched.sigmas[i + 1]
                x0_c = sched.clip_x0(to_x0_eps(out_c, flat, a_n, s_n, sched.prediction_type)[0])
            else:
                eps = to_x0_eps(out, x, sched.alphas[i], sched.sigmas[i], sched.prediction_type)[1]
                x0_c = one_step_x0(model_fn, sched, i + 1, flat, eps.repeat(M, *lat_ones), "reuse_eps")
            raw = evaluate_reward(reward_fn, x0_c, rows.repeat(M), counter)
            v = combine_rewards(raw, reward_weights, rows.repeat(M)).view(M, B)  # a particle's candidates
            logits = torch.nan_to_num(v, nan=-float("inf"))
            if alpha == 0:
                choice = logits.argmax(dim=0)
            else:
                none_valid = torch.isinf(logits).all(0, keepdim=True)
                logits = torch.where(none_valid, torch.zeros_like(logits), logits)
                probs = torch.softmax(logits / alpha, dim=0).T
                choice = multinomial_rows(probs, 1, select_generator).view(B).to(x.device)
            selected_at = i
            x = cand[choice, rows]
            r_last = v[choice, rows]
            raw_last = raw.view(M, B, *raw.shape[1:])[choice, rows]
            out = None if out_c is None else out_c.view(M, B, *out_c.shape[1:])[choice, rows]
    groups = _prompt_groups(B, group_size, x.device)
    if selected_at < T - 1:
        # the last step made no selection (outside the window, or a kernel without noise there: flow_cps, DDIM
        # into sigma 0), so the candidates' values describe an earlier state: score the finished samples
        r_last = _score(reward_fn, x, counter, reward_weights, groups=groups)
    else:  # the prompt's particles compared on their common reward columns (not each particle's own)
        redo = torch.isin(groups, groups[torch.isnan(r_last)])
        if bool(redo.any()):  # a kept reward failed: score that prompt's finished particles again (P evaluations)
            raw_last = raw_last.clone()
            raw_last[redo] = evaluate_reward(reward_fn, x[redo], rows[redo], counter)
        r_last = combine_rewards(raw_last, reward_weights, groups)
    best, best_r, idx = select_best(x, r_last, group_size)
    return GuidedOutput(best, best_r, counter, x, r_last, {"index": idx})
