"""Shared pieces of the guided samplers: the latent-reward contract, evaluation counting, reward
combination, candidate noise, and per-prompt selection.

The reward contract (every guided sampler uses it)::

    reward_fn(x0 [N, *L], sample_index [N] long) -> Tensor [N] or [N, R]

``x0`` are clean-latent estimates (detached, float32); ``sample_index[n]`` is the row of the sampler's batch
that candidate ``n`` belongs to, so a closure can look up that sample's prompt and metadata. A ``[N, R]``
result is one column per reward; columns are combined with weights (NaN = not applicable, excluded and
the remaining weights rescaled, the rule of :func:`rewards.multi.weighted_sum`). The reward is never
differentiated: :func:`evaluate_reward` calls it under ``torch.no_grad`` on detached tensors, which is what
makes these samplers work with verifiers, OCR or a remote judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from samplers.steps import GeneratorLike

LatentReward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "LatentReward",
    "EvalCounter",
    "GuidedOutput",
    "counting_model",
    "evaluate_reward",
    "combine_rewards",
    "candidate_noise",
    "schedule_index",
    "select_best",
    "check_window",
]


@dataclass
class EvalCounter:
    """Per-sample evaluation counts (a batch of ``B`` rows counts ``B``).

    Attributes:
        model_evals: denoiser forward passes (CFG's doubled batch counts once per sample).
        vjp_evals: vector-Jacobian products through the denoiser (DOIT: one per guided step and sample).
        reward_evals: clean estimates scored by the reward.
    """

    model_evals: int = 0
    vjp_evals: int = 0
    reward_evals: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {"model_evals": self.model_evals, "vjp_evals": self.vjp_evals,
                "reward_evals": self.reward_evals}


@dataclass
class GuidedOutput:
    """Result of a guided sampler.

    Attributes:
        samples: ``[B_out, *L]`` final clean latents (one per prompt after best-of selection, or every
            particle with ``select="all"``).
        rewards: ``[B_out]`` float32 combined reward of ``samples`` (the last reward evaluation; NaN if the
            method never scored them, e.g. unguided sampling).
        counter: model / VJP / reward evaluation counts of the whole call.
        particles: ``[B, *L]`` every final particle before selection.
        particle_rewards: ``[B]`` their combined rewards (None if not scored).
        extras: method-specific diagnostics (FK: number of resampling events; SVDD: chosen indices ...).
    """

    samples: torch.Tensor
    rewards: torch.Tensor
    counter: EvalCounter
    particles: torch.Tensor
    particle_rewards: Optional[torch.Tensor] = None
    extras: Dict[str, object] = field(default_factory=dict)


def counting_model(model_fn: ModelFn, counter: EvalCounter) -> ModelFn:
    """Wrap ``model_fn`` so that every call adds its batch size to ``counter.model_evals``."""

    def fn(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        counter.model_evals += int(x_t.shape[0])
        return model_fn(x_t, timestep)

    return fn


def combine_rewards(values: torch.Tensor, weights: Optional[Sequence[float]] = None,
                    groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N]`` from a reward result ``[N]`` or ``[N, R]`` (weighted sum; NaN columns excluded and the row's
    remaining weights rescaled to the total absolute weight; a row with no valid column is NaN).

    ``groups`` ``[N]``: the rows compared with each other (a prompt's particles, a particle's candidates). They
    are scored on the same columns: a column NaN in some rows of a group (a reward that failed on some samples)
    is left out for the whole group, so a row whose reward failed cannot win by its other columns being scaled
    up; a column NaN in every row (a reward that does not apply to the prompt) is left out as before. A group
    without a column finite in all its rows scores only its rows that have no NaN column."""
    values = values.float()
    if values.ndim == 1:
        return values
    if values.ndim != 2:
        raise ValueError(f"reward_fn must return [N] or [N, R], got shape {tuple(values.shape)}")
    R = values.shape[1]
    w = torch.ones(R) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (R,):
        raise ValueError(f"got {w.numel()} reward weights for {R} reward columns; give one weight per column")
    from rewards.multi import weighted_sum  # the trainers' combination (NaN renormalised, groups' common columns)

    return weighted_sum(values, w.to(values.device), groups=groups)


def evaluate_reward(
    reward_fn: LatentReward,
    x0: torch.Tensor,
    sample_index: torch.Tensor,
    counter: Optional[EvalCounter] = None,
) -> torch.Tensor:
    """Score ``x0`` ``[N, *L]`` without gradient. Returns the raw ``[N]`` or ``[N, R]`` float32 result.

    The input is detached and the call runs under ``torch.no_grad``: no reward is ever differentiated here.
    """
    with torch.no_grad():
        out = reward_fn(x0.detach().float(), sample_index)
    out = torch.as_tensor(out, dtype=torch.float32, device=x0.device)
    if out.ndim not in (1, 2) or out.shape[0] != x0.shape[0]:
        raise ValueError(
            f"reward_fn returned shape {tuple(out.shape)} for {x0.shape[0]} inputs; "
            "it must return [N] or [N, R]"
        )
    if counter is not None:
        counter.reward_evals += int(x0.shape[0])
    return out.detach()


def candidate_noise(
    num_candidates: int,
    like: torch.Tensor,
    generator: GeneratorLike,
    *,
    antithetic: bool,
) -> torch.Tensor:
    """``[M, B, *L]`` float32 standard normal candidate noise; antithetic pairs ``z[m + M/2] = -z[m]``.

    A list of generators draws sample ``b``'s candidates from ``generator[b]`` (batch-split invariant).
    """
    M, B, shape = num_candidates, like.shape[0], tuple(like.shape[1:])
    if antithetic and M % 2:
        raise ValueError(f"antithetic sampling needs an even number of candidates, got {M}; use {M + 1}")
    half = M // 2 if antithetic else M
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B}")
        z = torch.stack(
            [torch.randn((half, *shape), generator=g, device=g.device, dtype=torch.float32)
             for g in generator], 1
        ).to(like.device)
    else:
        dev = generator.device if generator is not None else like.device
        z = torch.randn((half, B, *shape), generator=generator, device=dev, dtype=torch.float32)
        z = z.to(like.device)
    return torch.cat([z, -z]) if antithetic else z


def schedule_index(timesteps: torch.Tensor, timestep: torch.Tensor) -> int:
    """The schedule position of a model call's ``timestep`` ``[B]`` (all equal) in ``timesteps`` ``[T]``."""
    t = timestep.reshape(-1).float()
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("guidance needs every sample of a batch at the same step; got different timesteps")
    diff = (timesteps.to(t.device).float() - t[0]).abs()
    i = int(diff.argmin())
    if float(diff[i]) > 1e-3 * max(1.0, float(t[0].abs())):
        raise ValueError(f"timestep {float(t[0])} is not in the guidance schedule {timesteps.tolist()}")
    return i


def check_window(window: Optional[Tuple[int, int]], num_steps: int, name: str = "window") -> Tuple[int, int]:
    """``(start, end)`` end-exclusive step range (``None``: every step), validated against ``num_steps``."""
    if window is None:
        return 0, num_steps
    start, end = int(window[0]), int(window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"{name}={tuple(window)} must satisfy 0 <= start < end <= num_steps={num_steps}")
    return start, end


def select_best(
    samples: torch.Tensor, rewards: torch.Tensor, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best of each contiguous group of ``group_size`` rows (NaN rewards lose). Returns
    ``(samples [B/G, *L], rewards [B/G], index [B/G] long)``."""
    B = samples.shape[0]
    if B % group_size:
        raise ValueError(f"batch of {B} is not a whole number of groups of {group_size}")
    r = torch.nan_to_num(rewards.float(), nan=-float("inf")).view(B // group_size, group_size)
    idx = r.argmax(dim=1) + torch.arange(B // group_size, device=r.device) * group_size
    idx = idx.to(samples.device)
    return samples[idx], rewards[idx.to(rewards.device)], idx
