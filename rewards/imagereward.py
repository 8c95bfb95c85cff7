"""``imagereward_style``: an ImageReward-*style* preference head on CLIP features. Read this before using it.

ImageReward (Xu et al., NeurIPS 2023) is a BLIP ViT-L image encoder with a cross-attention text encoder and an
MLP head, normalised as ``(raw - mean) / std``. That model is too big for this library's CPU world, its
weights cannot be downloaded here, and **its checkpoint does not load into this reward**. What this reward is:

    ``score = (MLP([f_img, f_txt, f_img * f_txt]) - mean) / std``

with ``f_img, f_txt`` the L2-normalised embeddings of a frozen CLIP (see :mod:`rewards.clip_backbone`) and an
MLP ``3*D -> hidden_dims... -> 1`` (ImageReward's head dims by default: 1024, 128, 64, 16) whose weights YOU
provide in ``head_weights`` (``.safetensors`` / ``.pth``), e.g. a head trained on preference pairs with
:class:`ImageRewardStyleHead`. Without ``head_weights`` it refuses to build unless
``allow_random_weights=True``.
Unbounded range (about N(0, 1) on the data the head was normalised on). Differentiable w.r.t. the images.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.types import RewardOutput
from rewards.aesthetic import AestheticMLP, load_head
from rewards.base import call_batched, resolve_device
from rewards.clip import _split_backbone_kwargs
from rewards.clip_backbone import ClipBackbone, build_clip_backbone, openai_vit_l14
from rewards.registry import register_reward

__all__ = ["ImageRewardStyleHead", "ImageRewardStyleReward"]


class ImageRewardStyleHead(nn.Module):
    """``MLP([img, txt, img * txt])`` over ``D``-dim normalised embeddings (``3 * D`` inputs)."""

    def __init__(
        self,
        embed_dim: int,
        hidden_dims: Sequence[int] = (1024, 128, 64, 16),
        dropouts: Sequence[float] = (0.2, 0.2, 0.1),
    ) -> None:
        super().__init__()
        self.mlp = AestheticMLP(3 * embed_dim, hidden_dims, dropouts)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([img, txt, img * txt], dim=-1))


class ImageRewardStyleReward:
    """See the module docstring: a preference head on CLIP text+image features, not ImageReward itself."""

    differentiable = True
    trainable = False
    allows_nan = False
    range = (-math.inf, math.inf)

    def __init__(
        self,
        backbone: ClipBackbone,
        head: ImageRewardStyleHead,
        *,
        mean: float = 0.0,
        std: float = 1.0,
        name: str = "imagereward_style",
        batch_size: Optional[int] = 32,
    ) -> None:
        if std <= 0:
            raise ValueError(f"{name}: std must be > 0, got {std}")
        self.backbone = backbone
        self.head = head.to(backbone.device)
        self.mean, self.std = float(mean), float(std)
        self.name = name
        self.batch_size = batch_size
        self.device = backbone.device

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> torch.Tensor:
        img = F.normalize(self.backbone.encode_images(images), dim=-1)
        with torch.no_grad():
            txt = F.normalize(self.backbone.encode_unique_text(prompts), dim=-1)
        return (self.head(img, txt).float() - self.mean) / self.std

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        return call_batched(self, images, prompts, metadata)


@register_reward("imagereward_style")
def imagereward_style(
    *,
    head_weights: Optional[str] = None,
    hidden_dims: Sequence[int] = (1024, 128, 64, 16),
    dropouts: Sequence[float] = (0.2, 0.2, 0.1),
    mean: float = 0.0,
    std: float = 1.0,
    batch_size: Optional[int] = None,
    device: Any = None,
    **kwargs: Any,
) -> ImageRewardStyleReward:
    """ImageReward-style head on CLIP features; ``weights`` (CLIP), ``head_weights`` (head): local paths."""
    kwargs = openai_vit_l14(kwargs)
    backbone_kwargs = _split_backbone_kwargs(kwargs)
    if kwargs:
        raise TypeError(f"imagereward_style: unexpected kwargs {sorted(kwargs)}")
    backbone = build_clip_backbone(
        reward="imagereward_style", device=resolve_device(device), **backbone_kwargs
    )
    head = load_head(
        ImageRewardStyleHead(backbone.embed_dim, hidden_dims, dropouts),
        head_weights,
        reward="imagereward_style",
        allow_random_weights=bool(backbone_kwargs.get("allow_random_weights", False)),
        seed=int(backbone_kwargs.get("seed", 0)),
    )
    return ImageRewardStyleReward(backbone, head, mean=mean, std=std, batch_size=batch_size or 32)
