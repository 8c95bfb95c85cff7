"""Sampler transitions with exact Gaussian log-probabilities.

One function serves rollout and re-scoring (DESIGN.md): called without ``prev_sample`` it draws the next
state; called with ``prev_sample`` it evaluates that state's log-probability under the same transition,
so a re-scored step under unchanged parameters reproduces the stored log-prob bit for bit.

Conventions (see :mod:`diffalign.types`): step math runs in float32 whatever the model dtype (bf16 can
overflow in the mean, Flow-GRPO's note); log-probs are reduced by the MEAN over non-batch dims;
``prev_sample`` is detached inside the log-prob so gradients flow only through the mean.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch

from diffalign.types import StepOutput
from samplers.parametrization import expand_like, to_x0_eps
from samplers.schedules import Schedule

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]

__all__ = [
    "gaussian_log_prob",
    "randn",
    "PrefetchedNoise",
    "flow_euler_step",
    "flow_sde_step",
    "flow_cps_step",
    "ddim_step",
    "scheduled_step",
    "STEPS",
    "DETERMINISTIC_STEP",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 mean over non-batch dims of ``log N(x; mean, std^2)`` (Flow-GRPO eq. (9) / DDPO).

    ``x`` is detached: the log-prob is a function of the policy only through ``mean``.
    """
    x = x.detach().float()
    mean = mean.float()
    std = expand_like(std, mean) if torch.as_tensor(std).ndim <= 1 else std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


class PrefetchedNoise(list):
    """Per-sample generators whose next draw can be made ahead of its use (a list of ``torch.Generator``).

    On a GPU, drawing a step's kernel noise from CPU generators after the model call leaves the GPU idle while the
    CPU draws and copies. :func:`samplers.rollout` therefore calls :meth:`prefetch` right after launching a
    step's model call (kernels run asynchronously), so the draw overlaps the forward pass; the step's
    :func:`randn` then takes the prefetched tensor. A step that turns out to draw nothing (its std is 0) leaves
    the draw unused, and :meth:`discard` puts the generators back where they were before it. Each generator thus
    draws the same numbers in the same order as drawing at use, and ends in the same state.
    """

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device) -> None:
        super().__init__(generators)
        self.device = torch.device(device)
        self.pending: Optional[torch.Tensor] = None
        self._states: Optional[list] = None

    def prefetch(self, shape: Sequence[int]) -> None:
        """Draw the next ``[B, *shape[1:]]`` noise now and start its copy to ``device`` (pinned, non-blocking)."""
        self.discard()
        self._states = [g.get_state() for g in self]
        noise = randn(shape, list(self), self[0].device)  # drawn where the generators live, as at use
        if noise.device.type == "cpu" and self.device.type == "cuda":
            noise = noise.pin_memory()
        self.pending = noise.to(self.device, non_blocking=True)

    def take(self, shape: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
        """The prefetched draw (and forget it), or ``None`` if there is none."""
        noise, self.pending, self._states = self.pending, None, None
        if noise is not None and (tuple(noise.shape) != tuple(shape) or noise.device != torch.device(device)):
            raise RuntimeError(f"prefetched noise of shape {tuple(noise.shape)} on {noise.device} does not match the "
                               f"draw of shape {tuple(shape)} on {device}")
        return noise

    def discard(self) -> None:
        """Forget an unused prefetched draw and rewind the generators to before it."""
        if self.pending is not None:
            for g, state in zip(self, self._states, strict=True):
                g.set_state(state)
        self.pending, self._states = None, None


def randn(shape: Sequence[int], generator: GeneratorLike, device: torch.device) -> torch.Tensor:
    """Float32 standard normal noise; a list of generators draws each sample from its own stream.

    Per-sample generators make a sample's noise independent of how a batch is split across processes. A
    :class:`PrefetchedNoise` holding a draw gives that draw.
    """
    if isinstance(generator, PrefetchedNoise):
        noise = generator.take(shape, device)
        if noise is not None:
            return noise
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        ).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _finish(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: Optional[torch.Tensor],
    generator: GeneratorLike,
    x0_pred: torch.Tensor,
    extras: Optional[Dict[str, torch.Tensor]] = None,
) -> StepOutput:
    std_b = expand_like(std, mean)
    deterministic = bool((std_b == 0).all())
    if prev_sample is None:
        if deterministic:
            prev_sample = mean
        else:
            prev_sample = mean + std_b * randn(mean.shape, generator, mean.device)
    log_prob = None if deterministic else gaussian_log_prob(prev_sample, mean, std_b)
    std_out = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std_out.ndim == 0:
        std_out = std_out.expand(mean.shape[0])
    return StepOutput(prev_sample, log_prob, mean, std_out, x0_pred, extras or {})


def flow_euler_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    sigma_next: Union[float, torch.Tensor],
) -> StepOutput:
    """Deterministic Euler step of the flow ODE: ``x' = x + (sigma_next - sigma) v`` (float32).

    Matches diffusers' ``FlowMatchEulerDiscreteScheduler.step`` (which also upcasts to float32).
    """
    x = x_t.float()
    v = velocity.float()
    s = expand_like(sigma, x)
    dt = expand_like(sigma_next, x) - s
    mean = x + dt * v
    zero = torch.zeros((), device=x.device)
    return _finish(mean, zero, None, None, x - s * v)


def flow_sde_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    sigma_next: Union[float, torch.Tensor],
    *,
    noise_level: float,
    sigma_cap: Optional[float] = None,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> StepOutput:
    """Flow-GRPO's marginal-preserving SDE step (Flow-GRPO, arXiv 2505.05470, eqs. (7)-(9)).

    With ``dt = sigma_next - sigma < 0`` and diffusion coefficient ``g = a sqrt(sigma / (1 - sigma))``::

        mean = x + v dt + g^2 / (2 sigma) * (x + (1 - sigma) v) * dt
        std  = g * sqrt(-dt)

    At ``sigma = 1`` the ``1 - sigma`` in ``g`` would vanish; as Flow-GRPO does, ``sigma_cap`` (the
    schedule's second sigma) replaces ``sigma`` there. With ``noise_level = 0`` the step is exactly the
    Euler step. ``extras["g"]`` returns ``g``, which Flow-GRPO's KL term divides by.
    """
    x = x_t.float()
    v = velocity.float()
    s = expand_like(sigma, x)
    dt = expand_like(sigma_next, x) - s
    if sigma_cap is None:
        if bool((s >= 1).any()):
            raise ValueError("flow_sde_step at sigma=1 needs sigma_cap (the schedule's second sigma)")
        denom = s
    else:
        denom = torch.where(s >= 1, torch.as_tensor(sigma_cap, dtype=torch.float32, device=x.device), s)
    g = noise_level * torch.sqrt(s / (1 - denom))
    mean = x + v * dt + (g**2 / (2 * s)) * (x + (1 - s) * v) * dt
    std = g * torch.sqrt(-dt)
    return _finish(mean, std.reshape(-1) if std.ndim else std, prev_sample, generator, x - s * v,
                   {"g": g.reshape(-1) if g.ndim else g})


def flow_cps_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    sigma_next: Union[float, torch.Tensor],
    *,
    noise_level: float,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> StepOutput:
    """Coefficient-preserving sampling step (CPS, arXiv 2509.05952; used by Adv-GRPO, Flow-GRPO-Fast).

    ``std = sigma_next sin(a pi / 2)``, ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat``
    with ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``. The next state's signal and noise
    coefficients equal those of the marginal at ``sigma_next`` exactly.

    The log-prob is the true Gaussian log-density (Flow-GRPO's CPS code drops the ``1/(2 std^2)`` factor
    and constants; its clip range 1e-5 corresponds to a log-ratio ``2 std^2`` times ours).
    """
    x = x_t.float()
    s = expand_like(sigma, x)
    s_next = expand_like(sigma_next, x)
    x0, eps = to_x0_eps(velocity, x, 1 - s, s, "flow")
    std = s_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - s_next) * x0 + torch.sqrt(s_next**2 - std**2) * eps
    return _finish(mean, std.reshape(-1) if std.ndim else std, prev_sample, generator, x0)


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    sigma: Union[float, torch.Tensor],
    alpha_next: Union[float, torch.Tensor],
    sigma_next: Union[float, torch.Tensor],
    *,
    eta: float,
    prediction_type: str = "epsilon",
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
    clip_sample_range: Optional[float] = None,
) -> StepOutput:
    """DDIM step with stochasticity ``eta`` (Song et al. 2021 eq. (12), (16); DDPO's sampler).

    In ``x = alpha x0 + sigma eps`` form::

        std  = eta * sqrt(posterior variance of q(x_next | x_t, x0))
             = eta * (sigma_next / sigma) * sqrt(sigma^2 - (alpha / alpha_next)^2 sigma_next^2)
        mean = alpha_next * x0_hat + sqrt(sigma_next^2 - std^2) * eps_hat

    the DDPM posterior of any Gaussian forward process (Kingma et al. 2021, VDM eq. (2)-(4)). On a variance-
    preserving schedule (``alpha^2 = abar``, ``sigma^2 = 1 - abar``) it is DDPO's ``sigma_t = eta sqrt((1-abar_prev)
    /(1-abar_t)) sqrt(1 - abar_t/abar_prev)`` (research/grpo_family.md §3.1); on a flow schedule (``alpha = 1 -
    sigma``) that VP form exceeds ``sigma_next`` for ``eta >= 0.5`` late in sampling and gave NaN steps, the
    posterior form never does (``std <= eta sigma_next``). ``eta = 0`` is diffusers' deterministic DDIM step. With
    ``clip_sample_range`` the ``x0`` estimate is clamped to ``[-r, r]`` and ``eps_hat`` kept unclipped, as
    diffusers' ``clip_sample`` (and DDPO's step) do.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}: above 1 the step's std exceeds the next noise level "
                         "and the mean is NaN")
    x = x_t.float()
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    a_next, s_next = expand_like(alpha_next, x), expand_like(sigma_next, x)
    x0, eps = to_x0_eps(model_output, x, a, s, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (s_next**2 / s**2) * (s**2 - (a / a_next) ** 2 * s_next**2)
    std = eta * torch.sqrt(variance.clamp_min(0))  # 0 when the step keeps the noise level; rounding may dip below
    mean = a_next * x0 + torch.sqrt(s_next**2 - std**2) * eps
    return _finish(mean, std.reshape(-1) if std.ndim else std, prev_sample, generator, x0)


def _gather(values: torch.Tensor, index: Union[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    if isinstance(index, int):
        return values[index].to(device)
    return values.to(device)[index.to(device)]


def scheduled_step(
    kind: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    schedule: Schedule,
    index: Union[int, torch.Tensor],
    *,
    noise_level: float,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
) -> StepOutput:
    """Run step ``kind`` (a key of :data:`STEPS`) at schedule position ``index`` (int or ``[B]`` long).

    Per-sample indices let a trainer re-score a minibatch whose samples sit at different steps; the
    arithmetic per element is the same as in the rollout, so log-probs reproduce exactly.
    """
    if kind not in STEPS:
        raise ValueError(f"unknown step {kind!r}; valid steps: {sorted(STEPS)}")
    dev = x_t.device
    nxt = index + 1
    if kind in ("flow_euler", "flow_sde", "flow_cps") and schedule.kind != "flow":
        raise ValueError(f"step {kind!r} needs a flow schedule, got kind={schedule.kind!r}; use step='ddim'")
    if kind == "flow_euler":
        return flow_euler_step(model_output, x_t, _gather(schedule.sigmas, index, dev),
                               _gather(schedule.sigmas, nxt, dev))
    if kind == "flow_sde":
        cap = float(schedule.sigmas[1])  # one step: sigmas[1] = 0, so g = noise_level at sigma 1 (as Flow-GRPO)
        return flow_sde_step(model_output, x_t, _gather(schedule.sigmas, index, dev),
                             _gather(schedule.sigmas, nxt, dev), noise_level=noise_level, sigma_cap=cap,
                             prev_sample=prev_sample, generator=generator)
    if kind == "flow_cps":
        return flow_cps_step(model_output, x_t, _gather(schedule.sigmas, index, dev),
                             _gather(schedule.sigmas, nxt, dev), noise_level=noise_level,
                             prev_sample=prev_sample, generator=generator)
    return ddim_step(model_output, x_t, _gather(schedule.alphas, index, dev), _gather(schedule.sigmas, index, dev),
                     _gather(schedule.alphas, nxt, dev), _gather(schedule.sigmas, nxt, dev), eta=noise_level,
                     prediction_type=schedule.prediction_type, prev_sample=prev_sample, generator=generator,
                     clip_sample_range=schedule.clip_sample_range)


#: Step kinds usable in configs. ``flow_euler`` is deterministic; the others take a noise level
#: (Flow-GRPO's ``a``, CPS's ``a``, DDIM's ``eta``) and are deterministic at noise level 0.
STEPS: Dict[str, str] = {
    "flow_euler": "deterministic Euler step of the flow ODE",
    "flow_sde": "Flow-GRPO SDE step (noise_level = a, 0.7 for SD3.5)",
    "flow_cps": "coefficient-preserving step (noise_level = a, 0.8 typical)",
    "ddim": "DDIM with eta = noise_level (DDPO uses 1.0); works for flow and VP schedules",
}

#: The deterministic step of each schedule kind (what noise level 0 reduces to).
DETERMINISTIC_STEP = {"flow": "flow_euler", "vp": "ddim"}
