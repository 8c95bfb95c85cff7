"""One entry point over every guided sampler: ``guided_sample(method, ...)``.

Every method runs on the same base sampler (``step`` at ``noise_level``) from the same initial latents
and kernel noise, so methods differ only by their guidance; counts of model, VJP and reward evaluations
come back in ``GuidedOutput.counter``. Methods (:data:`GUIDANCE_METHODS`):

=========== ============================================================ ===================================
method      per prompt (``group_size = P`` particles)                    reward evaluations per prompt
=========== ============================================================ ===================================
none        the base sampler, the final sample scored                    P (reporting only)
best_of_n   P full samples, best kept                                    P
doob        DOIT-wrapped model (:mod:`samplers.guided.doob`), best kept  P * (M * guided steps + 1)
fk          FK steering, P particles                                     P * (resampling steps + 1)
svdd        SVDD-PM, M candidates per step, P chains, best kept          P * M * selection steps
=========== ============================================================ ===================================

DOIT's ``keep_simulated`` (with ``lookahead="rollout"``, whose candidates are completed into real samples with
known rewards): a particle is replaced by the best completed candidate it simulated when that one scored
higher, at no extra reward evaluation. The selection then searches as well as it steers; benchmarks report it
as its own row.

DOIT's ``resample_lambda`` (``lam > 0``, ``P > 1``, ``gamma > 0``): at each guided step, before the step is taken,
the ``P`` particles of a prompt are resampled (multinomial) by their simulated ``h = mean_m exp(lam r_m)``
(:func:`~samplers.guided.doob.doob_log_h`) over their ancestor's ``h`` at the previous guided step, the
incremental weight of twisted sequential Monte Carlo. The candidates that estimate ``grad log h`` estimate ``h``
too, so particles move to where the simulation found reward at no extra reward evaluation. DOIT's corrected move
is not importance-weighted against the base kernel, so with both the population is tilted further than
``exp(lam r)``: a search heuristic, not an exact sampler of the tilted target. The best-of-particles output does
not reweight the final particles. With ``keep_simulated`` each slot keeps the best candidate simulated in it, by
whichever particle occupied it (so with ``select="all"`` a row may return a candidate of its slot's earlier
particle; the best-of selection is over every candidate the prompt simulated either way).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from samplers.guided.baselines import _resample, best_of_n, fk_steering, svdd_sample
from samplers.guided.common import (
    EvalCounter,
    GuidedOutput,
    LatentReward,
    ModelFn,
    combine_rewards,
    counting_model,
    evaluate_reward,
    select_best,
)
from samplers.guided.doob import doob_log_h, doob_model_fn, pick_better
from samplers.parametrization import expand_like
from samplers.rollout import make_generators, rollout
from samplers.schedules import Schedule

__all__ = ["GUIDANCE_METHODS", "guided_sample"]

GUIDANCE_METHODS = {
    "none": "the unguided base sampler",
    "best_of_n": "best of group_size samples by the final reward",
    "doob": "DOIT: Doob h-transform correction estimated by simulation (one VJP per guided step)",
    "fk": "Feynman-Kac steering: particles resampled on intermediate rewards",
    "svdd": "SVDD-PM: per-step selection among candidates of the stochastic kernel",
}

_OPTIONS = {
    "none": (),
    "best_of_n": (),
    "doob": ("gamma", "num_candidates", "temperature", "window", "standardize", "antithetic", "lookahead",
             "select", "keep_simulated", "resample_lambda"),
    "fk": ("lam", "potential", "every", "window", "ess_threshold", "select"),
    "svdd": ("num_candidates", "alpha", "window", "lookahead"),
}


def guided_sample(
    method: str,
    model_fn: ModelFn,
    schedule: Schedule,
    initial_latents: torch.Tensor,
    reward_fn: LatentReward,
    *,
    step: str,
    noise_level: float,
    group_size: int = 1,
    seed: int = 0,
    sample_ids: Optional[Sequence[int]] = None,
    reward_weights: Optional[Sequence[float]] = None,
    options: Optional[Dict[str, Any]] = None,
    generator: Optional[Sequence[torch.Generator]] = None,
) -> GuidedOutput:
    """Sample ``initial_latents`` ``[B, *L]`` (contiguous groups of ``group_size`` per prompt) with
    ``method``.

    Noise: the kernel draws from per-sample generators seeded by ``(seed, sample_ids)``
    (:func:`samplers.rollout.make_generators`); candidates and resampling draw from separate streams, so
    ``doob`` with ``gamma = 0`` returns exactly the samples of ``none``. ``generator`` overrides the kernel's
    generators (pass the ones that drew ``initial_latents`` to continue their streams, as
    :func:`trainers.common.sample_batch` does). ``options`` are the method's
    keyword arguments (see ``_OPTIONS`` and each function); unknown ones are rejected.
    """
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance method {method!r}; valid methods: {sorted(GUIDANCE_METHODS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"method {method!r} takes options {list(_OPTIONS[method])}, got unknown {unknown}")
    B = initial_latents.shape[0]
    ids = list(range(B)) if sample_ids is None else list(sample_ids)
    dev = "cpu"
    kernel_gens = list(generator) if generator is not None else make_generators(seed, ids, device=dev)
    candidate_gens = make_generators(seed + 1_000_003, ids, device=dev)

    def draw_gens(keys):
        # resampling (FK, DOIT's resample_lambda) draws per prompt, keyed by its first particle's id, and SVDD's
        # selection per particle: a prompt's draws do not depend on its batch (one generator per call restarted at
        # every batch, and gave a prompt draws that depended on its neighbours)
        return make_generators(seed + 17, keys, device=dev)
    counter = EvalCounter()
    counted = counting_model(model_fn, counter)
    common = dict(reward_weights=reward_weights, counter=counter)

    if method == "best_of_n":
        return best_of_n(counted, schedule, initial_latents, reward_fn, group_size=group_size, step=step,
                         noise_level=noise_level, generator=kernel_gens, **common)
    if method == "fk":
        return fk_steering(counted, schedule, initial_latents, reward_fn, group_size=group_size, step=step,
                           noise_level=noise_level, generator=kernel_gens,
                           resample_generator=draw_gens(ids[::group_size]),
                           **options, **common)
    if method == "svdd":
        return svdd_sample(counted, schedule, initial_latents, reward_fn, group_size=group_size, step=step,
                           noise_level=noise_level, generator=candidate_gens, select_generator=draw_gens(ids),
                           kernel_generator=kernel_gens, **options, **common)
    select = options.pop("select", "best")
    if select not in ("best", "all"):
        raise ValueError(f"select must be 'best' or 'all', got {select!r}")
    pool = {} if options.pop("keep_simulated", False) else None
    lam = float(options.pop("resample_lambda", 0.0))
    if lam < 0 or (lam > 0 and group_size < 2):
        raise ValueError(f"resample_lambda must be >= 0 and needs group_size >= 2 particles per prompt, got "
                         f"{lam} with group_size={group_size}; set resample_lambda=0 or use more particles")
    if lam > 0 and options.get("gamma", 1.0) == 0:
        raise ValueError("resample_lambda > 0 resamples on DOIT's simulated candidates, which gamma = 0 does not "
                         "draw; set gamma > 0 or resample_lambda=0")
    fn, before, extras = counted, None, {}
    if method == "doob":
        twist = {} if lam > 0 else None
        fn = doob_model_fn(counted, schedule, reward_fn, step=step, noise_level=noise_level,
                           generator=candidate_gens, pool=pool, twist=twist, **options, **common)
        if twist is not None:
            before = _twist_resampler(twist, lam, group_size, draw_gens(ids[::group_size]), extras)
    traj = rollout(fn, schedule, initial_latents, step=step, noise_level=noise_level, generator=kernel_gens,
                   before_step=before)
    final = traj.final
    index = torch.arange(B, device=final.device)
    raw = evaluate_reward(reward_fn, final, index, counter)
    if pool:
        # keep_simulated: a particle is replaced by the best completed candidate it simulated, if better; the
        # two are compared on their common reward columns, then the prompt's particles on theirs
        pooled = pool["raw"].to(raw)
        pair = combine_rewards(torch.cat([raw, pooled]), reward_weights, torch.cat([index, index])).view(2, B)
        better = pick_better(pair[1], pair[0])
        final = torch.where(expand_like(better, final).bool(), pool["x"].to(final), final)
        raw = torch.where(expand_like(better, raw).bool(), pooled, raw)
    r = combine_rewards(raw, reward_weights, index // group_size)
    if select == "all" or group_size == 1:
        return GuidedOutput(final, r, counter, final, r, extras)
    best, best_r, idx = select_best(final, r, group_size)
    return GuidedOutput(best, best_r, counter, final, r, {**extras, "index": idx})


def _twist_resampler(twist: dict, lam: float, group_size: int, generator, extras: dict):
    """``before_step`` hook: at a guided step, resample each prompt's particles (with their model output, so
    duplicates draw their own kernel noise) by the simulated ``h`` of this step over their ancestor's at the
    previous guided step (``h_k / h_{k-1}``, the incremental weight of twisted SMC; ``h_0 = 1``).

    "Previous" is the last step that recorded candidates; a particle whose carried ``h`` is 0 counts as ``h = 1``.
    A prompt whose particles all have ``h = 0`` (every candidate NaN or -inf) keeps its particles. Records
    ``extras["ancestors"]`` (a list with the ``[B]`` ancestor indices of every guided step, identity for kept
    prompts) and ``extras["num_resampled_steps"]`` (its length).
    """
    state: Dict[str, torch.Tensor] = {}

    def before(i: int, x: torch.Tensor, out: torch.Tensor):
        if twist.get("step") != i:
            return x, out
        twist.pop("step")
        log_h = doob_log_h(twist.pop("rewards"), lam).to(x.device)
        if bool((log_h.isnan() | torch.isposinf(log_h)).any()):
            raise ValueError(f"resampling needs finite candidate rewards; lambda * reward overflowed or a reward was "
                             f"+inf (lambda={lam}): lower guidance.resample_lambda or bound the reward")
        prev = state.get("log_h", torch.zeros_like(log_h))
        log_w = log_h - torch.where(torch.isneginf(prev), torch.zeros_like(prev), prev)
        G = x.shape[0] // group_size
        none = torch.isneginf(log_w.view(G, group_size)).all(dim=1)
        log_w = torch.where(none.repeat_interleave(group_size), torch.zeros_like(log_w), log_w)
        idx = _resample(log_w, group_size, ~none, generator)
        state["log_h"] = log_h[idx]
        extras.setdefault("ancestors", []).append(idx)
        extras["num_resampled_steps"] = len(extras["ancestors"])
        return x[idx], out[idx]

    return before


def window_tuple(window: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """A config list ``[start, end]`` as a tuple (``None`` stays ``None``)."""
    return None if window is None else (int(window[0]), int(window[1]))
