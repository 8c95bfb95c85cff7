"""Machinery shared by trainers: functions to call, not a base class to inherit (STYLE.md habit 10)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from diffalign.config import ConfigError, UserError
from diffalign.types import Trajectory

__all__ = ["DTYPES", "build_adapter", "EMA", "image_size", "sample_batch", "resolve_device", "autocast_ctx",
           "trainable_state", "load_trainable_state",
           "checkpoint_weights", "restore_weights", "TrainingState", "NonFiniteError", "grads_finite",
           "optimizer_update", "LossScaler", "loop_state", "restore_loop_state", "update_metrics"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, accelerator=None) -> torch.device:
    if name == "auto":
        return accelerator.device if accelerator is not None else torch.device("cpu")
    return torch.device(name)


def build_adapter(model_cfg, device: torch.device, pipeline=None):
    """Load the generator of a :class:`diffalign.config.ModelConfig`, freeze it, and make the trainable part.

    With ``lora.enabled`` only the LoRA parameters train (the base is the frozen reference, reached with
    ``adapter.disable_adapter()``); otherwise the whole denoiser trains. Trainable parameters are kept in
    float32 whatever the model dtype (mixed precision runs the forward under autocast).

    ``pipeline``: an in-memory diffusers pipeline to use instead of loading ``model_cfg.path`` (it is moved to
    ``device`` and cast to ``model_cfg.dtype``, in place). ``model_cfg.path`` then names it in messages and in the
    run's config, and where it is a model folder (or ``builtin:NAME``) its ``diffalign.json`` call arguments still
    apply (the shipped shapes-flow model's ``max_sequence_length=0``); ``diffalign export`` of such a run needs
    ``model.path`` to be a folder holding the same base weights.
    """
    from diffalign.generators import folder_call_kwargs, load_generator, wrap_pipeline
    from diffalign.shapes.models import resolve_model_path

    if pipeline is not None:
        adapter = wrap_pipeline(pipeline, dtype=DTYPES[model_cfg.dtype], device=device)
        path = model_cfg.path
        if isinstance(path, str) and path.startswith("builtin:"):
            path = resolve_model_path(path)
        adapter.call_kwargs = folder_call_kwargs(os.path.expanduser(str(path)))  # {} unless a folder says more
    else:
        adapter = load_generator(resolve_model_path(model_cfg.path), dtype=DTYPES[model_cfg.dtype], device=device)
    for module in adapter.pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    if model_cfg.lora.enabled:
        lora = model_cfg.lora
        adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, init=lora.init)
    else:
        adapter.denoiser.requires_grad_(True)
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
    if model_cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    adapter.set_attention_backend(model_cfg.attention)
    return adapter


def _live_trainable(adapter) -> Dict[str, torch.Tensor]:
    """What trains, as it lives on the device: the LoRA state dict (peft names) or the whole denoiser's."""
    return adapter.lora_state_dict() if adapter.has_lora else adapter.denoiser.state_dict()


def trainable_state(adapter) -> Dict[str, torch.Tensor]:
    """Float32 copies, on the CPU, of what trains: the LoRA state dict (peft names) or the whole denoiser's.

    Copies, because a caller may swap other weights (EMA) into the live parameters afterwards; on the CPU, where
    the checkpoint writer reads them, because a full fine-tune's copies on the accelerator would cost two more
    float32 denoisers of its memory at every checkpoint."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in _live_trainable(adapter).items()}


def _nonfinite_names(adapter) -> List[str]:
    """Names of the trained tensors (as they live, no copy) holding a NaN or an infinity."""
    return [name for name, t in _live_trainable(adapter).items() if not bool(torch.isfinite(t).all())]


def load_trainable_state(adapter, state: Dict[str, torch.Tensor], params: Sequence[torch.nn.Parameter] = ()) -> None:
    """Inverse of :func:`trainable_state`; ``params`` are re-cast to float32 (trainable weights stay fp32)."""
    if adapter.has_lora:
        adapter.load_lora_state_dict(state)
    else:
        adapter.denoiser.load_state_dict(state)
    for p in params:
        p.data = p.data.float()


def checkpoint_weights(adapter, ema: Optional["EMA"], *, copy: bool = True,
                       check: Optional[Callable[[str, List[str]], None]] = None) -> tuple:
    """``(trainable_state, ema_state)`` for a checkpoint; the EMA weights are stored under the same names
    (so ``diffalign export`` and eval load either one the same way), or ``None`` without EMA.

    ``check(label, names)`` first sees the names of the non-finite tensors of the trained (``"trained"``) and EMA
    (``"EMA"``) weights, checked where they live; ``copy=False`` skips the copies (``{}`` each): a rank other
    than the checkpoint writer's only checks."""
    def snapshot(label: str) -> Dict[str, torch.Tensor]:
        if check is not None:
            check(label, _nonfinite_names(adapter))
        return trainable_state(adapter) if copy else {}

    ema_state = None
    if ema is not None and not copy:  # a checking rank reads the shadow where it lives: no swap, no device backup
        if check is not None:
            check("EMA", _nonfinite_ema_names(adapter, ema))
        ema_state = {}
    elif ema is not None:
        with ema.swapped_in():
            ema_state = snapshot("EMA")
    return snapshot("trained"), ema_state


def _nonfinite_ema_names(adapter, ema: "EMA") -> List[str]:
    """Names (as in :func:`trainable_state`) of the EMA shadow tensors holding a NaN or an infinity, read from the
    shadow itself (swapping it in clones every trained parameter on its device first)."""
    bad = {p.data_ptr() for p, sh in zip(ema.params, ema.shadow) if not bool(torch.isfinite(sh).all())}
    if not bad:
        return []
    names = [name for name, t in _live_trainable(adapter).items() if t.data_ptr() in bad]
    return names or [f"{len(bad)} EMA tensors"]


def restore_weights(adapter, params: Sequence[torch.nn.Parameter], ema: Optional["EMA"], state) -> None:
    """Inverse of :func:`checkpoint_weights` from a loaded :class:`~diffalign.checkpoint.CheckpointState`; weights
    that do not fit the model are a :class:`~diffalign.checkpoint.CheckpointError` naming the fix."""
    from diffalign.checkpoint import CheckpointError

    try:
        if ema is not None and state.ema_state:
            # load the EMA weights into the live parameters, copy them as the shadow, then load the trained ones
            load_trainable_state(adapter, state.ema_state, params)
            ema.load_state_dict({"num_updates": state.counters.get("ema_updates", 0),
                                 "shadow": [p.detach().clone() for p in params]})
        load_trainable_state(adapter, state.trainable_state, params)
        if ema is not None and not state.ema_state:
            # written without an EMA (train.ema turned on at the resume): a fresh EMA of the restored weights, not
            # of the weights the model was built with
            ema.load_state_dict({"num_updates": 0, "shadow": [p.detach().clone() for p in params]})
    except (ValueError, RuntimeError) as exc:
        if not weights_mismatch(exc):
            raise
        raise CheckpointError(f"checkpoint {state.path}: {exc}") from exc


def weights_mismatch(exc: BaseException) -> bool:
    """Whether loading weights failed because they do not fit the model: other names (a ValueError of the LoRA
    loader) or other shapes (torch's "Error(s) in loading state_dict" RuntimeError, e.g. an SD3.5-M LoRA on
    SD3.5-L), not another RuntimeError (out of memory)."""
    return isinstance(exc, ValueError) or (isinstance(exc, RuntimeError) and "loading state_dict" in str(exc))


def lr_factor(step: int, warmup: int = 0, schedule: str = "constant", decay_steps: int = 0) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based): a linear warmup over ``warmup``
    steps, then ``constant`` (1), or a ``linear`` / ``cosine`` decay from 1 to 0 over ``decay_steps`` (0 after)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if decay_steps <= 0:
        raise ValueError(f"lr_schedule={schedule!r} needs train.lr_decay_steps > 0 (optimizer steps to decay "
                         "over); set it, or lr_schedule=constant")
    t = min(max(step - warmup, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"lr_schedule must be constant, linear or cosine, got {schedule!r}")


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg) -> tuple:
    """``(AdamW, LambdaLR)`` from a trainer's ``train`` section (``learning_rate``, ``adam_beta1/2``,
    ``weight_decay``, ``adam_eps``, ``warmup_steps``, ``lr_schedule``, ``lr_decay_steps``: :func:`lr_factor`);
    an empty ``params`` is an error."""
    if not params:
        raise ValueError("no trainable parameters: enable model.lora or full fine-tuning")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    warm, schedule, decay = cfg.warmup_steps, cfg.lr_schedule, cfg.lr_decay_steps
    lr_factor(warm, warm, schedule, decay)  # a bad combination fails here, not at the first step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, schedule, decay))
    return optimizer, lr_scheduler


def _lock_run_dir(output_dir, dist, device):
    """The main process's lock of the run folder (:func:`diffalign.checkpoint.lock_run_dir`); every rank stops
    when it cannot be taken (one collective on a multi-process run, so no rank goes on alone)."""
    from diffalign.checkpoint import RunDirInUseError, lock_run_dir

    handle, error = None, None
    if dist.is_main:
        try:
            handle = lock_run_dir(output_dir)
        except Exception as exc:  # noqa: BLE001 - raised below, after every rank has heard of it
            error = exc
    if dist.world_size > 1:
        refused = float(dist.gather(torch.tensor([float(error is not None)], device=device)).max())
        if refused and error is None:
            error = RunDirInUseError(f"the main process could not take {output_dir} (see its error)")
    if error is not None:
        raise error
    return handle


def epoch_rewards(trainer, local_rewards: torch.Tensor, assignment) -> torch.Tensor:
    """``[N, R]`` rewards of the whole epoch: every rank's raw scores gathered, then the reward specs' transforms
    over all of them at once (a ``rank`` transform ranks a prompt's whole group, on any number of processes and
    any sampling batch size; ranked per sampling batch it compared whichever samples shared a batch)."""
    raw = trainer.dist.gather(local_rewards.to(trainer.device)).cpu()
    meta = [{"prompt": p, "sample_id": int(i)} for p, i in zip(assignment.global_prompts, assignment.global_ids)]
    return trainer.rewards.apply_transforms(raw, assignment.global_prompts, meta)


def check_group_size(run, world_size: int) -> None:
    """``sample.group_size`` must divide the samples of an epoch (every process's batches together)."""
    s = run.sample
    total = world_size * s.batch_size * s.num_batches_per_epoch
    if total % s.group_size:
        raise ConfigError(
            f"got {s.group_size}, but processes x sample.batch_size x sample.num_batches_per_epoch = "
            f"{world_size} x {s.batch_size} x {s.num_batches_per_epoch} = {total} samples per epoch is "
            "not a multiple of it; choose a group_size that divides it, or change batch_size / "
            "num_batches_per_epoch",
            key="sample.group_size")


def claim_run(run, dist, device="cpu"):
    """The checks of a run that need no model, before a trainer loads one (minutes and a GPU's memory for a real
    checkpoint): the group size against the world size, the run folder's lock (a second run on the same
    ``output_dir`` is refused) and ``checkpoint.resume_from`` (a misspelt name). Returns the checkpoint manager
    holding the lock, for :func:`open_run` (``claimed=``); :func:`release_claim` lets go of it if setup fails."""
    from diffalign.checkpoint import CheckpointManager, resolve_resume

    check_group_size(run, dist.world_size)
    ckpt = CheckpointManager(run.output_dir, keep_last=run.checkpoint.keep_last, rank=dist.rank,
                             world_size=dist.world_size, barrier=dist.barrier)
    ckpt.run_lock = _lock_run_dir(run.output_dir, dist, device)
    try:
        resolve_resume(run.output_dir, run.checkpoint.resume_from)
    except BaseException:
        release_claim(ckpt)
        raise
    return ckpt


@contextlib.contextmanager
def claimed_setup(trainer, what: str):
    """The start of a trainer's ``setup()`` (GRPO, NFT): processes, device and dtype, :func:`claim_run`, then the
    rewards and prompts (a misspelt reward option or a missing prompt file fails before the model loads) and the
    adapter. Yields the claimed checkpoint manager (for :func:`open_run`); the rest of the setup runs inside the
    ``with``, and a failure anywhere in it lets go of the run folder."""
    from diffalign.distributed import DistContext
    from diffalign.prompts import build_prompt_source

    run = trainer.run
    trainer.dist = DistContext.from_accelerator(trainer.accelerator)
    trainer.device = resolve_device(run.model.device, trainer.accelerator)
    trainer.dtype = DTYPES[run.model.dtype]
    if not run.rewards:
        raise ValueError(f"rewards: {what} needs at least one reward; add e.g. rewards: [{{name: shapes}}]")
    claimed = claim_run(run, trainer.dist, trainer.device)  # the checks that need no model, before it loads
    try:
        torch.manual_seed(run.seed)
        trainer.rewards, trainer.eval_only_rewards = build_run_rewards(run)
        torch.manual_seed(run.seed)  # the model's LoRA initialisation does not depend on the rewards built
        trainer.prompts = build_prompt_source(run.prompts, run.seed)
        trainer.adapter = build_adapter(run.model, trainer.device, trainer.pipeline)
        yield claimed
    except BaseException:
        release_claim(claimed)
        raise


def release_claim(ckpt) -> None:
    """Let go of the run folder's lock taken by :func:`claim_run` (a setup that failed)."""
    if ckpt is not None and ckpt.run_lock is not None:
        ckpt.run_lock.close()
        ckpt.run_lock = None


def open_run(run, dist, restore, device="cpu", claimed=None) -> tuple:
    """A trainer's checkpoint manager, metrics logger and config record (GRPO, NFT).

    Takes the run folder's lock first (a second run on the same ``output_dir`` is refused; ``claimed``: the
    manager :func:`claim_run` returned, already holding it), released by :func:`close_run`. Resumes from
    ``run.checkpoint.resume_from`` through ``restore(state) -> epoch`` (the trainer loads its own state, usually
    with :func:`restore_run_state`), opens the logger at the resumed epoch and saves the resolved config on the
    main process. Returns ``(ckpt, logger, config_dict)``.
    """
    ckpt = claimed if claimed is not None else claim_run(run, dist, device)
    try:
        return _open_locked_run(run, dist, restore, ckpt)
    except BaseException:  # a resume that fails lets go of the folder
        release_claim(ckpt)
        raise


def _open_locked_run(run, dist, restore, ckpt) -> tuple:
    from diffalign.checkpoint import check_model_config, config_changes, resolve_resume
    from diffalign.config import save_config, to_dict
    from diffalign.logging import MetricsLogger

    resumed_epoch = None
    resume = resolve_resume(run.output_dir, run.checkpoint.resume_from)
    if resume is not None:
        state = ckpt.load(resume)
        check_model_config(state, run.model, "resume from")
        changed = config_changes(state, to_dict(run))
        if changed and dist.is_main:
            warnings.warn(f"resuming from {resume} with a config that differs from the checkpoint's (the run "
                          f"continues with the new values; config.yaml is updated):\n  " + "\n  ".join(changed),
                          UserWarning)
        resumed_epoch = restore(state)
    # checkpoints above the resumed one (all of them on a fresh start, or a resume from outside this run's
    # folder) are another timeline: moved aside at this run's first checkpoint, so that pruning and `latest` see
    # this run's only; a fresh start also moves an earlier log aside (resume_step -1)
    inside = resume is not None and resume.resolve().parent == ckpt.checkpoints_dir.resolve()
    moving = ckpt.set_aside_after(resumed_epoch if inside else -1)
    if moving and dist.is_main:
        what = (f"this run resumes from {resume}" if resume is not None
                else "this run starts afresh (checkpoint.resume_from=null)")
        warnings.warn(f"{what}: {run.output_dir}'s checkpoints {moving} belong to the run it replaces; they move to "
                      f"{ckpt.checkpoints_dir}/superseded-<time>/ when this run writes its first checkpoint (until "
                      "then resume_from=latest still finds them); use a new output_dir to keep runs apart",
                      UserWarning)
    config_dict = to_dict(run)
    # the W&B run shows the resolved config and is named after the output folder (it had neither)
    logger = MetricsLogger(run.output_dir, tensorboard=run.logging.tensorboard, wandb=run.logging.wandb,
                           wandb_project=run.logging.wandb_project, is_main=dist.is_main,
                           resume_step=resumed_epoch if resumed_epoch is not None else -1,
                           wandb_config=config_dict, run_name=os.path.basename(os.path.normpath(run.output_dir)))
    if dist.is_main:
        save_config(run, f"{run.output_dir}/config.yaml")
    return ckpt, logger, config_dict


def restore_run_state(state, adapter, params: Sequence[torch.nn.Parameter], ema: Optional["EMA"], optimizer,
                      lr_scheduler) -> tuple:
    """Weights, EMA, optimizer, LR scheduler and every RNG from a loaded checkpoint (inverse of
    :func:`save_run_state`). Returns ``(epoch, step, sampler_state)`` for the trainer's own extras."""
    from diffalign.checkpoint import restore_rng, restore_training_state

    check = getattr(optimizer, "check_compatible", None)
    if check is not None and state.optimizer_state is not None:
        check(state.optimizer_state)  # another trainer's checkpoint is refused before the model is touched
    restore_weights(adapter, params, ema, state)
    restore_training_state(state, optimizer=optimizer, lr_scheduler=lr_scheduler)
    restore_rng(state)
    return int(state.counters["epoch"]), int(state.counters["step"]), state.sampler_state or {}


def save_run_state(ckpt, adapter, ema: Optional["EMA"], *, epoch: int, step: int, optimizer, lr_scheduler,
                   sampler_state: Dict, config: Dict) -> None:
    """One checkpoint of a trainer: trained (and EMA) weights, optimizer (or any object with a
    ``state_dict``), LR scheduler, counters, ``sampler_state`` plus the prompt-sampler position, config."""
    def refuse(label: str, bad: List[str]) -> None:
        if bad:  # never publish (or prune good checkpoints for) a broken model
            raise NonFiniteError(
                f"refusing to write checkpoint {epoch}: {len(bad)} {label} tensors are not finite (first: {bad[0]}); "
                "the last good checkpoint stays 'latest'. Resume from it with a lower train.learning_rate")

    # every rank checks its (identical) weights; only the writer (rank 0) copies them to the CPU
    trained, ema_state = checkpoint_weights(adapter, ema, copy=ckpt.rank == 0, check=refuse)
    ckpt.save(
        epoch,
        trainable_state=trained,
        ema_state=ema_state,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        counters={"epoch": epoch, "step": step, "ema_updates": ema.num_updates if ema else 0},
        sampler_state={**sampler_state, "prompt_epoch": epoch},
        config=config,
    )


class NonFiniteError(UserError, RuntimeError):
    """A run met non-finite gradients (or weights, or samples) it was configured not to skip."""


def nonfinite_images(images: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the images holding a NaN or inf pixel."""
    return ~torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)


def check_finite_samples(trainer, images: torch.Tensor) -> None:
    """Stop the run, on every rank alike (one collective on several processes), when a training rollout decoded
    non-finite images: the weights no longer make images. An update whose gradient was finite but far too large
    does that; the gradient checks cannot see it, and the rewards would score the NaN images as if they were
    images (the verifier gives a blank image a third), checkpoints would go on and prune the good ones."""
    from diffalign.checkpoint import list_checkpoints

    bad = float(nonfinite_images(images).sum())
    if trainer.dist.world_size > 1:
        bad = float(trainer.dist.gather(torch.tensor([bad], device=trainer.device)).sum())
    if not bad:
        return
    saved = list_checkpoints(trainer.run.output_dir)
    names = [p.name for p in saved]
    raise NonFiniteError(
        f"the model's samples are not finite at epoch {trainer.epoch + 1} ({int(bad)} images of this batch): an "
        "earlier update with a finite but too large gradient broke the weights (train/grad_norm in metrics.jsonl "
        "shows its size). Lower train.learning_rate or train.max_grad_norm and resume from a checkpoint written "
        f"before the blow-up (each holds the weights after its epoch's update; this run has {names or 'none'}), "
        f"e.g. checkpoint.resume_from={saved[-2] if len(saved) > 1 else 'null'}")


class LossScaler:
    """Dynamic loss scaling for ``model.dtype: float16`` training (Micikevicius et al. 2018, "Mixed Precision
    Training", §3.2; torch's GradScaler rule): every loss is multiplied by ``scale`` before ``backward`` so that
    small gradients survive float16 activations, the gradients are divided by it after the all-reduce, a step
    whose gradient overflows is skipped and halves ``scale``, and ``growth_interval`` clean steps in a row
    double it (torch's default interval is 2000 steps; an RL run makes few optimizer steps, hence 200,
    ``train.loss_scale_growth_interval``). Disabled (every method a no-op, ``scale == 1``) for float32 and
    bfloat16, whose exponent range needs no scaling. Its state travels in the checkpoint, so a resume continues
    with the same scale.

    A non-finite gradient under float16 is first taken for an overflow: the step is skipped and the scale halved
    (``train/overflow_steps``, one warning per run); only at ``min_scale`` does ``train.on_nonfinite`` apply. A
    NaN loss is thus skipped up to log2(init_scale) = 16 times before it counts as one."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 200,
                 min_scale: float = 1.0) -> None:
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.good_steps = 0

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params: Sequence[torch.nn.Parameter]) -> None:
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)

    def overflowed(self) -> bool:
        """After a non-finite gradient: ``True`` (scale halved, the step to be skipped quietly) while the scale
        can still shrink; ``False`` once it reached ``min_scale`` (then it is a real NaN / inf)."""
        if not self.enabled or self.scale <= self.min_scale:
            return False
        self.scale, self.good_steps = max(self.scale / 2, self.min_scale), 0
        return True

    def step_done(self) -> None:
        if self.enabled:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> Dict[str, float]:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Continue a float16 run's scale; a state written without scaling (a float32 / bfloat16 run resumed as
        float16) is ignored, so the scale starts at ``init_scale`` rather than at 1."""
        if self.enabled and state.get("enabled", True):
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def accumulation_window(index: int, count: int, accum: int) -> int:
    """Minibatches in the gradient-accumulation window of minibatch ``index`` (of ``count``, ``accum`` per window):
    ``accum``, or fewer for the last window when ``count`` is not a multiple of ``accum``. Each micro-loss is divided
    by it (times the trained steps), so every optimizer step takes the *mean* over its own micro-batches and a
    partial last window is not a proportionally smaller step (as transformers' Trainer does, counting the
    window's actual batches; Flow-GRPO divides by the nominal count)."""
    return min(accum, count - (index // accum) * accum)


def grads_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether every ``.grad`` of ``params`` is finite (call after the all-reduce: then every rank agrees)."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def optimizer_update(trainer, metrics: Dict[str, List[float]], *, finite: bool = True) -> bool:
    """The end of one optimizer step, once ``.grad`` is complete and identical on every rank (after the
    all-reduce, so every rank takes the same decision): clip, step, LR schedule, EMA, step counter.

    A non-finite gradient (a NaN loss, an overflow; or ``finite=False`` from a caller that found its own inputs
    non-finite, e.g. MARBLE's per-reward gradients) never reaches the weights: with ``train.on_nonfinite: skip``
    the step is dropped (weights, optimizer moments, LR schedule and EMA untouched; counted in
    ``train/skipped_steps``, warned), and more than ``train.max_skipped_steps`` dropped in a row stop the run;
    with ``raise`` the first one does (under float16 loss scaling only once the scale is at its minimum:
    :class:`LossScaler`). The count of skips in a row (``trainer.skipped_streak``) is checkpointed by
    the trainers, so a resume continues it.
    Returns whether the step was applied."""
    cfg = trainer.cfg
    grads = [p.grad for p in trainer.params if p.grad is not None]
    norm = (float(torch.nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0
            else float(torch.nn.utils.get_total_norm(grads)))
    scaler = getattr(trainer, "scaler", None)
    if scaler is not None and scaler.enabled:
        metrics.setdefault("train/loss_scale", []).append(scaler.scale)
    if not (finite and math.isfinite(norm)):
        trainer.optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.overflowed():  # float16 loss scaling: expected while the scale settles
            metrics.setdefault("train/overflow_steps", []).append(1.0)
            if not getattr(trainer, "overflow_warned", False):
                trainer.overflow_warned = True
                warnings.warn(f"float16 gradient overflow at optimizer step {trainer.global_step + 1}: step skipped, "
                              f"loss scale halved to {scaler.scale:g} (expected while the scale settles; warned "
                              "once; train/overflow_steps counts them; a NaN that persists down to scale 1 is "
                              "handled by train.on_nonfinite)", RuntimeWarning)
            return False
        streak = getattr(trainer, "skipped_streak", 0) + 1
        trainer.skipped_streak = streak
        metrics.setdefault("train/skipped_steps", []).append(1.0)
        what = f"non-finite gradient (norm {norm}) at optimizer step {trainer.global_step + 1}"
        if cfg.on_nonfinite == "raise" or streak > cfg.max_skipped_steps:
            rule = ("train.on_nonfinite=raise" if cfg.on_nonfinite == "raise"
                    else f"{streak} steps in a row > train.max_skipped_steps={cfg.max_skipped_steps}")
            raise NonFiniteError(
                f"{what} ({rule}); the weights and checkpoints are from before it. Look for a reward returning "
                "inf, a too-high learning rate or an fp16 overflow (try model.dtype=bfloat16), or raise "
                "train.max_skipped_steps")
        warnings.warn(f"{what}: step skipped (weights, optimizer, LR schedule and EMA unchanged; "
                      f"{streak} in a row, train.max_skipped_steps={cfg.max_skipped_steps})", RuntimeWarning)
        return False
    trainer.skipped_streak = 0
    if scaler is not None:
        scaler.step_done()
    if cfg.max_grad_norm > 0:
        metrics.setdefault("train/grad_norm", []).append(norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ema is not None:
        trainer.ema.update()
    trainer.global_step += 1
    return True


def loop_state(trainer) -> Dict:
    """The optimizer loop's own checkpoint state (a trainer's ``sampler_state`` entries): the float16 loss scale,
    the count of steps :func:`optimizer_update` skipped in a row, and the next global sample id."""
    out = {"loss_scaler": trainer.scaler.state_dict(), "skipped_streak": getattr(trainer, "skipped_streak", 0)}
    if getattr(trainer, "next_sample_id", None) is not None:
        out["next_sample_id"] = int(trainer.next_sample_id)
    if getattr(trainer, "next_prompt_position", None) is not None:
        out["next_prompt_position"] = int(trainer.next_prompt_position)
    return out


def restore_loop_state(trainer, extra: Dict) -> None:
    """Inverse of :func:`loop_state` (a checkpoint without the entries starts them afresh; without
    ``next_sample_id``, an older checkpoint, the ids continue as ``epoch x samples per epoch``)."""
    if "loss_scaler" in extra:
        trainer.scaler.load_state_dict(extra["loss_scaler"])
    trainer.skipped_streak = int(extra.get("skipped_streak", 0))
    trainer.next_sample_id = int(extra["next_sample_id"]) if "next_sample_id" in extra else None
    trainer.next_prompt_position = (int(extra["next_prompt_position"]) if "next_prompt_position" in extra
                                    else None)


def no_reward_epoch(trainer, stats: Dict[str, float], epoch: int) -> Optional[Dict[str, float]]:
    """The training metrics of an epoch in which no sample of the global batch has a finite combined reward
    (every reward failed under ``on_error: skip``, e.g. a remote server that is down; ``stats`` are the epoch's
    advantage statistics, whose ``reward/combined`` is then the NaN mean of no value; with per-column advantages,
    ``train.aggregation`` gdpo or marble, no finite value in any column), else ``None``.

    Such an epoch makes no optimizer step: with no reward there is nothing to learn, and a step on a zero policy
    gradient would still move the weights (Adam's momentum, weight decay, a KL or NFT regularizer). The weights,
    optimizer, LR schedule, EMA and (NFT) old policy stay put; every rank decides alike (the rewards are
    gathered). Logged as ``train/no_reward_epochs``, with a warning."""
    columns = [v for k, v in stats.items() if k.startswith("reward/") and k != "reward/combined"]
    if getattr(trainer.cfg, "aggregation", "weighted_sum") != "weighted_sum":  # per-column advantages (gdpo, marble)
        if any(not math.isnan(v) for v in columns):
            return None
    elif not math.isnan(stats["reward/combined"]):
        return None
    if trainer.dist.is_main:
        warnings.warn(f"epoch {epoch + 1}: no sample has a finite combined reward (every reward failed or was NaN; "
                      "see reward_failures/* in the log): no update this epoch", UserWarning, stacklevel=2)
    return {"train/updates": 0, "train/no_reward_epochs": 1}


#: The per-minibatch loss statistics (:class:`diffalign.types.LossStats`, and DiffusionNFT's two implicit-policy
#: losses) a trainer logs as ``train/KEY``
LOSS_STAT_KEYS = ("loss", "policy_loss", "kl_loss", "approx_kl", "clip_frac", "ratio_mean", "loss_pos", "loss_neg")


def epoch_means(trainer, values: Dict[str, List[float]], prefix: str = "") -> Dict[str, float]:
    """An epoch's mean of each ``values[KEY]`` list (per-minibatch statistics). The loss statistics
    (``prefix + KEY`` for KEY in :data:`LOSS_STAT_KEYS`) are averaged over every rank's minibatches, one collective
    on a multi-process run (the keys are fixed, so the ranks line up; a rank without a value counts none), so a
    run logs the same loss on one process or many; the other keys are this rank's."""
    import numpy as np

    out = {k: float(np.mean(v)) for k, v in values.items() if len(v)}
    if trainer.dist.world_size > 1:
        keys = [prefix + k for k in LOSS_STAT_KEYS]
        local = torch.tensor([[float(np.sum(values.get(k, []))), float(len(values.get(k, [])))] for k in keys],
                             dtype=torch.float64)
        total = trainer.dist.gather(local.flatten()[None].to(trainer.device)).sum(dim=0).view(len(keys), 2).cpu()
        for k, (sum_, count) in zip(keys, total.tolist()):
            if count:
                out[k] = sum_ / count
    return out


def harmonizer_state(harmonizer, names: Sequence[str]) -> Dict:
    """MARBLE's coefficients for a checkpoint, with the reward columns they belong to (in order)."""
    return {**harmonizer.state_dict(), "rewards": list(names)}


def restore_harmonizer(harmonizer, saved: Optional[Dict], names: Optional[Sequence[str]] = None) -> None:
    """Load MARBLE's coefficients from a checkpoint's ``extra["harmonizer"]`` (``saved``; ``None``: none saved).
    Coefficients saved for other rewards (another number, or, where the checkpoint names them, other reward
    columns or another order: a coefficient belongs to its reward, not to its position) restart uniform, with a
    warning, as when none were saved; so do the tracked reward gradients (``marble_grad_ema``)."""
    if saved is None:
        return
    if len(saved["alpha_bar"]) != harmonizer.num_rewards:
        warnings.warn(f"the checkpoint's MARBLE coefficients are for {len(saved['alpha_bar'])} rewards, this run has "
                      f"{harmonizer.num_rewards} (the rewards changed): they restart uniform", stacklevel=2)
        return
    if names is not None and saved.get("rewards") is not None and list(saved["rewards"]) != list(names):
        warnings.warn(f"the checkpoint's MARBLE coefficients are for the rewards {list(saved['rewards'])}, this run "
                      f"has {list(names)} (changed or reordered): they restart uniform, and so do the tracked "
                      "reward gradients", stacklevel=2)
        harmonizer.tracked = None
        return
    harmonizer.load_state_dict(saved)


def reapply_optimizer_settings(optimizer, lr_scheduler, cfg) -> None:
    """The ``train`` section's AdamW settings after a resume: loading a checkpoint's optimizer and LR schedule
    restores the learning rate, weight decay, betas and eps it was saved with, so a value changed for the resume
    (listed in its warning as applied) was silently ignored. The schedule's position is kept: the rate is the new
    ``learning_rate`` times the schedule's factor at the restored step (unchanged settings give the same values)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["weight_decay"] = cfg.weight_decay
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
    lr_scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group["lr"] = cfg.learning_rate * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def update_metrics(trainer, step_stats: Dict[str, List[float]]) -> Dict[str, float]:
    """An epoch's counts from :func:`optimizer_update`'s ``step_stats``: skipped steps and, under float16, the loss
    scale and the steps an overflow skipped while it settles."""
    out = {"train/skipped_steps": len(step_stats.get("train/skipped_steps", []))}
    if trainer.scaler.enabled:
        out["train/loss_scale"] = trainer.scaler.scale
        out["train/overflow_steps"] = len(step_stats.get("train/overflow_steps", []))
    return out


class TrainingState:
    """A trainer's checkpoint optimizer slot: the optimizer, named tensor lists the optimizer does not hold (NFT's
    old policy), and MARBLE's tracked per-reward gradients (:meth:`diffalign.balance.Harmonizer.tracked_state`).

    ``state_dict()`` is ``{"trainer": OWNER, "optimizer": ..., NAME: [tensors], "marble_tracked": [K, D]}`` (the
    last only while tracking). :meth:`load_state_dict` refuses a slot written by another trainer (before touching
    the optimizer) and accepts a bare optimizer state, what GRPO checkpoints held before this bundle existed.
    """

    def __init__(self, owner: str, optimizer, params: Sequence[torch.Tensor], harmonizer=None,
                 tensors: Optional[Dict[str, List[torch.Tensor]]] = None) -> None:
        self.owner, self.optimizer, self.harmonizer, self.tensors = owner, optimizer, harmonizer, dict(tensors or {})
        self.num_params = sum(p.numel() for p in params)
        self.device = params[0].device if len(params) else torch.device("cpu")

    def state_dict(self) -> Dict:
        state = {"trainer": self.owner, "optimizer": self.optimizer.state_dict(),
                 **{name: [t.detach().cpu() for t in ts] for name, ts in self.tensors.items()}}
        tracked = self.harmonizer.tracked_state() if self.harmonizer is not None else None
        if tracked is not None:
            state["marble_tracked"] = tracked
        return state

    @staticmethod
    def _bundle(state: Dict) -> Dict:
        # a bare optimizer state_dict is what GRPO checkpoints held before the bundle existed
        return state if "optimizer" in state else {"trainer": "grpo", "optimizer": state}

    def check_compatible(self, state: Dict) -> None:
        """Raise ``CheckpointError`` (a ``ValueError``) if ``state`` was written by another trainer (or, for a slot
        with named tensor lists such as NFT's old policy, with another number of tensors); changes nothing
        (:func:`restore_run_state` calls it before any weight is restored)."""
        from diffalign.checkpoint import CheckpointError

        state = self._bundle(state)
        known = {"trainer", "optimizer", "marble_tracked"}
        foreign = sorted(set(state) - known - set(self.tensors))
        missing = sorted(set(self.tensors) - set(state))
        writer = state.get("trainer")
        if (writer is not None and writer != self.owner) or foreign or missing:
            raise CheckpointError(
                f"the checkpoint's optimizer state was written by another trainer ({writer or 'unknown'}: extra "
                f"{foreign}, missing {missing}); this run is trainer {self.owner!r}: resume with the trainer that "
                "wrote it, or start afresh (checkpoint.resume_from=null)")
        for name, ts in self.tensors.items():
            if len(state[name]) != len(ts):
                raise CheckpointError(f"the checkpoint's {name!r} holds {len(state[name])} tensors, this run has "
                                      f"{len(ts)}: resume with the same model and adapter")

    def load_state_dict(self, state: Dict) -> None:
        self.check_compatible(state)
        state = self._bundle(state)
        self.optimizer.load_state_dict(state["optimizer"])
        for name, ts in self.tensors.items():
            for t, v in zip(ts, state[name]):
                t.copy_(v)
        if self.harmonizer is not None:
            tracked = state.get("marble_tracked")
            if tracked is not None and tracked.shape[0] != self.harmonizer.num_rewards:
                warnings.warn(f"the checkpoint's tracked reward gradients are for {tracked.shape[0]} rewards, this run "
                              f"has {self.harmonizer.num_rewards}: tracking restarts", stacklevel=2)
                tracked = None
            if tracked is None and self.harmonizer.grad_ema > 0:
                warnings.warn("train.marble_grad_ema > 0 but the checkpoint holds no tracked reward gradients (saved "
                              "without tracking): tracking restarts from the next batch's gradients", stacklevel=2)
            self.harmonizer.load_tracked_state(tracked, self.device, num_params=self.num_params)


def image_size(adapter, sample_cfg) -> tuple:
    """``(height, width)`` in pixels: the config's, or the model's native size."""
    native_h, native_w = adapter.default_image_size()
    h, w = int(sample_cfg.height or native_h), int(sample_cfg.width or native_w)
    multiple = int(adapter.size_multiple)  # the multiple diffusers' pipelines check (FLUX: its 2x2 packing)
    for key, value in (("height", h), ("width", w)):
        if value % multiple:
            near = max(multiple, value // multiple * multiple)
            raise ConfigError(f"got {value}; this model needs a multiple of {multiple} (VAE downsampling x "
                              f"patch size), e.g. {near}, or null for the model's native size "
                              f"{native_h}x{native_w}", key=f"sample.{key}")
    return h, w


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast for the model forward; step math stays float32 inside the samplers."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def swap_in(params: Sequence[torch.nn.Parameter], shadow: Sequence[torch.Tensor]):
    """Copy ``shadow`` into ``params`` for the ``with`` block, then copy the live values back (EMA weights for
    evaluation, DiffusionNFT's old policy for its no-grad forwards)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for s, p in zip(shadow, params):
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, p in zip(backup, params):
                p.copy_(b)


class EMA:
    """Exponential moving average of trainable parameters (Flow-GRPO's ``EMAModuleWrapper`` idea,
    research/grpo_family.md §1.4).

    :meth:`update` is called once per optimizer step; the average moves every ``every`` calls with
    ``decay_t = min(decay, (1 + t) / (10 + t))``, ``t`` the number of optimizer steps so far (as Flow-GRPO's global
    step), not of averaging moves: with ``every: 8`` the warm-up reaches 0.9 after 80 optimizer steps, not 640.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float = 0.9, every: int = 1) -> None:
        self.params = list(params)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        if self.num_updates % self.every:
            return
        t = self.num_updates
        d = min(self.decay, (1 + t) / (10 + t))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - d)

    def swapped_in(self):
        """Temporarily load the EMA weights into the live parameters (evaluation, export)."""
        return swap_in(self.params, self.shadow)

    def state_dict(self) -> Dict:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Dict) -> None:
        self.num_updates = int(state["num_updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def sample_batch(
    adapter,
    prompts: List[str],
    sample_ids: Iterable[int],
    *,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    negative_prompt: str,
    height: int,
    width: int,
    step: str,
    noise_level: float,
    window=None,
    store_x0: bool = False,
    dtype: torch.dtype = torch.float32,
    noise_ids: Optional[Iterable[int]] = None,
):
    """Roll out one batch: encode, per-sample noise, rollout, decode. Returns ``(trajectory, cond, images,
    schedule)``; ``images`` ``[B, 3, H, W]`` float in ``[0, 1]``.

    The initial latents and the kernel noise of sample ``i`` come from one generator seeded by
    ``(seed, sample_ids[i])``. With ``noise_ids`` the initial latents come instead from generators seeded by
    ``noise_ids`` (a separate stream), so samples with equal ``noise_ids`` start from the same noise while
    their kernel noise still differs (``sample.shared_group_noise``)."""
    from diffalign.distributed import seed_for
    from samplers import make_generators, rollout

    device = adapter.device
    cond = adapter.encode_prompts(prompts, negative_prompt, guidance_scale, height=height, width=width)
    gens = make_generators(seed, list(sample_ids), device="cpu")
    init_gens = gens if noise_ids is None else make_generators(seed_for(seed, 11), list(noise_ids),
                                                               device="cpu")
    noise = adapter.prepare_latents(len(prompts), height, width, generator=init_gens).to(device)
    schedule = adapter.make_schedule(num_steps, height, width)
    with autocast_ctx(device, dtype):
        traj: Trajectory = rollout(adapter.model_fn(cond, guidance_scale), schedule, noise, step=step,
                                   noise_level=noise_level, window=window, generator=gens, store_x0=store_x0)
    with torch.no_grad():
        images = adapter.decode(traj.final, height=height, width=width).float()
    return traj, cond, images, schedule


def should_stop(cfg, ran: int, started: float, dist=None, device="cpu") -> tuple:
    """``(stop, timed_out, signalled)`` after ``ran`` epochs in this process: ``train.stop_after_epochs``
    reached, ``train.max_minutes`` of wall time since ``started`` (``time.time()``) spent, or a stop requested by
    SIGTERM / SIGINT (:mod:`diffalign.interrupt`; ``signalled`` is the signal number, else 0). A timed-out run
    ends with an evaluation (outside its time budget), like a finished one; a signalled run only with its
    checkpoint. With a multi-process ``dist`` (:class:`diffalign.distributed.DistContext`) every rank takes the
    decision of any rank whose clock ran out or that got a signal, so no rank waits alone in a collective."""
    import time

    from diffalign.interrupt import stop_active, stop_requested

    timed_out = cfg.max_minutes is not None and (time.time() - started) / 60 >= cfg.max_minutes
    signalled = stop_requested() or 0
    if dist is not None and dist.world_size > 1 and (cfg.max_minutes is not None or stop_active()):
        flags = dist.gather(torch.tensor([[float(timed_out), float(signalled)]], device=device)).amax(dim=0)
        timed_out, signalled = bool(flags[0] > 0), int(flags[1])
    stop = timed_out or bool(signalled) or (cfg.stop_after_epochs is not None and ran >= cfg.stop_after_epochs)
    return stop, timed_out, signalled


def shared_signal(dist=None, device="cpu") -> int:
    """The signal number of a stop request of any rank (:mod:`diffalign.interrupt`), else 0; one collective per
    call when a :class:`~diffalign.interrupt.GracefulStop` is active on a multi-process run (it is on every
    rank or none)."""
    from diffalign.interrupt import stop_active, stop_requested

    signalled = stop_requested() or 0
    if dist is not None and dist.world_size > 1 and stop_active():
        signalled = int(dist.gather(torch.tensor([float(signalled)], device=device)).max())
    return signalled


def _epoch_failures(trainer, before: Dict[str, int]) -> Dict[str, float]:
    """``reward_failures/NAME``: samples of this epoch (all ranks) whose reward failed under ``on_error: skip``;
    only rewards with a skip policy are logged (a failure under ``raise`` stops the run)."""
    rewards = trainer.rewards
    names = [n for n, spec in zip(rewards.names, rewards.specs) if spec.on_error == "skip"]
    if not names:
        return {}
    local = torch.tensor([[float(rewards.total_failures[n] - before.get(n, 0)) for n in names]],
                         device=trainer.device)
    total = trainer.dist.gather(local).sum(dim=0)
    return {f"reward_failures/{n}": float(total[i]) for i, n in enumerate(names)}


def run_epochs(trainer, desc: str, one_epoch) -> Dict[str, float]:
    """The epoch loop of the online trainers (GRPO, NFT): evaluation at epoch 0 and every ``eval_every``,
    repeat assignment of the epoch's prompts, timing, metrics, sample grids, checkpoints, the time limit and a
    progress bar.

    ``one_epoch(epoch, assignment) -> (data, stats, t_sampled)``: the trainer's sampling, advantages and
    updates; ``data`` holds ``reward_seconds`` and ``images``, ``stats`` the epoch's metrics (with
    ``reward/combined``), ``t_sampled`` the ``time.perf_counter()`` after sampling. Uses the trainer's
    ``run``, ``cfg``, ``dist``, ``device``, ``prompts``, ``epoch``, ``logger``, ``evaluate()`` and
    ``save_checkpoint()``; returns the last evaluation.
    """
    import time

    from diffalign.distributed import repeat_assignment
    from diffalign.logging import progress

    run, cfg, s, dist = trainer.run, trainer.cfg, trainer.run.sample, trainer.dist
    check_group_size(run, dist.world_size)  # checked by claim_run already; a custom trainer may not call it
    total = dist.world_size * s.batch_size * s.num_batches_per_epoch
    n_prompts = total // s.group_size
    started = time.time()
    ran = 0
    last_eval: Dict[str, float] = {}
    if trainer.epoch >= cfg.num_epochs and dist.is_main:
        print(f"{desc}: {run.output_dir} is already at epoch {trainer.epoch} of train.num_epochs={cfg.num_epochs} "
              "(resumed from its latest checkpoint): nothing to train. Raise train.num_epochs to continue, or use "
              "checkpoint.resume_from=null (or another output_dir) to start over")
    trainer.last_eval_epoch = None  # the epoch of the evaluation run_epochs returns (train_main says which)
    if trainer.epoch == 0 and cfg.eval_every:
        last_eval = trainer.evaluate()
        trainer.last_eval_epoch = 0
        trainer.logger.log(0, last_eval)
    # counted by hand after each epoch: a bar iterated over breaks on a stop and fell back to the epoch before
    bar = progress(None, desc=desc, disable=not dist.is_main, initial=trainer.epoch, total=cfg.num_epochs)
    saved_at = trainer.epoch  # a resumed run's checkpoint is this epoch's
    for epoch in range(trainer.epoch, cfg.num_epochs):
        signalled = shared_signal(dist, trainer.device)
        if signalled:  # a signal during the last evaluation or checkpoint (or the first evaluation): stop now
            trainer.stopped_by = signalled
            if saved_at != trainer.epoch:
                trainer.save_checkpoint()
                saved_at = trainer.epoch
            break
        t0 = time.perf_counter()
        # global sample ids (they key every sample's noise) run on from the last epoch's, so a resume that changes
        # the samples per epoch draws fresh noise (epoch x samples per epoch would repeat earlier epochs' ids)
        first_id = trainer.next_sample_id if getattr(trainer, "next_sample_id", None) is not None else epoch * total
        # the shapes prompt stream runs on the same way (epoch x prompts per epoch repeated or skipped prompts)
        position = getattr(trainer, "next_prompt_position", None)
        position = epoch * n_prompts if position is None else position
        trainer.next_prompt_position = position + n_prompts
        assignment = repeat_assignment(trainer.prompts.epoch_prompts(epoch, n_prompts, position), s.group_size,
                                       epoch=epoch, seed=run.seed, rank=dist.rank, world_size=dist.world_size,
                                       first_id=first_id)
        trainer.next_sample_id = first_id + total
        failed_before = dict(trainer.rewards.total_failures)
        data, stats, t1 = one_epoch(epoch, assignment)
        t2 = time.perf_counter()
        trainer.epoch = epoch + 1
        metrics = {**stats, "time/sample": t1 - t0 - data["reward_seconds"],
                   "time/reward": data["reward_seconds"], "time/train": t2 - t1, "epoch": trainer.epoch,
                   **_epoch_failures(trainer, failed_before)}
        logged_images = (data["images"][:16].cpu() if dist.is_main and run.logging.image_every
                         and trainer.epoch % run.logging.image_every == 0 else None)
        del data  # the epoch's trajectories, encodings and images: freed before evaluation and the next rollout
        ran += 1
        stop, timed_out, signalled = should_stop(cfg, ran, started, dist, trainer.device)
        trainer.stopped_by = signalled or None  # no extra evaluation for a signal (a grace period is short)
        evaluated = bool(cfg.eval_every and trainer.epoch % cfg.eval_every == 0) or trainer.epoch == cfg.num_epochs \
            or timed_out
        if evaluated:
            last_eval = trainer.evaluate()
            trainer.last_eval_epoch = trainer.epoch
            metrics.update(last_eval)
        if dist.is_main:
            bar.set_postfix(reward=f"{stats['reward/combined']:.3f}")
            if logged_images is not None:
                trainer.logger.log_images(trainer.epoch, logged_images, assignment.prompts[:16])
        if trainer.epoch % run.logging.log_every == 0 or evaluated or stop:
            trainer.logger.log(trainer.epoch, metrics)
        if (run.checkpoint.every and trainer.epoch % run.checkpoint.every == 0) or stop \
                or trainer.epoch == cfg.num_epochs:
            trainer.save_checkpoint()
            saved_at = trainer.epoch
        bar.update(1)
        if stop:
            break
    bar.close()
    trainer.saved_any = saved_at > 0  # a checkpoint of this run is on disk (resumed from, or written)
    return last_eval


def close_run(trainer, title: str) -> None:
    """End of a run: the reward-curve plot (main process; a failing plot never fails the run), then the logger
    is closed."""
    from diffalign.logging import plot_curves, read_metrics

    out = trainer.run.output_dir
    if trainer.dist.is_main:
        present = {k for row in read_metrics(f"{out}/metrics.jsonl") for k in row}
        keys = [k for n in eval_reward_names(trainer) for k in (f"reward/{n}", f"eval/reward/{n}") if k in present]
        try:
            if keys:  # nothing logged yet (a run that stopped before its first epoch): no plot, no warning
                plot_curves(f"{out}/metrics.jsonl", f"{out}/reward_curve.png", keys, title=title)
        except Exception as exc:  # a plot must never fail a finished run
            print(f"warning: could not plot reward curves: {exc}")
    trainer.logger.close()
    lock = trainer.ckpt.run_lock
    if lock is not None:
        lock.close()  # the run folder is free for the next run (also in this process)
        trainer.ckpt.run_lock = None


#: Seed stream of the trainers' per-sample training draws (``make_generators(seed_for(run seed,
#: TRAIN_SEED_STREAM), global sample ids)``): trained timesteps and, for DiffusionNFT, the forward noise, so a
#: sample is trained alike on one process or many.
TRAIN_SEED_STREAM = 23

#: Seed stream of the evaluation noise (``seed_for(run seed, EVAL_SEED_STREAM)``): shared by the trainer's
#: periodic evaluation and ``diffalign eval``, so evaluating a checkpoint reproduces the score logged for it.
EVAL_SEED_STREAM = 99


def eval_seed(run_seed: int) -> int:
    """The initial-noise seed of every evaluation of a run with seed ``run_seed``."""
    from diffalign.distributed import seed_for

    return seed_for(run_seed, EVAL_SEED_STREAM)


def eval_settings(sample_cfg, eval_num_steps: Optional[int], eval_guidance_scale: Optional[float]) -> tuple:
    """``(num_steps, guidance_scale)`` of an evaluation: a trainer's ``eval_num_steps`` / ``eval_guidance_scale``
    overrides, else the ``sample`` section's ``eval_num_steps`` / ``guidance_scale`` (a CFG of 0 is a value)."""
    return (eval_num_steps or sample_cfg.eval_num_steps,
            sample_cfg.guidance_scale if eval_guidance_scale is None else eval_guidance_scale)


def build_eval_only_rewards(run, training_rewards):
    """The ``eval_rewards`` columns of ``run`` as a :class:`rewards.MultiReward` (``None`` without any); their names
    must differ from the training columns', which come first in every evaluation."""
    if not run.eval_rewards:
        return None
    from rewards import MultiReward
    from trainers.grpo import _reward_spec_dict

    extra = MultiReward([_reward_spec_dict(r) for r in run.eval_rewards])
    clash = sorted(set(extra.names) & set(training_rewards.names))
    if clash:
        raise ConfigError(f"columns {clash} are already training rewards (evaluated anyway); remove "
                          "them from eval_rewards, or give the extra column another name with label: NAME",
                          key="eval_rewards")
    return extra


def build_run_rewards(run) -> tuple:
    """``(rewards, eval_only)``: ``run``'s ``rewards`` as a :class:`rewards.MultiReward` and its ``eval_rewards``
    columns (:func:`build_eval_only_rewards`, ``None`` without any). The trainers, ``diffalign eval`` and ``sample``
    build them before the model, so that a misspelt reward option fails before a long model load."""
    from rewards import MultiReward
    from trainers.grpo import _reward_spec_dict

    rewards = MultiReward([_reward_spec_dict(r) for r in run.rewards])
    return rewards, build_eval_only_rewards(run, rewards)


def eval_reward_sets(trainer) -> List:
    """The MultiRewards a trainer's evaluation scores, in column order: ``trainer.rewards``, then
    ``trainer.eval_only_rewards`` when the run has ``eval_rewards``."""
    return [r for r in (trainer.rewards, trainer.eval_only_rewards) if r is not None]


def eval_reward_names(trainer) -> List[str]:
    """The evaluation's column names (:func:`eval_reward_sets`), as logged under ``eval/reward/NAME``."""
    return [n for r in eval_reward_sets(trainer) for n in r.names]


def _score_columns(reward_sets, images, prompts) -> torch.Tensor:
    """Raw scores: the transforms apply to the whole evaluation set at once (:func:`transform_rows`)."""
    meta = [{"prompt": p} for p in prompts]
    return torch.cat([r(images, prompts, meta, transform=False).rewards for r in reward_sets], dim=1)


def transform_rows(reward_sets, rows: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The evaluation's ``[N, R]`` raw rows (:func:`score_prompts`, gathered over processes: row ``k`` is prompt
    ``k``; rows past ``len(prompts)`` are a gather's padding and stay) through each reward set's transforms, over
    all prompts at once, so a ``rank`` transform does not depend on the batch size or the number of processes."""
    reward_sets = [r for r in (reward_sets if isinstance(reward_sets, (list, tuple)) else [reward_sets])
                   if r is not None]  # build_run_rewards gives None without eval_rewards
    if not any(t is not None for r in reward_sets for t in getattr(r, "transforms", [])):
        return rows
    n, out, col = len(prompts), rows.clone(), 0
    meta = [{"prompt": p} for p in prompts]
    for r in reward_sets:
        k = len(r.names)
        out[:n, col:col + k] = r.apply_transforms(rows[:n, col:col + k], prompts, meta).to(out)
        col += k
    return out


@torch.no_grad()
def score_prompts(adapter, rewards, prompts: Sequence[str], ids: Sequence[int], *, sample_cfg, seed: int,
                  num_steps: int, guidance_scale: float, height: int, width: int, dtype: torch.dtype,
                  keep_images: bool = False) -> tuple:
    """Sample ``prompts`` with the deterministic sampler in batches of ``sample_cfg.batch_size`` and score them:
    ``(rewards [N, R], images [N, 3, H, W] on the CPU, or None)``. ``ids`` are the prompts' global indices, which
    seed each prompt's initial noise, so a prompt gets the same image however the prompts are split into batches or
    ranks. The one sampling path of the trainers' evaluation and of ``diffalign eval`` / ``sample``.
    ``rewards`` is a MultiReward or a list of them, whose columns are concatenated in order; the rows are raw scores
    (their transforms apply to the whole prompt set: :func:`transform_rows`)."""
    from samplers.steps import DETERMINISTIC_STEP

    reward_sets = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]

    rows, images = [], []
    for i in range(0, len(prompts), sample_cfg.batch_size):
        batch, batch_ids = list(prompts[i:i + sample_cfg.batch_size]), list(ids[i:i + sample_cfg.batch_size])
        _, _, imgs, _ = sample_batch(
            adapter, batch, batch_ids, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
            negative_prompt=sample_cfg.negative_prompt, height=height, width=width,
            step=DETERMINISTIC_STEP[adapter.kind], noise_level=0.0, dtype=dtype)
        bad = nonfinite_images(imgs)
        if bool(bad.any()):  # not images: no reward scores them (NaN rows, which the means skip), a warning
            warnings.warn(f"{int(bad.sum())} of {len(batch)} evaluation images are not finite (NaN/inf pixels): the "
                          "model is broken (e.g. by a too large update); they are left out of the means",
                          RuntimeWarning)
            scored = _score_columns(reward_sets, imgs[~bad], [p for p, b in zip(batch, bad.tolist()) if not b]) \
                if not bool(bad.all()) else None
            row = torch.full((len(batch), sum(len(r.names) for r in reward_sets)), float("nan"), device=imgs.device)
            if scored is not None:  # on the images' device, as the other batches' rows (the rewards return there)
                row[~bad] = scored.to(row)
            rows.append(row)
        else:
            rows.append(_score_columns(reward_sets, imgs, batch))
        if keep_images:
            images.append(imgs.cpu())  # a whole prompt set of full-size images would fill an accelerator
    out = torch.cat(rows) if rows else torch.zeros(0, sum(len(r.names) for r in reward_sets))
    return out, (torch.cat(images) if keep_images and images else None)


def eval_shard(num_prompts: int, batch_size: int, rank: int, world_size: int) -> Tuple[List[int], int]:
    """``(indices, per)``: the evaluation prompts of ``rank`` and the most any rank gets (the gather's padding).

    Ranks get whole batches of ``batch_size`` consecutive prompts, the batches one process samples, so every
    image is computed in the same batch on any number of processes (batched kernels round differently for other
    batch shapes: a bf16 run logged 0.6080 on two processes against 0.6076 on one when the ranks' halves cut
    batches apart)."""
    num_batches = math.ceil(num_prompts / batch_size)
    per = math.ceil(num_batches / world_size) * batch_size
    return list(range(min(num_prompts, rank * per), min(num_prompts, (rank + 1) * per))), per


def gather_eval_rows(local: torch.Tensor, per: int, dist, device) -> torch.Tensor:
    """Every rank's evaluation reward rows in prompt order (``[world_size x per, R]``, on the CPU): this rank's
    ``local`` rows of its :func:`eval_shard`, padded with NaN rows to ``per`` (which the means skip), gathered on
    ``device`` (NCCL needs the accelerator's)."""
    pad = per - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_full((pad, local.shape[1]), float("nan"))])
    return dist.gather(local.to(device)).cpu()


@torch.no_grad()
def sample_eval_prompts(trainer, indices: Sequence[int], keep_images: bool = False) -> tuple:
    """The evaluation prompts ``indices`` sampled and scored as the trainer's evaluation does it (deterministic
    sampler, ``eval_num_steps`` / ``eval_guidance_scale``, the evaluation noise, the EMA weights when the run keeps
    them): :func:`score_prompts`' ``(rows [n, R], images or None)`` on this process (raw scores: the reward
    transforms apply to the whole set, :func:`transform_rows`).

    Uses the trainer's ``run``, ``cfg`` (``eval_guidance_scale``, ``eval_num_steps``), ``dtype``, ``adapter``,
    ``ema``, ``prompts``, ``rewards``, ``eval_only_rewards`` (``run.eval_rewards``, columns after the training
    ones, or None), ``height`` and ``width``."""
    s, cfg = trainer.run.sample, trainer.cfg
    prompts = trainer.prompts.eval_prompts()
    steps, gs = eval_settings(s, cfg.eval_num_steps, cfg.eval_guidance_scale)
    ctx = trainer.ema.swapped_in() if trainer.ema is not None else contextlib.nullcontext()
    with ctx:
        return score_prompts(trainer.adapter, eval_reward_sets(trainer), [prompts[k] for k in indices],
                             list(indices), sample_cfg=s, seed=eval_seed(trainer.run.seed), num_steps=steps,
                             guidance_scale=gs, height=trainer.height, width=trainer.width, dtype=trainer.dtype,
                             keep_images=keep_images)


@torch.no_grad()
def evaluate_run(trainer) -> Dict[str, float]:
    """Mean reward per column on the fixed eval prompts (``eval/reward/NAME``), sampled by
    :func:`sample_eval_prompts` (deterministic sampler, the trainer's current weights or their EMA); prompts are
    split over ranks (``dist``) and the rewards gathered (on ``device``)."""
    dist = trainer.dist
    mine, per = eval_shard(len(trainer.prompts.eval_prompts()), trainer.run.sample.batch_size, dist.rank,
                           dist.world_size)
    local, _ = sample_eval_prompts(trainer, mine)
    allr = transform_rows(eval_reward_sets(trainer), gather_eval_rows(local, per, dist, trainer.device),
                          trainer.prompts.eval_prompts())
    names = eval_reward_names(trainer)
    return {f"eval/reward/{name}": float(torch.nanmean(allr[:, j])) for j, name in enumerate(names)}
