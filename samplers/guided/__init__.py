"""Guided sampling with any (non-differentiable) reward: DOIT (a Doob h-transform wrapper of the model's
prediction function) and the best-of-N, FK-steering and SVDD baselines. See :mod:`samplers.guided.sample`
for the method table and :mod:`samplers.guided.common` for the reward contract."""

from samplers.guided.baselines import FK_POTENTIALS, best_of_n, fk_log_potential, fk_steering, svdd_sample
from samplers.guided.common import (
    EvalCounter,
    GuidedOutput,
    LatentReward,
    combine_rewards,
    counting_model,
    evaluate_reward,
    select_best,
)
from samplers.guided.doob import LOOKAHEADS, doob_model_fn, doob_weights, one_step_x0
from samplers.guided.sample import GUIDANCE_METHODS, guided_sample

__all__ = [
    "GUIDANCE_METHODS",
    "guided_sample",
    "doob_model_fn",
    "doob_weights",
    "one_step_x0",
    "LOOKAHEADS",
    "best_of_n",
    "fk_steering",
    "fk_log_potential",
    "FK_POTENTIALS",
    "svdd_sample",
    "EvalCounter",
    "GuidedOutput",
    "LatentReward",
    "combine_rewards",
    "counting_model",
    "evaluate_reward",
    "select_best",
]
