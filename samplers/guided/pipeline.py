"""Glue between generator adapters, image rewards and the guided samplers (used by ``diffalign sample``
and ``scripts/bench_guidance.py``). No I/O: tensors and adapters in, tensors out.

* :func:`adapter_model_fn`: a prediction function that accepts ``k`` stacked copies of the batch
  (DOIT's and SVDD's candidate batches) by repeating the prompt conditioning.
* :func:`latent_reward`: a latent reward ``(x0, sample_index) -> [N, R]`` that decodes with the adapter's
  VAE and scores the images with an image reward (a :class:`rewards.MultiReward` or any
  ``reward(images, prompts, metadata)``), always without gradient.
* :func:`guided_sample_prompts`: encode prompts, draw per-sample noise, run :func:`guided_sample`, decode and
  score the results with the full reward matrix.
* :func:`method_options`: a :class:`diffalign.config.GuidanceConfig` section as a method's options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from samplers.guided.common import EvalCounter, LatentReward, ModelFn
from samplers.guided.sample import GUIDANCE_METHODS, guided_sample, window_tuple
from samplers.rollout import make_generators

__all__ = ["adapter_model_fn", "latent_reward", "guided_sample_prompts", "GuidedImages", "method_options",
           "reward_columns", "resolve_kernel", "MethodResult", "compare_methods", "format_table"]


def adapter_model_fn(adapter: Any, cond: Any, guidance_scale: float) -> ModelFn:
    """``adapter.predict`` with ``cond`` bound, for inputs of ``k * B`` rows (row ``m * B + b`` is sample
    ``b``): the conditioning is concatenated ``k`` times, once per ``k``."""
    from diffalign.generators.base import Conditioning

    B = cond.batch_size
    cache = {1: cond}

    def fn(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        if n % B:
            raise ValueError(f"model input has {n} rows, not a multiple of the {B} encoded prompts")
        k = n // B
        if k not in cache:
            cache[k] = Conditioning.cat([cond] * k)
        return adapter.predict(x_t, timestep, cache[k], guidance_scale)

    return fn


def reward_columns(out: Any) -> torch.Tensor:
    """``[N]`` or ``[N, R]`` float32 from a reward result (MultiRewardOutput, RewardOutput or a tensor)."""
    if hasattr(out, "rewards"):
        return out.rewards.float()
    if hasattr(out, "scores"):
        return torch.as_tensor(out.scores).float()
    return torch.as_tensor(out).float()


def latent_reward(
    adapter: Any,
    reward: Any,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    metadata: Optional[Sequence[Dict[str, Any]]] = None,
    decode_batch_size: int = 64,
) -> LatentReward:
    """A latent reward for the guided samplers: ``sample_index`` picks each row's prompt (and metadata).

    Decoding and scoring run under ``torch.no_grad`` on detached latents: the reward is never
    differentiated, whatever it is.
    """
    prompts = list(prompts)

    def fn(x0: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x0 = x0.detach().to(adapter.device)
            chunks = [x0[i:i + decode_batch_size] for i in range(0, x0.shape[0], decode_batch_size)]
            images = torch.cat([adapter.decode(c, height=height, width=width).float() for c in chunks])
            rows = sample_index.tolist()
            ps = [prompts[j] for j in rows]
            md = [dict(metadata[j]) if metadata is not None else {"prompt": prompts[j]} for j in rows]
            return reward_columns(reward(images, ps, md)).to(x0.device)

    return fn


#: noise-stream ids of a prompt's particles: ``prompt_id * PARTICLE_STRIDE + j`` (see guided_sample_prompts)
PARTICLE_STRIDE = 1 << 16


@dataclass
class GuidedImages:
    """One batch of prompts sampled with a guided method.

    Attributes:
        images: ``[n, 3, H, W]`` in ``[0, 1]``, one per prompt (every particle with ``select="all"``).
        rewards: ``[n, R]`` the full reward matrix of ``images`` (an evaluation, not counted in ``counter``).
        counter: model / VJP / reward evaluations spent by the method (its own reward calls only).
        wall_s: seconds spent in the method (sampling and its reward calls; not the final scoring).
    """

    images: torch.Tensor
    rewards: torch.Tensor
    counter: EvalCounter
    wall_s: float


def guided_sample_prompts(
    adapter: Any,
    prompts: Sequence[str],
    reward: Any,
    method: str,
    *,
    prompt_ids: Sequence[int],
    seed: int,
    num_steps: int,
    guidance_scale: float,
    negative_prompt: str,
    height: int,
    width: int,
    step: str,
    noise_level: float,
    group_size: int = 1,
    options: Optional[Dict[str, Any]] = None,
    reward_weights: Optional[Sequence[float]] = None,
) -> GuidedImages:
    """Sample ``prompts`` with ``method`` using ``group_size`` particles each, and score the results.

    Particle ``j`` of prompt ``i`` gets the noise stream of sample id ``prompt_ids[i] * PARTICLE_STRIDE + j``,
    whatever the method's number of particles, so a prompt's particles are the same whatever the batching, and
    particle ``j`` starts from the same noise in every method that has one (the unguided sample of a prompt is
    particle 0 of its best-of-N, which therefore never scores below it).
    """
    if group_size > PARTICLE_STRIDE:
        raise ValueError(f"group_size={group_size}: at most {PARTICLE_STRIDE} particles per prompt")
    rows: List[str] = [p for p in prompts for _ in range(group_size)]
    row_ids = [int(pid) * PARTICLE_STRIDE + j for pid in prompt_ids for j in range(group_size)]
    if reward_weights is None and hasattr(reward, "weights"):
        reward_weights = [float(w) for w in reward.weights]
    with torch.no_grad():
        cond = adapter.encode_prompts(rows, negative_prompt, guidance_scale, height=height, width=width)
        gens = make_generators(seed, row_ids, device="cpu")
        noise = adapter.prepare_latents(len(rows), height, width, generator=gens).to(adapter.device)
    schedule = adapter.make_schedule(num_steps, height, width)
    model_fn = adapter_model_fn(adapter, cond, guidance_scale)
    reward_fn = latent_reward(adapter, reward, rows, height=height, width=width)
    start = time.perf_counter()
    out = guided_sample(method, model_fn, schedule, noise, reward_fn, step=step, noise_level=noise_level,
                        group_size=group_size, seed=seed, sample_ids=row_ids, reward_weights=reward_weights,
                        options=options, generator=gens)
    wall = time.perf_counter() - start
    n_out = out.samples.shape[0]
    out_prompts = list(prompts) if n_out == len(prompts) else rows
    with torch.no_grad():
        images = adapter.decode(out.samples.to(adapter.device), height=height, width=width).float()
        scores = reward_columns(reward(images, out_prompts, [{"prompt": p} for p in out_prompts]))
    if scores.ndim == 1:
        scores = scores[:, None]
    return GuidedImages(images, scores, out.counter, wall)


def method_options(method: str, cfg: Any) -> Dict[str, Any]:
    """The options of ``method`` from a :class:`diffalign.config.GuidanceConfig`-like section."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance method {method!r}; valid methods: {sorted(GUIDANCE_METHODS)}")
    window = window_tuple(cfg.window)
    if method == "doob":
        return dict(gamma=cfg.gamma, num_candidates=cfg.num_candidates, temperature=cfg.temperature,
                    window=window, standardize=cfg.standardize, antithetic=cfg.antithetic,
                    lookahead=cfg.lookahead, select=cfg.select, keep_simulated=cfg.keep_simulated,
                    resample_lambda=cfg.resample_lambda)
    if method == "fk":
        return dict(lam=cfg.fk_lambda, potential=cfg.fk_potential, every=cfg.fk_every, window=window,
                    ess_threshold=cfg.fk_ess_threshold, select=cfg.select)
    if method == "svdd":
        return dict(num_candidates=cfg.num_candidates, alpha=cfg.svdd_alpha, window=window,
                    lookahead=cfg.svdd_lookahead)
    return {}


def resolve_kernel(adapter_kind: str, step: Optional[str], noise_level: Optional[float],
                   sample_step: str, sample_noise_level: float) -> tuple:
    """``(step, noise_level)`` of the guided sampler: the guidance section's, else the sample section's;
    a diffusion (``vp``) model always uses ``ddim``; the deterministic ``flow_euler`` becomes ``flow_sde``."""
    if step is not None and step.startswith("flow_") and adapter_kind != "flow":
        from diffalign.config import ConfigError

        raise ConfigError(f"got {step!r}, a flow-matching step, but the model is a {adapter_kind!r} diffusion "
                          "model; use guidance.step=ddim (noise_level = eta) or leave it null", key="guidance.step")
    step = step or sample_step
    if adapter_kind != "flow":  # the sample section's default (flow_sde) on a diffusion model: its DDIM kernel
        step = "ddim"
    elif step == "flow_euler":
        step = "flow_sde"
    level = sample_noise_level if noise_level is None else noise_level
    return step, float(level)


@dataclass
class MethodResult:
    """Totals of one method over all prompts: ``images [n, 3, H, W]``, ``rewards [n, R]``, counts, seconds."""

    method: str
    images: torch.Tensor
    rewards: torch.Tensor
    counter: EvalCounter
    wall_s: float
    num_prompts: Optional[int] = None  # None: one image per prompt (``select="all"`` gives one per particle)
    #: reward entries that failed (and were set to NaN) under ``on_error: skip``, per reward column: the
    #: method's own evaluations and the final scoring
    failures: Dict[str, int] = field(default_factory=dict)

    @property
    def prompts(self) -> int:
        return self.rewards.shape[0] if self.num_prompts is None else self.num_prompts

    def score(self, weights: Sequence[float]) -> torch.Tensor:
        """``[n]`` weighted reward of each image (NaN columns excluded, :func:`combine_rewards`). To compare
        methods use :func:`compared_scores`, which scores every method's images of a prompt on the same columns."""
        from samplers.guided.common import combine_rewards

        return combine_rewards(self.rewards, weights)


def compared_scores(results: Dict[str, MethodResult], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """``{method: [n]}`` weighted reward of each image, every method's images of one prompt scored on the same
    reward columns: a column that failed (NaN under ``on_error: skip``) on any of them is left out for all of
    them, as within a method's own selection (:func:`combine_rewards` with groups). Scored alone, a method whose
    remote judge went away would have its other columns scaled up to the total weight and head the table."""
    from samplers.guided.common import combine_rewards

    rows, groups, sizes = [], [], []
    for res in results.values():
        per = res.rewards.shape[0] // max(res.prompts, 1)  # images per prompt (select="all": one per particle)
        rows.append(res.rewards)
        groups.append(torch.arange(res.rewards.shape[0]) // max(per, 1))
        sizes.append(res.rewards.shape[0])
    if not rows:
        return {}
    scores = combine_rewards(torch.cat(rows), weights, groups=torch.cat(groups))
    return dict(zip(results, scores.split(sizes)))


def compare_methods(
    adapter: Any,
    prompts: Sequence[str],
    reward: Any,
    methods: Sequence[str],
    options: Dict[str, Dict[str, Any]],
    *,
    batch_size: int,
    group_size: Dict[str, int],
    method_of: Optional[Dict[str, str]] = None,
    on_result: Optional[Callable[[str, MethodResult], None]] = None,
    first_prompt_id: int = 0,
    **sample_kwargs: Any,
) -> Dict[str, MethodResult]:
    """Run every method on the same prompts (in batches of ``batch_size`` prompts) and the same noise.

    ``first_prompt_id`` is the index of ``prompts[0]`` in the whole prompt set (a process's share of it under
    ``diffalign sample`` on several processes): prompt ``i`` draws the noise of prompt id ``first_prompt_id + i``.
    No prompts give empty results (``[0, 3, height, width]`` images, ``[0, R]`` rewards).

    ``methods`` are row labels: ``method_of[label]`` names the guidance method of a row (default: the label
    itself), so one method can appear in several rows with other options (``scripts/bench_guidance.py``).
    ``options[label]`` and ``group_size[label]`` per row; ``on_result(label, result)`` is called as each row
    finishes (progress lines in long comparisons); ``sample_kwargs`` go to :func:`guided_sample_prompts`
    (seed, num_steps, guidance_scale, negative_prompt, height, width, step, noise_level).
    """
    results: Dict[str, MethodResult] = {}
    method_of = method_of or {}
    for label in methods:
        method = method_of.get(label, label)
        images, rows, counter, wall = [], [], EvalCounter(), 0.0
        failed_before = dict(getattr(reward, "total_failures", {}))
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i:i + batch_size])
            ids = range(first_prompt_id + i, first_prompt_id + i + len(batch))
            out = guided_sample_prompts(adapter, batch, reward, method, prompt_ids=ids,
                                        group_size=group_size.get(label, 1), options=options.get(label, {}),
                                        **sample_kwargs)
            images.append(out.images.cpu())  # many rows of full-size images would fill an accelerator
            rows.append(out.rewards.cpu())
            for k, v in out.counter.as_dict().items():
                setattr(counter, k, getattr(counter, k) + v)
            wall += out.wall_s
        if not images:  # no prompts (an empty share of a multi-process run)
            images = [torch.zeros(0, 3, sample_kwargs["height"], sample_kwargs["width"])]
            rows = [torch.zeros(0, len(getattr(reward, "names", [None])))]
        failures = {n: k - failed_before.get(n, 0) for n, k in getattr(reward, "total_failures", {}).items()}
        results[label] = MethodResult(method, torch.cat(images), torch.cat(rows), counter, wall, len(prompts),
                                      {n: k for n, k in failures.items() if k})
        if on_result is not None:
            on_result(label, results[label])
    return results


def _common_means(results: Dict[str, MethodResult], values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``{method: mean}`` of per-image ``values`` over the prompts where they are finite in every method (NaN
    where none is): a method whose reward failed on a hard prompt is not averaged over easier prompts only."""
    per_prompt = {}
    for m, res in results.items():
        v = values[m].float().cpu()
        per_prompt[m] = torch.isfinite(v).view(max(res.prompts, 1), -1).all(dim=1) if v.numel() else None
    masks = [k for k in per_prompt.values() if k is not None]
    common = torch.stack(masks).all(dim=0) if masks and len({k.shape for k in masks}) == 1 else None
    out = {}
    for m, res in results.items():
        v = values[m].float().cpu()
        if common is None or not v.numel():
            out[m] = float(torch.nanmean(v)) if v.numel() else float("nan")
            continue
        rows = common.repeat_interleave(v.shape[0] // common.shape[0])
        out[m] = float(v[rows].mean()) if bool(rows.any()) else float("nan")
    return out


def format_table(results: Dict[str, MethodResult], weights: Sequence[float], names: Sequence[str],
                 judged: Optional[Dict[str, torch.Tensor]] = None, judge_names: Sequence[str] = ()) -> str:
    """A markdown table: per method, evaluations per prompt, wall time and mean scores; ``judged[method]``
    ``[n, J]`` adds the mean of each judge column (``eval_rewards``, scored after sampling)."""
    head = ["method", "model evals/prompt", "VJPs/prompt", "reward evals/prompt", "wall s", "mean score"]
    head += [f"mean {n}" for n in names] if len(names) > 1 else []
    head += [f"judge {n}" for n in judge_names]
    failed = any(res.failures for res in results.values())
    head += ["reward failures"] if failed else []  # entries set to NaN under on_error: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    score = _common_means(results, compared_scores(results, weights))
    columns = [_common_means(results, {m: r.rewards[:, j] for m, r in results.items()}) for j in range(len(names))]
    judges = [_common_means(results, {m: judged[m][:, j] for m in results}) for j in range(len(judge_names))]
    for method, res in results.items():
        n = res.prompts  # evaluations per prompt, whatever the number of images kept per prompt
        c = res.counter
        cells = [method, f"{c.model_evals / n:.0f}", f"{c.vjp_evals / n:.0f}", f"{c.reward_evals / n:.0f}",
                 f"{res.wall_s:.1f}", f"{score[method]:.4f}"]
        if len(names) > 1:
            cells += [f"{col[method]:.4f}" for col in columns]
        cells += [f"{col[method]:.4f}" for col in judges]
        if failed:
            cells.append(", ".join(f"{name} {k}" for name, k in res.failures.items()) or "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
