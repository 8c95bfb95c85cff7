#!/usr/bin/env python
"""Base quality of the shipped shapes models: verifier score per category, held-in and held-out,
a sample grid per model, and the time to load a model and sample 64 images (32x32, 20 steps).

    python scripts/eval_shapes_models.py                      # both models, 256 held-in + 256 held-out
    python scripts/eval_shapes_models.py --models shapes-flow --n 64

Writes ``OUT/<model>.json`` and ``GRID_DIR/<model>-grid.png`` (``--out``, default ``outputs/shapes_eval``;
``--grid-dir``, default OUT; the README's grids: ``--grid-dir docs/images``); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffalign.generators import load_generator  # noqa: E402
from diffalign.logging import save_image_grid  # noqa: E402
from diffalign.shapes.models import resolve_model_path  # noqa: E402
from diffalign.shapes.prompts import parse_prompt, prompt_set  # noqa: E402
from diffalign.shapes.verifier import score_images  # noqa: E402
from trainers.common import sample_batch  # noqa: E402


def generate(adapter, prompts, *, steps: int, guidance: float, seed: int, batch: int = 64):
    det = "flow_euler" if adapter.kind == "flow" else "ddim"
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        _, _, imgs, _ = sample_batch(adapter, chunk, range(i, i + len(chunk)), seed=seed, num_steps=steps,
                                     guidance_scale=guidance, negative_prompt="", height=32, width=32, step=det,
                                     noise_level=0.0)
        out.append(imgs)
    return torch.cat(out)


def per_category(prompts, scores, details):
    cats = defaultdict(list)
    strict = defaultdict(list)
    for p, s, d in zip(prompts, scores.tolist(), details):
        c = parse_prompt(p).category
        cats[c].append(s)
        strict[c].append(float(d["strict"]))
    return ({c: sum(v) / len(v) for c, v in sorted(cats.items())},
            {c: sum(v) / len(v) for c, v in sorted(strict.items())})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-flow", "shapes-ddpm"])
    ap.add_argument("--n", type=int, default=256, help="prompts per split")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/shapes_eval"))
    ap.add_argument("--grid-dir", type=Path, default=None,
                    help="where the sample grids go (default: OUT; docs/images is where the README's come from)")
    args = ap.parse_args(argv)
    args.grid_dir = args.grid_dir or args.out
    args.out.mkdir(parents=True, exist_ok=True)
    args.grid_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        # speed: load + 64 images, 20 steps, 32x32 (what a new user waits for)
        t0 = time.perf_counter()
        adapter = load_generator(resolve_model_path(f"builtin:{name}"))
        t_load = time.perf_counter() - t0
        speed_prompts = prompt_set("held_in", 64, seed=args.seed + 1)
        t1 = time.perf_counter()
        generate(adapter, speed_prompts, steps=20, guidance=args.guidance, seed=args.seed)
        t_sample = time.perf_counter() - t1
        result = {"model": name, "steps": args.steps, "guidance": args.guidance, "load_seconds": round(t_load, 2),
                  "sample64_seconds": round(t_sample, 2), "threads": torch.get_num_threads()}
        for split in ("held_in", "held_out"):
            prompts = prompt_set(split, args.n, seed=args.seed)
            images = generate(adapter, prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
            scores, details = score_images(images, prompts)
            cat, strict = per_category(prompts, scores, details)
            strict_all = float(sum(d["strict"] for d in details) / len(details))
            result[split] = {"mean": float(scores.mean()), "strict": strict_all, "per_category": cat,
                             "per_category_strict": strict}
            if split == "held_in":
                caps = [f"{p} [{s:.2f}]" for p, s in zip(prompts[:32], scores[:32].tolist())]
                save_image_grid(images[:32], caps, args.grid_dir / f"{name}-grid.png", ncol=8, scale=4)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        rows.append(result)
    cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    print("| model | split | mean | strict | " + " | ".join(cats) + " |")
    print("|---" * (4 + len(cats)) + "|")
    for r in rows:
        for split in ("held_in", "held_out"):
            pc = r[split]["per_category"]
            print(f"| {r['model']} | {split} | {r[split]['mean']:.3f} | {r[split]['strict']:.3f} | "
                  + " | ".join(f"{pc[c]:.3f}" if c in pc else "-" for c in cats) + " |")
    for r in rows:
        print(f"{r['model']}: load {r['load_seconds']} s, 64 images x 20 steps at 32x32: {r['sample64_seconds']} s "
              f"({r['threads']} threads)")


if __name__ == "__main__":
    main()
