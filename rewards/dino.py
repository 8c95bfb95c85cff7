"""``dino_similarity``: cosine similarity of DINOv2 CLS features to a set of reference images.

``score_i = reduce_j cos(f(image_i), f(ref_j))`` with ``f`` the layer-normed CLS token (``pooler_output``) of
a transformers ``Dinov2Model`` and ``reduce`` = ``mean`` (default) or ``max`` over the references. Range
[-1, 1]. Weights come from a local ``Dinov2Model`` folder (``weights=...``); a ``Dinov2Config`` dict in
``model_config`` with ``allow_random_weights=True`` gives a tiny random model for tests. References: a tensor
``[N, 3, H, W]`` in [0, 1], a list of image files, or a folder of images. Images are resized (short side),
centre-cropped to ``image_size`` and ImageNet-normalised with torch ops, so the reward is differentiable with
respect to the images.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.types import RewardOutput
from rewards.base import call_batched, resolve_device
from rewards.clip_backbone import missing_weights_error, preprocess_images
from rewards.registry import register_reward

__all__ = ["DinoSimilarityReward", "load_reference_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(references: Union[torch.Tensor, str, Sequence[str]], size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` float in [0, 1] from a tensor, a folder, or a list of image files. Files get the
    scored images' geometry (short side resized to ``size``, centre crop: :func:`preprocess_images` without its
    normalisation), so an image scores 1 against itself whether given as a file or a tensor."""
    if isinstance(references, torch.Tensor):
        if references.ndim != 4 or references.shape[1] != 3:
            raise ValueError(
                f"dino_similarity: reference tensor must be [N, 3, H, W], got {tuple(references.shape)}"
            )
        return references.detach().float()
    from PIL import Image

    if isinstance(references, (str, os.PathLike)):
        folder = str(references)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"dino_similarity: references {folder!r} is neither a folder nor a list of files"
            )
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTS))
    else:
        paths = [str(p) for p in references]
    if not paths:
        raise ValueError("dino_similarity: no reference images given")
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        img = torch.from_numpy(arr).permute(2, 0, 1)[None]
        out.append(preprocess_images(img, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0])  # exactly the scored path
    return torch.stack(out)


class DinoSimilarityReward:
    differentiable = True
    trainable = False
    allows_nan = False
    range = (-1.0, 1.0)

    def __init__(
        self,
        model: torch.nn.Module,
        references: torch.Tensor,
        *,
        reduce: str = "mean",
        image_size: int = 224,
        name: str = "dino_similarity",
        batch_size: Optional[int] = 32,
        device: Union[None, str, torch.device] = None,
    ) -> None:
        if reduce not in ("mean", "max"):
            raise ValueError(f"{name}: reduce={reduce!r} is not valid; use 'mean' or 'max'")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.reduce = reduce
        self.image_size = int(image_size)
        self.name = name
        self.batch_size = batch_size
        with torch.no_grad():
            feats = [
                self.features(references[i : i + 32].to(self.device))
                for i in range(0, references.shape[0], 32)
            ]
        self.reference_features = F.normalize(torch.cat(feats), dim=-1)  # [N, D]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_images(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        x = x.to(next(self.model.parameters()).dtype)
        return self.model(pixel_values=x).pooler_output.float()

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> torch.Tensor:
        sims = F.normalize(self.features(images), dim=-1) @ self.reference_features.T  # [B, N]
        return sims.mean(dim=1) if self.reduce == "mean" else sims.max(dim=1).values

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        return call_batched(self, images, prompts, metadata)


@register_reward("dino_similarity")
def dino_similarity(
    *,
    references: Any,
    weights: Optional[str] = None,
    model_config: Optional[Dict[str, Any]] = None,
    allow_random_weights: bool = False,
    seed: int = 0,
    reduce: str = "mean",
    image_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Any = None,
) -> DinoSimilarityReward:
    """Mean (or max) cosine similarity of DINOv2 CLS features to reference images. Range [-1, 1]."""
    from transformers import Dinov2Config, Dinov2Model

    if weights is not None:
        if not os.path.isdir(str(weights)):
            raise FileNotFoundError(
                f"dino_similarity: weights={weights!r} must be a local Dinov2Model folder"
            )
        model = Dinov2Model.from_pretrained(str(weights), local_files_only=True)
    elif allow_random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Dinov2Model(Dinov2Config(**(model_config or {})))
    else:
        raise missing_weights_error("dino_similarity", "DINOv2 weights", "weights='/path/to/dinov2_folder'")
    size = int(image_size or (224 if weights is not None else model.config.image_size))
    refs = load_reference_images(references, size)
    return DinoSimilarityReward(
        model, refs, reduce=reduce, image_size=size, batch_size=batch_size or 32, device=device
    )
