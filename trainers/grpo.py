"""GRPO for flow and diffusion models: Flow-GRPO (SDE rollouts) and DDPO-style (DDIM with eta).

* Flow-GRPO: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470.
  Policy loss eq. (6) (PPO clip on per-step Gaussian log-prob ratios, group-normalised advantages),
  KL to the reference in closed form on the step means, Flow-GRPO-Fast's random SDE window.
* DDPO: Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301,
  §4.3 (DDPO_IS): the same clipped surrogate on DDIM-eta transitions, per-prompt stat tracking,
  random timestep subsets per sample.

Layout (torchtune-style recipe): :class:`GRPOConfig` (the ``train`` section), :func:`grpo_loss` (pure),
:func:`select_train_steps` (pure), :class:`GRPOTrainer` (orchestration: setup / train / save / cleanup).
All details and defaults: research/grpo_family.md §1.3, §1.7, §3.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from diffalign.config import ConfigError, TrainLoopConfig, check, param, register_trainer_config
from diffalign.types import LossStats

__all__ = ["GRPOConfig", "grpo_loss", "kl_to_reference", "select_train_steps", "GRPOTrainer"]


@register_trainer_config("grpo")
@dataclass
class GRPOConfig(TrainLoopConfig):
    """The ``train`` section of a GRPO run (defaults: Flow-GRPO's SD3.5 recipe, grpo_family.md §1.7)."""

    num_epochs: int = param(100, help="epochs (one epoch = sample, score, train)", min=1)
    batch_size: int = param(8, help="training minibatch per process (keep = sample.batch_size for ratio 1)", min=1)
    shuffle: bool = param(True, help="shuffle samples between minibatches (off: rollout batches = minibatches)")
    clip_range: float = param(1e-4, help="PPO clip epsilon on the importance ratio (per-dim-mean log-probs)")
    adv_clip_max: float = param(5.0, help="advantages are clipped to [-adv_clip_max, adv_clip_max]", min=0.0)
    beta: float = param(0.0, help="KL-to-reference weight (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore)", min=0.0)
    kl_form: Literal["auto", "flow_grpo", "gaussian", "velocity"] = param(
        "auto",
        help="flow_grpo: |mu - mu_ref|^2 / (2 g^2) (Flow-GRPO code); gaussian: exact transition KL "
        "|mu - mu_ref|^2 / (2 std^2); velocity: |v - v_ref|^2 (no-CFG recipe); auto: flow_grpo for "
        "flow_sde, gaussian otherwise",
    )
    timestep_fraction: float = param(
        0.99, help="fraction of the trajectory's T steps trained (int(T * f)), among its stochastic ones: first "
        "trains the stochastic steps before int(T * f) (0.99 of 10: steps 0-8, never the last), random that many",
        min=0.0, max=1.0,
    )
    timestep_selection: Literal["first", "random"] = param(
        "first", help="first: the first steps in order (Flow-GRPO); random: a per-sample random subset (DDPO)"
    )
    advantage: Literal["group", "per_prompt_tracker"] = param(
        "group", help="group: statistics of each prompt's group in this epoch; per_prompt_tracker: DDPO's buffers"
    )
    std_mode: Literal["group", "batch", "global"] = param(
        "batch", help="std of the advantage: within the group, of the gathered batch (Flow-GRPO), or running"
    )
    aggregation: Literal["weighted_sum", "gdpo", "marble"] = param(
        "weighted_sum", help="multi-reward aggregation: weighted_sum (sum, then normalise), gdpo (normalise each "
        "reward per group, weighted-sum, whiten), marble (per-reward gradients combined by the min-norm QP every "
        "step, diffalign.balance)")
    marble_grad_ema: float = param(
        0.0, help="aggregation=marble: solve the QP on moving averages of the per-reward gradients with this decay "
        "(MoCo-style tracking, as trainer nft's knob); 0 = each update's gradients (MARBLE)", min=0.0, max=0.999)
    drop_zero_std_groups: bool = param(
        False, help="do not train on groups whose rewards are all equal: they leave the loss's average (policy and "
        "KL), as Flow-GRPO's zero-advantage filtering; an update with no other group makes no optimizer step "
        "(train/empty_updates)")
    tracker_buffer_size: int = param(16, help="per_prompt_tracker: rewards kept per prompt", min=1)
    tracker_min_count: int = param(16, help="per_prompt_tracker: below this use batch statistics", min=1)

    def validate_run(self, run) -> None:
        s = run.sample
        self.validate_loop()
        check(self.clip_range > 0, "train.clip_range",
              f"got {self.clip_range}; the PPO clip range must be > 0 (Flow-GRPO: 1e-4, DDPO: 1e-4)")
        check(self.adv_clip_max > 0, "train.adv_clip_max",
              f"got {self.adv_clip_max}; 0 clips every advantage to 0 and nothing is learned: use e.g. 5")
        check(self.timestep_fraction > 0, "train.timestep_fraction",
              f"got {self.timestep_fraction}; a fraction > 0 of the trajectory's steps is trained (e.g. 0.99 or 1.0)")
        check(s.group_size >= 2, "sample.group_size", f"got {s.group_size}; GRPO needs >= 2 images per prompt")
        check(s.step != "flow_euler" and s.noise_level > 0, "sample.noise_level",
              f"GRPO needs stochastic steps; got step={s.step!r} noise_level={s.noise_level}")
        check(self.aggregation == "weighted_sum" or self.advantage == "group", "train.aggregation",
              f"{self.aggregation!r} needs train.advantage='group' (got {self.advantage!r})")
        check(self.marble_grad_ema == 0 or self.aggregation == "marble", "train.marble_grad_ema",
              f"got {self.marble_grad_ema} with aggregation={self.aggregation!r}; tracked reward gradients are "
              "MARBLE's: set train.aggregation=marble or train.marble_grad_ema=0")
        check(not self.drop_zero_std_groups or (self.aggregation == "weighted_sum" and self.advantage == "group"),
              "train.drop_zero_std_groups", f"dropping zero-std groups needs train.aggregation=weighted_sum and "
              f"train.advantage=group (got {self.aggregation!r}, {self.advantage!r}); set it to false")
        check(self.beta == 0 or run.model.lora.enabled, "train.beta",
              f"got {self.beta} with model.lora.enabled=false; the KL's reference is the adapter-disabled base "
              "model, which full fine-tuning does not keep: enable LoRA or set train.beta=0")


# ----------------------------------------------------------------------------------------- pure math


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    denominator: Optional[float] = None,
) -> Tuple[torch.Tensor, LossStats]:
    """Clipped surrogate of one trained timestep (Flow-GRPO eq. (6); DDPO §4.3), averaged over the batch.

    ``ratio = exp(logp - logp_old)``; ``L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + beta KL``.
    Log-probs are the per-dim-mean convention of :mod:`diffalign.types`, which is why ``eps`` is ~1e-4.
    ``mask`` (``[B]`` bool): sum the policy and KL terms over these samples only and divide by ``denominator``
    (default: their number), so dropped samples do not dilute the average (Flow-GRPO's zero-advantage filtering
    removes them from training: research/grpo_family.md §1.3); a minibatch with none contributes 0. The trainer
    passes the kept count of the whole accumulation window (over its minibatches), so every kept sample of an
    update weighs the same, as if the dropped ones had been removed and the rest re-batched. The diagnostics
    (``approx_kl``, ``clip_frac``, ``ratio_mean``) are means over the kept samples as well (NaN when none).
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)

    def mean(x: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return x.mean()
        m = mask.to(x.dtype)
        den = m.sum().clamp_min(1.0) if denominator is None else torch.as_tensor(max(float(denominator), 1e-12))
        return (x * m).sum() / den

    policy = mean(torch.maximum(unclipped, clipped))
    kl_loss = mean(kl) if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy + beta * kl_loss
    with torch.no_grad():
        # diagnostics over the trained (kept) samples only; a minibatch without any gives NaN (skipped by the trainer)
        kept = torch.ones_like(ratio) if mask is None else mask.to(ratio.dtype)

        def diag(x: torch.Tensor) -> torch.Tensor:
            return (x.detach() * kept).sum() / kept.sum() if bool(kept.sum() > 0) else torch.full_like(x[0], math.nan)

        stats = LossStats(
            loss=loss.detach(),
            policy_loss=policy.detach(),
            kl_loss=kl_loss.detach(),
            approx_kl=diag(0.5 * log_ratio ** 2),
            clip_frac=diag(((ratio - 1.0).abs() > clip_range).to(ratio.dtype)),
            ratio_mean=diag(ratio),
        )
    return loss, stats


def kl_to_reference(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    *,
    form: str,
    g: Optional[torch.Tensor] = None,
    velocity: Optional[torch.Tensor] = None,
    ref_velocity: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B]`` KL of one step to the reference policy (same std, so only the means differ).

    * ``gaussian``: ``mean_dims (mu - mu_ref)^2 / (2 std^2)``, the exact per-dim KL of the two transitions.
    * ``flow_grpo``: ``mean_dims (mu - mu_ref)^2 / (2 g^2)`` as Flow-GRPO's code (no ``|dt|``; its beta is
      tuned for this, issue flow_grpo#78).
    * ``velocity``: ``mean_dims (v - v_ref)^2`` (the no-CFG recipe, flow_grpo#198).
    """
    dims = tuple(range(1, mean.ndim))
    if form == "velocity":
        return ((velocity.float() - ref_velocity.float()) ** 2).mean(dim=dims)
    diff2 = ((mean.float() - ref_mean.float()) ** 2).mean(dim=dims)
    scale = g if form == "flow_grpo" else std
    if scale is None:
        raise ValueError(f"kl_form={form!r} needs the step's {'g' if form == 'flow_grpo' else 'std'}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=mean.device).reshape(-1)
    return diff2 / (2 * scale**2)


def check_noisy_windows(schedule, sample) -> None:
    """Refuse a window that can fall on the last step alone where that step draws no noise (``flow_cps``, and
    ``ddim`` into a final noise level of 0: their std is proportional to the next state's noise), before any epoch
    runs: that epoch had no stochastic step to train. A random window fell there in some epochs only, hours into a
    run, and a resume drew the same window again. (A deterministic sampler is refused by the config.)"""
    T = sample.num_steps
    if sample.step not in ("flow_cps", "ddim") or float(schedule.sigmas[-1]) != 0.0:
        return
    if sample.random_window is not None:
        if sample.drawn_window_length == 1 and sample.random_window[1] == T:
            lo = sample.random_window[0]
            raise ConfigError(f"got {list(sample.random_window)}: a one-step window drawn there can be the last step, "
                              f"which {sample.step} takes into noise level 0 without noise, leaving that epoch "
                              f"nothing to train; use [{lo}, {T - 1}]", key="sample.random_window")
        return
    if sample.window is not None and list(sample.window) == [T - 1, T]:
        raise ConfigError(f"got {list(sample.window)}: the last step, which {sample.step} takes into noise level 0 "
                          f"without noise, so there is nothing to train; use e.g. [{max(0, T - 3)}, {T - 1}]",
                          key="sample.window")
    if sample.window is None and T == 1:
        raise ConfigError(f"got 1: the only step, which {sample.step} takes into noise level 0 without noise, so "
                          "there is nothing to train; use 2 or more steps, or step=flow_sde", key="sample.num_steps")


def select_train_steps(
    stochastic: torch.Tensor,
    num_samples: int,
    *,
    fraction: float,
    mode: str,
    generator: Optional[torch.Generator] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """``[N, K]`` long: the trained step indices of each sample (research/grpo_family.md §1.3, §3.2).

    The fraction applies to the trajectory, as in both reference codes (``int(num_steps * fraction)`` of its
    ``T`` steps): ``first`` trains the stochastic steps before step ``int(T * fraction)`` in order for every sample
    (Flow-GRPO: 0.99 of 10 trains steps 0-8, never the last; a Flow-GRPO-Fast window inside them is trained
    whole); ``random`` trains ``min(#stochastic, int(T * fraction))`` stochastic steps drawn per sample (DDPO), from
    ``generators[i]`` for sample ``i`` when given (one per sample, so a sample's steps do not depend on its batch
    or process), else from ``generator``. At least one step is trained. (Before, the fraction applied to the
    stochastic steps alone, so 0.99 also dropped the last step of a window, or a second step where the last one is
    deterministic: ``flow_cps``, DDIM into sigma 0.)
    """
    cand = torch.nonzero(stochastic, as_tuple=False).flatten()
    if cand.numel() == 0:
        raise ValueError("no stochastic steps to train; check sample.window / sample.noise_level")
    limit = int(stochastic.numel() * fraction)
    if mode == "first":
        chosen = cand[cand < limit]
        chosen = chosen if chosen.numel() else cand[:1]
        return chosen.expand(num_samples, chosen.numel()).clone()
    k = min(cand.numel(), max(1, limit))
    if mode == "random":
        if generators is not None and len(generators) != num_samples:
            raise ValueError(f"generators: {len(generators)} given for {num_samples} samples; pass one per sample")
        gens = generators if generators is not None else [generator] * num_samples
        perms = torch.stack([torch.randperm(cand.numel(), generator=g) for g in gens])
        return cand[perms[:, :k]]
    raise ValueError(f"timestep_selection must be 'first' or 'random', got {mode!r}")


def resolve_kl_form(form: str, step: str) -> str:
    if form == "auto":
        return "flow_grpo" if step == "flow_sde" else "gaussian"
    if form == "flow_grpo" and step != "flow_sde":
        raise ValueError(f"train.kl_form='flow_grpo' needs sample.step='flow_sde' (got {step!r}); use 'gaussian'")
    return form


# ----------------------------------------------------------------------------------------- trainer


class GRPOTrainer:
    """Online GRPO recipe: ``setup()``, ``train()``, ``save_checkpoint()``, ``cleanup()``."""

    def __init__(self, run_cfg, accelerator=None, pipeline=None) -> None:
        """``pipeline``: train this in-memory diffusers pipeline instead of loading ``run_cfg.model.path``
        (see :func:`trainers.common.build_adapter`)."""
        from diffalign.config import resolve_train_section

        self.run = run_cfg
        self.pipeline = pipeline
        self.cfg: GRPOConfig = resolve_train_section(run_cfg)
        self.cfg.check_batch_split(run_cfg.sample)  # a training rule: eval and sample may batch as they like
        self.accelerator = accelerator

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from diffalign.advantages import PerPromptStatTracker, RunningMoments
        from trainers.common import EMA, LossScaler, TrainingState, build_optimizer, claimed_setup, image_size, open_run

        run, cfg = self.run, self.cfg
        with claimed_setup(self, "GRPO") as claimed:
            if self.adapter.kind != "flow" and run.sample.step.startswith("flow_"):
                raise ConfigError(f"got {run.sample.step!r}, a flow-matching step, but {run.model.path!r} is a "
                                  f"{self.adapter.kind!r} diffusion model; use sample.step=ddim (noise_level = "
                                  "eta)",
                                  key="sample.step")
            self.height, self.width = image_size(self.adapter, run.sample)
            check_noisy_windows(self.adapter.make_schedule(run.sample.num_steps, self.height, self.width), run.sample)
            self.params = self.adapter.trainable_parameters()
            self.optimizer, self.lr_scheduler = build_optimizer(self.params, cfg)
            self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_every) if cfg.ema else None
            self.scaler = LossScaler(self.dtype == torch.float16, growth_interval=cfg.loss_scale_growth_interval)
            self.tracker = PerPromptStatTracker(cfg.tracker_buffer_size, cfg.tracker_min_count)
            self.moments = RunningMoments()
            self.kl_form = resolve_kl_form(cfg.kl_form, run.sample.step)
            self.marble = None
            if cfg.aggregation == "marble":
                from diffalign.balance import Harmonizer, RewardGradients

                self.marble = (Harmonizer(len(self.rewards.names), grad_ema=cfg.marble_grad_ema),
                               RewardGradients(self.params, len(self.rewards.names)))
            # the optimizer slot also carries MARBLE's tracked reward gradients
            self.state = TrainingState("grpo", self.optimizer, self.params, self.marble[0] if self.marble else None)
            self.epoch, self.global_step = 0, 0
            self.ckpt, self.logger, self.config_dict = open_run(run, self.dist, self._restore, self.device,
                                                                claimed=claimed)

    def _restore(self, state) -> int:
        from trainers.common import (reapply_optimizer_settings, restore_harmonizer, restore_loop_state,
                                     restore_run_state)

        self.epoch, self.global_step, extra = restore_run_state(state, self.adapter, self.params, self.ema,
                                                                self.state, self.lr_scheduler)
        reapply_optimizer_settings(self.optimizer, self.lr_scheduler, self.cfg)
        if self.marble is not None:
            if "harmonizer" in extra:
                restore_harmonizer(self.marble[0], extra["harmonizer"], self.rewards.names)
            else:
                warnings.warn("train.aggregation=marble but the checkpoint holds no MARBLE coefficients (written "
                              "without MARBLE or by an older version): they restart uniform", stacklevel=2)
        if "tracker" in extra:
            self.tracker.load_state_dict(extra["tracker"])
        if "moments" in extra:
            self.moments.load_state_dict(extra["moments"])
        restore_loop_state(self, extra)
        return self.epoch

    def save_checkpoint(self) -> None:
        from trainers.common import harmonizer_state, loop_state, save_run_state

        extra = {"tracker": self.tracker.state_dict(), "moments": self.moments.state_dict(), **loop_state(self)}
        if self.marble is not None:
            extra["harmonizer"] = harmonizer_state(self.marble[0], self.rewards.names)
        save_run_state(self.ckpt, self.adapter, self.ema, epoch=self.epoch, step=self.global_step,
                       optimizer=self.state, lr_scheduler=self.lr_scheduler, sampler_state=extra,
                       config=self.config_dict)

    # ------------------------------------------------------------------ one epoch
    def _window(self, epoch: int) -> Optional[Tuple[int, int]]:
        s = self.run.sample
        if s.random_window is None:
            return tuple(s.window) if s.window is not None else None
        from diffalign.distributed import seed_for

        k = s.drawn_window_length
        lo, hi = s.random_window
        start = int(np.random.default_rng(seed_for(self.run.seed, epoch, 5)).integers(lo, max(lo, hi - k) + 1))
        return (start, start + k)

    def _sample(self, epoch: int, assignment) -> Dict:
        from diffalign.types import Trajectory
        from trainers.common import check_finite_samples, sample_batch

        s = self.run.sample
        trajs, conds, rewards, images = [], [], [], []
        prompts_all, ids_all = assignment.prompts, assignment.sample_ids
        # shared_group_noise: one initial noise per (epoch, prompt group), unique across epochs: the epoch's first
        # sample id plus the group (an epoch has fewer groups than samples; epoch x N + group for a run whose
        # samples per epoch never changed)
        first_id = int(assignment.global_ids[0])
        noise_all = ((first_id + assignment.groups).tolist() if s.shared_group_noise else None)
        window = self._window(epoch)
        t_reward = 0.0
        for b in range(s.num_batches_per_epoch):
            sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
            traj, cond, imgs, schedule = sample_batch(
                self.adapter, prompts_all[sl], ids_all[sl], seed=self.run.seed, num_steps=s.num_steps,
                guidance_scale=s.guidance_scale, negative_prompt=s.negative_prompt, height=self.height,
                width=self.width, step=s.step, noise_level=s.noise_level, window=window, dtype=self.dtype,
                noise_ids=noise_all[sl] if noise_all is not None else None)
            check_finite_samples(self, imgs)  # before any reward scores NaN images
            t0 = time.perf_counter()
            meta = [{"prompt": p, "sample_id": i} for p, i in zip(prompts_all[sl], ids_all[sl])]
            out = self.rewards(imgs, prompts_all[sl], meta, transform=False)  # transformed per epoch
            t_reward += time.perf_counter() - t0
            trajs.append(traj)
            conds.append(cond)
            rewards.append(out.rewards)
            images.append(imgs)
        from diffalign.generators.base import Conditioning

        return {"traj": Trajectory.cat(trajs), "cond": Conditioning.cat(conds), "rewards": torch.cat(rewards),
                "images": torch.cat(images), "schedule": schedule, "reward_seconds": t_reward,
                "sample_ids": ids_all}

    def _advantages(self, local_rewards: torch.Tensor, assignment) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
        """Gather ``[n, R]`` rewards, combine columns, compute advantages on the global batch, slice back."""
        from diffalign.advantages import group_advantages
        from trainers.common import epoch_rewards
        from rewards import weighted_sum

        all_rewards = epoch_rewards(self, local_rewards, assignment)
        combined = weighted_sum(all_rewards, self.rewards.weights, groups=assignment.global_groups)
        cfg = self.cfg
        stats = {}
        if cfg.advantage == "per_prompt_tracker":
            adv = self.tracker.update(assignment.global_prompts, combined)
            keep = ~torch.isnan(combined)  # (no group statistics: no zero_std_fraction)
        elif cfg.aggregation != "weighted_sum":
            from diffalign.advantages import multi_reward_advantages

            res = multi_reward_advantages(all_rewards, assignment.global_groups, self.rewards.weights,
                                          aggregation=cfg.aggregation, std_mode=cfg.std_mode, eps=cfg.adv_eps,
                                          clip=cfg.adv_clip_max)
            adv, keep = res.advantages, res.keep  # [N, R] for marble
        else:
            if cfg.std_mode == "global":
                self.moments.update(combined)
            res = group_advantages(combined, assignment.global_groups, std_mode=cfg.std_mode, eps=cfg.adv_eps,
                                   clip=cfg.adv_clip_max, drop_zero_std=cfg.drop_zero_std_groups,
                                   global_std=self.moments.std)
            adv, keep = res.advantages, res.keep
            stats["zero_std_fraction"] = res.zero_std_fraction
            stats["group_std_mean"] = res.group_std_mean
        sl = slice(assignment.start, assignment.end)
        for i, name in enumerate(self.rewards.names):
            col = all_rewards[:, i]
            stats[f"reward/{name}"] = float(torch.nanmean(col))
        stats["reward/combined"] = float(torch.nanmean(combined))
        stats["advantage/abs_mean"] = float(adv.abs().mean())
        stats["advantage/std"] = float(adv.std())
        return adv[sl], keep[sl], stats

    def _train_epoch(self, epoch: int, data: Dict, advantages: torch.Tensor, keep: torch.Tensor) -> Dict:
        from diffalign.distributed import all_reduce_gradients, seed_for
        from samplers import score_steps
        from samplers.rollout import make_generators
        from trainers.common import (TRAIN_SEED_STREAM, accumulation_window, autocast_ctx, epoch_means, grads_finite,
                                     optimizer_update, update_metrics)

        cfg, s = self.cfg, self.run.sample
        traj, cond, schedule = data["traj"], data["cond"], data["schedule"]
        n = traj.batch_size
        # the minibatch order is this rank's; each sample's trained steps come from its own stream (global id),
        # so a sample trains on the same steps on any number of processes
        gen = torch.Generator().manual_seed(seed_for(self.run.seed, epoch, self.dist.rank, 11))
        sample_gens = make_generators(seed_for(self.run.seed, TRAIN_SEED_STREAM), data["sample_ids"])
        accum = cfg.gradient_accumulation_steps
        stats_acc: Dict[str, List[float]] = {}
        marble_acc: Dict[str, List[float]] = {}  # the QP's statistics, the same on every rank: logged as marble/*
        step_stats: Dict[str, List[float]] = {}  # grad norms, skipped steps (trainers.common.optimizer_update)
        micro, updates = 0, 0
        for inner in range(cfg.num_inner_epochs):
            order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
            steps = select_train_steps(traj.stochastic, n, fraction=cfg.timestep_fraction,
                                       mode=cfg.timestep_selection, generators=sample_gens)
            minibatches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            # drop_zero_std_groups: the kept samples of each accumulation window (its minibatches on every rank)
            # share the update equally: each minibatch's masked sum is divided by the window's kept count over all
            # ranks / (world_size * window), then by per_update (the gradient all-reduce averages ranks); a window
            # that keeps no sample on any rank makes no optimizer step
            window_kept = self._window_kept(minibatches, keep, accum) if cfg.drop_zero_std_groups else None
            for mb_i, mb in enumerate(minibatches):
                window = accumulation_window(mb_i, len(minibatches), accum)
                per_update = window * steps.shape[1]
                sub = traj.index_select(mb)
                mb_cond = cond.index_select(mb)
                model_fn = self.adapter.model_fn(mb_cond, s.guidance_scale)
                adv = advantages[mb].to(self.device)
                kept = keep[mb].to(self.device).float()
                for j in range(steps.shape[1]):
                    idx = steps[mb, j]
                    index = int(idx[0]) if bool((idx == idx[0]).all()) else idx
                    old = sub.log_probs[torch.arange(len(mb)), idx].to(self.device)
                    with autocast_ctx(self.device, self.dtype):
                        out = score_steps(model_fn, schedule, sub, index)
                    kl = None
                    if cfg.beta > 0:
                        kl = self._reference_kl(model_fn, schedule, sub, index, out)
                    applied = adv if self.marble is None else adv @ self.marble[0].alpha_bar.to(adv)  # stats only
                    mask, den = None, None
                    if cfg.drop_zero_std_groups:
                        mask = keep[mb].to(self.device)
                        den = float(window_kept[mb_i // accum]) / (self.dist.world_size * window)
                    loss, st = grpo_loss(out.log_prob, old, applied * kept, clip_range=cfg.clip_range,
                                         adv_clip_max=cfg.adv_clip_max, kl=kl, beta=cfg.beta, mask=mask,
                                         denominator=den)
                    if self.marble is None:
                        self.scaler(loss / per_update).backward()
                    else:
                        self._marble_backward(out.log_prob, old, adv * kept[:, None], kl, per_update)
                    micro += 1
                    for k, v in st.as_dict().items():
                        if not math.isnan(v):  # diagnostics of a minibatch whose samples were all dropped
                            stats_acc.setdefault(k, []).append(v)
                    if micro % per_update == 0 or (mb_i == len(minibatches) - 1 and j == steps.shape[1] - 1):
                        micro = 0
                        if window_kept is not None and float(window_kept[mb_i // accum]) == 0:
                            # every group of the update tied: nothing to learn from (Flow-GRPO trains no such
                            # sample); no step, so weight decay, Adam, the LR schedule and the EMA stay put
                            self.optimizer.zero_grad(set_to_none=True)
                            step_stats.setdefault("train/empty_updates", []).append(1.0)
                            continue
                        all_reduce_gradients(self.params, self.dist.world_size)
                        self.scaler.unscale_(self.params)
                        finite = True  # without MARBLE, optimizer_update checks the gradient itself
                        if self.marble is not None and not grads_finite(self.params):
                            finite = False  # the KL part: checked before the QP moves its state
                            self.marble[1].reset()
                        elif self.marble is not None:
                            from diffalign.balance import log_harmonized

                            res = self.marble[1].harmonize_into_grad(self.marble[0], self.dist.world_size,
                                                                     self.scaler.scale)
                            finite = res is not None
                            for k, v in (log_harmonized(res, self.rewards.names) if finite else {}).items():
                                marble_acc.setdefault(k, []).append(v)
                        updates += int(optimizer_update(self, step_stats, finite=finite))
        out = {f"train/{k}": v for k, v in epoch_means(self, stats_acc).items()}  # loss stats: all ranks'
        grad_norms = step_stats.get("train/grad_norm", [])
        out["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out.update(update_metrics(self, step_stats))
        out["train/updates"] = updates
        if cfg.drop_zero_std_groups:
            out["train/empty_updates"] = len(step_stats.get("train/empty_updates", []))
        out["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        out.update({k: float(np.mean(v)) for k, v in marble_acc.items()})
        if self.marble is not None:
            for i, name in enumerate(self.rewards.names):
                out[f"marble/alpha_bar/{name}"] = float(self.marble[0].alpha_bar[i])
        return out

    def _window_kept(self, minibatches, keep: torch.Tensor, accum: int) -> torch.Tensor:
        """``[W]`` kept samples of each accumulation window of ``accum`` minibatches, summed over all ranks (every
        rank has the same number of windows, so the gather lines up)."""
        counts = torch.zeros(-(-len(minibatches) // accum))
        for i, mb in enumerate(minibatches):
            counts[i // accum] += float(keep[mb].sum())
        return self.dist.gather(counts[None].to(self.device)).sum(0).cpu()

    def _marble_backward(self, log_prob, old, advantages, kl, per_update) -> None:
        """MARBLE full mode (seed_algorithms.md §6.2): one gradient per reward column into the per-reward buffers,
        the KL gradient straight into ``.grad`` (outside the QP)."""
        cfg = self.cfg
        if kl is not None:
            self.scaler(cfg.beta * kl.mean() / per_update).backward(retain_graph=True)
        losses = [self.scaler(grpo_loss(log_prob, old, advantages[:, r], clip_range=cfg.clip_range,
                                        adv_clip_max=cfg.adv_clip_max)[0] / per_update)
                  for r in range(advantages.shape[1])]
        self.marble[1].accumulate(losses)

    def _reference_kl(self, model_fn, schedule, sub, index, out) -> torch.Tensor:
        from samplers import score_steps
        from trainers.common import autocast_ctx

        with torch.no_grad(), self.adapter.disable_adapter(), autocast_ctx(self.device, self.dtype):
            ref = score_steps(model_fn, schedule, sub, index)
        if self.kl_form == "velocity":
            # flow models: v = (x_t - x0_hat) / sigma, so v - v_ref = (x0_ref - x0) / sigma
            from samplers.parametrization import expand_like

            sigma = expand_like(schedule.sigmas.to(out.mean.device)[index], out.mean)
            return kl_to_reference(out.mean, ref.mean, out.std, form="velocity", velocity=-out.x0_pred / sigma,
                                   ref_velocity=-ref.x0_pred / sigma)
        return kl_to_reference(out.mean, ref.mean, out.std, form=self.kl_form, g=out.extras.get("g"))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, float]:
        """Mean reward per column on the fixed eval prompts (:func:`trainers.common.evaluate_run`)."""
        from trainers.common import evaluate_run

        return evaluate_run(self)

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict[str, float]:
        from trainers.common import run_epochs

        return run_epochs(self, "grpo", self._epoch)

    def _epoch(self, epoch: int, assignment) -> Tuple[Dict, Dict, float]:
        data = self._sample(epoch, assignment)
        t_sampled = time.perf_counter()
        adv, keep, adv_stats = self._advantages(data["rewards"], assignment)
        from trainers.common import no_reward_epoch

        train_stats = no_reward_epoch(self, adv_stats, epoch) or self._train_epoch(epoch, data, adv, keep)
        return data, {**adv_stats, **train_stats}, t_sampled

    def cleanup(self) -> None:
        from trainers.common import close_run

        close_run(self, "GRPO rewards")


def _reward_spec_dict(spec) -> Dict:
    from diffalign.config import to_dict

    d = to_dict(spec)
    if hasattr(spec, "registry_kwargs"):
        return spec.registry_kwargs()
    return d
