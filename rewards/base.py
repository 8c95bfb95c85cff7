"""The reward protocol and the small helpers every reward uses.

A reward is any callable ``reward(images, prompts, metadata) -> RewardOutput | Tensor[B]`` where

* ``images`` is ``[B, 3, H, W]`` float in ``[0, 1]`` (any device, any float dtype),
* ``prompts`` is a list of ``B`` strings,
* ``metadata`` is a list of ``B`` dicts (may be empty dicts),

with these attributes (read by :class:`rewards.multi.MultiReward`, the trainers and the remote server):

=================  =====================================================================================
``name``           registry name (also the column name in the reward matrix)
``differentiable`` True when gradients flow from the scores back to ``images``
``trainable``      True when the reward holds parameters a trainer may update (adversarial rewards)
``range``          ``(low, high)`` documented range of the scores (``math.inf`` where unbounded)
``allows_nan``     True when NaN is a legal score ("not applicable to this sample", e.g. OCR on a prompt
                   without quoted text); a NaN from a reward with ``allows_nan=False`` is an error
``batch_size``     the reward splits its input into chunks of at most this many samples
``device``         where the reward's model lives; the reward moves each chunk there and returns scores
                   on the device of ``images``
=================  =====================================================================================

Rewards are plain classes created once by a factory (model loading happens in the factory, never per
call). Nothing here is a base class to inherit: :func:`score_in_batches` is the shared machinery.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

from diffalign.config import UserError
from diffalign.types import RewardOutput

__all__ = [
    "Reward",
    "RewardError",
    "RewardOutput",
    "FunctionReward",
    "pixel_statistic_reward",
    "score_in_batches",
    "call_batched",
    "as_reward_output",
    "check_inputs",
    "resolve_device",
    "safe_sqrt",
    "UNBOUNDED",
]

UNBOUNDED: Tuple[float, float] = (-math.inf, math.inf)

Metadata = List[Dict[str, Any]]


class RewardError(RuntimeError):
    """A reward failed or returned something invalid; the message names the reward and the batch."""


class RewardBuildError(UserError, TypeError):
    """A reward's spec names an option the reward does not take: the user's config, reported by the CLI as one
    line. (Other errors while a reward is built are not the user's and keep their traceback.)"""


class RewardFileError(UserError, FileNotFoundError):
    """A reward's spec points at weights or files that are not there (a path in the config): one line."""


def option_problem(fn: Callable[..., Any], kwargs: Dict[str, Any], positional: int = 0,
                   reserved: Tuple[str, ...] = ()) -> Optional[str]:
    """Why ``kwargs`` cannot be passed by keyword to ``fn`` after ``positional`` positional arguments
    (``reserved`` keywords are the caller's), naming each option it does not take, the nearest valid one and all
    valid ones; ``None`` when they can, or when ``fn`` takes ``**kwargs`` (any option; ``**_``, which swallows
    them, is checked) or has no readable signature (a builtin)."""
    import difflib
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD and p.name != "_" for p in params):
        return None
    taken = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:positional]
    options = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p not in taken and p.name not in reserved]
    unknown = [k for k in kwargs if k not in options]
    if not unknown:
        return None
    hints = [f"{k!r} -> {close[0]!r}" for k in unknown for close in [difflib.get_close_matches(k, options, 1)]
             if close]
    return (f"unknown option{'s' if len(unknown) > 1 else ''} {unknown}"
            + (f" (did you mean {', '.join(hints)}?)" if hints else "") + f"; its options are {options}")


def check_bound_kwargs(fn: Callable[..., Any], kwargs: Dict[str, Any], name: str) -> None:
    """:class:`RewardBuildError` naming the options ``fn`` does not take, when ``kwargs`` are bound to a call
    ``fn(images, prompts, metadata, **kwargs)`` (:class:`FunctionReward`'s); nothing when ``fn``'s signature cannot
    be read (a builtin)."""
    problem = option_problem(fn, kwargs, positional=3)
    if problem:
        raise RewardBuildError(f"reward {name!r}: {problem}")


@runtime_checkable
class Reward(Protocol):
    """Structural type of a reward (see the module docstring for the meaning of each attribute)."""

    name: str
    differentiable: bool
    trainable: bool
    range: Tuple[float, float]
    allows_nan: bool

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Metadata
    ) -> Union[RewardOutput, torch.Tensor]: ...


def safe_sqrt(x: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0``, except that where ``x <= tiny`` the value is 0 and the gradient 0 (not
    infinite or NaN): a standard deviation or norm of a flat image must not put NaN into a backward pass through
    a differentiable reward. NaN stays NaN (a broken image is reported, never scored 0)."""
    return torch.where(x <= tiny, torch.zeros_like(x), x.clamp_min(tiny).sqrt())


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """``None`` -> ``cuda`` when available else ``cpu``; anything else -> ``torch.device(device)``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_batch(prompts: Sequence[str], start: int = 0, limit: int = 3) -> str:
    """Human-readable description of a batch for error messages: size, indices and the first prompts."""
    n = len(prompts)
    idx = f"{start}..{start + n - 1}" if n else "(empty)"
    shown = ", ".join(repr(p[:60]) for p in list(prompts)[:limit])
    more = f", ... (+{n - limit} more)" if n > limit else ""
    return f"batch of {n} sample(s), indices {idx}, prompts [{shown}{more}]"


def check_inputs(name: str, images: Any, prompts: Any, metadata: Any) -> Metadata:
    """Validate the reward call arguments; returns ``metadata`` (``None`` -> list of empty dicts)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"reward {name!r}: images must be a float tensor [B, 3, H, W] in [0, 1], got {shape}; "
            "convert PIL/uint8 images with torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"reward {name!r}: images must be floating point in [0, 1], got dtype {images.dtype}"
        )
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(
            f"reward {name!r}: need one prompt per image, got {images.shape[0]} images and "
            f"{'a single string' if isinstance(prompts, str) else len(prompts)} prompts"
        )
    if metadata is None:
        return [{} for _ in prompts]
    if len(metadata) != len(prompts):
        raise ValueError(
            f"reward {name!r}: need one metadata dict per image, got {len(metadata)} for {len(prompts)}"
        )
    return list(metadata)


def returned_type_message(name: str, out: Any) -> str:
    """What a reward that returned neither a Tensor[B] nor a RewardOutput did wrong, and the fix."""
    hint = ("return torch.as_tensor(scores, dtype=torch.float32)" if isinstance(out, (list, tuple))
            or hasattr(out, "__array__") else "return a Tensor[B] of scores, e.g. torch.as_tensor(scores)")
    return (f"reward {name!r} returned a {type(out).__name__}, not a Tensor[B] or RewardOutput (the reward "
            f"protocol, rewards/base.py); {hint}")


def as_reward_output(out: Union[RewardOutput, torch.Tensor], name: str = "reward") -> RewardOutput:
    """Normalise a reward's return value to a :class:`RewardOutput` (no validation of shape/values). The protocol
    is strict: a list or numpy array is a TypeError that says the reward returned it and how to return a tensor
    (a silent conversion would drop a differentiable reward's graph and guess a dtype and device)."""
    if isinstance(out, RewardOutput):
        return out
    if isinstance(out, torch.Tensor):
        return RewardOutput(scores=out, details=None)
    raise TypeError(returned_type_message(name, out))


def score_in_batches(
    fn: Callable[[torch.Tensor, List[str], Metadata], Union[RewardOutput, torch.Tensor]],
    images: torch.Tensor,
    prompts: List[str],
    metadata: Metadata,
    *,
    batch_size: Optional[int],
    name: str,
    device: Optional[torch.device] = None,
) -> RewardOutput:
    """Call ``fn`` on chunks of at most ``batch_size`` samples and concatenate the results.

    Each chunk is moved to ``device`` (when given); scores come back as float32 on the device of
    ``images`` so that differentiable rewards keep their graph. An exception inside a chunk is re-raised
    as :class:`RewardError` naming the reward and the chunk (indices and prompts).
    """
    n = images.shape[0]
    step = n if not batch_size or batch_size <= 0 else int(batch_size)
    scores: List[torch.Tensor] = []
    details: List[Dict[str, Any]] = []
    any_details = False
    for start in range(0, n, max(step, 1)):
        stop = min(start + step, n)
        chunk = images[start:stop]
        if device is not None and chunk.device != device:
            chunk = chunk.to(device)
        try:
            raw = fn(chunk, prompts[start:stop], metadata[start:stop])
        except RewardError:
            raise
        except Exception as exc:  # re-raised with the reward and the chunk named
            raise RewardError(
                f"reward {name!r} raised {type(exc).__name__}: {exc} "
                f"(on {describe_batch(prompts[start:stop], start)})"
            ) from exc
        if not isinstance(raw, (RewardOutput, torch.Tensor)):  # the reward raised nothing: it returned this
            raise RewardError(f"{returned_type_message(name, raw)} (on {describe_batch(prompts[start:stop], start)})")
        out = as_reward_output(raw)
        s = out.scores
        if not isinstance(s, torch.Tensor):
            s = torch.as_tensor(s)
        scores.append(s.to(device=images.device, dtype=torch.float32))
        if out.details is not None:
            any_details = True
            details.extend(out.details)
        else:
            details.extend({} for _ in range(stop - start))
    cat = torch.cat(scores) if scores else torch.zeros(0, device=images.device)
    return RewardOutput(scores=cat, details=details if any_details else None)


class FunctionReward:
    """Wrap a plain function ``fn(images, prompts, metadata, **kwargs) -> Tensor[B] | RewardOutput``.

    This is how a user plugin that is a plain callable (not a factory) becomes a reward: the spec's
    ``kwargs`` are bound and passed on every call, batching and device placement are added, and the
    protocol attributes take their defaults unless the function defines them as attributes.
    """

    def __init__(
        self,
        fn: Callable[..., Union[RewardOutput, torch.Tensor]],
        name: Optional[str] = None,
        *,
        batch_size: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        **kwargs: Any,
    ) -> None:
        self.fn = fn
        self.kwargs = kwargs
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", "reward")
        check_bound_kwargs(fn, kwargs, self.name)  # an unknown option fails here, not on the first call
        self.differentiable = bool(getattr(fn, "differentiable", False))
        self.trainable = bool(getattr(fn, "trainable", False))
        self.range = tuple(getattr(fn, "range", UNBOUNDED))
        self.allows_nan = bool(getattr(fn, "allows_nan", False))
        self.batch_size = batch_size
        self.device = None if device is None else torch.device(device)

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[Metadata] = None
    ) -> RewardOutput:
        metadata = check_inputs(self.name, images, prompts, metadata)
        return score_in_batches(
            lambda im, pr, md: self.fn(im, pr, md, **self.kwargs),
            images,
            list(prompts),
            metadata,
            batch_size=self.batch_size,
            name=self.name,
            device=self.device,
        )

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r}, fn={getattr(self.fn, '__qualname__', self.fn)!r})"


def pixel_statistic_reward(statistic: Callable[[torch.Tensor], torch.Tensor], *, name: str,
                           range: Tuple[float, float], batch_size: Optional[int] = None,
                           device: Union[None, str, torch.device] = None) -> FunctionReward:
    """A differentiable, prompt-independent reward from a per-image statistic ``statistic(images) -> [B]`` of
    ``[B, 3, H, W]`` images (clamped to [0, 1] first), e.g. colourfulness or contrast; ``batch_size`` and
    ``device`` as for :class:`FunctionReward`. A factory passes its spec's options here, so an unknown option is
    a ``TypeError`` when the reward is built, not on its first call."""

    def score(images: torch.Tensor, prompts: List[str], metadata: Metadata) -> RewardOutput:
        return RewardOutput(scores=statistic(images.clamp(0, 1)))

    score.differentiable = True  # type: ignore[attr-defined]
    score.range = tuple(range)  # type: ignore[attr-defined]
    score.__qualname__ = getattr(statistic, "__qualname__", score.__qualname__)  # readable repr
    return FunctionReward(score, name, batch_size=batch_size, device=device)


def call_batched(reward: Any, images: torch.Tensor, prompts: Any, metadata: Any = None) -> RewardOutput:
    """The ``__call__`` of a reward that defines ``_score(images, prompts, metadata)``: check the inputs, then
    :func:`score_in_batches` with the reward's ``batch_size``, ``name`` and ``device``."""
    metadata = check_inputs(reward.name, images, prompts, metadata)
    return score_in_batches(reward._score, images, list(prompts), metadata, batch_size=reward.batch_size,
                            name=reward.name, device=reward.device)
