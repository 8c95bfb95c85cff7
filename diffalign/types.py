"""Records passed between samplers, rewards and trainers.

Shapes use ``B`` for batch, ``T`` for the number of sampler steps in a rollout, ``R`` for the number of
reward columns and ``*L`` for the latent shape of one sample (``C, H, W`` for image latents; packed
``S, D`` for FLUX).

Log-probability convention (one place, used everywhere): the log-density of a Gaussian transition is
computed in float32 and reduced by the MEAN over every non-batch dimension (the Flow-GRPO / DDPO
convention). PPO clip ranges (1e-4), KL weights and PRDP's beta are tuned for this scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional

import torch

__all__ = ["StepOutput", "Trajectory", "RewardOutput", "LossStats"]


@dataclass
class StepOutput:
    """Result of one sampler transition ``x_t -> x_next``.

    Attributes:
        prev_sample: ``[B, *L]`` the next (less noisy) state. When the step was called with a given
            ``prev_sample`` (re-scoring), this is that tensor, unchanged.
        log_prob: ``[B]`` float32 log-density of ``prev_sample`` under ``N(mean, std^2 I)``, averaged over
            the non-batch dims; ``None`` for a deterministic step (``std == 0``).
        mean: ``[B, *L]`` float32 mean of the transition (carries the gradient of the model output).
        std: ``[B]`` (or broadcastable) float32 standard deviation of the transition; 0 for deterministic.
        x0_pred: ``[B, *L]`` float32 one-step clean estimate at ``x_t`` (used by guidance and VGPO).
        extras: step-specific quantities, e.g. Flow-GRPO's diffusion coefficient ``g`` under key
            ``"g"`` (its KL term divides by ``2 g^2``).
    """

    prev_sample: torch.Tensor
    log_prob: Optional[torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    x0_pred: Optional[torch.Tensor] = None
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One batch of rollouts, designed for every consumer in DESIGN.md's table.

    Attributes:
        latents: ``[B, T+1, *L]`` states ``x_0 .. x_T`` in sampling order (index 0 is the initial noise,
            index ``T`` the final clean latent). Step ``j`` maps ``latents[:, j] -> latents[:, j+1]``.
        log_probs: ``[B, T]`` float32 behaviour-policy log-probs of each transition (0 where the step was
            deterministic; see ``stochastic``). GRPO's ``old_log_prob``.
        step_indices: ``[T]`` long, ``0..T-1``; index into ``timesteps`` / the schedule for each step.
        timesteps: ``[T]`` the value each model call received (flow: ``1000 * sigma``; DDIM: integer t).
        stochastic: ``[T]`` bool, True where the step drew noise (an SDE window, Flow-GRPO-Fast).
        stds: ``[T]`` float32 transition std per step (0 for deterministic steps).
        ref_log_probs: optional ``[B, T]`` log-probs of the same transitions under the reference model
            (PRDP); filled by :func:`samplers.rollout.score_trajectory` with the adapter disabled.
        x0_preds: optional ``[B, T, *L]`` one-step clean estimates at each state (guidance, FK, SVDD,
            VGPO), stored only when requested.
        noise_level: the stochasticity knob used for the stochastic steps (Flow-GRPO's ``a``, DDIM eta).
        step_kind: name of the step function in ``samplers.STEPS`` that produced the trajectory.
        extras: free-form per-trajectory data (e.g. per-step ``g`` under ``"g"`` as ``[T]``).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    step_indices: torch.Tensor
    timesteps: torch.Tensor
    stochastic: torch.Tensor
    stds: torch.Tensor
    noise_level: float
    step_kind: str
    ref_log_probs: Optional[torch.Tensor] = None
    x0_preds: Optional[torch.Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    @property
    def final(self) -> torch.Tensor:
        """``[B, *L]`` the final clean latent (what DiffusionNFT, GDRO and rewards consume)."""
        return self.latents[:, -1]

    def index_select(self, index: torch.Tensor) -> "Trajectory":
        """Select samples along the batch axis (per-sample tensors only; per-step tensors are shared)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("latents", "log_probs", "ref_log_probs", "x0_preds") and value is not None:
                value = value.index_select(0, index.to(value.device))
            out[f.name] = value
        return replace(self, **out)

    @staticmethod
    def cat(trajectories: List["Trajectory"]) -> "Trajectory":
        """Concatenate trajectories with identical schedules along the batch axis."""
        first = trajectories[0]
        for t in trajectories[1:]:
            if not torch.equal(t.timesteps.cpu(), first.timesteps.cpu()) or t.step_kind != first.step_kind:
                raise ValueError("Trajectory.cat needs trajectories sampled with the same schedule and step")
        out = {}
        for f in fields(first):
            values = [getattr(t, f.name) for t in trajectories]
            if f.name in ("latents", "log_probs", "ref_log_probs", "x0_preds"):
                out[f.name] = None if values[0] is None else torch.cat(values, dim=0)
            else:
                out[f.name] = values[0]
        return Trajectory(**out)


@dataclass
class RewardOutput:
    """Scores of one reward on a batch.

    Attributes:
        scores: ``[B]`` float32. NaN means "not applicable to this sample" (never "failed silently").
        details: optional per-sample dicts (e.g. the shapes verifier's per-criterion results).
    """

    scores: torch.Tensor
    details: Optional[List[Dict[str, Any]]] = None


@dataclass
class LossStats:
    """Scalar statistics a trainer's pure loss returns beside the loss (all detached 0-dim tensors)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_loss: torch.Tensor
    approx_kl: torch.Tensor
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, float]:
        out = {f.name: float(getattr(self, f.name)) for f in fields(self) if f.name != "extras"}
        out.update({k: float(v) for k, v in self.extras.items()})
        return out
