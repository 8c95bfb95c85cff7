"""Contrast reward: the RMS contrast of an image's luminance (Peli, JOSA A 7(10) 1990, eq. (1) with the
luminances normalised to [0, 1]).

``C = std(Y)`` over the image's pixels with ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 luma), images in
[0, 1], so C lies in [0, 0.5] (0.5 for half black, half white). Differentiable; runs on the images' device.
In the shapes world (shapes on a black background) it rewards larger and brighter shapes, which partly
conflicts with the verifier (brighter hues, counts) and with JPEG compressibility (strong edges cost bytes);
the maximum is at half the canvas white.
"""

from __future__ import annotations

from typing import Any

import torch

from rewards.base import FunctionReward, pixel_statistic_reward, safe_sqrt
from rewards.registry import register_reward

__all__ = ["contrast", "rms_contrast", "LUMA_WEIGHTS"]

#: ITU-R BT.601 luma weights of R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def rms_contrast(images: torch.Tensor) -> torch.Tensor:
    """``[B]`` RMS contrast (standard deviation of the BT.601 luma) of ``[B, 3, H, W]`` images in [0, 1]."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    luma = (images.float() * w).sum(dim=1).flatten(1)
    return safe_sqrt(luma.var(dim=1, unbiased=False))


@register_reward("contrast")
def contrast(**kwargs: Any) -> FunctionReward:
    """RMS contrast of the image's luminance (higher = more contrast). Range [0, 0.5]."""
    kwargs.setdefault("name", "contrast")
    return pixel_statistic_reward(rms_contrast, range=(0.0, 0.5), **kwargs)
