"""Shapes rewards: the built-in world's deterministic verifier (a GenEval-like prompt-image check), and its
shaped, smooth form ``shapes_soft`` for training.

Scores come from ``diffalign.shapes.verifier.score_images(images, prompts) -> (scores [B], details)``:
the fraction of the caption's criteria (count, colour, shape, relative position) the image satisfies,
1.0 for a clean render of the caption. ``details`` holds the verifier's per-criterion results. The module is
imported inside the factory so that ``import rewards`` never depends on it. Not differentiable.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from diffalign.types import RewardOutput
from rewards.base import RewardBuildError, call_batched
from rewards.registry import register_reward

__all__ = ["ShapesReward"]


class ShapesReward:
    """Wraps the shapes verifier as a reward. Range [0, 1]."""

    differentiable = False
    trainable = False
    allows_nan = False
    range = (0.0, 1.0)

    def __init__(
        self,
        score_images: Any,
        *,
        batch_size: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        name: str = "shapes",
        extra_options: Sequence[str] = (),
        **verifier_kwargs: Any,
    ) -> None:
        from diffalign.shapes.verifier import DEFAULTS

        valid = sorted(DEFAULTS) + list(extra_options)
        unknown = sorted(set(verifier_kwargs) - set(valid))
        if unknown:  # the verifier would raise it on the first scored batch, after the model has loaded
            raise RewardBuildError(f"reward {name!r}: unknown verifier option(s) {unknown}; valid: {valid} (and "
                                   "batch_size, device)")
        self._score_images = score_images
        self.verifier_kwargs = verifier_kwargs
        self.name = name
        self.batch_size = batch_size
        self.device = torch.device("cpu")

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> RewardOutput:
        scores, details = self._score_images(
            images.detach().float().clamp(0, 1), list(prompts), **self.verifier_kwargs
        )
        return RewardOutput(scores=torch.as_tensor(scores, dtype=torch.float32), details=list(details))

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        return call_batched(self, images, prompts, metadata)


@register_reward("shapes")
def shapes(**kwargs: Any) -> ShapesReward:
    """The shapes-world verifier (``diffalign.shapes.verifier.score_images``). Range [0, 1]."""
    try:
        from diffalign.shapes.verifier import score_images
    except ImportError as exc:
        raise ImportError(
            "the 'shapes' reward needs diffalign.shapes.verifier.score_images, "
            f"which could not be imported: {exc}"
        ) from exc
    return ShapesReward(score_images, **kwargs)


@register_reward("shapes_soft")
def shapes_soft(**kwargs: Any) -> ShapesReward:
    """The shaped shapes verifier (``diffalign.shapes.verifier.soft_score_images``): each criterion a number in
    [0, 1] that moves smoothly with the features the verifier thresholds; ``temperature`` (default 1) scales
    the sigmoids, toward 0 it is the ``shapes`` reward. For training; evaluate with ``shapes``. Range [0, 1]."""
    kwargs.setdefault("name", "shapes_soft")
    from diffalign.shapes.verifier import soft_score_images

    return ShapesReward(soft_score_images, extra_options=("temperature",), **kwargs)
