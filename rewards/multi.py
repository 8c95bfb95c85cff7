"""Evaluate several rewards on one batch: the ``[B, R]`` reward matrix.

``MultiReward(specs)(images, prompts, metadata)`` returns a :class:`MultiRewardOutput` whose ``rewards`` is a
``[B, R]`` float32 matrix, one column per spec in spec order (``names``), after each spec's transform.

What NaN means: the entry is "not applicable to this sample" -- the reward declared it so (OCR on a prompt
without quoted text, ``allows_nan=True``) or the reward failed on that sample under ``on_error="skip"``
(then it is also counted in ``failures``). NaN is never turned into 0 here. Downstream code must either
exclude NaN entries (per-reward group statistics over the valid entries only) or combine columns with
:func:`weighted_sum`, whose NaN rule is explicit.

Failure policy per spec (``on_error``):

* ``"raise"`` (default): a reward that raises, returns something that is not ``Tensor[B]`` /
  ``RewardOutput``, returns the wrong shape, returns inf, or returns NaN while ``allows_nan`` is False
  raises :class:`rewards.base.RewardError` naming the reward, what was wrong and the batch (size, indices,
  prompts).
* ``"skip"``: the affected entries become NaN (the whole column of the batch if the call failed or the shape
  was wrong, only the offending entries for inf / disallowed NaN); ``failures[name]`` counts the entries and
  ``errors[name]`` keeps the messages.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from diffalign.types import RewardOutput
from rewards.base import RewardError, check_inputs, describe_batch, returned_type_message
from rewards.registry import RewardSpec, build_reward
from rewards.transforms import build_transform

__all__ = ["MultiReward", "MultiRewardOutput", "weighted_sum", "NAN_POLICIES"]

NAN_POLICIES = ("renormalize", "zero", "propagate")


@dataclass
class MultiRewardOutput:
    """Result of :class:`MultiReward` on one batch.

    Attributes:
        rewards: ``[B, R]`` float32, transformed scores; NaN = not applicable / skipped failure.
        raw: ``[B, R]`` float32, scores before the transforms.
        names: ``R`` column names, in spec order.
        weights: ``[R]`` float32, the specs' weights (for :func:`weighted_sum`).
        timings: seconds spent in each reward (call + validation, not the transform).
        details: per reward, the per-sample detail dicts it returned (or None).
        failures: per reward, number of entries set to NaN because of a failure in this call (``skip``).
        errors: per reward, the failure messages of this call.
    """

    rewards: torch.Tensor
    raw: torch.Tensor
    names: List[str]
    weights: torch.Tensor
    timings: Dict[str, float] = field(default_factory=dict)
    details: Dict[str, Optional[List[Dict[str, Any]]]] = field(default_factory=dict)
    failures: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, List[str]] = field(default_factory=dict)

    def column(self, name: str) -> torch.Tensor:
        """``[B]`` the column of reward ``name``."""
        return self.rewards[:, self.names.index(name)]

    def weighted_sum(self, nan_policy: str = "renormalize") -> torch.Tensor:
        """``[B]`` :func:`weighted_sum` of ``rewards`` with the specs' weights."""
        return weighted_sum(self.rewards, self.weights, nan_policy=nan_policy)


def common_columns(values: torch.Tensor, groups: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """``values`` ``[N, R]`` with every column that is NaN in some row of a group set to NaN in all rows of that
    group (``groups`` ``[N]``: the rows compared with each other, e.g. a prompt's samples); in a group left without
    such a ``weighted`` column, the rows with a NaN weighted column become all NaN. Rows compared with each other
    are so combined from the same columns: a sample whose reward failed cannot rank above the others by its
    remaining columns being rescaled to the total weight."""
    groups = groups.to(values.device).long()
    nan = torch.isnan(values)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    nan_count = torch.zeros(num_groups, values.shape[1], device=values.device).index_add_(0, groups, nan.float())
    common = (nan_count == 0)[groups]  # [N, R]: finite in every row of the row's group
    weighted = weighted.to(values.device)
    has_common = (common & weighted[None, :]).any(dim=1, keepdim=True)
    row_ok = ~(nan & weighted[None, :]).any(dim=1, keepdim=True)
    keep = torch.where(has_common, common, row_ok.expand_as(common))
    return torch.where(keep, values, torch.full_like(values, float("nan")))


def weighted_sum(
    matrix: torch.Tensor, weights: Union[torch.Tensor, Sequence[float]], nan_policy: str = "renormalize",
    groups: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Combine a ``[B, R]`` reward matrix into ``[B]`` with weights ``[R]``, handling NaN explicitly.

    ``groups`` ``[B]`` (``renormalize`` only): rows compared with each other (a prompt's group) are combined from
    the columns finite in all of them (:func:`common_columns`): a column NaN in only some rows of a group (a reward
    that failed under ``on_error: skip``) is left out for the whole group.

    ``nan_policy``:

    * ``"renormalize"`` (default): NaN entries are excluded and the remaining weights of that row are rescaled
      to keep the row's total absolute weight,
      ``s_i = sum_{r in V_i} w_r x_ir * (sum_r |w_r|) / (sum_{r in V_i} |w_r|)``
      with ``V_i`` the non-NaN columns of row ``i`` with ``w_r != 0``. A row without any such column is
      NaN (not applicable to any weighted reward). Without NaN this is the plain weighted sum (Flow-GRPO's
      ``avg``).
    * ``"zero"``: a NaN entry contributes 0 (opt-in only).
    * ``"propagate"``: plain weighted sum; any NaN in a weighted column makes the row NaN.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"weighted_sum: nan_policy={nan_policy!r} is not valid; use one of {list(NAN_POLICIES)}"
        )
    if matrix.ndim != 2:
        raise ValueError(f"weighted_sum: matrix must be [B, R], got shape {tuple(matrix.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float32, device=matrix.device)
    if w.ndim != 1 or w.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"weighted_sum: need {matrix.shape[1]} weights for {matrix.shape[1]} columns, "
            f"got {tuple(w.shape)}"
        )
    x = matrix.float()
    active = w != 0
    if groups is not None and nan_policy == "renormalize":
        x = common_columns(x, groups, active)
    # Zero-weight columns never matter (not even their NaN).
    x = torch.where(active[None, :], x, torch.zeros_like(x))
    if nan_policy == "propagate":
        return (x * w).sum(dim=1)
    valid = ~torch.isnan(x)
    contrib = torch.where(valid, x * w, torch.zeros_like(x)).sum(dim=1)
    if nan_policy == "zero":
        return contrib
    valid_mass = (valid & active[None, :]).float().mul(w.abs()).sum(dim=1)
    total_mass = w.abs().sum()
    out = contrib * total_mass / valid_mass.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(valid_mass > 0, out, torch.full_like(out, float("nan")))


class MultiReward:
    """Build every reward of ``specs`` once; calling it scores a batch with all of them.

    Args:
        specs: a list of :class:`RewardSpec`, names, dicts, or already-built reward objects (which get a
            default spec: weight 1, no transform, ``on_error="raise"``).
        grad: run the rewards with autograd enabled (default False: evaluation under ``torch.no_grad``).
    """

    def __init__(self, specs: Sequence[Any], *, grad: bool = False) -> None:
        self.specs: List[RewardSpec] = []
        self.rewards: List[Any] = []
        for s in specs:
            if callable(s) and not isinstance(s, (str, Mapping, RewardSpec)):
                name = getattr(s, "name", None) or getattr(s, "__name__", "reward")
                self.specs.append(RewardSpec(name=name))
                self.rewards.append(s)
            else:
                spec = RewardSpec.from_any(s)
                self.specs.append(spec)
                self.rewards.append(build_reward(spec))
        if not self.specs:
            raise ValueError("MultiReward needs at least one reward spec")
        self.names = [getattr(r, "name", None) or s.column for s, r in zip(self.specs, self.rewards)]
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            from diffalign.config import ConfigError  # a ValueError: one line from the CLI, before the model loads

            raise ConfigError(f"reward columns {dup} appear more than once; give each a distinct 'label' in its spec",
                              key="rewards")
        self.transforms = [build_transform(s.transform) for s in self.specs]
        self.weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)
        self.grad = grad
        self.total_failures: Dict[str, int] = {n: 0 for n in self.names}
        self._warned: set = set()  # rewards whose first skipped failure was already warned about

    def __len__(self) -> int:
        return len(self.specs)

    def _allows_nan(self, i: int) -> bool:
        spec = self.specs[i]
        return (
            spec.allow_nan
            if spec.allow_nan is not None
            else bool(getattr(self.rewards[i], "allows_nan", False))
        )

    def _score_one(
        self, i: int, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> tuple:
        """Returns (scores [B] float32 on images.device, details, n_failed, messages)."""
        name, spec, reward = self.names[i], self.specs[i], self.rewards[i]
        b = images.shape[0]
        where = describe_batch(prompts)
        nan_col = torch.full((b,), float("nan"), dtype=torch.float32, device=images.device)

        def fail(message: str, exc: Optional[BaseException] = None) -> tuple:
            if spec.on_error == "raise":
                raise RewardError(message) from exc
            return nan_col, None, b, [message]

        try:
            out = reward(images, prompts, metadata)
        except Exception as exc:
            msg = (
                str(exc)
                if isinstance(exc, RewardError)
                else f"reward {name!r} raised {type(exc).__name__}: {exc}"
            )
            return fail(f"{msg} (on {where})" if "(on batch" not in msg else msg, exc)
        if not isinstance(out, (RewardOutput, torch.Tensor)):
            return fail(f"{returned_type_message(name, out)} (on {where})")
        out_scores = out.scores if isinstance(out, RewardOutput) else out
        if not isinstance(out_scores, torch.Tensor) or tuple(out_scores.shape) != (b,):
            shape = (
                tuple(out_scores.shape) if isinstance(out_scores, torch.Tensor) else type(out_scores).__name__
            )
            return fail(f"reward {name!r} returned scores of shape {shape}; expected [{b}] (on {where})")
        details = out.details if isinstance(out, RewardOutput) else None
        if details is not None and len(details) != b:
            return fail(f"reward {name!r} returned {len(details)} detail dicts for {b} samples (on {where})")
        scores = (
            out_scores.detach().to(device=images.device, dtype=torch.float32)
            if not self.grad
            else out_scores.to(device=images.device, dtype=torch.float32)
        )
        bad = torch.isinf(scores)
        if not self._allows_nan(i):
            bad = bad | torch.isnan(scores)
        if bool(bad.any()):
            idx = torch.nonzero(bad).flatten().tolist()
            kinds = sorted({"inf" if bool(torch.isinf(scores[j])) else "NaN" for j in idx})
            rule = "" if kinds == ["inf"] else " (NaN is only allowed for rewards with allows_nan=True)"
            message = (
                f"reward {name!r} returned {'/'.join(kinds)} "
                f"at indices {idx[:10]}{'...' if len(idx) > 10 else ''}"
                f"{rule} (on {where})"
            )
            if spec.on_error == "raise":
                raise RewardError(message)
            scores = torch.where(bad, torch.full_like(scores, float("nan")), scores)
            return scores, details, len(idx), [message]
        return scores, details, 0, []

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Optional[Sequence[Dict[str, Any]]] = None,
        transform: bool = True,
    ) -> MultiRewardOutput:
        """Score ``images``; ``rewards`` are the transformed columns (``raw`` before the transforms). With
        ``transform=False`` ``rewards`` are the raw scores too: a caller scoring a larger set in pieces (the
        trainers' sampling batches on every process) applies :meth:`apply_transforms` to the whole set, since a
        ``rank`` transform compares the samples of a group and a piece holds only some of them."""
        prompts = list(prompts)
        metadata = check_inputs("multi", images, prompts, metadata)
        b = images.shape[0]
        raw_cols = []
        timings: Dict[str, float] = {}
        details: Dict[str, Optional[List[Dict[str, Any]]]] = {}
        failures: Dict[str, int] = {}
        errors: Dict[str, List[str]] = {}
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            for i, name in enumerate(self.names):
                start = time.perf_counter()
                scores, det, n_failed, messages = self._score_one(i, images, prompts, metadata)
                if images.is_cuda:
                    torch.cuda.synchronize(images.device)
                timings[name] = time.perf_counter() - start
                details[name] = det
                failures[name] = n_failed
                errors[name] = messages
                self.total_failures[name] += n_failed
                if n_failed and name not in self._warned:  # tolerated, but never silently
                    self._warned.add(name)
                    warnings.warn(f"reward {name!r} failed on {n_failed} of {b} samples; on_error=skip set them to "
                                  f"NaN (they get no advantage; counted in total_failures and the trainers' "
                                  f"reward_failures/{name} metric; warned once): {messages[0] if messages else ''}",
                                  RuntimeWarning)
                raw_cols.append(scores)
            raw = torch.stack(raw_cols, dim=1) if b else torch.zeros(0, len(self.names), device=images.device)
            rewards = self.apply_transforms(raw, prompts, metadata) if transform else raw.clone()
        return MultiRewardOutput(
            rewards=rewards,
            raw=raw,
            names=list(self.names),
            weights=self.weights.to(images.device),
            timings=timings,
            details=details,
            failures=failures,
            errors=errors,
        )

    def apply_transforms(self, raw: torch.Tensor, prompts: Sequence[str],
                         metadata: Optional[Sequence[Dict[str, Any]]] = None) -> torch.Tensor:
        """``[N, R]`` columns of ``raw`` (scores of :meth:`__call__` with ``transform=False``) through their specs'
        transforms, over the whole set at once (``prompts`` / ``metadata`` one per row)."""
        prompts = list(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if raw.shape[0] != len(prompts) or len(metadata) != len(prompts):
            raise ValueError(f"apply_transforms: {raw.shape[0]} rows, {len(prompts)} prompts, {len(metadata)} "
                             "metadata dicts; give one of each per row")
        cols = [raw[:, i] if t is None else t(raw[:, i], prompts=prompts, metadata=metadata).float().to(raw.device)
                for i, t in enumerate(self.transforms)]
        return torch.stack(cols, dim=1) if raw.shape[0] else raw.clone()

    def __repr__(self) -> str:
        return (
            "MultiReward(" + ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights.tolist())) + ")"
        )
