"""Noise schedules as explicit tensors.

Every sampler step receives explicit noise levels, never a hidden step counter (DESIGN.md). A state at
step ``i`` is ``x_i = alpha_i * x0 + sigma_i * eps``:

* flow matching (SD3, FLUX, rectified flow): ``alpha = 1 - sigma``, ``sigma`` in ``[0, 1]``, ``sigma = 1``
  is pure noise; the model is called with ``timestep = sigma * num_train_timesteps``.
* variance preserving diffusion (SD1.5, SDXL): ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``; the
  model is called with the integer training timestep ``t``.

The functions below reproduce diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` and
``DDIMScheduler.set_timesteps`` (pinned by tests against the schedulers themselves) so that a rollout
with noise level 0 reproduces a diffusers pipeline call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "Schedule",
    "PREDICTION_TYPES",
    "flow_sigmas",
    "flow_schedule",
    "flow_schedule_from_scheduler_config",
    "vp_timesteps",
    "vp_schedule",
    "alphas_cumprod_from_betas",
    "calculate_shift",
]

PREDICTION_TYPES = ("flow", "epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Schedule:
    """A discretised noise schedule for ``T`` sampler steps.

    Attributes:
        kind: ``"flow"`` or ``"vp"``.
        prediction_type: what the model outputs: ``"flow"`` (velocity ``eps - x0``), ``"epsilon"``,
            ``"v_prediction"`` or ``"sample"``.
        timesteps: ``[T]`` float32, the value passed to the model at each step.
        alphas: ``[T+1]`` float32 signal scale of each state (last entry: the final state).
        sigmas: ``[T+1]`` float32 noise scale of each state. For flow models these are diffusers'
            ``scheduler.sigmas`` exactly (ending in 0).
        num_train_timesteps: the training horizon of the model (1000 for SD/SD3/FLUX).
        clip_sample_range: VP only: DDIM steps clamp their ``x0`` estimate to ``[-r, r]`` (diffusers'
            ``clip_sample``; the noise estimate stays unclipped, as ``DDIMScheduler.step`` by default).
            ``None``: no clamp.
    """

    kind: str
    prediction_type: str
    timesteps: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor
    num_train_timesteps: int = 1000
    clip_sample_range: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "vp"):
            raise ValueError(f"Schedule.kind must be 'flow' or 'vp', got {self.kind!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Schedule.prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.kind == "flow" and self.prediction_type != "flow":
            raise ValueError("a flow schedule needs prediction_type='flow' (velocity)")
        n = self.timesteps.shape[0]
        if self.alphas.shape[0] != n + 1 or self.sigmas.shape[0] != n + 1:
            raise ValueError(
                f"Schedule needs T+1 alphas/sigmas for T={n} timesteps, got {self.alphas.shape[0]} and "
                f"{self.sigmas.shape[0]}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` clamped as the DDIM step clamps its estimate (``clip_sample_range``; unchanged when ``None``), for
        code that forms clean estimates outside the step (guided sampling's lookaheads)."""
        r = self.clip_sample_range
        return x0 if r is None else x0.clamp(-r, r)

    def to(self, device: torch.device | str) -> "Schedule":
        return replace(
            self,
            timesteps=self.timesteps.to(device),
            alphas=self.alphas.to(device),
            sigmas=self.sigmas.to(device),
        )


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift ``mu`` of FLUX / SD3.5 dynamic shifting (a line through two points)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _time_shift(mu: float, sigmas: np.ndarray, kind: str) -> np.ndarray:
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    use_dynamic_shifting: bool = False,
    mu: Optional[float] = None,
    time_shift_type: str = "exponential",
    shift_terminal: Optional[float] = None,
    sigmas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """``[T+1]`` float32 flow-matching sigmas, ending in 0, as diffusers' flow-match Euler scheduler makes them.

    Without explicit ``sigmas`` the grid runs linearly between the scheduler's (shifted) ``sigma_max`` and
    ``sigma_min``; then SD3's static shift ``shift * s / (1 + (shift - 1) s)`` or FLUX's dynamic shift
    ``exp(mu) / (exp(mu) + 1/s - 1)`` is applied.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting=True needs `mu` (see calculate_shift)")
    n_train = num_train_timesteps
    if sigmas is None:
        # The scheduler's own sigma range after its constructor-time shift.
        train_sigmas = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy() / np.float32(n_train)
        train_sigmas = torch.from_numpy(train_sigmas)
        if not use_dynamic_shifting:
            train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        grid = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        grid = np.asarray(sigmas, dtype=np.float32)
        if grid.shape[0] != num_steps:
            raise ValueError(f"got {grid.shape[0]} custom sigmas for num_steps={num_steps}")
    if use_dynamic_shifting:
        grid = _time_shift(mu, grid, time_shift_type)
    else:
        grid = shift * grid / (1 + (shift - 1) * grid)
    if shift_terminal:
        one_minus = 1 - grid
        scale = one_minus[-1] / (1 - shift_terminal)
        grid = 1 - (one_minus / scale)
    out = torch.from_numpy(np.asarray(grid)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def flow_schedule(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> Schedule:
    """A flow schedule from ``[T+1]`` sigmas ending in 0 (``timesteps = sigma * num_train_timesteps``)."""
    sigmas = sigmas.to(torch.float32)
    if sigmas[-1].item() != 0.0:
        raise ValueError(f"flow sigmas must end in 0, got {sigmas[-1].item()}")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("flow sigmas must be strictly decreasing")
    return Schedule(
        kind="flow",
        prediction_type="flow",
        timesteps=sigmas[:-1] * num_train_timesteps,
        alphas=1.0 - sigmas,
        sigmas=sigmas,
        num_train_timesteps=num_train_timesteps,
    )


#: scheduler options diffalign's flow schedule and steps do not reproduce (``stochastic_sampling``: diffusers' step
#: re-noises its x0 estimate with fresh noise, another sampler than the Euler / SDE steps here)
_UNSUPPORTED_FLOW_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                             "stochastic_sampling")


def flow_schedule_from_scheduler_config(
    config: Mapping[str, Any],
    num_steps: int,
    *,
    image_seq_len: Optional[int] = None,
    mu: Optional[float] = None,
    sigmas: Optional[Sequence[float]] = None,
) -> Schedule:
    """Build the schedule a diffusers flow pipeline would use, from its scheduler config.

    ``image_seq_len`` gives ``mu`` for dynamic shifting when ``mu`` itself is not passed (as SD3.5 / FLUX
    pipelines do).
    """
    for key in _UNSUPPORTED_FLOW_OPTIONS:
        if config.get(key, False):
            raise ValueError(
                f"scheduler option {key}=True is not supported by diffalign's flow schedule; "
                "set it to False in the scheduler config"
            )
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        if image_seq_len is None:
            raise ValueError("dynamic shifting needs `mu` or `image_seq_len`")
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    n_train = int(config.get("num_train_timesteps", 1000))
    s = flow_sigmas(
        num_steps,
        shift=float(config.get("shift", 1.0)),
        num_train_timesteps=n_train,
        use_dynamic_shifting=dynamic,
        mu=mu,
        time_shift_type=config.get("time_shift_type", "exponential"),
        shift_terminal=config.get("shift_terminal", None),
        sigmas=sigmas,
    )
    return flow_schedule(s, n_train)


def alphas_cumprod_from_betas(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """``[N]`` float32 cumulative products of ``1 - beta`` for the usual DDPM beta schedules."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(
            f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', got {beta_schedule!r}"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def vp_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """``[T]`` long DDIM inference timesteps, highest first (diffusers' three spacings)."""
    n = num_train_timesteps
    if num_steps < 1 or num_steps > n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = n / num_steps
        ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(
            f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}"
        )
    return torch.from_numpy(ts)


def vp_schedule(
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    *,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    clip_sample_range: Optional[float] = None,
) -> Schedule:
    """DDIM schedule over ``alphas_cumprod`` (``[N]``), with diffusers' previous-timestep rule
    (``clip_sample_range``: see :class:`Schedule`).

    The state after step ``i`` has the noise level of timestep ``t_i - N // T``; when that is negative
    the scheduler's "final alpha" (1.0 or ``abar_0``) is used, exactly as ``DDIMScheduler.step``.
    """
    if prediction_type == "flow":
        raise ValueError("a VP schedule needs prediction_type 'epsilon', 'v_prediction' or 'sample'")
    acp = alphas_cumprod.to(torch.float32).cpu()
    n = acp.shape[0]
    ts = vp_timesteps(num_steps, n, timestep_spacing, steps_offset)
    final = torch.tensor(1.0) if set_alpha_to_one else acp[0]
    prev = ts - n // num_steps
    abar = acp[ts]
    abar_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
    abar_all = torch.cat([abar, abar_prev[-1:]])
    # The state reached by step i is the state step i+1 starts from; check the grid is consistent.
    if num_steps > 1 and not torch.equal(abar_prev[:-1], abar[1:]):
        raise ValueError(
            "timesteps are not evenly spaced by num_train_timesteps // num_steps; "
            f"use timestep_spacing='leading' (got {timestep_spacing!r} with {num_steps} steps)"
        )
    return Schedule(
        kind="vp",
        prediction_type=prediction_type,
        timesteps=ts.to(torch.float32),
        alphas=abar_all.sqrt(),
        sigmas=(1.0 - abar_all).sqrt(),
        num_train_timesteps=n,
        clip_sample_range=clip_sample_range,
    )
