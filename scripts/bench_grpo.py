#!/usr/bin/env python
"""GRPO benchmarks (issue 5, acceptance 6): rollout throughput against the plain diffusers pipeline call, the
per-epoch time split of a GRPO run, and memory after epoch 2 against epoch 20.

    python scripts/bench_grpo.py                         # the shipped flow model (builtin:shapes-flow)
    python scripts/bench_grpo.py --tiny                  # a tiny random SD3 pipeline, no shipped model needed
    python scripts/bench_grpo.py --model PATH            # any SD3-layout pipeline folder
    python scripts/bench_grpo.py --metrics RUN/metrics.jsonl --skip-rollout   # time split of an existing run
    python scripts/bench_grpo.py --arch DIR --gpu-recipe # real-size random weights on a GPU (see "At scale")

1. Rollout throughput (images/s) on the same pipeline object, same prompts, steps, CFG scale, size and
   batch: ``pipe(prompt, negative_prompt="", num_inference_steps, guidance_scale, output_type="pt")``
   against diffalign's ``trainers.common.sample_batch`` (encode, per-sample noise, ``samplers.rollout``
   with the adapter, decode) with the deterministic ODE step and with the Flow-GRPO SDE step (which also
   stores the trajectory and log-probs). Repetitions are interleaved (the order rotates every repetition)
   and the ratio is the median of the per-repetition ratios, so load drifting over the run cancels.
   Goal: at least 0.95x. A correctness line checks that the ODE rollout reproduces the pipeline's latents
   for the same per-sample generators.
2. Per-epoch time split (sampling / reward / training) of a GRPO run, from its ``metrics.jsonl`` (the
   first epoch is reported separately: it includes one-time warm-up).
3. Memory: the peak during each epoch (Linux: the RSS high-water mark ``VmHWM``, reset at the start of
   every epoch through ``/proc/self/clear_refs``; elsewhere the process-lifetime ``ru_maxrss``; on CUDA
   ``torch.cuda.max_memory_allocated``, reset per epoch), the RSS at the end of each epoch and the live
   tensors the garbage collector reaches then (count and MiB: a leak detector that ~1 GB of libraries
   cannot hide), epoch 2 against epoch 20 (``--epochs``; the run trains one epoch more, since the last
   one also evaluates and checkpoints). Goal: growth under 5%.

The GRPO run uses ``configs/shapes/flow_grpo.yaml`` (batch 16 x 4 per epoch, groups of 8, 10 steps,
CFG 3.0, LoRA r16) with evaluation, images and periodic checkpoints off, in a temporary folder (``--tiny``
shrinks the epoch, see ``TINY_OVERRIDES``).

At scale: ``--arch DIR`` builds the pipeline that a folder of diffusers configs describes (e.g.
SD3.5-Medium's ``model_index.json`` and component ``config.json`` files, no weights) with random weights, in
``--dtype`` on the GPU (:func:`diffalign.testing.arch.random_pipeline`), and trains that object in process
(``GRPOTrainer(..., pipeline=...)``). ``--gpu-recipe`` sets the rest to Flow-GRPO's SD3.5-Medium recipe
(``configs/gpu/sd35m_geneval_flow_grpo.yaml``: 512 px, 10 steps, CFG 4.5, LoRA r32, gradient checkpointing)
in bfloat16, on one GPU with a programmatic reward (``GPU_RECIPE_OVERRIDES``: 16 samples in 2 groups of 8
per epoch, one optimizer step of 2 accumulated minibatches of 8). In that mode the GRPO run comes first and
the rollout benchmark then times the trained policy (its LoRA attached) against the pipeline call on the same
object. ``--shrink`` cuts the architecture to a few layers and small widths: a CPU smoke run of the same path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRPO_CONFIG = ROOT / "configs" / "shapes" / "flow_grpo.yaml"
#: --tiny shrinks the GRPO epoch (a smoke run of the harness, not the shipped model's workload): 8 samples in
#: groups of 4, 4 sampler steps, one optimizer step per epoch. Later key=value arguments still win.
#: --gpu-recipe: Flow-GRPO's SD3.5-Medium recipe on one GPU, with a programmatic reward (no weights, no server)
#: and a continuous one, so no group is dropped for tied rewards. Evaluation only at the end, 8 prompts.
GPU_RECIPE_CONFIG = ROOT / "configs" / "gpu" / "sd35m_geneval_flow_grpo.yaml"
GPU_RECIPE_OVERRIDES = ["prompts.source=shapes", "prompts.path=null", "prompts.eval_path=null",
                        "prompts.eval_size=8", "sample.eval_num_steps=10", "rewards=[{name: colorfulness}]",
                        "sample.batch_size=8", "sample.group_size=8", "sample.num_batches_per_epoch=2",
                        "train.batch_size=8", "train.gradient_accumulation_steps=2", "train.drop_zero_std_groups=false",
                        "train.ema_every=1"]
#: --shrink: SD3-family components cut to 2 blocks and small widths (consistent: CLIP-L + CLIP-G projections = the
#: transformer's pooled width, the T5 width = its joint attention width); the VAE keeps its latent channels.
SHRINK = {
    "transformer": {"num_layers": 2, "dual_attention_layers": [0], "attention_head_dim": 8, "num_attention_heads": 4,
                    "joint_attention_dim": 64, "caption_projection_dim": 32, "pooled_projection_dim": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "projection_dim": 32},
    "text_encoder_3": {"d_model": 64, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4},
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
}
TINY_OVERRIDES = ["sample.num_steps=4", "sample.random_window=[0,4]", "sample.batch_size=8",
                  "sample.group_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=8",
                  "train.gradient_accumulation_steps=1"]


# ----------------------------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def live_tensors() -> Dict[str, float]:
    """Count and MiB of the distinct tensor storages reachable by the garbage collector (a sharper leak
    detector than RSS, which the ~1 GB of libraries dominates on a small model)."""
    import warnings

    seen, total, count = set(), 0, 0
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.is_meta:
                    continue
                st = obj.untyped_storage()
                key = (st.data_ptr(), obj.device.type)
            except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
                continue
            count += 1
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return {"tensors": float(count), "tensor_mib": total / 2**20}


class MemoryProbe:
    """Per-interval peak memory: ``start()`` resets the high-water mark, ``stop()`` reads it (in MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.can_reset = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset = _proc_status_kb("VmHWM") is not None
            except OSError:
                self.can_reset = False

    @property
    def kind(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated per epoch"
        if self.can_reset:
            return "RSS high-water mark per epoch (VmHWM, reset via /proc/self/clear_refs)"
        return "RSS high-water mark since start (ru_maxrss; cannot reset here)"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def stop(self) -> Dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                    "current_mib": torch.cuda.memory_allocated() / 2**20}
        rss = _proc_status_kb("VmRSS")
        if self.can_reset:
            peak = _proc_status_kb("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = peak / 1024 if platform.system() == "Darwin" else peak  # bytes on macOS, KiB on Linux
        return {"peak_mib": peak / 1024, "current_mib": (rss or 0) / 1024}


# ----------------------------------------------------------------------------------------------- models


def tiny_model(folder: Path) -> str:
    """A tiny random SD3 pipeline saved to ``folder`` (32x32 images, no T5), so the script runs anywhere."""
    from diffalign.testing.tiny import tiny_sd3_pipeline

    if not (folder / "model_index.json").exists():
        tiny_sd3_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


def _prompts(n: int, seed: int = 0) -> List[str]:
    from diffalign.shapes.prompts import prompt_set

    return list(prompt_set("held_in", n, seed=seed))


# ----------------------------------------------------------------------------------------------- 1. rollout


def load_rollout_adapter(model: str, *, dtype: torch.dtype, lora_rank: int):
    """``model`` loaded for :func:`bench_rollout` on the GPU if there is one, with a LoRA of ``lora_rank``."""
    from diffalign.generators import load_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_generator(model, dtype=dtype, device=device)
    if lora_rank > 0:
        adapter.add_lora(rank=lora_rank, alpha=2.0 * lora_rank)
    return adapter


def float32_noise(adapter, ids: List[int], size: int) -> torch.Tensor:
    """diffalign's initial noise for samples ``ids`` (float32 draws of ``make_generators(0, ids)``), cast to the
    pipeline's dtype and device: what a pipeline call gets as ``latents=`` to start where diffalign starts (it
    would otherwise draw in its own dtype, on torch 2.11 not the float32 draw rounded)."""
    from samplers import make_generators

    noise = adapter.prepare_latents(len(ids), size, size, generator=make_generators(0, ids, device="cpu"))
    return noise.to(device=adapter.pipeline.device, dtype=adapter.pipeline.dtype)


def bench_rollout(adapter, *, batch: int, steps: int, guidance: float, size: int, reps: int,
                  noise_level: float, profile: bool = False) -> List[Dict]:
    """Time ``adapter.pipeline(...)`` against diffalign's rollouts on the same object (see the module doc)."""
    from samplers import make_generators
    from trainers.common import sample_batch

    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    extra = dict(adapter.call_kwargs)  # e.g. the shipped flow model's max_sequence_length=0
    prompts = _prompts(batch)
    ids = list(range(batch))
    sync = torch.cuda.synchronize if adapter.device.type == "cuda" else (lambda: None)

    def pipeline_call(output_type: str, generator, **kwargs):
        return pipe(prompt=prompts, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                    height=size, width=size, generator=generator, output_type=output_type, return_dict=False,
                    **extra, **kwargs)[0]

    def diffalign_call(step: str, level: float):
        return sample_batch(adapter, prompts, ids, seed=0, num_steps=steps, guidance_scale=guidance,
                            negative_prompt="", height=size, width=size, step=step, noise_level=level)

    # correctness: the ODE rollout is the pipeline's sampler (same per-sample generators -> same latents). Below
    # float32 the pipeline draws its noise in the model dtype, which on some torch versions is not the float32
    # draw rounded (scripts/check_sampler_parity.py): it then gets diffalign's float32 draw, so that the check
    # compares the samplers, not the draws
    given = {"latents": float32_noise(adapter, ids, size)} if pipe.dtype != torch.float32 else {}
    with torch.no_grad():
        want = pipeline_call("latent", make_generators(0, ids, device="cpu"), **given).float()
        traj, _, _, _ = diffalign_call("flow_euler", 0.0)
    parity = float((traj.final.cpu() - want.cpu()).abs().max())
    parity_rel = parity / max(float(want.abs().max()), 1e-12)

    seed_counter = iter(range(10**9))
    methods: Dict[str, Callable[[], object]] = {
        "diffusers pipe(output_type='pt')": lambda: pipeline_call(
            "pt", torch.Generator(device="cpu").manual_seed(next(seed_counter))),
        "diffalign sample_batch, ODE (flow_euler)": lambda: diffalign_call("flow_euler", 0.0),
        f"diffalign sample_batch, SDE (flow_sde {noise_level})":
            lambda: diffalign_call("flow_sde", noise_level),
    }
    names = list(methods)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for n in names:  # warm-up (allocator, first-call caches)
        methods[n]()
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            sync()
            t0 = time.perf_counter()
            methods[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    if profile:
        profile_methods(methods, sync)
    base = names[0]
    rows = []
    for n in names:
        paired = [tb / tm for tb, tm in zip(times[base], times[n], strict=True)]
        rows.append({"method": n, "images_per_s": batch / statistics.median(times[n]),
                     "median_s": statistics.median(times[n]), "min_s": min(times[n]),
                     "ratio_median_paired": statistics.median(paired),
                     "ratio_best": min(times[base]) / min(times[n])})
    rows[0]["parity_max_abs_diff"] = parity
    rows[0]["parity_max_rel_diff"] = parity_rel
    return rows


def profile_methods(methods: Dict[str, Callable[[], object]], sync: Callable[[], None], rows: int = 8) -> None:
    """One profiled call of each method (``--profile``): wall time, time the GPU spent in kernels, and the
    operators with the most host time (where a method that is slower than the pipeline spends it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    for name, fn in methods.items():
        sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            sync()
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        # kernel rows only: CPU-operator rows also carry the device time of the kernels they launched
        gpu = sum(e.self_device_time_total for e in events  # as torch's table footer counts it
                  if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)) / 1e6 if cuda else 0.0
        print(f"\n### profile: {name}: {wall:.3f} s wall (profiled), {gpu:.3f} s of GPU kernels "
              f"({100 * gpu / wall:.0f}% busy)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


# ----------------------------------------------------------------------------------------------- 2, 3. GRPO


def grpo_run(model: str, out: Path, *, epochs: int, size: int, tiny: bool,
             overrides: List[str], config: Path = GRPO_CONFIG, pipeline=None) -> tuple:
    """Train ``epochs`` GRPO epochs in this process (on ``pipeline`` if given, else ``model``); returns
    ``({epoch: memory}, trainer)``, the memory measured per epoch."""
    from diffalign.config import RunConfig, load_config
    from trainers.grpo import GRPOTrainer

    ov = [f"model.path={model}", f"output_dir={out}", f"train.num_epochs={epochs}", "train.eval_every=0",
          "train.max_minutes=null", "checkpoint.every=0", "checkpoint.resume_from=null",
          "logging.image_every=0", "logging.tensorboard=false",
          # explicit size: the config leaves it to the model, and trainers.common.image_size falls back to
          # 512 px for adapters without default_image_size (SD3: the shapes model's pos-embed stops at 32 px)
          f"sample.height={size}", f"sample.width={size}"]
    if torch.cuda.is_available():
        ov.append("model.device=cuda")  # without an accelerator the trainer's "auto" means CPU
    if tiny:
        ov += TINY_OVERRIDES
    cfg = load_config(RunConfig, config, ov + list(overrides))
    trainer = GRPOTrainer(cfg, None, pipeline=pipeline)
    trainer.setup()
    probe = MemoryProbe(trainer.device)
    if probe.cuda:
        torch.cuda.synchronize()
        print(f"  after setup: {torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated on the GPU "
              f"({sum(p.numel() for p in trainer.params) / 1e6:.1f} M trainable parameters)", flush=True)
    memory: Dict[int, Dict] = {}
    log = trainer.logger.log

    def logged(step, metrics):  # the trainer logs once at the end of every epoch: measure, then reset
        result = log(step, metrics)
        if "epoch" in metrics:
            epoch = int(metrics["epoch"])
            gc.collect()
            memory[epoch] = {**probe.stop(), **live_tensors()}
            print(f"  epoch {epoch:3d}: reward {metrics.get('reward/combined', float('nan')):.4f}  "
                  f"peak {memory[epoch]['peak_mib']:.1f} MiB  sample {metrics.get('time/sample', 0):.2f} s  "
                  f"train {metrics.get('time/train', 0):.2f} s", flush=True)
            probe.start()
        return result

    trainer.logger.log = logged
    probe.start()
    try:
        trainer.train()
    finally:
        trainer.logger.log = log
        trainer.cleanup()
    memory["_kind"] = probe.kind
    return memory, trainer


def time_split(metrics_path: Path) -> List[Dict]:
    rows = []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "time/sample" in r:
                rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------------- report


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: List[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def report_rollout(rows: List[Dict], settings: str) -> None:
    print(f"\n## 1. Rollout throughput ({settings})")
    print(_table(["method", "images/s", "median s/batch", "ratio vs pipe (median paired)", "ratio (best-of)"],
                 [[r["method"], f"{r['images_per_s']:.1f}", f"{r['median_s']:.4f}",
                   f"{r['ratio_median_paired']:.3f}x", f"{r['ratio_best']:.3f}x"] for r in rows]))
    worst = min(r["ratio_median_paired"] for r in rows[1:])
    print(f"goal >= 0.95x: {'PASS' if worst >= 0.95 else 'FAIL'} (worst diffalign ratio {worst:.3f}x); "
          f"ODE parity with the pipeline: max |latent diff| = {rows[0]['parity_max_abs_diff']:.2e} "
          f"({rows[0]['parity_max_rel_diff']:.2e} of the largest |latent|)")


def report_split(rows: List[Dict], trainer=None) -> None:
    print(f"\n## 2. GRPO per-epoch time split ({len(rows)} epochs)")
    if trainer is not None and trainer.epoch:
        steps = trainer.global_step / trainer.epoch
        train = statistics.mean(r["time/train"] for r in rows[1:] or rows)
        which = "epoch 1" if len(rows) == 1 else "epoch 2" if len(rows) == 2 else f"epochs 2-{len(rows)}"
        print(f"{steps:g} optimizer steps per epoch: {train / steps:.2f} s of training per optimizer step ({which})")
    keys = [("sampling", "time/sample"), ("reward", "time/reward"), ("training", "time/train")]
    out = []

    def add(label, sel):
        if not sel:
            return
        means = {k: statistics.mean(r[m] for r in sel) for k, m in keys}
        total = sum(means.values())
        cells = [f"{means[k]:.3f} s ({100 * means[k] / total:.0f}%)" for k, _ in keys]
        out.append([label, *cells, f"{total:.3f} s"])

    add("epoch 1 (warm-up)", rows[:1])
    add("epoch 2" if len(rows) == 2 else f"epochs 2-{len(rows)} (mean)", rows[1:])
    print(_table(["epochs", "sampling", "reward", "training", "total"], out))


def report_memory(memory: Dict, first: int, last: int) -> None:
    kind = memory.pop("_kind", "?")
    print(f"\n## 3. Memory, epoch {first} vs epoch {last} ({kind})")
    if first not in memory or last not in memory:
        print(f"not enough epochs measured (have {sorted(memory)})")
        return
    a, b = memory[first], memory[last]
    rows = [[f"epoch {e}", f"{m['peak_mib']:.1f}", f"{m['current_mib']:.1f}", f"{m['tensor_mib']:.2f}",
             f"{m['tensors']:.0f}"] for e, m in ((first, a), (last, b))]
    keys = ("peak_mib", "current_mib", "tensor_mib", "tensors")
    rows.append(["ratio"] + [f"{b[k] / max(a[k], 1e-9):.4f}x" for k in keys])
    print(_table(["", "peak MiB", "at epoch end MiB", "live tensors MiB", "live tensors"], rows))
    growth = 100 * (b["peak_mib"] / a["peak_mib"] - 1)
    peaks = [memory[e]["peak_mib"] for e in sorted(memory)]
    print(f"goal growth < 5%: {'PASS' if growth < 5 else 'FAIL'} (peak {growth:+.2f}%); per-epoch peaks MiB: "
          + " ".join(f"{p:.0f}" for p in peaks))


def shrink_overrides(folder: Path) -> Dict[str, Dict]:
    """:data:`SHRINK` for ``folder``: an MMDiT (SD3-medium) keeps no dual-attention block, an MMDiT-X (SD3.5-Medium)
    keeps one. Only SD3-family folders with T5 (three text encoders) fit."""
    overrides = {k: dict(v) for k, v in SHRINK.items()}
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    if not cfg.get("dual_attention_layers"):
        overrides["transformer"]["dual_attention_layers"] = []
    return overrides


def build_arch(folder: Path, *, dtype: torch.dtype, shrink: bool, seed: int = 0):
    """The random-weight pipeline of ``folder``'s configs on the GPU if there is one (``--arch``)."""
    from diffalign.testing.arch import parameter_counts, random_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    pipe = random_pipeline(folder, dtype=dtype, device=device, seed=seed,
                           overrides=shrink_overrides(folder) if shrink else None)
    counts = parameter_counts(pipe)
    print(f"(built {type(pipe).__name__} from {folder}{' (shrunk)' if shrink else ''} with random weights in "
          f"{time.perf_counter() - t0:.1f} s, {dtype}, {device}: "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()) + " parameters)", flush=True)
    return pipe, counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes-flow", help="SD3-layout pipeline or builtin:NAME")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random SD3 pipeline instead of --model")
    ap.add_argument("--arch", type=Path, default=None,
                    help="build this folder of diffusers configs (model_index.json + component configs) with random "
                         "weights instead of --model")
    ap.add_argument("--shrink", action="store_true",
                    help="with --arch: 2 blocks and small widths (a smoke run; SD3-family folders with T5)")
    ap.add_argument("--gpu-recipe", action="store_true",
                    help="Flow-GRPO's SD3.5-Medium recipe (configs/gpu/sd35m_geneval_flow_grpo.yaml + "
                         "GPU_RECIPE_OVERRIDES) and its rollout settings (batch 8, CFG 4.5, 512 px, LoRA r32, "
                         "bfloat16), unless given explicitly")
    ap.add_argument("--config", type=Path, default=None, help="GRPO config (default: configs/shapes/flow_grpo.yaml)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="model dtype (default float32; bfloat16 with --gpu-recipe)")
    ap.add_argument("--batch", type=int, default=None, help="rollout batch (default 16; 8 with --gpu-recipe)")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale (> 1 doubles the batch in both; default 3.0; 4.5 with --gpu-recipe)")
    ap.add_argument("--size", type=int, default=None, help="image height = width in pixels (default 32; 512 with "
                                                           "--gpu-recipe)")
    ap.add_argument("--noise-level", type=float, default=0.7, help="Flow-GRPO SDE noise level")
    ap.add_argument("--reps", type=int, default=11, help="interleaved timed repetitions per method")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="attach a LoRA of this rank first (0 = none); with --arch the trained policy's LoRA is timed")
    ap.add_argument("--epochs", type=int, default=20, help="GRPO epochs (memory: epoch 2 vs this one)")
    ap.add_argument("--mem-first", type=int, default=2, help="the early epoch of the memory comparison")
    ap.add_argument("--metrics", type=Path, help="only summarise this metrics.jsonl (no GRPO run)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rollouts, profile one call of each (GPU busy time, top host operators)")
    ap.add_argument("--skip-rollout", action="store_true")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; 1 (default) keeps ratios stable on shared CPUs; 0 = torch's")
    ap.add_argument("--out", type=Path, default=None, help="GRPO run folder (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers to this file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the GRPO config")
    args = ap.parse_args(argv)
    recipe = args.gpu_recipe

    def pick(value, default, gpu_default):
        return value if value is not None else (gpu_default if recipe else default)

    dtype_name = pick(args.dtype, "float32", "bfloat16")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    batch, guidance, size = pick(args.batch, 16, 8), pick(args.guidance, 3.0, 4.5), pick(args.size, 32, 512)
    config = args.config or (GPU_RECIPE_CONFIG if recipe else GRPO_CONFIG)
    if args.shrink and args.arch is None:
        ap.error("--shrink needs --arch")
    if args.tiny and args.arch is not None:
        ap.error("--tiny and --arch are alternatives: pass one")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_grpo_")
    pipeline = None
    if args.arch is not None:
        label = str(args.arch)
        model = label
    else:
        model = tiny_model(Path(tmp.name) / "tiny-sd3") if args.tiny else args.model
        label = "tiny SD3 (random)" if args.tiny else model
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# bench_grpo: model={label}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device={device_name}, dtype={dtype_name}", flush=True)
    results: Dict = {"model": "tiny" if args.tiny else label, "device": device_name, "dtype": dtype_name}
    if args.arch is not None:
        pipeline, results["parameters"] = build_arch(args.arch, dtype=dtype, shrink=args.shrink)
    t_all = time.perf_counter()
    settings = (f"batch {batch}, {args.steps} steps, CFG {guidance}, {size}x{size} px, {args.reps} interleaved "
                f"reps, {dtype_name}")
    rollout_kwargs = dict(batch=batch, steps=args.steps, guidance=guidance, size=size, reps=args.reps,
                          noise_level=args.noise_level, profile=args.profile)

    if not args.skip_rollout and pipeline is None:
        adapter = load_rollout_adapter(model, dtype=dtype, lora_rank=args.lora_rank)
        rows = bench_rollout(adapter, **rollout_kwargs)
        del adapter
        gc.collect()
        report_rollout(rows, settings + (f", LoRA r{args.lora_rank}" if args.lora_rank else ""))
        results["rollout"] = rows

    trainer = None
    if args.metrics is not None:
        split = time_split(args.metrics)
        report_split(split)
        results["time_split"] = split
    elif not args.skip_grpo:
        out = args.out or Path(tmp.name) / "grpo"
        # the model dtype follows --dtype / --gpu-recipe / --arch (its pipeline is built in it), else the config
        dtype_set = args.dtype is not None or recipe or args.arch is not None
        overrides = ([f"model.dtype={dtype_name}"] if dtype_set else []) + (GPU_RECIPE_OVERRIDES if recipe else []) \
            + args.overrides
        shown = [f"sample.height={size}", f"sample.width={size}"] + (TINY_OVERRIDES if args.tiny else []) + overrides
        # one extra epoch: the last one also runs the final evaluation and checkpoint, not comparable
        print(f"\n(GRPO run: {args.epochs} + 1 epochs of {config} with {' '.join(shown)}, in {out})", flush=True)
        memory, trainer = grpo_run(model, out, epochs=args.epochs + 1, size=size, tiny=args.tiny,
                                   overrides=overrides, config=config, pipeline=pipeline)
        results["grpo_model_dtype"] = trainer.run.model.dtype  # the config's unless --dtype / --gpu-recipe / --arch
        print(f"(GRPO model dtype: {trainer.run.model.dtype})")
        split = time_split(out / "metrics.jsonl")[:args.epochs]
        report_split(split, trainer)
        results["time_split"] = split
        results["memory"] = {str(k): v for k, v in memory.items()}
        report_memory(memory, args.mem_first, args.epochs)

    if not args.skip_rollout and pipeline is not None:
        if trainer is not None:  # the trained policy, its LoRA attached
            adapter, what = trainer.adapter, f"the trained policy (LoRA r{trainer.run.model.lora.rank})"
        else:
            from diffalign.generators import wrap_pipeline

            adapter, what = wrap_pipeline(pipeline), "no LoRA"
            if args.lora_rank > 0:
                adapter.add_lora(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
                what = f"LoRA r{args.lora_rank}"
        rows = bench_rollout(adapter, **rollout_kwargs)
        report_rollout(rows, f"{settings}, {what}")
        results["rollout"] = rows

    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
