"""CLIP image-text similarity rewards: ``clip_score``, ``pickscore``, ``hps``.

All three are ``scale * cos(f_image, f_text)`` on a frozen CLIP (see :mod:`rewards.clip_backbone`); they
differ in the model they expect and the scale:

* ``clip_score`` -- ``cos`` (range [-1, 1]) on any CLIP (default open_clip ``ViT-L-14``). Hessel et al.'s
  CLIP-S is ``2.5 * max(cos, 0)``: add ``transform: [{name: clip, min: 0}, {name: affine, scale: 2.5}]``.
* ``pickscore`` -- ``logit_scale * cos / normaliser`` (Flow-GRPO: ``normaliser=26``; PickScore_v1's
  ``logit_scale`` is 100, so real scores sit around 0.8-0.9). Real weights: the PickScore_v1 ``CLIPModel``
  folder, ``backend="transformers"`` (the default here), tokenizer of CLIP-ViT-H-14-laion2B.
* ``hps`` -- HPSv2-style: ``cos`` on open_clip ``ViT-H-14`` with the HPS v2/v2.1 checkpoint in ``weights``
  (HPSv2 reports the raw cosine, around 0.25-0.30 for real images).

Differentiable with respect to the images (the preprocessing is torch ops); parameters are frozen.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from diffalign.types import RewardOutput
from rewards.base import call_batched, resolve_device
from rewards.clip_backbone import ClipBackbone, build_clip_backbone, openai_vit_l14
from rewards.registry import register_reward

__all__ = ["ClipSimilarityReward"]

_BACKBONE_KEYS = (
    "backend",
    "model_name",
    "model_config",
    "weights",
    "tokenizer_path",
    "pretrained",
    "allow_random_weights",
    "seed",
    "dtype",
)


def _split_backbone_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in _BACKBONE_KEYS}


class ClipSimilarityReward:
    """``scale * cos(image, text)`` with ``scale = logit_scale / normaliser`` when ``use_logit_scale``."""

    differentiable = True
    trainable = False
    allows_nan = False

    def __init__(
        self,
        backbone: ClipBackbone,
        *,
        name: str,
        use_logit_scale: bool = False,
        normaliser: float = 1.0,
        batch_size: Optional[int] = 32,
    ) -> None:
        if normaliser == 0:
            raise ValueError(f"{name}: normaliser must be non-zero")
        self.backbone = backbone
        self.name = name
        self.scale = (backbone.logit_scale if use_logit_scale else 1.0) / float(normaliser)
        self.range = (-abs(self.scale), abs(self.scale))
        self.batch_size = batch_size
        self.device = backbone.device

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> torch.Tensor:
        img = F.normalize(self.backbone.encode_images(images), dim=-1)
        with torch.no_grad():
            txt = F.normalize(self.backbone.encode_unique_text(prompts), dim=-1)
        return self.scale * (img * txt).sum(-1)

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        return call_batched(self, images, prompts, metadata)


def _build(
    name: str, defaults: Dict[str, Any], use_logit_scale: bool, normaliser: float, kwargs: Dict[str, Any]
) -> ClipSimilarityReward:
    kwargs = {**defaults, **kwargs}
    device = resolve_device(kwargs.pop("device", None))
    batch_size = kwargs.pop("batch_size", None) or 32
    normaliser = kwargs.pop("normaliser", normaliser)
    backbone = build_clip_backbone(reward=name, device=device, **_split_backbone_kwargs(kwargs))
    if kwargs:
        raise TypeError(
            f"{name}: unexpected kwargs {sorted(kwargs)}; "
            f"valid: {sorted(_BACKBONE_KEYS + ('normaliser', 'batch_size', 'device'))}"
        )
    return ClipSimilarityReward(
        backbone, name=name, use_logit_scale=use_logit_scale, normaliser=normaliser, batch_size=batch_size
    )


@register_reward("clip_score")
def clip_score(**kwargs: Any) -> ClipSimilarityReward:
    """Cosine similarity of CLIP image and text embeddings. Range [-1, 1]. Defaults to OpenAI's ViT-L/14
    (``pretrained="openai"``: QuickGELU); give ``pretrained`` (or null) for other weights."""
    return _build("clip_score", openai_vit_l14(kwargs), False, 1.0, {})


@register_reward("pickscore")
def pickscore(**kwargs: Any) -> ClipSimilarityReward:
    """PickScore-style ``logit_scale * cos / normaliser`` (26, Flow-GRPO). Range +-logit_scale/26."""
    return _build("pickscore", {"backend": "transformers", "model_name": "ViT-H-14"}, True, 26.0, kwargs)


@register_reward("hps")
def hps(**kwargs: Any) -> ClipSimilarityReward:
    """HPSv2-style cosine on open_clip ViT-H-14 with the HPS checkpoint in ``weights``. Range [-1, 1]."""
    return _build("hps", {"model_name": "ViT-H-14"}, False, 1.0, kwargs)
