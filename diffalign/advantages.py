"""Group-relative advantages (pure functions and small stateful trackers).

GRPO estimates the baseline of a sample's reward from the other samples drawn for the same prompt
(Flow-GRPO, arXiv 2505.05470, eq. (4); DeepSeekMath GRPO): ``A_i = (r_i - mean_group) / (std + eps)``.
Where the std comes from is a choice: the group itself, the whole gathered batch (Flow-GRPO's
``global_std=True``, its default), or a running estimate across epochs.

NaN rewards mean "not applicable" (DESIGN.md): they are excluded from every statistic and get
advantage 0, so they neither push nor pull the policy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "STD_MODES",
    "GroupAdvantages",
    "group_ids_from_keys",
    "group_advantages",
    "RunningMoments",
    "PerPromptStatTracker",
    "AGGREGATIONS",
    "per_reward_advantages",
    "gdpo_advantages",
    "MultiRewardAdvantages",
    "multi_reward_advantages",
]

STD_MODES = ("group", "batch", "global")


@dataclass
class GroupAdvantages:
    """Result of :func:`group_advantages`.

    Attributes:
        advantages: ``[N]`` float32, clipped to ``[-clip, clip]``; 0 for NaN rewards and (optionally)
            for samples of zero-std groups.
        keep: ``[N]`` bool, False for samples a trainer should drop (zero-std groups when requested).
        zero_std_fraction: fraction of groups whose rewards are all equal, over the groups with at least one finite
            reward; NaN when no group has one (all rewards NaN: there is nothing to call equal or not).
        group_std_mean: mean within-group std (a diagnostic of reward resolution), over the same groups; NaN when
            there is none. (NaN metrics are logged as null in metrics.jsonl and left out of plots.)
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    zero_std_fraction: float
    group_std_mean: float


def group_ids_from_keys(keys: Sequence) -> torch.Tensor:
    """``[N]`` long ids, equal for equal keys (prompts), numbered in order of first appearance."""
    table: Dict = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.long)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std_mode: str = "batch",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    drop_zero_std: bool = False,
    global_std: Optional[float] = None,
) -> GroupAdvantages:
    """Per-group normalised advantages of scalar rewards ``[N]`` (Flow-GRPO §1.3, research/grpo_family.md).

    Args:
        rewards: ``[N]`` float rewards; NaN entries are ignored and get advantage 0.
        group_ids: ``[N]`` long group index (samples of one prompt share an id).
        std_mode: ``"group"`` (std within each group), ``"batch"`` (std of all valid rewards in the batch,
            Flow-GRPO's default) or ``"global"`` (``global_std`` supplied by a :class:`RunningMoments`).
        eps: added to the std (Flow-GRPO uses 1e-4).
        clip: advantages are clipped to ``[-clip, clip]`` (5 in Flow-GRPO / DDPO); None disables.
        drop_zero_std: mark samples of groups whose rewards are all equal as not kept.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    r = rewards.detach().double().cpu()
    g = group_ids.cpu()
    if r.ndim != 1 or g.shape != r.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(r.shape)} and {tuple(g.shape)}")
    valid = ~torch.isnan(r)
    adv = torch.zeros_like(r)
    keep = valid.clone()
    if std_mode == "batch":
        denom_all = (r[valid].std(unbiased=False) if valid.sum() > 1 else torch.tensor(0.0)).item()
    elif std_mode == "global":
        if global_std is None:
            raise ValueError("std_mode='global' needs global_std (from a RunningMoments tracker)")
        denom_all = float(global_std)
    n_groups, n_zero, stds = 0, 0, []
    for gid in torch.unique(g):
        members = (g == gid) & valid
        if members.sum() == 0:
            continue
        vals = r[members]
        n_groups += 1
        std = vals.std(unbiased=False).item() if vals.numel() > 1 else 0.0
        stds.append(std)
        zero = std == 0.0
        n_zero += int(zero)
        denom = std if std_mode == "group" else denom_all
        centred = vals - vals.mean()
        adv[members] = centred / (denom + eps) if denom + eps > 0 else torch.zeros_like(centred)
        if zero and drop_zero_std:
            keep[members] = False
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv[~keep] = 0.0
    return GroupAdvantages(
        advantages=adv.float(),
        keep=keep,
        zero_std_fraction=n_zero / n_groups if n_groups else math.nan,
        group_std_mean=float(np.mean(stds)) if stds else math.nan,
    )


class RunningMoments:
    """Running mean/std of all rewards seen so far (Chan et al. parallel variance); checkpointable."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().cpu()
        v = v[~torch.isnan(v)]
        if v.numel() == 0:
            return
        n, mean, m2 = v.numel(), v.mean().item(), ((v - v.mean()) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 0.0

    def state_dict(self) -> Dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class PerPromptStatTracker:
    """DDPO's per-prompt statistics (ddpo-pytorch ``stat_tracking.py``; research/grpo_family.md §3.2).

    Each prompt keeps a buffer of its last ``buffer_size`` rewards that persists across epochs; while a
    prompt has fewer than ``min_count`` rewards the batch mean/std is used instead.
    ``A = (r - mean) / (std + eps)``.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: Dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this batch's rewards and return ``[N]`` float32 advantages (0 for NaN rewards)."""
        r = rewards.detach().double().cpu()
        valid = ~torch.isnan(r)
        batch_mean = r[valid].mean().item() if valid.any() else 0.0
        batch_std = r[valid].std(unbiased=False).item() if valid.sum() > 1 else 0.0
        adv = torch.zeros_like(r)
        for prompt in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt and bool(valid[i])]
            if not idx:
                continue
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                arr = np.asarray(buf)
                mean, std = arr.mean(), arr.std()
            adv[idx] = (r[idx] - mean) / (std + self.eps)
        return adv.float()

    def state_dict(self) -> Dict:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: Dict) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


# ----------------------------------------------------------------------------------------- several rewards

#: how the columns of a ``[N, R]`` reward matrix become advantages (``train.aggregation``)
AGGREGATIONS = ("weighted_sum", "gdpo", "marble")


def per_reward_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
) -> torch.Tensor:
    """``[N, R]`` group-normalised advantages of each reward column on its own (GDPO step 1; MARBLE's
    independent per-reward advantage ``A_k``, seed_algorithms.md §6.2). NaN entries get 0 in their column."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, R], got shape {tuple(rewards.shape)}")
    cols = [group_advantages(rewards[:, k], group_ids, std_mode=std_mode, eps=eps, clip=clip).advantages
            for k in range(rewards.shape[1])]
    return torch.stack(cols, dim=1)


def gdpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: Sequence[float],
    *,
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
) -> torch.Tensor:
    """``[N]`` GDPO advantages (NVIDIA, arXiv 2601.05242; seed_algorithms.md §7.1).

    Each reward is normalised within its group (``(r - mean_g) / (std_g + eps)``, group std), the columns are
    summed with ``weights``, and the sum is whitened over the batch (``(s - mean) / (std + eps)``; the paper
    reports training failures without this step) over the rows with at least one reward (a row whose rewards
    are all NaN gets 0 and is not in the statistics). Clipping comes last.
    """
    per = per_reward_advantages(rewards, group_ids, std_mode="group", eps=eps, clip=None).double()
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (rewards.shape[1],):
        raise ValueError(f"need {rewards.shape[1]} weights for {rewards.shape[1]} reward columns, got {tuple(w.shape)}")
    summed = per @ w
    valid = ~torch.isnan(rewards).all(dim=1)  # a row with no reward at all is not in the batch statistics
    s = summed[valid]
    std = s.std(unbiased=False) if s.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    mean = s.mean() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    adv = torch.where(valid, (summed - mean) / (std + eps), torch.zeros_like(summed))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()


@dataclass
class MultiRewardAdvantages:
    """Result of :func:`multi_reward_advantages`.

    Attributes:
        advantages: ``[N]`` (weighted_sum, gdpo) or ``[N, R]`` (marble: one column per reward).
        keep: ``[N]`` bool, samples to train on.
        combined: ``[N]`` the weighted-sum reward (logged in every mode).
        stats: scalar diagnostics (``zero_std_fraction``, ``group_std_mean`` where defined).
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    combined: torch.Tensor
    stats: Dict[str, float]


def multi_reward_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: Sequence[float],
    *,
    aggregation: str = "weighted_sum",
    std_mode: str = "batch",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    drop_zero_std: bool = False,
    global_std: Optional[float] = None,
) -> MultiRewardAdvantages:
    """Advantages of a ``[N, R]`` reward matrix under one of :data:`AGGREGATIONS`.

    * ``weighted_sum`` (Flow-GRPO / DiffusionNFT): weighted sum of the columns (NaN renormalised, see
      :func:`rewards.weighted_sum`), then :func:`group_advantages` with ``std_mode``.
    * ``gdpo``: :func:`gdpo_advantages`.
    * ``marble``: :func:`per_reward_advantages` with ``std_mode`` (``global`` falls back to ``batch``); the
      trainer harmonises the per-reward gradients. Reward weights are not used (MARBLE learns them).
    """
    from rewards import weighted_sum

    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    combined = weighted_sum(rewards, torch.as_tensor(list(weights), dtype=torch.float32), groups=group_ids)
    if aggregation == "weighted_sum":
        res = group_advantages(combined, group_ids, std_mode=std_mode, eps=eps, clip=clip,
                               drop_zero_std=drop_zero_std, global_std=global_std)
        return MultiRewardAdvantages(res.advantages, res.keep, combined,
                                     {"zero_std_fraction": res.zero_std_fraction,
                                      "group_std_mean": res.group_std_mean})
    keep = ~torch.isnan(combined)
    if aggregation == "gdpo":
        adv = gdpo_advantages(rewards, group_ids, weights, eps=eps, clip=clip)
        return MultiRewardAdvantages(adv * keep, keep, combined, {})
    mode = "batch" if std_mode == "global" else std_mode
    adv = per_reward_advantages(rewards, group_ids, std_mode=mode, eps=eps, clip=clip)
    return MultiRewardAdvantages(adv * keep[:, None], keep, combined, {})
