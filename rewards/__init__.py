"""Rewards: registry, built-in rewards, reward transforms, multi-reward evaluation, remote client/server.

A reward is a callable ``reward(images [B,3,H,W] in [0,1], prompts, metadata) -> RewardOutput | Tensor[B]``
with attributes ``name, differentiable, trainable, range, allows_nan, batch_size, device`` (see
:mod:`rewards.base`). Build one from a config entry with :func:`build_reward`, several with
:class:`MultiReward` (-> a ``[B, R]`` matrix; NaN = not applicable). See ``rewards/README.md`` for the table
of built-in rewards and how to add one. Importing this package loads no model and needs no network.
"""

# Built-in rewards register themselves on import (each module imports its heavy dependencies lazily).
from rewards import (  # noqa: E402,F401
    aesthetic, clip, colorfulness, contrast, dino, imagereward, jpeg, ocr, remote, shapes,
)
from rewards.base import FunctionReward, Reward, RewardError, RewardOutput, score_in_batches
from rewards.multi import MultiReward, MultiRewardOutput, weighted_sum
from rewards.registry import (
    REWARDS,
    RewardSpec,
    build_reward,
    get_factory,
    parse_reward_specs,
    register_reward,
    reward_factory,
)
from rewards.remote import RemoteReward, RewardServer, add_serve_reward_parser, serve_main, serve_reward  # noqa: E402
from rewards.transforms import TRANSFORMS, build_transform

__all__ = [
    "REWARDS",
    "TRANSFORMS",
    "Reward",
    "RewardError",
    "RewardOutput",
    "RewardSpec",
    "FunctionReward",
    "MultiReward",
    "MultiRewardOutput",
    "RemoteReward",
    "RewardServer",
    "add_serve_reward_parser",
    "build_reward",
    "build_transform",
    "get_factory",
    "parse_reward_specs",
    "register_reward",
    "reward_factory",
    "score_in_batches",
    "serve_main",
    "serve_reward",
    "weighted_sum",
]
