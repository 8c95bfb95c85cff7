"""Colourfulness reward: Hasler & Süsstrunk's colourfulness metric (SPIE 2003, eq. (3), "M^(3)").

With opponent channels ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over the image's pixels,
``C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)``. Images are in [0, 1], so C is on a
[0, ~1.2] scale (the paper's 0-255 values divided by 255). Differentiable; runs on the images' device.
In the shapes world it partly conflicts with JPEG compressibility (saturated colours and edges cost bytes).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from diffalign.types import RewardOutput
from rewards.base import check_inputs, safe_sqrt, score_in_batches
from rewards.registry import register_reward

__all__ = ["ColorfulnessReward", "colorfulness_score"]


def colorfulness_score(images: torch.Tensor) -> torch.Tensor:
    """``[B]`` Hasler–Süsstrunk colourfulness of ``[B, 3, H, W]`` images in [0, 1]."""
    x = images.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std = safe_sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean = safe_sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return std + 0.3 * mean


class ColorfulnessReward:
    """Wraps :func:`colorfulness_score` as a reward. Range [0, ~1.2]."""

    differentiable = True
    trainable = False
    allows_nan = False
    range = (0.0, 1.25)

    def __init__(self, *, batch_size: Optional[int] = None, device: Union[None, str, torch.device] = None,
                 name: str = "colorfulness") -> None:
        self.name = name
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None

    def _score(self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]) -> RewardOutput:
        return RewardOutput(scores=colorfulness_score(images.clamp(0, 1)))

    def __call__(self, images: torch.Tensor, prompts: List[str],
                 metadata: Optional[List[Dict[str, Any]]] = None) -> RewardOutput:
        metadata = check_inputs(self.name, images, prompts, metadata)
        return score_in_batches(self._score, images, list(prompts), metadata, batch_size=self.batch_size,
                                name=self.name, device=self.device)


@register_reward("colorfulness")
def colorfulness(**kwargs: Any) -> ColorfulnessReward:
    """Hasler–Süsstrunk colourfulness of the image (higher = more colourful). Range [0, ~1.2]."""
    return ColorfulnessReward(**kwargs)
