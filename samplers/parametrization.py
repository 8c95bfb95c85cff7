"""Conversions between a model's output and (x0, epsilon, velocity) estimates.

With ``x_t = alpha * x0 + sigma * eps``:

* flow velocity (SD3 / FLUX, ``alpha = 1 - sigma``): ``v = eps - x0`` so ``x0 = x_t - sigma v`` and
  ``eps = x_t + (1 - sigma) v`` (Flow-GRPO notation, research/grpo_family.md "Notation").
* epsilon: ``x0 = (x_t - sigma eps) / alpha`` (DDIM, Song et al. 2021 eq. (12)).
* v-prediction (VP, ``alpha^2 + sigma^2 = 1``): ``v = alpha eps - sigma x0`` so ``x0 = alpha x_t - sigma v``
  and ``eps = sigma x_t + alpha v`` (Salimans & Ho 2022, §4).
* sample: the model predicts ``x0`` directly; ``eps = (x_t - alpha x0) / sigma``.

All functions compute in float32 and broadcast ``alpha`` / ``sigma`` given as scalars or ``[B]``.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

Scalar = Union[float, torch.Tensor]

__all__ = ["expand_like", "to_x0_eps", "velocity_from_x0_eps", "x0_eps_to_model_output"]


def expand_like(value: Scalar, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or ``[B]`` tensor to broadcast against ``x`` ``[B, ...]`` (float32, x's device)."""
    v = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if v.ndim == 0 or (v.ndim == x.ndim and v.shape[0] == x.shape[0] and v[0].numel() == 1):
        return v
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"expected a scalar or a [B={x.shape[0]}] tensor, got shape {tuple(v.shape)}")
    return v.view(-1, *([1] * (x.ndim - 1)))


def to_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: Scalar,
    sigma: Scalar,
    prediction_type: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return float32 ``(x0_hat, eps_hat)`` for a model output of the given ``prediction_type``."""
    out = model_output.float()
    x = x_t.float()
    a = expand_like(alpha, x)
    s = expand_like(sigma, x)
    if prediction_type == "flow":
        return x - s * out, x + (1 - s) * out
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, s * x + a * out
    if prediction_type == "sample":
        return out, (x - a * out) / s
    raise ValueError(
        f"prediction_type must be one of 'flow', 'epsilon', 'v_prediction', 'sample', got {prediction_type!r}"
    )


def velocity_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity ``eps - x0``."""
    return eps - x0


def x0_eps_to_model_output(
    x0: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar, prediction_type: str
) -> torch.Tensor:
    """Inverse of :func:`to_x0_eps`: the model output that encodes ``(x0, eps)`` at ``(alpha, sigma)``."""
    a = expand_like(alpha, x0)
    s = expand_like(sigma, x0)
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
