"""Reward transforms: pure functions ``scores [B] -> scores [B]`` selectable per reward in a config.

Every transform has the signature ``fn(scores, *, prompts=None, metadata=None, **kwargs)``; the context
arguments are only read by transforms that need them (a per-prompt reference, a group id). NaN entries
("not applicable") stay NaN and never influence other entries.

==========  =====================================================  ==================================
name        formula                                                kwargs
==========  =====================================================  ==================================
``affine``  ``scale * r + shift``                                   ``scale=1.0, shift=0.0``
``clip``    ``min(max(r, min), max)``                               ``min=None, max=None``
``rank``    average rank within the group, mapped to ``[0, 1]``     ``by="batch" | "prompt" | <metadata key>``
``lsc``     ``log sigmoid(r - r_ref(x))``                           ``reference=...`` or ``reference_key=...``
``par``     ``mean_m sigmoid(r - r_ref_m(x))``                      ``reference=...`` or ``reference_key=...``
==========  =====================================================  ==================================

A config selects one transform (``"rank"`` or ``{"name": "affine", "scale": 0.002}``) or a list applied in
order (``[{"name": "clip", "min": 0}, {"name": "affine", "scale": 2.5}]`` turns ``clip_score`` into
Hessel et al.'s CLIP-S).

References for ``lsc`` / ``par`` are given as a number, a ``{prompt: value}`` dict (PAR: ``{prompt:
[values]}`` for several references), a tensor ``[B]`` (PAR: ``[B, M]``) aligned with the batch, or taken
from ``metadata[i][reference_key]``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TRANSFORMS", "affine", "clip", "rank", "lsc", "par", "build_transform", "group_ids"]


def affine(scores: torch.Tensor, *, scale: float = 1.0, shift: float = 0.0, **_: Any) -> torch.Tensor:
    """``scale * r + shift``."""
    return scores * scale + shift


def clip(
    scores: torch.Tensor, *, min: Optional[float] = None, max: Optional[float] = None, **_: Any
) -> torch.Tensor:
    """Clamp to ``[min, max]`` (either bound may be None). NaN stays NaN."""
    if min is None and max is None:
        return scores
    return torch.clamp(scores, min=min, max=max)


def group_ids(
    n: int,
    by: str = "batch",
    prompts: Optional[Sequence[str]] = None,
    metadata: Optional[Sequence[Mapping]] = None,
) -> torch.Tensor:
    """``[n]`` long group index: one group (``by="batch"``), one per prompt, or per ``metadata[i][by]``."""
    if by == "batch":
        return torch.zeros(n, dtype=torch.long)
    if by == "prompt":
        if prompts is None:
            raise ValueError("rank(by='prompt') needs the prompts")
        keys: List[Any] = list(prompts)
    else:
        if metadata is None or any(by not in m for m in metadata):
            raise ValueError(
                f"rank(by={by!r}) groups by metadata key {by!r}, but some samples lack it; "
                "use by='batch', by='prompt' or a key present in every metadata dict"
            )
        keys = [m[by] for m in metadata]
    index: Dict[Any, int] = {}
    return torch.tensor(
        [
            index.setdefault(k if isinstance(k, (str, int, float, tuple)) else str(k), len(index))
            for k in keys
        ],
        dtype=torch.long,
    )


def rank(
    scores: torch.Tensor,
    *,
    by: str = "batch",
    prompts: Optional[Sequence[str]] = None,
    metadata: Optional[Sequence[Mapping]] = None,
    **_: Any,
) -> torch.Tensor:
    """Rank within each group mapped to ``[0, 1]``: ``(rank - 1) / (n - 1)`` with ties averaged.

    The lowest score of a group gets 0 and the highest 1; a group with a single valid sample gets 0.5.
    NaN entries are excluded from the ranking and stay NaN. Not differentiable.
    """
    groups = group_ids(scores.shape[0], by, prompts, metadata).to(scores.device)
    out = torch.full_like(scores, float("nan"), dtype=torch.float32)
    values = scores.detach().float()
    for g in torch.unique(groups):
        idx = torch.nonzero((groups == g) & ~torch.isnan(values)).flatten()
        n = idx.numel()
        if n == 0:
            continue
        if n == 1:
            out[idx] = 0.5
            continue
        v = values[idx]
        # Average rank of ties: count strictly-smaller and equal entries.
        less = (v[None, :] < v[:, None]).sum(1).float()
        equal = (v[None, :] == v[:, None]).sum(1).float()
        avg_rank = less + (equal - 1) / 2  # 0-based
        out[idx] = avg_rank / (n - 1)
    return out


def _reference(
    scores: torch.Tensor,
    reference: Any,
    reference_key: Optional[str],
    prompts: Optional[Sequence[str]],
    metadata: Optional[Sequence[Mapping]],
    transform: str,
) -> torch.Tensor:
    """Reference reward(s) aligned with ``scores``: ``[B]`` or ``[B, M]`` float32."""
    n = scores.shape[0]
    if (reference is None) == (reference_key is None):
        raise ValueError(
            f"{transform}: give exactly one of reference= (number, {{prompt: value}} dict or tensor [B]) "
            "or reference_key= (a metadata key holding each sample's reference reward)"
        )
    if reference_key is not None:
        if metadata is None or any(reference_key not in m for m in metadata):
            raise ValueError(
                f"{transform}: reference_key={reference_key!r} is missing from some metadata dicts"
            )
        values: Any = [m[reference_key] for m in metadata]
    elif isinstance(reference, Mapping):
        if prompts is None:
            raise ValueError(f"{transform}: a per-prompt reference dict needs the prompts")
        missing = [p for p in prompts if p not in reference]
        if missing:
            raise ValueError(
                f"{transform}: no reference reward for prompt {missing[0]!r} "
                f"({len(set(missing))} prompt(s) missing); "
                "the reference dict must hold every prompt of the batch"
            )
        values = [reference[p] for p in prompts]
    elif isinstance(reference, (int, float)):
        values = [float(reference)] * n
    else:
        values = reference
    ref = torch.as_tensor(
        values if not isinstance(values, torch.Tensor) else values.detach(), dtype=torch.float32
    )
    if ref.ndim == 0:
        ref = ref.expand(n)
    if ref.shape[0] != n:
        raise ValueError(f"{transform}: reference has {ref.shape[0]} rows for a batch of {n}")
    return ref.to(scores.device)


def lsc(
    scores: torch.Tensor,
    *,
    reference: Any = None,
    reference_key: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    metadata: Optional[Sequence[Mapping]] = None,
    **_: Any,
) -> torch.Tensor:
    """Log-sigmoid-centred reward ``u = log sigmoid(r - r_ref(x))`` (range ``(-inf, 0)``).

    Wang et al., "Transforming and Combining Rewards for Aligning LLMs" (ICML 2024, arXiv 2402.00742):
    for a Bradley-Terry reward, ``sigmoid(r - r_ref)`` is the probability that the sample is better than the
    per-prompt reference; its log is concave and saturating, and a sum of LSC rewards is the log-probability
    of being good on all properties. ``r_ref(x)`` is a per-prompt reference reward, e.g. a high quantile of
    the base model's rewards for that prompt. With ``[B, M]`` references, the mean reference is used.
    """
    ref = _reference(scores, reference, reference_key, prompts, metadata, "lsc")
    if ref.ndim == 2:
        ref = ref.mean(dim=1)
    return F.logsigmoid(scores.float() - ref)


def par(
    scores: torch.Tensor,
    *,
    reference: Any = None,
    reference_key: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    metadata: Optional[Sequence[Mapping]] = None,
    **_: Any,
) -> torch.Tensor:
    """Preference-as-reward ``r_RL = (1/M) sum_m sigmoid(r - r_ref_m(x))`` (range ``(0, 1)``).

    Fu et al., "Reward Shaping to Mitigate Reward Hacking in RLHF" (arXiv 2502.18770): a bounded, centred
    reward that grows fast at first and then saturates; ``r_ref_m`` are rewards of reference-policy samples
    for the same prompt (``M = 1`` suffices). References ``[B]`` or ``[B, M]`` (or ``{prompt: [values]}``).
    """
    ref = _reference(scores, reference, reference_key, prompts, metadata, "par")
    s = scores.float()
    if ref.ndim == 2:
        return torch.sigmoid(s[:, None] - ref).mean(dim=1)
    return torch.sigmoid(s - ref)


TRANSFORMS: Dict[str, Callable[..., torch.Tensor]] = {
    "affine": affine,
    "clip": clip,
    "rank": rank,
    "lsc": lsc,
    "par": par,
}


def _one(spec: Any) -> Callable[..., torch.Tensor]:
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"transform spec {dict(spec)!r} needs a 'name' (one of {sorted(TRANSFORMS)})")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if "kwargs" in kwargs and isinstance(kwargs["kwargs"], Mapping):
            kwargs = {**{k: v for k, v in kwargs.items() if k != "kwargs"}, **kwargs["kwargs"]}
        name = spec["name"]
    elif callable(spec):
        return spec
    else:
        raise TypeError(f"a transform spec must be a name, a dict or a callable, got {type(spec).__name__}")
    if name not in TRANSFORMS:
        raise ValueError(f"unknown reward transform {name!r}; valid transforms are {sorted(TRANSFORMS)}")
    fn = TRANSFORMS[name]
    from rewards.base import option_problem

    problem = option_problem(fn, kwargs, positional=1, reserved=("prompts", "metadata"))
    if problem:  # every transform swallows extra keywords (**_): a misspelt option was silently ignored
        raise ValueError(f"transform {name!r}: {problem}")

    def apply(
        scores: torch.Tensor,
        *,
        prompts: Optional[Sequence[str]] = None,
        metadata: Optional[Sequence[Mapping]] = None,
    ) -> torch.Tensor:
        return fn(scores, prompts=prompts, metadata=metadata, **kwargs)

    apply.__name__ = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items() if k != 'reference')})"
    return apply


def build_transform(spec: Any) -> Optional[Callable[..., torch.Tensor]]:
    """``None`` -> None; a name, ``{"name": ..., **kwargs}``, a callable, or a list of those (in order).

    The result is called as ``t(scores, prompts=..., metadata=...)``.
    """
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        parts = [_one(s) for s in spec]
        if not parts:
            return None

        def chain(scores: torch.Tensor, *, prompts=None, metadata=None) -> torch.Tensor:
            for p in parts:
                scores = p(scores, prompts=prompts, metadata=metadata)
            return scores

        return chain
    return _one(spec)
