"""Pure sampler math: schedules, step functions with log-probs, rollout, guided sampling."""

from samplers.parametrization import to_x0_eps, x0_eps_to_model_output  # noqa: F401
from samplers.rollout import make_generators, rollout, score_steps, stochastic_mask  # noqa: F401
from samplers.schedules import (  # noqa: F401
    Schedule,
    flow_schedule,
    flow_schedule_from_scheduler_config,
    flow_sigmas,
    vp_schedule,
)
from samplers.steps import (  # noqa: F401
    DETERMINISTIC_STEP,
    STEPS,
    ddim_step,
    flow_cps_step,
    flow_euler_step,
    flow_sde_step,
    gaussian_log_prob,
    scheduled_step,
)
from samplers.guided import (  # noqa: F401,E402
    GUIDANCE_METHODS,
    best_of_n,
    doob_model_fn,
    fk_steering,
    guided_sample,
    svdd_sample,
)
