#!/usr/bin/env python
"""Does diffalign's deterministic sampler reproduce the diffusers pipeline, and how far does bfloat16 move each?

Runs the same prompts, per-sample generators, steps, CFG scale and size through ``pipe(..., output_type="latent")``
and diffalign's ``trainers.common.sample_batch`` with the Euler ODE step (``flow_euler``), first with every
module in float32, then after casting the pipeline to ``--low`` (bfloat16 by default). Prints the final latents'
distance of each run from the float32 pipeline (max and mean absolute difference, each relative to the reference's
max / mean magnitude).

In float32 the two samplers must agree to rounding (they run the same model calls; diffalign's step arithmetic is
float32 as diffusers' scheduler's). In bfloat16 they differ by design: the pipeline draws the initial noise in the
model dtype and rounds the latents to it after every step, diffalign draws and keeps them in float32; the table
shows which lies closer to the float32 result, and a row gives the pipeline diffalign's initial noise.

    python scripts/check_sampler_parity.py --model builtin:shapes-flow --size 32
    python scripts/check_sampler_parity.py --arch SD35M_CONFIG_DIR --size 512      # real size, random weights (GPU)
    python scripts/check_sampler_parity.py --arch DIR --shrink --layers 24 --size 64 # a deep, narrow CPU variant
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _distance(x: torch.Tensor, ref: torch.Tensor) -> tuple:
    d = (x.float().cpu() - ref.float().cpu()).abs()
    r = ref.float().cpu().abs()
    return float(d.max()), float(d.max() / r.max().clamp_min(1e-12)), float(d.mean() / r.mean().clamp_min(1e-12))


def main(argv=None) -> int:
    from bench_grpo import float32_noise, shrink_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes-flow", help="SD3/FLUX pipeline folder or builtin:NAME")
    ap.add_argument("--arch", type=Path, default=None, help="a folder of diffusers configs, built with random weights")
    ap.add_argument("--shrink", action="store_true",
                    help="with --arch: small widths (scripts/bench_grpo.py SHRINK; SD3-family folders with T5)")
    ap.add_argument("--layers", type=int, default=None, help="with --arch: the transformer's number of blocks")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--low", choices=["bfloat16", "float16"], default="bfloat16", help="the reduced precision")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffalign.generators import load_generator, wrap_pipeline
    from samplers import make_generators
    from trainers.common import sample_batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if args.arch is not None:
        from diffalign.testing.arch import random_pipeline

        overrides = shrink_overrides(args.arch) if args.shrink else {}
        if args.layers is not None:  # MMDiT-X (SD3.5-Medium) has dual attention in its first 13 blocks
            dual = json.loads((args.arch / "transformer" / "config.json").read_text()).get("dual_attention_layers")
            overrides.setdefault("transformer", {}).update(
                num_layers=args.layers, dual_attention_layers=list(range(min(13, args.layers))) if dual else [])
        adapter = wrap_pipeline(random_pipeline(args.arch, dtype=torch.float32, device=device, overrides=overrides))
        label = f"{args.arch} (random weights{', shrunk' if args.shrink else ''}"
        label += f", {args.layers} blocks)" if args.layers else ")"
    else:
        adapter = load_generator(args.model, dtype=torch.float32, device=device)
        label = args.model
    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    extra = dict(adapter.call_kwargs)
    prompts = ["a red circle left of a blue square", "two green triangles", "a photo of a cat on a sofa",
               "three yellow stars above a purple circle"] * args.batch
    prompts, ids = prompts[:args.batch], list(range(args.batch))
    print(f"# sampler parity: {label}, {device}, batch {args.batch}, {args.steps} steps, CFG {args.guidance}, "
          f"{args.size} px (built in {time.perf_counter() - t0:.1f} s)", flush=True)

    def run_pipeline(given_noise: bool = False):
        kwargs = dict(extra)
        if given_noise:  # diffalign's float32 draw, cast to the model dtype (the pipeline otherwise draws in it)
            kwargs["latents"] = float32_noise(adapter, ids, args.size)
        with torch.no_grad():
            # the empty negative as the adapter encodes it: SDXL's pipeline zeroes it only when given None
            # (force_zeros_for_empty_prompt); SD1.5's pipeline wants a list beside a list of prompts
            negative = None if getattr(adapter, "is_sdxl", False) else [""] * len(prompts)
            return pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=args.steps,
                        guidance_scale=args.guidance, height=args.size, width=args.size,
                        generator=make_generators(0, ids), output_type="latent", return_dict=False, **kwargs)[0]

    def run_diffalign():
        with torch.no_grad():
            traj, _, _, _ = sample_batch(adapter, prompts, ids, seed=0, num_steps=args.steps,
                                         guidance_scale=args.guidance, negative_prompt="", height=args.size,
                                         width=args.size, step="flow_euler", noise_level=0.0)
        return traj.final  # FLUX: packed, as the pipeline's output_type="latent"

    results = {"pipeline float32": run_pipeline(), "diffalign float32": run_diffalign()}
    low = getattr(torch, args.low)
    pipe.to(dtype=low)
    results[f"pipeline {args.low}"] = run_pipeline()
    results[f"pipeline {args.low}, given diffalign's float32 initial noise"] = run_pipeline(given_noise=True)
    results[f"diffalign {args.low}"] = run_diffalign()
    ref = results["pipeline float32"]
    print("| run | max abs diff | max diff / max abs | mean diff / mean abs |")
    print("|---|---|---|---|")
    for name, x in results.items():
        mx, rel, mean = _distance(x, ref)
        print(f"| {name} | {mx:.3e} | {rel:.3e} | {mean:.3e} |")
    print("(distances from the float32 pipeline's final latents)")
    draws = [torch.randn((1, *adapter.prepare_latents(1, args.size, args.size).shape[1:]),
                         generator=torch.Generator().manual_seed(0), dtype=dt) for dt in (torch.float32, low)]
    same = torch.equal(draws[0].to(low), draws[1])
    print(f"a {args.low} torch.randn from a CPU generator {'equals' if same else 'differs from'} the float32 draw "
          f"of the same seed rounded to {args.low} (torch {torch.__version__}): the pipeline draws its initial "
          "noise in the model dtype, diffalign in float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
