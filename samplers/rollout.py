"""Rollout: run a sampler over a schedule and record a :class:`~diffalign.types.Trajectory`.

``model_fn(x_t, timestep) -> model_output`` is any prediction function (a generator adapter's
``predict`` with its conditioning bound, possibly wrapped by guidance). ``x_t`` is float32 ``[B, *L]`` and
``timestep`` a ``[B]`` float32 tensor of model timesteps; the output is in the schedule's
``prediction_type``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Tuple

import torch

from diffalign.types import StepOutput, Trajectory
from samplers.schedules import Schedule
from samplers.steps import DETERMINISTIC_STEP, STEPS, GeneratorLike, PrefetchedNoise, scheduled_step

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, StepOutput], None]
StateHook = Callable[[int, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]

__all__ = ["rollout", "score_steps", "stochastic_mask", "make_generators", "ModelFn"]


def stochastic_mask(num_steps: int, window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``[T]`` bool: which steps are stochastic. ``window=(start, end)`` (end exclusive) limits noise to a
    contiguous window, as Flow-GRPO-Fast / MixGRPO do; ``None`` makes every step stochastic."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window is None:
        mask[:] = True
        return mask
    start, end = int(window[0]), int(window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"stochastic window {window} must satisfy 0 <= start < end <= num_steps={num_steps}")
    mask[start:end] = True
    return mask


def _prefetching(generator: GeneratorLike, device: torch.device, prefetch: Optional[bool]):
    """A :class:`~samplers.steps.PrefetchedNoise` over a list of per-sample generators when ``prefetch`` (``None``:
    when they are CPU generators and sampling runs on a GPU, the only case where the draws overlap other work),
    else ``generator`` itself."""
    if not isinstance(generator, (list, tuple)) or isinstance(generator, PrefetchedNoise) or not generator:
        return generator
    if prefetch is None:
        prefetch = device.type == "cuda" and all(g.device.type == "cpu" for g in generator)
    return PrefetchedNoise(generator, device) if prefetch else generator


def _draws(kind: str, level: float, sigma_next: float) -> bool:
    """Whether a step of ``kind`` at noise ``level`` is expected to draw kernel noise (worth a prefetch): not the
    Euler step nor any step at level 0, nor CPS / DDIM into ``sigma_next = 0`` (std 0 there). A wrong guess costs
    nothing but time: an unused draw is discarded with the generators rewound."""
    return level > 0 and kind != "flow_euler" and (kind == "flow_sde" or sigma_next > 0)


def make_generators(seed: int, sample_ids: Sequence[int], device: torch.device | str = "cpu") -> list:
    """One ``torch.Generator`` per sample, seeded from ``(seed, sample_id)``.

    The stream of a sample depends only on the run seed and its global id, so a batch split over any number
    of processes draws the same noise per sample, and no two samples share noise.
    """
    gens = []
    for sid in sample_ids:
        g = torch.Generator(device=device)
        # Mix the two integers so that (seed, id) pairs do not collide for small ids.
        g.manual_seed((int(seed) * 1_000_003 + int(sid) * 7_919 + 0x9E3779B9) % (2**63 - 1))
        gens.append(g)
    return gens


def rollout(
    model_fn: ModelFn,
    schedule: Schedule,
    initial_latents: torch.Tensor,
    *,
    step: str = "flow_sde",
    noise_level: float = 0.7,
    window: Optional[Tuple[int, int]] = None,
    generator: GeneratorLike = None,
    requires_grad: bool = False,
    store_x0: bool = False,
    callback: Optional[StepCallback] = None,
    before_step: Optional[StateHook] = None,
    prefetch_noise: Optional[bool] = None,
) -> Trajectory:
    """Sample from ``initial_latents`` ``[B, *L]`` along ``schedule``.

    Args:
        step: a key of :data:`samplers.steps.STEPS`.
        noise_level: stochasticity of the stochastic steps (0 gives the deterministic sampler).
        window: optional ``(start, end)``; steps outside it run with noise level 0 (the ODE).
        generator: a ``torch.Generator`` or a list with one per sample (see :func:`make_generators`).
        requires_grad: keep the autograd graph through the model calls (reward backprop); otherwise the
            rollout runs under ``torch.no_grad``.
        store_x0: also store the one-step clean estimate at every state (``[B, T, *L]``).
        callback: ``callback(i, x_t, step_output)`` after each step.
        before_step: ``before_step(i, x_t, model_output) -> (x_t, model_output)`` between the model call and
            step ``i``, which then runs on what it returns: particles resampled by sequential Monte Carlo (rows
            duplicated with their model output, so duplicates draw their own kernel noise). Recorded states are not
            reordered, so with resampling a row's history is not one particle's path.
        prefetch_noise: draw each stochastic step's kernel noise from per-sample CPU generators while its model
            call runs (:class:`~samplers.steps.PrefetchedNoise`); the noise is bitwise the same. ``None``: only
            when sampling on a GPU, where it keeps the GPU busy.
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid steps: {sorted(STEPS)}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    T = schedule.num_steps
    mask = stochastic_mask(T, window)
    device = initial_latents.device
    sched = schedule.to(device)
    x = initial_latents.float()
    B = x.shape[0]
    latents = [x]
    log_probs = torch.zeros(B, T, dtype=torch.float32, device=device)
    # per-step std and g stay on the device until the end (one host read at the end rather than two per step)
    stds = torch.zeros(T, dtype=torch.float32, device=device)
    drew = torch.zeros(T, dtype=torch.bool)
    x0_preds = [] if store_x0 else None
    gs = torch.zeros(T, dtype=torch.float32, device=device)
    noise = _prefetching(generator, device, prefetch_noise)
    next_sigma = schedule.sigmas.detach().cpu()[1:]
    ctx = contextlib.nullcontext() if requires_grad else torch.no_grad()
    with ctx:
        for i in range(T):
            t = sched.timesteps[i].expand(B)
            out = model_fn(x, t)
            if before_step is not None:
                x, out = before_step(i, x, out)
            level = noise_level if bool(mask[i]) else 0.0
            kind = step if level > 0 else DETERMINISTIC_STEP[schedule.kind]
            if isinstance(noise, PrefetchedNoise) and _draws(kind, level, float(next_sigma[i])):
                noise.prefetch(x.shape)  # overlaps the model call just launched
            try:
                res = scheduled_step(kind, out, x, sched, i, noise_level=level, generator=noise)
            finally:  # a step whose std came out 0 (or that raised) drew nothing: rewind its prefetched draw
                if isinstance(noise, PrefetchedNoise):
                    noise.discard()
            if res.log_prob is not None:
                drew[i] = True
                log_probs[:, i] = res.log_prob.detach()
                stds[i] = res.std.detach().reshape(-1)[0]
            if "g" in res.extras:
                gs[i] = torch.as_tensor(res.extras["g"]).detach().reshape(-1)[0]
            if store_x0:
                x0_preds.append(res.x0_pred if requires_grad else res.x0_pred.detach())
            if callback is not None:
                callback(i, x, res)
            x = res.prev_sample if requires_grad else res.prev_sample.detach()
            latents.append(x)
    stds, gs = stds.cpu(), gs.cpu()
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        step_indices=torch.arange(T),
        timesteps=schedule.timesteps.clone(),
        # a step whose std is 0 (CPS / DDIM-on-flow at sigma_next = 0) drew no noise: not stochastic
        stochastic=mask & drew,
        stds=stds,
        noise_level=float(noise_level),
        step_kind=step,
        x0_preds=torch.stack(x0_preds, dim=1) if store_x0 else None,
        extras={"g": gs} if step == "flow_sde" else {},
    )


def score_steps(
    model_fn: ModelFn,
    schedule: Schedule,
    trajectory: Trajectory,
    index: torch.Tensor | int,
    *,
    sample_index: Optional[torch.Tensor] = None,
) -> StepOutput:
    """Re-score step(s) ``index`` of a stored trajectory: the model runs at the stored state and the step
    function evaluates the stored next state instead of drawing one.

    ``index`` is an int (the same step for every sample) or ``[B]`` long (per-sample steps, DDPO's
    shuffled timesteps). Returns the :class:`StepOutput` whose ``log_prob`` is the new log-probability
    (with gradient through the model when enabled).
    """
    sched = schedule.to(trajectory.latents.device)
    lat = trajectory.latents if sample_index is None else trajectory.latents[sample_index]
    B = lat.shape[0]
    if isinstance(index, int):
        x_t, x_next = lat[:, index], lat[:, index + 1]
        t = sched.timesteps[index].expand(B)
        noisy = bool(trajectory.stochastic[index])
    else:
        idx = index.to(lat.device)
        rows = torch.arange(B, device=lat.device)
        x_t, x_next = lat[rows, idx], lat[rows, idx + 1]
        t = sched.timesteps[idx]
        noisy = bool(trajectory.stochastic[idx.cpu()].all())
    if not noisy:
        raise ValueError("score_steps needs stochastic steps; deterministic steps have no log-probability")
    out = model_fn(x_t, t)
    return scheduled_step(trajectory.step_kind, out, x_t, sched, index, noise_level=trajectory.noise_level,
                          prev_sample=x_next)
