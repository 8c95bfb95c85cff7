"""LAION aesthetic predictor (v2) reward: an MLP on the L2-normalised CLIP image embedding.

Architecture (research/grpo_family.md section 1.5): ``Linear 768->1024, Dropout 0.2, Linear 1024->128,
Dropout 0.2, Linear 128->64, Dropout 0.1, Linear 64->16, Linear 16->1`` under a module attribute ``layers``,
so the state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}`` and the public
``sac+logos+ava1-l14-linearMSE.pth`` file loads as is. Real use: open_clip ``ViT-L-14`` with OpenAI
weights in ``weights`` and the MLP in ``head_weights`` (``.pth`` via ``torch.load(weights_only=True)`` or
``.safetensors``). Dims are configurable for tiny tests (``hidden_dims``, ``dropouts``; the input dim is the
backbone's embedding dim). Scores are about 1-10 on real images (unbounded in principle).
Differentiable with respect to the images.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.types import RewardOutput
from rewards.base import call_batched, resolve_device
from rewards.clip import _split_backbone_kwargs
from rewards.clip_backbone import (
    ClipBackbone,
    build_clip_backbone,
    load_state_dict_file,
    missing_weights_error,
    openai_vit_l14,
)
from rewards.registry import register_reward

__all__ = ["AestheticMLP", "AestheticReward", "load_head"]


class AestheticMLP(nn.Module):
    """``embed_dim -> hidden_dims... -> 1`` with dropout after the first ``len(dropouts)`` hidden layers."""

    def __init__(
        self,
        embed_dim: int = 768,
        hidden_dims: Sequence[int] = (1024, 128, 64, 16),
        dropouts: Sequence[float] = (0.2, 0.2, 0.1),
    ) -> None:
        super().__init__()
        mods: List[nn.Module] = []
        prev = embed_dim
        for i, h in enumerate(hidden_dims):
            mods.append(nn.Linear(prev, h))
            if i < len(dropouts):
                mods.append(nn.Dropout(dropouts[i]))
            prev = h
        mods.append(nn.Linear(prev, 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(
    head: nn.Module, path: Optional[str], *, reward: str, allow_random_weights: bool, seed: int
) -> nn.Module:
    """Load ``path`` into ``head`` (strict), or keep a seeded random init when allowed; returns it frozen."""
    if path is None:
        if not allow_random_weights:
            raise missing_weights_error(
                reward, "head weights", "head_weights='/path/to/head.pth|.safetensors'"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
    else:
        state = load_state_dict_file(str(path))
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"reward {reward!r}: head weights {path!r} do not match the head architecture: {exc}"
            ) from exc
    return head.eval().requires_grad_(False)


class AestheticReward:
    """``MLP(normalize(clip_image_embedding))``. Range about [1, 10] for the LAION weights."""

    differentiable = True
    trainable = False
    allows_nan = False
    range = (-math.inf, math.inf)

    def __init__(
        self,
        backbone: ClipBackbone,
        head: nn.Module,
        *,
        name: str = "aesthetic",
        batch_size: Optional[int] = 32,
    ) -> None:
        self.backbone = backbone
        self.head = head.to(backbone.device)
        self.name = name
        self.batch_size = batch_size
        self.device = backbone.device

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> torch.Tensor:
        emb = F.normalize(self.backbone.encode_images(images), dim=-1)
        return self.head(emb.to(next(self.head.parameters()).dtype)).float()

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        return call_batched(self, images, prompts, metadata)


@register_reward("aesthetic")
def aesthetic(
    *,
    head_weights: Optional[str] = None,
    hidden_dims: Sequence[int] = (1024, 128, 64, 16),
    dropouts: Sequence[float] = (0.2, 0.2, 0.1),
    batch_size: Optional[int] = None,
    device: Any = None,
    **kwargs: Any,
) -> AestheticReward:
    """LAION aesthetic MLP on CLIP ViT-L/14 image embeddings; ``weights`` (CLIP), ``head_weights`` (MLP). The MLP
    was trained on OpenAI's ViT-L/14, the default (``pretrained="openai"``: QuickGELU)."""
    kwargs = openai_vit_l14(kwargs)
    backbone_kwargs = _split_backbone_kwargs(kwargs)
    if kwargs:
        raise TypeError(f"aesthetic: unexpected kwargs {sorted(kwargs)}")
    backbone = build_clip_backbone(reward="aesthetic", device=resolve_device(device), **backbone_kwargs)
    head = load_head(
        AestheticMLP(backbone.embed_dim, hidden_dims, dropouts),
        head_weights,
        reward="aesthetic",
        allow_random_weights=bool(backbone_kwargs.get("allow_random_weights", False)),
        seed=int(backbone_kwargs.get("seed", 0)),
    )
    return AestheticReward(backbone, head, batch_size=batch_size or 32)
