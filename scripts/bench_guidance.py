"""Benchmark: training-free guided sampling at an equal reward-evaluation budget.

On the shapes world (``builtin:shapes-flow`` + the ``shapes`` verifier) every method samples the same
prompts from the same initial noise and spends about ``--budget`` reward evaluations per prompt:

* unguided: the base sampler (flow SDE at ``--noise-level``), one sample per prompt;
* best_of_n: ``N = budget`` samples per prompt, the best kept;
* fk: ``--fk-particles`` particles, resampled (MAX potential, ESS-adaptive) at ``budget / particles - 1``
  evenly spaced steps;
* svdd: ``--svdd-candidates`` candidates at each of the last ``budget / M`` steps (greedy);
* doob: DOIT with ``--doob-particles`` chains, ``--doob-candidates`` candidates at the guided steps (a
  window sized so that ``P * (M * steps + 1) <= budget``), best particle kept; three lookaheads (reuse_eps,
  denoise, rollout), rollout with ``keep_simulated`` (the best completed candidate may replace its particle),
  and ``doob_smc``: rollout + ``keep_simulated`` + each prompt's particles resampled at the guided steps, before
  the move, by their simulated ``h`` over their ancestor's (``--doob-resample-lambda``);
* best_of_n_matched: best-of-N with N exactly DOIT's reward evaluations per prompt.

Prints one table (model evaluations, VJPs and reward evaluations per prompt, wall time, mean verifier score)
and, when ``best_of_n_matched`` ran, every row's paired difference against it (same prompts and initial
noise; mean and standard error over prompts), and writes both with the per-prompt scores to ``--out``. Use
``--model tiny`` (a random tiny SD3 pipeline, reward ``jpeg_compressibility``) to check the script without the
shipped model.

    python scripts/bench_guidance.py --prompts 16 --budget 32 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:shapes-flow", help="model path, builtin:NAME, or 'tiny'")
    p.add_argument("--reward", default=None,
                   help="reward name (default: shapes; jpeg_compressibility for tiny), or NAME,NAME2:W2,... for "
                   "one composite reward (weight 1 unless given): every method selects and guides on the weighted "
                   "sum, one evaluation per image; the first column is the score reported")
    p.add_argument("--prompts", type=int, default=16, help="number of evaluation prompts")
    p.add_argument("--budget", type=int, default=32, help="reward evaluations per prompt")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--noise-level", type=float, default=0.7, help="flow_sde a (or DDIM eta)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doob-particles", type=int, default=2)
    p.add_argument("--doob-candidates", type=int, default=4)
    p.add_argument("--doob-gamma", type=float, default=0.5)
    p.add_argument("--doob-temperature", type=float, default=0.5)
    p.add_argument("--doob-start", type=int, default=1, help="first guided step (flow: step 0 has alpha = 0)")
    p.add_argument("--doob-resample-lambda", type=float, default=5.0,
                   help="lambda of the doob_smc row: particles resampled by h = mean exp(lambda r) of their "
                   "candidates over their ancestor's h")
    p.add_argument("--doob-steps", type=int, default=None,
                   help="guided steps (default: as many as the budget allows)")
    p.add_argument("--fk-particles", type=int, default=8)
    p.add_argument("--fk-lambda", type=float, default=10.0)
    p.add_argument("--svdd-candidates", type=int, default=4)
    p.add_argument("--methods", default="none,best_of_n,fk,svdd,doob,doob_denoise,doob_rollout,doob_rollout_keep,"
                   "doob_smc,best_of_n_matched",
                   help="comma-separated subset of the rows")
    p.add_argument("--out", default="outputs/bench_guidance", help="output folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def load(args):
    from diffalign.generators import adapter_for_pipeline, load_generator
    from diffalign.shapes.models import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "tiny":
        from diffalign.testing.tiny import tiny_sd3_pipeline

        return adapter_for_pipeline(tiny_sd3_pipeline(seed=0).to(device)), (32, 32)
    adapter = load_generator(resolve_model_path(args.model), device=device)
    size = adapter.default_image_size() if hasattr(adapter, "default_image_size") else None
    return adapter, tuple(size) if size else (64, 64)


def reward_specs(text: str):
    """``"shapes,shapes_soft:0.05"`` -> MultiReward specs (weight 1 unless ``:W`` is given)."""
    specs = []
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            specs.append({"name": name, "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise SystemExit(f"--reward item {item!r}: the weight after ':' must be a number, e.g. shapes_soft:0.05")
    return specs


def plans(args, T: int):
    """Per row: (label, method, particles per prompt, options); each spends about ``budget`` rewards."""
    budget = args.budget
    rows = {"none": ("none", 1, {}), "best_of_n": ("best_of_n", budget, {})}
    P = args.fk_particles
    n_resample = max(budget // P - 1, 1)
    every = max(T // (n_resample + 1), 1)
    rows["fk"] = ("fk", P, dict(lam=args.fk_lambda, potential="max", every=every,
                                window=(every, every * n_resample + 1), ess_threshold=0.5))
    M = args.svdd_candidates
    k = max(min(budget // M, T), 1)
    rows["svdd"] = ("svdd", 1, dict(num_candidates=M, window=(T - k, T)))
    P, M, start = args.doob_particles, args.doob_candidates, args.doob_start
    k = min(args.doob_steps or max((budget // P - 1) // M, 1), T - start)
    doob = dict(gamma=args.doob_gamma, num_candidates=M, temperature=args.doob_temperature,
                window=(start, start + k))
    rows["doob"] = ("doob", P, doob)
    rows["doob_denoise"] = ("doob", P, {**doob, "lookahead": "denoise"})
    rows["doob_rollout"] = ("doob", P, {**doob, "lookahead": "rollout"})
    rows["doob_rollout_keep"] = ("doob", P, {**doob, "lookahead": "rollout", "keep_simulated": True})
    rows["doob_smc"] = ("doob", P, {**rows["doob_rollout_keep"][2], "resample_lambda": args.doob_resample_lambda})
    # best-of-N at exactly DOIT's reward evaluations per prompt: P chains x (M candidates x k steps + 1 final)
    rows["best_of_n_matched"] = ("best_of_n", P * (M * k + 1), {})
    return rows


def planned_evals(plan) -> int:
    """Reward evaluations per prompt a row's plan spends (the table's "reward evals/prompt" column measures it):
    FK scores its P particles at each resampling step and at the end, SVDD its M candidates at each step of its
    window (the last step's selection stands in for a final score), DOIT P chains x (M candidates x k steps + 1
    final); best-of-N its N samples, unguided its one sample (counted as best-of-1)."""
    method, P, options = plan
    if method == "fk":
        lo, hi = options["window"]
        return P * (len(range(lo, hi, options["every"])) + 1)
    if method == "svdd":
        lo, hi = options["window"]
        return options["num_candidates"] * (hi - lo)
    if method == "doob":
        lo, hi = options["window"]
        return P * (options["num_candidates"] * (hi - lo) + 1)
    return P  # best_of_n, none


def over_budget(table_plans, selected, budget: int) -> List[str]:
    """The selected rows whose plan spends more than ``budget`` reward evaluations per prompt (a plan takes at
    least one resampling / guided step whatever the budget), as printable lines."""
    return [f"{label}: {planned_evals(table_plans[label])} reward evaluations per prompt, over --budget {budget}"
            for label in selected if planned_evals(table_plans[label]) > budget]


def paired_lines(results, reference: str = "best_of_n_matched") -> str:
    """Per-prompt paired differences of every row against ``reference`` (same prompts, same initial noise),
    as ``mean +- standard error``: an "at least as good" claim is only as firm as this interval."""
    if reference not in results:
        return ""
    ref = results[reference].rewards[:, 0].double()
    lines = [f"paired difference of the mean score against {reference} (mean +- s.e. over prompts):"]
    for label, res in results.items():
        if label == reference:
            continue
        d = res.rewards[:, 0].double() - ref
        d = d[~d.isnan()]
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
        lines.append(f"  {label}: {float(d.mean()):+.4f} +- {se:.4f} (n={d.numel()})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffalign.prompts import PromptSource
    from rewards import MultiReward
    from samplers.guided.pipeline import compare_methods, format_table, resolve_kernel

    adapter, (h, w) = load(args)
    if adapter.kind == "flow" and args.doob_start < 1:
        # step 0 sits at sigma = 1 (alpha = 0): DOIT never guides it, so the matched budget would be wrong
        raise SystemExit(f"--doob-start {args.doob_start}: a flow model's step 0 is never guided; use >= 1")
    specs = reward_specs(args.reward or ("jpeg_compressibility" if args.model == "tiny" else "shapes"))
    reward_name = specs[0]["name"]
    reward = MultiReward(specs)
    prompts = PromptSource("shapes", args.seed, eval_size=args.prompts).eval_prompts()
    step, level = resolve_kernel(adapter.kind, None, args.noise_level, "flow_sde", args.noise_level)
    T = args.steps
    selected = [m.strip() for m in args.methods.split(",") if m.strip()]
    smc_off = {"--doob-particles < 2": args.doob_particles < 2, "--doob-gamma 0": args.doob_gamma == 0,
               "--doob-resample-lambda 0": args.doob_resample_lambda == 0}
    if "doob_smc" in selected and any(smc_off.values()):
        # resampling needs several particles and DOIT's candidates; with lambda 0 the row is doob_rollout_keep
        print(f"skipping doob_smc: {[k for k, v in smc_off.items() if v]}", file=sys.stderr)
        selected.remove("doob_smc")
    table_plans = plans(args, T)
    unknown = sorted(set(selected) - set(table_plans))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; valid: {sorted(table_plans)}")
    for line in over_budget(table_plans, selected, args.budget):
        # the comparison with best_of_n (N = --budget) is then uneven; best_of_n_matched stays matched to DOIT
        print(f"warning: {line}; raise --budget or lower the particles / candidates", file=sys.stderr)
    def progress(label, res):
        method, P, options = table_plans[label]
        score = float(torch.nanmean(res.rewards[:, 0]))
        print(f"{label:>13}: mean {reward_name} {score:.4f}  ({res.wall_s:.1f}s, options {options}, particles {P})",
              file=sys.stderr, flush=True)

    results = compare_methods(adapter, prompts, reward, selected, {k: table_plans[k][2] for k in selected},
                              batch_size=args.batch_size, group_size={k: table_plans[k][1] for k in selected},
                              method_of={k: table_plans[k][0] for k in selected}, on_result=progress,
                              seed=args.seed, num_steps=T, guidance_scale=args.cfg, negative_prompt="", height=h,
                              width=w, step=step, noise_level=level)
    # "mean score" is the first column (the one the methods are compared on); the others are shown beside it
    table = format_table(results, [1.0] + [0.0] * (len(specs) - 1), reward.names)
    composite = "" if len(specs) == 1 else f" (selected and guided on {args.reward})"
    header = (f"model={args.model} reward={reward_name}{composite} prompts={len(prompts)} steps={T} step={step} "
              f"noise_level={level} budget={args.budget} reward evals/prompt (unguided: 1)")
    paired = paired_lines(results)
    print(header)
    print(table)
    if paired:
        print("\n" + paired)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n" + ("\n" + paired + "\n" if paired else ""))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        rows_out = {
            k: {"method": table_plans[k][0],
                "options": {o: list(v) if isinstance(v, tuple) else v for o, v in table_plans[k][2].items()},
                "particles": table_plans[k][1], **r.counter.as_dict(), "wall_s": r.wall_s,
                "scores": r.rewards[:, 0].tolist()}
            for k, r in results.items()
        }
        record = {"args": vars(args), "prompts": prompts, "time": time.time(), "rows": rows_out}
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
