"""JPEG (in)compressibility rewards (DDPO, Black et al. 2023, section 6.1; Flow-GRPO ``jpeg_*``).

The image is quantised to 8-bit RGB and saved as JPEG at quality 95; the reward is the file size in kB
(``jpeg_incompressibility``) or its negation (``jpeg_compressibility``), as in ddpo-pytorch. Flow-GRPO divides
the size by 500; use ``transform: {name: affine, scale: 0.002}`` for that scale. Not differentiable.
"""

from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image

from diffalign.types import RewardOutput
from rewards.base import check_inputs, score_in_batches
from rewards.registry import register_reward

__all__ = ["JpegSizeReward", "jpeg_size_kb", "to_uint8_hwc"]


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> ``[B, H, W, 3]`` uint8 numpy (rounded, clamped)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(image_hwc: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1 kB = 1000 bytes, as in ddpo-pytorch) of one uint8 HWC image saved as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegSizeReward:
    """``sign * size_kb(JPEG(image, quality))``; sign -1 = compressibility, +1 = incompressibility."""

    differentiable = False
    trainable = False
    allows_nan = False

    def __init__(
        self,
        *,
        sign: float,
        name: str,
        quality: int = 95,
        batch_size: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
    ) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{name}: quality must be in [1, 100], got {quality}")
        self.sign = float(sign)
        self.name = name
        self.quality = int(quality)
        self.batch_size = batch_size
        self.device = torch.device("cpu")  # PIL encodes on the CPU whatever `device` says
        self.range = (-math.inf, 0.0) if self.sign < 0 else (0.0, math.inf)

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> RewardOutput:
        arrays = to_uint8_hwc(images)
        sizes = [jpeg_size_kb(a, self.quality) for a in arrays]
        scores = torch.tensor([self.sign * s for s in sizes], dtype=torch.float32)
        return RewardOutput(scores=scores, details=[{"jpeg_kb": s} for s in sizes])

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        metadata = check_inputs(self.name, images, prompts, metadata)
        return score_in_batches(
            self._score, images, list(prompts), metadata, batch_size=self.batch_size, name=self.name
        )


@register_reward("jpeg_compressibility")
def jpeg_compressibility(**kwargs: Any) -> JpegSizeReward:
    """``-size_kb`` of the JPEG (quality 95): higher = more compressible. Range (-inf, 0]."""
    return JpegSizeReward(sign=-1.0, name="jpeg_compressibility", **kwargs)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(**kwargs: Any) -> JpegSizeReward:
    """``+size_kb`` of the JPEG (quality 95). Range [0, inf)."""
    return JpegSizeReward(sign=1.0, name="jpeg_incompressibility", **kwargs)
