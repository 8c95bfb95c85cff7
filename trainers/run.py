"""Entry points behind ``diffalign train | sample | eval`` (also under ``accelerate launch``)."""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, Optional

import torch

from diffalign.config import ConfigError, UserError
from rewards.registry import check_reward_config

__all__ = ["TRAINERS", "make_accelerator", "quiet_other_rank", "train_main", "sample_main", "eval_main"]

#: trainer name -> "module:Class" (resolved lazily so `diffalign --help` stays fast)
TRAINERS: Dict[str, str] = {"grpo": "trainers.grpo:GRPOTrainer", "nft": "trainers.nft:NFTTrainer"}


class LaunchError(UserError, RuntimeError):
    """A launch the trainers cannot run correctly (wrong process group, unsupported sharding backend)."""


#: How long a rank of ``diffalign sample`` / ``eval`` may wait in a collective for the others: the prompts are
#: split in whole batches, so the last ranks can have less (or nothing) to sample and wait for the first ones
#: through a whole guided sampling run, far beyond NCCL's default of 10 minutes.
SAMPLING_COLLECTIVE_TIMEOUT = timedelta(hours=24)


def make_accelerator(device: str = "auto", collective_timeout: Optional[timedelta] = None):
    """An ``accelerate.Accelerator`` on the right device, with a world-size sanity check.

    On a machine without CUDA (or with ``model.device=cpu``) the accelerator is built with ``cpu=True``;
    without it, ``accelerate launch --multi_gpu`` on CPUs silently runs independent single-process jobs.
    ``collective_timeout``: the process group's timeout (default: torch's).
    """
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    extra = {}
    if collective_timeout is not None:
        from accelerate.utils import InitProcessGroupKwargs

        extra["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=collective_timeout)]
    acc = Accelerator(cpu=cpu, mixed_precision="no", **extra)
    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        # the trainers keep a full model per process and average gradients themselves (DDP-style); a sharding
        # backend would be set up by accelerate and then silently bypassed
        raise LaunchError(f"accelerate is configured for {kind}, which diffalign's trainers do not support yet; "
                           "launch with plain multi-process data parallel (`accelerate launch --multi_gpu ...` with "
                           "an accelerate config whose distributed_type is MULTI_GPU, or torchrun)")
    expected = int(os.environ.get("WORLD_SIZE", "").strip() or 1)  # unset or empty: one process
    if acc.num_processes != expected:
        raise LaunchError(
            f"launched with WORLD_SIZE={expected} but accelerate formed a group of {acc.num_processes}; on CPUs "
            "use `accelerate launch --multi_gpu --num_processes N` (not --cpu) or torchrun"
        )
    pinned = device != "auto" and torch.device(device).index is not None  # e.g. cuda:0
    if acc.num_processes > 1 and pinned:
        raise LaunchError(f"model.device={device} puts every one of the {acc.num_processes} processes on the same "
                          "device; with several processes use model.device=auto (or cuda): each process then "
                          "takes the device accelerate gives it")
    if not acc.is_main_process:
        quiet_other_rank(acc.process_index, acc.num_processes)
    return acc


def quiet_other_rank(rank: int, world_size: int) -> None:
    """Console hygiene on a process other than the main one: diffusers' and transformers' progress bars
    (pipeline loading, once per rank) are switched off, and each Python warning this process shows starts with
    ``[rank R/N]``. Warnings and the libraries' logged warnings stay on: a rank-specific one (a reward failing on
    this rank's samples, a prompt truncated by this rank's text encoder) must still be seen, and the prefix says
    which process wrote it. Idempotent (several commands in one launched process)."""
    import warnings

    for name in ("diffusers", "transformers"):
        try:
            lib_logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        lib_logging.disable_progress_bar()
    base = getattr(warnings.formatwarning, "_diffalign_base", warnings.formatwarning)
    prefix = f"[rank {rank}/{world_size}] "

    def formatwarning(message, category, filename, lineno, line=None):
        return prefix + base(message, category, filename, lineno, line)

    formatwarning._diffalign_base = base
    warnings.formatwarning = formatwarning


def _trainer_class(name: str):
    """The trainer class of ``trainer: NAME``: a built-in (:data:`TRAINERS`), else the ``trainer_class`` attribute
    (``"module:Class"`` or the class) of the trainer's config class (registered under NAME, or NAME a
    ``module:ConfigClass`` path). A ConfigError on ``trainer`` says what is missing and the fix."""
    import importlib

    from diffalign.config import _import_object, trainer_config_class

    if name in TRAINERS:
        module, cls = TRAINERS[name].split(":")
        return getattr(importlib.import_module(module), cls)
    config_cls = trainer_config_class(name)  # unknown names and bad paths: ConfigError on `trainer`
    target = getattr(config_cls, "trainer_class", None)
    if target is None:
        builtin = [n for n in TRAINERS if trainer_config_class(n) is config_cls]
        if builtin:  # e.g. trainer: trainers.grpo:GRPOConfig
            return _trainer_class(builtin[0])
        raise ConfigError(
            f"{name!r} resolves to the config class {config_cls.__module__}.{config_cls.__qualname__}, which names no "
            "trainer; give it a class attribute trainer_class = 'my_pkg.my_module:MyTrainer' (a class built as "
            "MyTrainer(run_cfg, accelerator) with setup(), train() and cleanup(), e.g. a GRPOTrainer subclass)",
            key="trainer")
    if isinstance(target, str):
        try:
            target = _import_object(target, "trainer")
        except ConfigError as exc:
            raise ConfigError(f"{config_cls.__qualname__}.trainer_class: {exc.detail}", key="trainer") from None
    if not isinstance(target, type):
        raise ConfigError(f"{config_cls.__qualname__}.trainer_class is {target!r}, not a class; set it to "
                          "'my_pkg.my_module:MyTrainer' or the trainer class itself", key="trainer")
    return target


def _check_loggers(logging_cfg) -> None:
    """A logger the config turns on must be installed: checked before the model loads."""
    import importlib.util

    for key in ("wandb", "tensorboard"):
        if getattr(logging_cfg, key) and importlib.util.find_spec(key) is None:
            raise ConfigError(f"got true, but the {key} package is not installed; pip install {key}, or set "
                              f"logging.{key}=false", key=f"logging.{key}")


def _check_output_dir(cfg) -> None:
    """``output_dir`` must be a folder (or not exist yet): found before the model loads, not when a long run or
    evaluation writes its first file."""
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"got {cfg.output_dir!r}, which is a file; output_dir is the folder for the command's "
                          "files (created if missing): give a folder path", key="output_dir")


def train_main(cfg) -> int:
    """``diffalign train CONFIG [key=value ...]``: build the trainer named by ``cfg.trainer`` and run it."""
    check_reward_config(cfg)
    _check_output_dir(cfg)
    if cfg.trainer is None:
        raise ConfigError("the config names no trainer; add `trainer: grpo` (or nft), or the override "
                          "trainer=grpo", key="trainer")
    _check_loggers(cfg.logging)
    import signal

    from diffalign.interrupt import GracefulStop

    accelerator = make_accelerator(cfg.model.device)
    trainer = _trainer_class(cfg.trainer)(cfg, accelerator)
    trainer.setup()
    try:
        with GracefulStop(announce=accelerator.is_main_process):  # SIGTERM / Ctrl-C: checkpoint, then stop
            result = trainer.train()
    finally:
        trainer.cleanup()
    _finish(accelerator)  # every rank got here: training ended (or stopped) on all of them
    stopped_by = getattr(trainer, "stopped_by", None)
    if stopped_by:
        if accelerator.is_main_process and getattr(trainer, "saved_any", True):
            how = ("run the same command to continue" if cfg.checkpoint.resume_from == "latest"
                   else "run the same command with checkpoint.resume_from=latest to continue")
            print(f"stopped by {signal.Signals(stopped_by).name} after epoch {trainer.epoch}, with a checkpoint in "
                  f"{cfg.output_dir}; {how}", file=sys.stderr)
        elif accelerator.is_main_process:
            print(f"stopped by {signal.Signals(stopped_by).name} before the first epoch finished: nothing was "
                  "saved; run the same command to start again", file=sys.stderr)
        return 128 + stopped_by
    if accelerator.is_main_process and result:
        at = getattr(trainer, "last_eval_epoch", None)
        label = ("final eval" if at is None or at == trainer.epoch else
                 f"last eval (epoch {at}; the run stopped at epoch {trainer.epoch} without evaluating again)")
        print(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.items())))
    return 0


def _load_eval_adapter(cfg, checkpoint: str | None, device=None):
    from trainers.common import build_adapter, resolve_device

    adapter = build_adapter(cfg.model, device if device is not None else resolve_device(cfg.model.device))
    adapter.loaded_checkpoint = None  # the folder and step loaded, for the files the command writes
    if checkpoint:
        from diffalign.checkpoint import CheckpointError, check_model_config, load_checkpoint, resolve_resume

        path = resolve_resume(cfg.output_dir, checkpoint)
        if path is None:
            raise CheckpointError(
                f"checkpoint.resume_from={checkpoint!r}: no checkpoint in {cfg.output_dir} (train first, point "
                "output_dir at a run, or use checkpoint.resume_from=null for the base model)")
        state = load_checkpoint(path)
        check_model_config(state, cfg.model, "load")
        saved_path = (state.config or {}).get("model", {}).get("path")
        if saved_path is not None and saved_path != cfg.model.path:
            import warnings

            warnings.warn(f"checkpoint {path} was trained on model.path={saved_path!r} and is loaded onto "
                          f"model.path={cfg.model.path!r}: its weights are a change of that model, so the results "
                          "describe neither (drop the model.path override to use the run's model)", stacklevel=2)
        from trainers.common import load_trainable_state, weights_mismatch

        try:  # evaluate the EMA weights when the run kept them
            load_trainable_state(adapter, state.ema_state or state.trainable_state)
        except (ValueError, RuntimeError) as exc:  # weights of another architecture: one line, as when resuming
            if not weights_mismatch(exc):
                raise
            raise CheckpointError(f"checkpoint {path}: {exc} (is model.path={cfg.model.path!r} the model the run "
                                  f"trained{'' if saved_path is None else f', {saved_path!r}'}?)") from exc
        adapter.loaded_checkpoint = {"path": str(Path(path).resolve()), "step": state.step}
    return adapter


def _eval_rows(cfg, adapter, prompts, built, keep_images: bool = False, ids=None):
    """``(names, rows [n, R], images or None)`` of ``prompts`` sampled as the trainer's evaluation samples them
    (its ``eval_num_steps`` / ``eval_guidance_scale`` when set, and its evaluation noise), so ``diffalign eval``
    and ``sample`` reproduce what a run logged; columns: the training rewards, then ``eval_rewards``
    (``built``: :func:`trainers.common.build_run_rewards`). ``ids``: the prompts' indices in the whole evaluation
    set (default ``0..n-1``), which seed their noise."""
    from trainers.common import DTYPES, eval_seed, eval_settings, image_size, score_prompts

    train = dict(cfg.train or {})
    steps, guidance = eval_settings(cfg.sample, train.get("eval_num_steps"), train.get("eval_guidance_scale"))
    reward_sets = [r for r in built if r is not None]
    h, w = image_size(adapter, cfg.sample)
    ids = range(len(prompts)) if ids is None else ids
    rows, images = score_prompts(adapter, reward_sets, prompts, ids, sample_cfg=cfg.sample,
                                 seed=eval_seed(cfg.seed), num_steps=steps, guidance_scale=guidance, height=h,
                                 width=w, dtype=DTYPES[cfg.model.dtype], keep_images=keep_images)
    return [n for r in reward_sets for n in r.names], rows, images


def eval_main(cfg) -> int:
    """``diffalign eval CONFIG [checkpoint.resume_from=latest|PATH] [key=value ...]``: mean reward per column over the
    evaluation prompts for the base model (no checkpoint) or a trained checkpoint; writes ``eval.json``.

    Under ``accelerate launch`` / ``torchrun`` the prompts are split over the processes in whole sampling batches,
    as in the trainers' evaluation (:func:`trainers.common.eval_shard`), the rewards gathered, and the main
    process writes the result: N processes give the numbers one process gives, about N times sooner."""
    check_reward_config(cfg)
    _check_output_dir(cfg)
    from diffalign.distributed import DistContext
    from diffalign.prompts import build_prompt_source

    checkpoint = cfg.checkpoint.resume_from
    prompts = build_prompt_source(cfg.prompts, cfg.seed).eval_prompts()  # a missing file fails before the model
    from trainers.common import build_run_rewards, eval_shard, gather_eval_rows, resolve_device, transform_rows

    # the accelerator first: it makes this rank's GPU the current device, where reward models without a device
    # of their own load ("cuda"); built before it, every rank's reward models went to cuda:0
    accelerator = make_accelerator(cfg.model.device, SAMPLING_COLLECTIVE_TIMEOUT)
    built = build_run_rewards(cfg)
    dist = DistContext.from_accelerator(accelerator)
    device = resolve_device(cfg.model.device, accelerator)
    adapter = _load_eval_adapter(cfg, checkpoint, device)
    mine, per = eval_shard(len(prompts), cfg.sample.batch_size, dist.rank, dist.world_size)
    # a checkpoint scores here what its run logged for it
    names, rows, _ = _eval_rows(cfg, adapter, [prompts[k] for k in mine], built, ids=mine)
    rows = transform_rows(built, gather_eval_rows(rows, per, dist, device), prompts)
    if dist.is_main:
        _write_eval(cfg, checkpoint, adapter.loaded_checkpoint, prompts, names, rows, dist.world_size)
    _finish(accelerator)
    return 0


def _finish(accelerator) -> None:
    """End a command on every rank together (after the main process's files are written), and take the process
    group down when this process exits: a gloo process that exits with its group alive can abort at exit
    ("terminate called without an active exception"), and so could one whose peers tore theirs down first (the
    exit hook waits for every rank before it does). Not at the end of the command: re-creating a group in
    the same launched process fails (the rendezvous store still holds the old group's addresses), so a caller
    that runs several commands in one process reuses the first one's group."""
    import atexit

    accelerator.wait_for_everyone()
    if str(accelerator.distributed_type).rsplit(".", 1)[-1] != "NO":
        atexit.unregister(_end_process_group)  # once per process, however many commands it runs
        atexit.register(_end_process_group)


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank tears down together: one that left first closed its peers' pairs
        torch.distributed.destroy_process_group()


def _write_eval(cfg, checkpoint, loaded, prompts, names, rows, world_size: int) -> None:
    """``eval.json``: the means per column, and which checkpoint they describe: as asked (``latest``) and as
    resolved (its folder and step; ``latest`` moves on as training continues)."""
    means = (float(torch.nanmean(rows[:, j])) for j in range(len(names)))
    # a column with no finite value is null (strict JSON, as in metrics.jsonl)
    finite = {f"eval/reward/{n}": (m if math.isfinite(m) else None) for n, m in zip(names, means)}
    os.makedirs(cfg.output_dir, exist_ok=True)
    _write_json(os.path.join(cfg.output_dir, "eval.json"),
                {"checkpoint": checkpoint, "checkpoint_path": (loaded or {}).get("path"),
                 "checkpoint_step": (loaded or {}).get("step"), "num_prompts": len(prompts),
                 "num_processes": world_size, **finite})
    print(json.dumps(finite, indent=2))


def _write_json(path: str, data) -> None:
    """``data`` as indented JSON, written atomically (an interrupted write never leaves half a file)."""
    from diffalign.checkpoint import _write_text_atomic

    _write_text_atomic(Path(path), json.dumps(data, indent=2))


def sample_main(cfg) -> int:
    """``diffalign sample CONFIG [key=value ...]``: images for the evaluation prompts, saved as a grid.

    Plain sampling uses the trainer's evaluation settings (``train.eval_num_steps`` / ``eval_guidance_scale``
    when set) and evaluation noise, so the grid shows the images ``diffalign eval`` scores. Guided sampling
    draws its own noise (the run seed) with ``guidance.num_steps`` (else ``sample.eval_num_steps``) and
    ``sample.guidance_scale``: its ``none`` row is the guided sampler's unguided baseline, not that grid.

    With ``guidance.method=doob|fk|svdd|best_of_n`` (or ``guidance.compare=[...]``) the prompts are sampled
    with reward guidance (``samplers.guided``) using the config's ``rewards``: every method of
    ``compare + [method]`` runs on the same prompts and noise, and ``output_dir`` gets one grid per method
    (``samples_<method>.png``), ``guidance_rewards.json`` (per-image rewards, evaluation counts, wall time)
    and the comparison table ``guidance_table.md`` (also printed).

    ``eval_rewards`` are judges: every final image is scored by them after sampling (never inside guidance,
    never counted as reward evaluations), in extra columns of the table, the json (``eval_rewards``) and, for
    plain sampling, ``samples_rewards.json``: guide on one reward, check another for reward hacking.

    Under ``accelerate launch`` / ``torchrun`` the prompts are split over the processes in whole sampling batches
    (:func:`trainers.common.eval_shard`), each prompt keeps its noise, and the main process gathers the images
    and rewards and writes the files: the same images and rewards as one process (a guided table's wall time is
    the slowest process's).
    """
    check_reward_config(cfg)
    _check_output_dir(cfg)
    from diffalign.config import check_guide_transforms
    from diffalign.distributed import DistContext
    from diffalign.prompts import build_prompt_source

    if cfg.guidance.method != "none" or cfg.guidance.compare:
        check_guide_transforms(cfg.rewards, cfg.guidance)
    checkpoint = cfg.checkpoint.resume_from
    prompts = build_prompt_source(cfg.prompts, cfg.seed).eval_prompts()  # a missing file fails before the model
    from trainers.common import build_run_rewards, eval_shard, image_size, resolve_device

    accelerator = make_accelerator(cfg.model.device, SAMPLING_COLLECTIVE_TIMEOUT)  # first: see eval_main
    built = build_run_rewards(cfg)
    # the device the trainer and `diffalign eval` use (model.device=auto: the accelerator's, CUDA when present)
    device = resolve_device(cfg.model.device, accelerator)
    dist = DistContext.from_accelerator(accelerator)
    adapter = _load_eval_adapter(cfg, checkpoint, device)
    mine, _ = eval_shard(len(prompts), cfg.sample.batch_size, dist.rank, dist.world_size)
    h, w = image_size(adapter, cfg.sample)
    guidance = cfg.guidance
    if guidance.method != "none" or guidance.compare:
        _guided_samples(cfg, adapter, prompts, mine, built, dist, device, h, w)
    else:
        _plain_samples(cfg, adapter, prompts, mine, built, dist, device, h, w)
    _finish(accelerator)
    return 0


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit values an image grid stores (4x smaller to gather; ``/ 255`` gives back
    floats that :func:`diffalign.logging.save_image_grid` turns into the same bytes)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _plain_samples(cfg, adapter, prompts, mine, built, dist, device, h, w) -> None:
    """``diffalign sample`` without guidance: this process samples and scores the prompts ``mine`` as the
    trainer's evaluation does; the main process gathers them and writes the grid and the rewards."""
    from diffalign.logging import save_image_grid

    names, rows, images = _eval_rows(cfg, adapter, [prompts[k] for k in mine], built, keep_images=True, ids=mine)
    images = _as_uint8(images if images is not None else torch.zeros(0, 3, h, w))  # None: no prompts here
    from trainers.common import transform_rows

    rows = transform_rows(built, dist.gather_rows(rows, device), prompts)
    images = dist.gather_rows(images, device, chunk_rows=cfg.sample.batch_size, main_only=True)
    if not dist.is_main:
        return
    images = images.float() / 255
    os.makedirs(cfg.output_dir, exist_ok=True)
    # captions: the training columns' weighted sum (the first column alone when there is one); eval_rewards
    # columns come after them in rows and are marked in the json
    n_train = len(cfg.rewards)
    weights = torch.tensor([r.weight for r in cfg.rewards], dtype=rows.dtype)
    shown = rows[:, 0] if n_train == 1 else (rows[:, :n_train] * weights).sum(dim=1)  # NaN shows as nan
    caps = [f"{p} ({float(shown[i]):.2f})" for i, p in enumerate(prompts)]
    path = save_image_grid(images, caps, os.path.join(cfg.output_dir, "samples.png"))
    print(f"wrote {path} (captions: {names[0] if n_train == 1 else 'weighted sum of ' + ', '.join(names[:n_train])})")
    means = {n: float(torch.nanmean(rows[:, j])) for j, n in enumerate(names)}
    _write_json(os.path.join(cfg.output_dir, "samples_rewards.json"),
                {"prompts": prompts, "names": names, "eval_names": names[n_train:], "mean": means,
                 "rewards": rows.tolist(), "num_processes": dist.world_size})
    print(json.dumps(means, indent=2))


def _guided_samples(cfg, adapter, prompts, mine, built, dist, device, h, w) -> None:
    """``diffalign sample`` with reward guidance: this process samples the prompts ``mine`` (consecutive indices
    into ``prompts``) with every method, the main process gathers and writes the grids, json and table."""
    from diffalign.logging import save_image_grid
    from samplers.guided.pipeline import compare_methods, compared_scores, format_table, method_options, resolve_kernel

    guidance = cfg.guidance
    reward, judges = built
    step, level = resolve_kernel(adapter.kind, guidance.step, guidance.noise_level, cfg.sample.step,
                                 cfg.sample.noise_level)
    methods = list(dict.fromkeys([*guidance.compare, guidance.method]))
    results = compare_methods(
        adapter, [prompts[k] for k in mine], reward, methods, {m: method_options(m, guidance) for m in methods},
        batch_size=cfg.sample.batch_size, group_size={m: 1 if m == "none" else guidance.num_particles for m in methods},
        first_prompt_id=mine[0] if mine else 0, seed=cfg.seed,
        num_steps=guidance.num_steps or cfg.sample.eval_num_steps, guidance_scale=cfg.sample.guidance_scale,
        negative_prompt=cfg.sample.negative_prompt, height=h, width=w, step=step, noise_level=level,
    )
    judged = {}
    for m, res in results.items():
        # images per prompt (select="all": one per particle), from a process that has prompts: every process must
        # gather in chunks of the same size
        per = int(dist.gather(torch.tensor([res.images.shape[0] // max(len(mine), 1)], device=device)).max())
        chunk = cfg.sample.batch_size * per  # one sampling batch's images
        if judges is not None:
            # judged where the images are, one sampling batch at a time (on any number of processes the same
            # calls: a judge that ranks or whitens within its batch sees the same batches)
            image_prompts = [prompts[mine[i // per]] for i in range(res.images.shape[0])]
            local = [_judge(judges, res.images[i:i + chunk], image_prompts[i:i + chunk])
                     for i in range(0, res.images.shape[0], chunk)]
            judged[m] = dist.gather_rows(torch.cat(local) if local else torch.zeros(0, len(judges.names)), device)
        results[m] = _gathered(res, dist, device, len(prompts), reward.names, chunk)
    if not dist.is_main:
        return
    os.makedirs(cfg.output_dir, exist_ok=True)
    weights = [float(x) for x in reward.weights]
    record = {"step": step, "noise_level": level, "names": reward.names, "weights": weights,
              "num_processes": dist.world_size, "methods": {}}
    scores = compared_scores(results, weights)  # a prompt's images in every method on the same reward columns
    for m, res in results.items():
        score = scores[m]
        per = res.images.shape[0] // len(prompts)
        image_prompts = [prompts[i // per] for i in range(res.images.shape[0])]
        caps = [f"{p} ({float(score[i]):.2f})" for i, p in enumerate(image_prompts)]
        path = save_image_grid(res.images, caps, os.path.join(cfg.output_dir, f"samples_{m}.png"))
        print(f"wrote {path}")
        record["methods"][m] = {**res.counter.as_dict(), "wall_s": res.wall_s,
                                "mean_score": float(torch.nanmean(score)),
                                "reward_failures": res.failures, "rewards": res.rewards.tolist()}
        if judges is not None:
            record["methods"][m]["eval_rewards"] = {n: judged[m][:, j].tolist() for j, n in enumerate(judges.names)}
    if judges is not None:
        record["eval_names"] = judges.names
    _write_json(os.path.join(cfg.output_dir, "guidance_rewards.json"), record)
    table = format_table(results, weights, reward.names, judged=judged,
                         judge_names=judges.names if judges is not None else ())
    with open(os.path.join(cfg.output_dir, "guidance_table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def _gathered(res, dist, device, num_prompts: int, reward_names, chunk_rows: int):
    """One method's result of every process, on the main process: images (as 8-bit values, ``chunk_rows`` at a
    time) and rewards in prompt order, evaluation counts and reward failures (per column of ``reward_names``)
    summed, the wall time of the slowest process. The other processes get counts and rewards, no images."""
    from samplers.guided.common import EvalCounter
    from samplers.guided.pipeline import MethodResult

    counts = res.counter.as_dict()
    local = [*counts.values(), *(res.failures.get(n, 0) for n in reward_names)]
    total = dist.gather(torch.tensor([local], dtype=torch.int64, device=device)).sum(dim=0).tolist()
    counter = EvalCounter(**dict(zip(counts, total)))
    failures = {n: k for n, k in zip(reward_names, total[len(counts):]) if k}
    wall = float(dist.gather(torch.tensor([res.wall_s], dtype=torch.float64, device=device)).max())
    images = dist.gather_rows(_as_uint8(res.images), device, chunk_rows=chunk_rows, main_only=True)
    return MethodResult(res.method, images.float() / 255, dist.gather_rows(res.rewards, device), counter, wall,
                        num_prompts, failures)


def _judge(judges, images: torch.Tensor, prompts) -> torch.Tensor:
    """``[n, R]``: the ``eval_rewards`` columns of final images (outside any guidance; no gradient)."""
    from trainers.common import _score_columns

    with torch.no_grad():
        return _score_columns([judges], images, list(prompts)).float().cpu()
