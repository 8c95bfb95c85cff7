"""Colourfulness reward: Hasler & Süsstrunk's colourfulness metric (SPIE 2003, eq. (3), "M^(3)").

With opponent channels ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over the image's pixels,
``C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)``. Images are in [0, 1], so C is on a
[0, ~1.2] scale (the paper's 0-255 values divided by 255). Differentiable; runs on the images' device.
In the shapes world it partly conflicts with JPEG compressibility (saturated colours and edges cost bytes).
"""

from __future__ import annotations

from typing import Any

import torch

from rewards.base import FunctionReward, pixel_statistic_reward, safe_sqrt
from rewards.registry import register_reward

__all__ = ["colorfulness", "colorfulness_score"]


def colorfulness_score(images: torch.Tensor) -> torch.Tensor:
    """``[B]`` Hasler–Süsstrunk colourfulness of ``[B, 3, H, W]`` images in [0, 1]."""
    x = images.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std = safe_sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean = safe_sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return std + 0.3 * mean


@register_reward("colorfulness")
def colorfulness(**kwargs: Any) -> FunctionReward:
    """Hasler–Süsstrunk colourfulness of the image (higher = more colourful). Range [0, ~1.2]."""
    kwargs.setdefault("name", "colorfulness")
    return pixel_statistic_reward(colorfulness_score, range=(0.0, 1.25), **kwargs)
