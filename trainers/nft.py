"""DiffusionNFT: online RL on the forward process, with multi-reward aggregation (weighted sum, GDPO, MARBLE).

* DiffusionNFT: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
  arXiv 2509.16117, §3.1 (implicit positive / negative policies ``v+- = v_old +- beta (v_theta - v_old)``,
  loss ``r ||v+ - v||^2 + (1 - r) ||v- - v||^2`` with the optimality probability ``r = clip(A / 2C + 1/2)``),
  in its released x0-form with adaptive per-sample weights (research/grpo_family.md §2.4). Samples come from
  the old policy with the deterministic ODE sampler; only clean latents and rewards are kept.
* MARBLE: Zhao et al., arXiv 2605.06507 (research/seed_algorithms.md §6): per-reward advantages, one gradient
  per reward, the min-norm QP on their Gram matrix (:mod:`diffalign.balance`), the KL gradient outside the
  QP; ``amortized`` solves every N optimizer steps and in between trains on ``A_bar = sum_k alpha_bar_k A_k``
  with one backward (Prop. 1: the NFT loss is affine in A, so this equals ``sum_k alpha_k grad l_k``).
* GDPO (arXiv 2601.05242): per-reward group normalisation, weighted sum, batch whitening.

Layout: :class:`NFTConfig` (the ``train`` section), :func:`nft_loss_terms`, :func:`nft_policy_loss`,
:func:`nft_loss` (pure), :func:`old_policy_decay` (pure), :class:`NFTTrainer` (setup / train / save / cleanup).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from diffalign.config import ConfigError, TrainLoopConfig, check, param, register_trainer_config
from diffalign.types import LossStats

__all__ = ["NFTConfig", "nft_loss_terms", "nft_policy_loss", "amortised_advantages", "nft_loss", "old_policy_decay",
           "OldPolicy", "NFTTrainer"]


@register_trainer_config("nft")
@dataclass
class NFTConfig(TrainLoopConfig):
    """The ``train`` section of a DiffusionNFT run (defaults: DiffusionNFT's SD3.5 recipe, grpo_family.md §2.4)."""

    num_epochs: int = param(100, help="epochs (one epoch = sample with the old policy, score, train)", min=1)
    batch_size: int = param(8, help="training minibatch per process", min=1)
    shuffle: bool = param(True, help="shuffle samples between minibatches")
    beta: float = param(1.0, help="implicit-policy mixing strength (DiffusionNFT: 1.0; 0.1 for OCR / multi-reward)",
                        min=0.0)
    adv_clip_max: float = param(5.0, help="C: advantages are clipped to [-C, C]; r = A / 2C + 1/2", min=0.0)
    kl_weight: float = param(1e-4, help="weight of mean (v_theta - v_ref)^2, the reference being the base model "
                             "(adapter disabled); 0 = off", min=0.0)
    weight_eps: float = param(1e-5, help="lower clip of the adaptive (detached mean-abs x0 error) weight", min=0.0)
    timestep_fraction: float = param(
        0.99, help="trained timesteps per sample: int(T * f) of a random permutation of the T sampler sigmas",
        min=0.0, max=1.0)
    old_decay_rate: float = param(0.001, help="old policy: theta_old <- d theta_old + (1 - d) theta after each "
                                  "epoch, d = min(rate * (step - start), max) (0 before start)", min=0.0)
    old_decay_max: float = param(0.5, help="old policy decay cap (DiffusionNFT type 1: 0.5; type 2: 0.999)",
                                 min=0.0, max=1.0)
    old_decay_start: int = param(0, help="optimizer steps with d = 0 (old = current) before the ramp (type 2: 75)",
                                 min=0)
    aggregation: Literal["weighted_sum", "gdpo", "marble"] = param(
        "weighted_sum", help="multi-reward aggregation: weighted_sum (sum rewards, then group-normalise), gdpo "
        "(normalise each reward per group, weighted-sum, whiten), marble (QP gradient harmonisation)")
    std_mode: Literal["group", "batch", "global"] = param(
        "batch", help="std of the (per-reward) advantage: within the group, of the gathered batch, or running")
    marble_mode: Literal["full", "amortized"] = param(
        "amortized", help="full: K backwards and a QP every step; amortized: QP every marble_every steps, one "
        "backward on sum_k alpha_bar_k A_k in between")
    marble_every: int = param(10, help="amortized: optimizer steps per QP refresh (MARBLE: 5-10)", min=1)
    marble_rho: float = param(0.7, help="EMA of the QP coefficients used by amortized steps", min=0.0, max=0.999)
    marble_normalize: bool = param(True, help="solve on unit per-reward gradients (required, MARBLE Table 3)")
    marble_batched_backward: bool = param(
        False, help="run the K per-reward backward passes as one vmapped backward (same gradients; can be "
        "faster on GPUs, not on CPUs)")
    marble_grad_ema: float = param(
        0.0, help="solve the QP on moving averages of the per-reward gradients with this decay (MoCo-style "
        "tracking, the direction built from the averages; for rewards whose per-batch gradient is mostly noise; "
        "needs marble_mode=full); 0 = each batch's gradients (MARBLE)",
        min=0.0, max=0.999)
    marble_solver: Literal["auto", "closed_form", "enumerate", "frank_wolfe", "projected_gradient"] = param(
        "auto", help="min-norm QP solver (diffalign.balance)")
    grad_diagnostics_every: int = param(
        0, help="every N optimizer steps also compute the per-reward gradients (K extra backwards) to log the "
        "cosine of the applied direction with each; 0 = only where MARBLE computes them anyway", min=0)

    def validate_run(self, run) -> None:
        s = run.sample
        self.validate_loop()
        check(s.group_size >= 2, "sample.group_size", f"got {s.group_size}; DiffusionNFT needs >= 2 images per prompt")
        check(s.step == "flow_euler", "sample.step",
              f"got {s.step!r}; DiffusionNFT samples with the deterministic ODE: set sample.step=flow_euler")
        check(s.window is None and s.random_window is None, "sample.window",
              f"got window={s.window}, random_window={s.random_window}; DiffusionNFT samples with the deterministic "
              "ODE and trains on forward-noised clean samples, so an SDE window has no effect: set both to null")
        check(not s.shared_group_noise, "sample.shared_group_noise",
              "got true; with deterministic ODE sampling a group sharing its initial noise would hold identical "
              "images: set sample.shared_group_noise=false")
        check(self.beta > 0, "train.beta", "got 0; the implicit policies need beta > 0 (DiffusionNFT uses 0.1-1)")
        check(self.kl_weight == 0 or run.model.lora.enabled, "train.kl_weight",
              f"got {self.kl_weight} with model.lora.enabled=false; the KL's reference is the adapter-disabled base "
              "model, which a full fine-tune does not keep: set train.kl_weight=0 or enable LoRA")
        check(self.adv_clip_max > 0, "train.adv_clip_max", "got 0; r = A / 2C + 1/2 needs C > 0 (default 5)")
        check(self.marble_grad_ema == 0 or (self.aggregation == "marble" and self.marble_mode == "full"),
              "train.marble_grad_ema",
              f"got {self.marble_grad_ema} with aggregation={self.aggregation!r}, marble_mode={self.marble_mode!r}; "
              "tracked gradients need a QP on every step: set train.aggregation=marble train.marble_mode=full, "
              "or train.marble_grad_ema=0")


# ----------------------------------------------------------------------------------------- pure math


def _up(x: torch.Tensor) -> torch.Tensor:
    # loss math in float32 at least (float64 inputs stay float64: the amortisation test needs it)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def nft_loss_terms(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    *,
    beta: float,
    weight_eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` positive and negative terms of the DiffusionNFT loss (arXiv 2509.16117 eq. (8), x0 form).

    ``v+ = (1 - beta) v_old + beta v``, ``v- = (1 + beta) v_old - beta v``; ``x0+- = x_t - sigma v+-``;
    ``L+- = mean_dims (x0+- - x0)^2 / stopgrad(max(mean_dims |x0+- - x0|, eps))`` (the released code's adaptive
    weighting). Neither term depends on the advantage, which is what makes MARBLE's amortisation exact.
    """
    v, v_old, x_t, x0 = _up(velocity), _up(old_velocity), _up(x_t), _up(x0)
    s = _up(sigma).reshape(-1, *([1] * (v.ndim - 1)))
    dims = tuple(range(1, v.ndim))
    v_pos = (1 - beta) * v_old + beta * v
    v_neg = (1 + beta) * v_old - beta * v
    err_pos = x_t - s * v_pos - x0
    err_neg = x_t - s * v_neg - x0
    w_pos = err_pos.detach().abs().mean(dim=dims).clamp_min(weight_eps)
    w_neg = err_neg.detach().abs().mean(dim=dims).clamp_min(weight_eps)
    return (err_pos**2).mean(dim=dims) / w_pos, (err_neg**2).mean(dim=dims) / w_neg


def nft_policy_loss(
    loss_pos: torch.Tensor, loss_neg: torch.Tensor, advantages: torch.Tensor, *, beta: float, adv_clip_max: float,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C mean_B (w r L+ + w (1 - r) L-) / beta`` with ``r = clip(clip(A, -C, C) / 2C + 1/2, 0, 1)`` (DiffusionNFT
    eq. (8) with the released code's ``C / beta`` scale). Affine in ``A`` while no clip is active.

    ``weight`` (``[B]``, default 1): 0 removes a sample's term while it still counts in the mean, as a zero
    advantage does in GRPO. In NFT a zero advantage is not "no signal": ``r = 1/2`` pulls ``v`` towards ``v_old``
    (gradient proportional to ``beta^2 (v - v_old)``), right for a sample whose reward equals its group's mean but
    not for one whose reward failed (NaN: "neither push nor pull", diffalign.advantages)."""
    c = adv_clip_max
    r = (_up(advantages).clamp(-c, c) / (2 * c) + 0.5).clamp(0.0, 1.0)
    terms = r * loss_pos + (1 - r) * loss_neg
    if weight is not None:
        terms = terms * _up(weight)
    return c * terms.mean() / beta


def amortised_advantages(per_reward: torch.Tensor, weights: torch.Tensor,
                         alpha: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A_bar [B], w_bar [B])`` for amortised MARBLE's single loss (seed_algorithms.md §6.3).

    MARBLE trains on ``A_bar = sum_k alpha_k A_k``, which (the loss being affine in ``A`` while no clip is active)
    equals ``sum_k alpha_k l(A_k)``. Where a sample's reward ``k`` failed (``weights[b, k] = 0``, see
    :func:`nft_policy_loss`), that sum must leave its term out, and does with ``w_bar = sum_k alpha_k w_k`` and
    ``A_bar = sum_k alpha_k w_k A_k / w_bar``: ``w_bar (r(A_bar) L+ + (1 - r(A_bar)) L-)`` equals
    ``sum_k alpha_k w_k (r(A_k) L+ + (1 - r(A_k)) L-)``. With every weight 1 this is ``(sum_k alpha_k A_k, 1)``."""
    w_bar = weights @ alpha
    weighted = (per_reward * weights) @ alpha
    a_bar = torch.where(w_bar > 0, weighted / w_bar.clamp_min(torch.finfo(w_bar.dtype).tiny), torch.zeros_like(w_bar))
    return a_bar, w_bar


def nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    adv_clip_max: float,
    ref_velocity: Optional[torch.Tensor] = None,
    kl_weight: float = 0.0,
    weight_eps: float = 1e-5,
) -> Tuple[torch.Tensor, LossStats]:
    """DiffusionNFT loss of one trained timestep: policy + ``kl_weight * mean (v - v_ref)^2``.

    Stats: ``approx_kl`` = ``mean (v - v_old)^2`` (DiffusionNFT's ``old_deviate``), ``clip_frac`` = fraction of
    advantages at the clip, ``ratio_mean`` = mean optimality probability ``r``.
    """
    l_pos, l_neg = nft_loss_terms(velocity, old_velocity, x_t, x0, sigma, beta=beta, weight_eps=weight_eps)
    policy = nft_policy_loss(l_pos, l_neg, advantages, beta=beta, adv_clip_max=adv_clip_max)
    kl = velocity_kl(velocity, ref_velocity) if ref_velocity is not None else torch.zeros((), device=policy.device)
    loss = policy + kl_weight * kl
    return loss, _loss_stats(policy, kl, kl_weight, velocity, old_velocity, l_pos, l_neg, advantages, adv_clip_max)


@torch.no_grad()
def _loss_stats(policy, kl, kl_weight, velocity, old_velocity, l_pos, l_neg, advantages, c) -> LossStats:
    return LossStats(
        loss=(policy + kl_weight * kl).detach(), policy_loss=policy.detach(), kl_loss=kl.detach(),
        approx_kl=((velocity.detach().float() - old_velocity.float()) ** 2).mean(),
        clip_frac=(advantages.abs() >= c).float().mean(),
        ratio_mean=(advantages.float().clamp(-c, c) / (2 * c) + 0.5).mean(),
        extras={"loss_pos": l_pos.detach().mean(), "loss_neg": l_neg.detach().mean()},
    )


def velocity_kl(velocity: torch.Tensor, ref_velocity: torch.Tensor) -> torch.Tensor:
    """``mean (v - v_ref)^2`` over batch and dims (DiffusionNFT's KL surrogate to the reference)."""
    return ((velocity.float() - ref_velocity.float()) ** 2).mean()


def old_policy_decay(step: int, *, rate: float, cap: float, start: int = 0) -> float:
    """DiffusionNFT's old-policy decay ``d = min(rate * (step - start), cap)``, 0 before ``start``."""
    if step < start:
        return 0.0
    return float(min(rate * (step - start), cap))


class OldPolicy:
    """A soft copy ``theta_old`` of the trainable parameters, swapped into the model for no-grad forwards.

    Swapping copies the (LoRA) tensors in and back out; it must not happen while an autograd graph that saved
    those parameters is alive, so trainers run the old-policy forward before the trained one.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def swapped_in(self):
        from trainers.common import swap_in

        return swap_in(self.params, self.shadow)


# ----------------------------------------------------------------------------------------- trainer


class NFTTrainer:
    """Online DiffusionNFT recipe: ``setup()``, ``train()``, ``save_checkpoint()``, ``cleanup()``."""

    def __init__(self, run_cfg, accelerator=None, pipeline=None) -> None:
        """``pipeline``: train this in-memory diffusers pipeline instead of loading ``run_cfg.model.path``
        (see :func:`trainers.common.build_adapter`)."""
        from diffalign.config import resolve_train_section

        self.run = run_cfg
        self.pipeline = pipeline
        self.cfg: NFTConfig = resolve_train_section(run_cfg)
        self.cfg.check_batch_split(run_cfg.sample)  # a training rule: eval and sample may batch as they like
        self.accelerator = accelerator

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from diffalign.advantages import RunningMoments
        from diffalign.balance import Harmonizer, RewardGradients
        from trainers.common import EMA, LossScaler, TrainingState, build_optimizer, claimed_setup, image_size, open_run

        run, cfg = self.run, self.cfg
        with claimed_setup(self, "DiffusionNFT") as claimed:
            if self.adapter.kind != "flow":
                raise ConfigError(f"DiffusionNFT trains flow-matching models; {run.model.path!r} is a "
                                  f"{self.adapter.kind!r} model; use a flow model (SD3, FLUX, builtin:shapes-flow) "
                                  "or trainer=grpo", key="model.path")
            self.height, self.width = image_size(self.adapter, run.sample)
            self.params = self.adapter.trainable_parameters()
            self.optimizer, self.lr_scheduler = build_optimizer(self.params, cfg)
            self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_every) if cfg.ema else None
            self.scaler = LossScaler(self.dtype == torch.float16, growth_interval=cfg.loss_scale_growth_interval)
            self.old = OldPolicy(self.params)
            self.num_rewards = len(self.rewards.names)
            self.harmonizer = Harmonizer(self.num_rewards, rho=cfg.marble_rho, normalize=cfg.marble_normalize,
                                         method=cfg.marble_solver, grad_ema=cfg.marble_grad_ema)
            self.state = TrainingState("nft", self.optimizer, self.params, self.harmonizer,
                                       tensors={"old_policy": self.old.shadow})
            # K per-reward rows plus one for the applied direction (gradient diagnostics of non-MARBLE steps)
            self.reward_grads = RewardGradients(self.params, self.num_rewards + 1)
            self.alpha_history: List[torch.Tensor] = []  # QP solutions of this process (tests, diagnostics)
            self.moments = RunningMoments()
            self.epoch, self.global_step = 0, 0
            self.ckpt, self.logger, self.config_dict = open_run(run, self.dist, self._restore, self.device,
                                                                claimed=claimed)

    def _restore(self, state) -> int:
        from trainers.common import (reapply_optimizer_settings, restore_harmonizer, restore_loop_state,
                                     restore_run_state)

        self.epoch, self.global_step, extra = restore_run_state(state, self.adapter, self.params, self.ema,
                                                                self.state, self.lr_scheduler)
        reapply_optimizer_settings(self.optimizer, self.lr_scheduler, self.cfg)
        if "moments" in extra:
            self.moments.load_state_dict(extra["moments"])
        restore_harmonizer(self.harmonizer, extra.get("harmonizer"), self.rewards.names)
        restore_loop_state(self, extra)
        return self.epoch

    def save_checkpoint(self) -> None:
        from trainers.common import harmonizer_state, loop_state, save_run_state

        save_run_state(self.ckpt, self.adapter, self.ema, epoch=self.epoch, step=self.global_step,
                       optimizer=self.state, lr_scheduler=self.lr_scheduler,
                       sampler_state={"moments": self.moments.state_dict(),
                                      "harmonizer": harmonizer_state(self.harmonizer, self.rewards.names),
                                      **loop_state(self)},
                       config=self.config_dict)

    # ------------------------------------------------------------------ one epoch
    def _sample(self, assignment) -> Dict:
        """Deterministic ODE samples of the old policy: clean latents, conditioning, images, rewards."""
        from diffalign.generators.base import Conditioning
        from trainers.common import check_finite_samples, sample_batch

        s = self.run.sample
        finals, conds, rewards, images = [], [], [], []
        t_reward = 0.0
        with self.old.swapped_in():
            for b in range(s.num_batches_per_epoch):
                sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
                prompts, ids = assignment.prompts[sl], assignment.sample_ids[sl]
                traj, cond, imgs, schedule = sample_batch(
                    self.adapter, prompts, ids, seed=self.run.seed, num_steps=s.num_steps,
                    guidance_scale=s.guidance_scale, negative_prompt=s.negative_prompt, height=self.height,
                    width=self.width, step="flow_euler", noise_level=0.0, dtype=self.dtype)
                check_finite_samples(self, imgs)  # before any reward scores NaN images
                t0 = time.perf_counter()
                out = self.rewards(imgs, prompts, [{"prompt": p, "sample_id": i} for p, i in zip(prompts, ids)],
                                   transform=False)  # transformed over the whole epoch (epoch_rewards)
                t_reward += time.perf_counter() - t0
                finals.append(traj.final)
                conds.append(cond)
                rewards.append(out.rewards)
                images.append(imgs)
        return {"x0": torch.cat(finals), "cond": Conditioning.cat(conds), "rewards": torch.cat(rewards),
                "images": torch.cat(images), "schedule": schedule, "reward_seconds": t_reward,
                "sample_ids": assignment.sample_ids}

    def _advantages(self, local_rewards: torch.Tensor, assignment) -> Tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, Dict]:
        """Gather ``[n, R]`` rewards; returns this rank's applied advantages (``[n]``, or ``[n, R]`` for MARBLE),
        per-reward advantages ``[n, R]`` (diagnostics), keep mask, and stats."""
        from diffalign.advantages import multi_reward_advantages, per_reward_advantages
        from trainers.common import epoch_rewards

        cfg = self.cfg
        all_rewards = epoch_rewards(self, local_rewards, assignment)
        groups = assignment.global_groups
        if cfg.std_mode == "global":
            from rewards import weighted_sum
            self.moments.update(weighted_sum(all_rewards, self.rewards.weights, groups=groups))
        res = multi_reward_advantages(all_rewards, groups, self.rewards.weights, aggregation=cfg.aggregation,
                                      std_mode=cfg.std_mode, eps=cfg.adv_eps, clip=cfg.adv_clip_max,
                                      global_std=self.moments.std)
        per = res.advantages if cfg.aggregation == "marble" else per_reward_advantages(
            all_rewards, groups, std_mode="batch" if cfg.std_mode == "global" else cfg.std_mode, eps=cfg.adv_eps,
            clip=cfg.adv_clip_max)
        stats = dict(res.stats)
        for i, name in enumerate(self.rewards.names):
            col = all_rewards[:, i]
            stats[f"reward/{name}"] = float(torch.nanmean(col))
        stats["reward/combined"] = float(torch.nanmean(res.combined))
        stats["advantage/abs_mean"] = float(res.advantages.abs().mean())
        sl = slice(assignment.start, assignment.end)
        return res.advantages[sl], per[sl], res.keep[sl], stats

    def _step_kind(self) -> Tuple[bool, bool]:
        """``(refresh, diagnose)`` for the coming optimizer step: a MARBLE QP step, or extra per-reward grads."""
        cfg = self.cfg
        marble = cfg.aggregation == "marble"
        refresh = marble and (cfg.marble_mode == "full" or self.global_step % cfg.marble_every == 0)
        diagnose = (not refresh and self.num_rewards > 1 and cfg.grad_diagnostics_every > 0
                    and self.global_step % cfg.grad_diagnostics_every == 0)
        return refresh, diagnose

    def _applied_advantages(self, adv: torch.Tensor, kept: torch.Tensor,
                            per_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(advantages [B], weights [B])`` of the one loss of a step: the combined advantage and the kept mask,
        or under MARBLE the amortised :func:`amortised_advantages`."""
        if adv.ndim == 1:
            return adv, kept
        return amortised_advantages(adv, per_weight, self.harmonizer.alpha_bar.to(adv))

    def _velocities(self, model_fn, x_t, timesteps) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        from trainers.common import autocast_ctx

        # old and reference forwards first: swapping the old weights in would break a live graph
        with torch.no_grad(), self.old.swapped_in(), autocast_ctx(self.device, self.dtype):
            v_old = model_fn(x_t, timesteps).float()
        v_ref = None
        if self.cfg.kl_weight > 0:
            with torch.no_grad(), self.adapter.disable_adapter(), autocast_ctx(self.device, self.dtype):
                v_ref = model_fn(x_t, timesteps).float()
        with autocast_ctx(self.device, self.dtype):
            v = model_fn(x_t, timesteps).float()
        return v_old, v_ref, v

    def _optimizer_step(self, refresh: bool, diagnose: bool, metrics: Dict[str, List[float]]) -> bool:
        """All-reduce, MARBLE (refresh / diagnose steps), then :func:`trainers.common.optimizer_update`; returns
        whether the step was applied (a non-finite gradient is skipped)."""
        from diffalign.balance import cosine_summary, direction_cosines, gram_matrix, log_harmonized
        from diffalign.distributed import all_reduce_gradients
        from trainers.common import grads_finite, optimizer_update

        k = self.num_rewards
        # the KL part (or, on plain steps, the whole gradient) is in .grad; averaged over ranks like GRPO's
        all_reduce_gradients(self.params, self.dist.world_size)
        self.scaler.unscale_(self.params)
        if (refresh or diagnose) and not grads_finite(self.params):  # before the QP or diagnostics touch any state
            self.reward_grads.reset()  # (a plain step's gradient is checked by optimizer_update itself)
            return optimizer_update(self, metrics, finite=False)
        if refresh:
            res = self.reward_grads.harmonize_into_grad(self.harmonizer, self.dist.world_size, self.scaler.scale)
            if res is None:  # a non-finite per-reward gradient: no QP, the harmonizer's state untouched
                return optimizer_update(self, metrics, finite=False)
        if refresh or diagnose:
            if refresh:
                self.alpha_history.append(res.alpha.cpu())
                stats = log_harmonized(res, self.rewards.names)
            else:
                self.reward_grads.all_reduce(self.dist.world_size, self.scaler.scale)
                grads = self.reward_grads.buffer
                if not bool(torch.isfinite(grads).all()):  # a diagnostic only: skip the step, log nothing
                    self.reward_grads.reset()
                    return optimizer_update(self, metrics, finite=False)
                direction = grads[k]  # the gradient of the applied policy loss, added unchanged
                cos = direction_cosines(grads[:k], direction)
                stats = {f"marble/cos/{n}": float(cos[i]) for i, n in enumerate(self.rewards.names)}
                stats.update(cosine_summary(cos, gram_matrix(grads[:k])))
                self.reward_grads.add_to_grad(direction)
                self.reward_grads.reset()
            for key, v in stats.items():
                metrics.setdefault(key, []).append(v)
        return optimizer_update(self, metrics)

    def _train_epoch(self, epoch: int, data: Dict, advantages: torch.Tensor, per_reward: torch.Tensor,
                     keep: torch.Tensor) -> Dict:
        from diffalign.distributed import seed_for
        from samplers.rollout import make_generators
        from trainers.common import TRAIN_SEED_STREAM, accumulation_window, epoch_means, update_metrics

        cfg = self.cfg
        x0_all, cond, schedule = data["x0"], data["cond"], data["schedule"]
        n, k = x0_all.shape[0], self.num_rewards
        sigmas = schedule.sigmas.to(self.device)
        timesteps = schedule.timesteps.to(self.device)
        num_t = schedule.num_steps
        num_train_t = max(1, int(num_t * cfg.timestep_fraction))
        # the minibatch order is this rank's; each sample's timesteps and noise come from its own stream (global
        # id), so a sample is trained the same way on any number of processes
        gen = torch.Generator().manual_seed(seed_for(self.run.seed, epoch, self.dist.rank, 11))
        sample_gens = make_generators(seed_for(self.run.seed, TRAIN_SEED_STREAM), data["sample_ids"])
        metrics: Dict[str, List[float]] = {}
        step_times: Dict[str, List[float]] = {"plain": [], "refresh": [], "diagnose": []}
        step_cpu: Dict[str, List[float]] = {"plain": [], "refresh": [], "diagnose": []}  # robust on shared CPUs
        micro, updates = 0, 0
        refresh, diagnose = self._step_kind()
        # DiffusionNFT trains without CFG. A guidance value that runs no CFG pass (FLUX.1-dev's guidance embedding)
        # is part of the velocity field that drew the samples, so the loss uses the sampling value there.
        train_gs = 1.0 if self.adapter.uses_cfg(self.run.sample.guidance_scale) else self.run.sample.guidance_scale
        t_step, c_step = time.perf_counter(), time.process_time()
        for _ in range(cfg.num_inner_epochs):
            order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
            t_idx = torch.stack([torch.randperm(num_t, generator=g)[:num_train_t] for g in sample_gens])
            minibatches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            for mb_i, mb in enumerate(minibatches):
                per_update = accumulation_window(mb_i, len(minibatches), cfg.gradient_accumulation_steps) * num_train_t
                model_fn = self.adapter.model_fn(cond.index_select(mb), train_gs)
                x0 = x0_all[mb].to(self.device)
                kept = keep[mb].to(self.device).float()
                adv = advantages[mb].to(self.device)
                adv = adv * (kept if adv.ndim == 1 else kept[:, None])
                per = per_reward[mb].to(self.device) * kept[:, None]
                # a reward that failed (or does not apply: NaN) on a sample leaves that sample out of its gradient
                per_weight = kept[:, None] * torch.isfinite(data["rewards"][mb]).to(self.device, kept.dtype)
                # alpha_bar moves only at an optimizer step, which ends a minibatch: one value for its timesteps
                applied, weight = self._applied_advantages(adv, kept, per_weight)
                for j in range(num_train_t):
                    idx = t_idx[mb, j].to(self.device)
                    sigma = sigmas[idx]
                    noise = torch.stack([torch.randn(x0.shape[1:], generator=sample_gens[i])
                                         for i in mb.tolist()]).to(self.device)
                    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
                    x_t = (1 - s) * x0 + s * noise
                    v_old, v_ref, v = self._velocities(model_fn, x_t, timesteps[idx])
                    l_pos, l_neg = nft_loss_terms(v, v_old, x_t, x0, sigma, beta=cfg.beta, weight_eps=cfg.weight_eps)
                    policy = nft_policy_loss(l_pos, l_neg, applied, beta=cfg.beta, adv_clip_max=cfg.adv_clip_max,
                                             weight=weight)
                    kl = velocity_kl(v, v_ref) if v_ref is not None else torch.zeros((), device=self.device)
                    if refresh or diagnose:
                        # one gradient per reward, each from the SAME samples, noise and timesteps (§6.2 step 2)
                        losses = [self.scaler(nft_policy_loss(l_pos, l_neg, per[:, r], beta=cfg.beta,
                                                              adv_clip_max=cfg.adv_clip_max,
                                                              weight=per_weight[:, r]) / per_update)
                                  for r in range(k)]
                        if diagnose:
                            losses.append(self.scaler(policy / per_update))
                        if v_ref is not None:
                            # the KL gradient stays outside the QP (MARBLE §3.2 step 6): straight into .grad
                            self.scaler(cfg.kl_weight * kl / per_update).backward(retain_graph=True)
                        self.reward_grads.accumulate(losses, batched=cfg.marble_batched_backward)
                    else:
                        self.scaler((policy + cfg.kl_weight * kl) / per_update).backward()
                    st = _loss_stats(policy, kl, cfg.kl_weight, v, v_old, l_pos, l_neg, applied, cfg.adv_clip_max)
                    micro += 1
                    for key, val in st.as_dict().items():
                        metrics.setdefault(f"train/{key}", []).append(val)
                    last = mb_i == len(minibatches) - 1 and j == num_train_t - 1
                    if micro % per_update == 0 or last:
                        applied = self._optimizer_step(refresh, diagnose, metrics)
                        kind = "refresh" if refresh else "diagnose" if diagnose else "plain"
                        step_times[kind].append(time.perf_counter() - t_step)
                        step_cpu[kind].append(time.process_time() - c_step)
                        updates += int(applied)
                        micro = 0
                        refresh, diagnose = self._step_kind()
                        t_step, c_step = time.perf_counter(), time.process_time()
        self.old.update(old_policy_decay(self.global_step, rate=cfg.old_decay_rate, cap=cfg.old_decay_max,
                                         start=cfg.old_decay_start))
        out = epoch_means(self, metrics, prefix="train/")  # loss stats: all ranks'
        out.update(update_metrics(self, metrics))
        out["train/updates"] = updates
        out["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        for kind, times in step_times.items():
            out[f"time/step_{kind}"] = float(np.sum(times))
            out[f"cpu_time/step_{kind}"] = float(np.sum(step_cpu[kind]))
            out[f"steps/{kind}"] = len(times)
        if cfg.aggregation == "marble":
            for i, name in enumerate(self.rewards.names):
                out[f"marble/alpha_bar/{name}"] = float(self.harmonizer.alpha_bar[i])
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, float]:
        """Mean reward per column on the fixed eval prompts (:func:`trainers.common.evaluate_run`)."""
        from trainers.common import evaluate_run

        return evaluate_run(self)

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict[str, float]:
        from trainers.common import run_epochs

        return run_epochs(self, "nft", self._epoch)

    def _epoch(self, epoch: int, assignment) -> Tuple[Dict, Dict, float]:
        data = self._sample(assignment)
        t_sampled = time.perf_counter()
        adv, per, keep, adv_stats = self._advantages(data["rewards"], assignment)
        from trainers.common import no_reward_epoch

        train_stats = no_reward_epoch(self, adv_stats, epoch) or self._train_epoch(epoch, data, adv, per, keep)
        return data, {**adv_stats, **train_stats}, t_sampled

    def cleanup(self) -> None:
        from trainers.common import close_run

        close_run(self, "DiffusionNFT rewards")
