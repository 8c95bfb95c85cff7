#!/usr/bin/env python
"""Multi-reward balancing on the shapes world (issue 6, acceptance 5): weighted sum vs GDPO vs MARBLE.

    python scripts/marble_experiment.py                        # builtin:shapes-flow, 3 rewards, 16 epochs each
    python scripts/marble_experiment.py --epochs 60 train.learning_rate=3e-4
    python scripts/marble_experiment.py --tiny --epochs 3      # a tiny random SD3 pipeline: checks the harness only
    python scripts/marble_experiment.py --grad-noise 8         # signal share of each reward's per-batch gradient

Each mode trains DiffusionNFT from ``configs/shapes/nft_marble.yaml`` (rewards: the shapes verifier, JPEG
compressibility, colourfulness; same seed, prompts, samples per step, optimizer steps and evaluation) with
``train.aggregation`` = ``weighted_sum`` | ``gdpo`` | ``marble`` (amortised, QP every 5 steps). Every
``--diag-every`` optimizer steps each run also computes the per-reward gradients (K extra backwards, not applied)
to measure the cosine of the direction it applies with each reward's gradient; MARBLE's QP steps measure it
anyway. Time per step excludes these diagnostic steps: it is ``(1 - f) * plain + f * qp`` with ``f`` the
share of QP steps of an undiagnosed run (1/N amortised, 1 full, 0 otherwise), in process CPU time (wall time on
a shared machine also measures the other jobs). The worst-cosine columns mix the same way: ``f`` times the QP
steps' mean (never negative: the min-norm point of the batch's own gradients) plus ``1 - f`` times the
diagnosed plain steps' mean. ``--modes`` also accepts ``marble_full`` and
``marble_tracked`` (full mode with ``train.marble_grad_ema=0.9``).

``--image-stats`` also samples the evaluation prompts before and after each mode's training (the trainer's
evaluation sampler and noise) and writes ``OUT/image_stats.json``: each reward's paired change per prompt with
its standard error, and what the images became (components per image, the largest component's share of the
image, the verifier's criteria pass rates); ``OUT/samples_MODE.png`` shows the first 16 prompts before (top) and
after (bottom).

Writes ``OUT/table.md``, ``OUT/results.json``, ``OUT/eval_rewards.png``, ``OUT/train_rewards.png``,
``OUT/worst_cosine.png`` and one run folder per mode (metrics.jsonl, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "shapes" / "nft_marble.yaml"
MODES = ("weighted_sum", "gdpo", "marble")
#: extra mode names: MARBLE's full mode (QP every step)
MODE_OVERRIDES = {"marble_full": ["train.aggregation=marble", "train.marble_mode=full"],
                  # full mode, QP on moving averages of the per-reward gradients (train.marble_grad_ema)
                  "marble_tracked": ["train.aggregation=marble", "train.marble_mode=full", "train.marble_grad_ema=0.9"]}
TINY_OVERRIDES = ["sample.height=32", "sample.width=32", "sample.num_steps=4", "sample.eval_num_steps=4",
                  "sample.batch_size=8", "sample.group_size=4", "sample.num_batches_per_epoch=1",
                  "train.batch_size=8", "train.gradient_accumulation_steps=1", "prompts.eval_size=8",
                  "train.marble_every=2"]


def make_trainer(model: str, run_dir: Path, overrides: List[str]):
    """A set-up NFT trainer from the experiment's config for ``model``, writing to ``run_dir``: a fresh run (no
    resume, no checkpoints, no sample grids, no time limit) with ``overrides`` on top."""
    from diffalign.config import RunConfig, load_config
    from trainers.nft import NFTTrainer
    from trainers.run import make_accelerator

    cfg = load_config(RunConfig, CONFIG, [
        f"model.path={model}", f"output_dir={run_dir}", "train.max_minutes=null", "checkpoint.every=0",
        "checkpoint.resume_from=null", "logging.image_every=0", *overrides])
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # a fresh run per invocation
    trainer = NFTTrainer(cfg, make_accelerator(cfg.model.device))
    trainer.setup()
    return trainer


def image_stats(trainer) -> Dict:
    """The evaluation prompts sampled as the trainer evaluates them: ``rewards`` ``[N, R]`` per prompt, the first
    16 ``images``, and what the verifier sees in them (:func:`diffalign.shapes.verifier.analyse`): components
    per image, the largest component's share of the image, and the pass rate of each criterion kind."""
    from diffalign.shapes import verifier
    from trainers.common import sample_eval_prompts

    prompts = trainer.prompts.eval_prompts()
    rows, imgs = sample_eval_prompts(trainer, range(len(prompts)), keep_images=True)
    x = imgs.permute(0, 2, 3, 1).float().clamp(0, 1).cpu().numpy()
    found = verifier.analyse(x)
    count = np.bincount(found["image"], minlength=len(x))
    largest = np.zeros(len(x))
    np.maximum.at(largest, found["image"], found["area"] / float(x.shape[1] * x.shape[2]))
    _, details = verifier.score_images(imgs, prompts)
    kinds: Dict[str, List[float]] = {}
    for d in details:
        for name, ok in d["criteria"].items():
            kinds.setdefault(name.rstrip("0123456789").rstrip("_"), []).append(float(ok))
    return {"rewards": rows.double(), "images": imgs[:16].cpu(),
            "stats": {"components_per_image": float(count.mean()), "largest_component_share": float(largest.mean()),
                      "images_with_a_component_over_30pct": float((largest > 0.3).mean()),
                      **{f"pass/{k}": float(np.mean(v)) for k, v in sorted(kinds.items())}}}


def compare_images(before: Dict, after: Dict, names: List[str], grid_path: Path) -> Dict:
    """Paired per-prompt change of each reward (mean, standard error) and both sides' image statistics; saves
    the before/after grid."""
    import torch
    from torchvision.utils import save_image

    d = after["rewards"] - before["rewards"]
    paired = {}
    for j, n in enumerate(names):  # prompts whose reward failed (NaN) before or after are left out
        dj = d[:, j][torch.isfinite(d[:, j])]
        paired[n] = [float(dj.mean()), float(dj.std() / len(dj) ** 0.5) if len(dj) > 1 else float("nan")]
    grid = torch.cat([before["images"], after["images"]]).float()
    save_image(torch.nn.functional.interpolate(grid, scale_factor=4, mode="nearest"), grid_path,
               nrow=len(before["images"]))
    return {"paired_delta": paired,
            "before": before["stats"], "after": after["stats"]}


def run_mode(mode: str, model: str, out: Path, epochs: int, diag_every: int, extra: List[str],
             eval_base: bool, with_images: bool = False) -> List[Dict]:
    from diffalign.logging import read_metrics
    from trainers.common import eval_reward_names

    trainer = make_trainer(model, out / mode, [
        *MODE_OVERRIDES.get(mode, [f"train.aggregation={mode}"]), f"train.num_epochs={epochs}",
        # the base model is evaluated once (first mode: eval at epoch 0 and at the end; the others: the end only)
        f"train.eval_every={epochs if eval_base else 0}", f"train.grad_diagnostics_every={diag_every}", *extra])
    metrics = out / mode / "metrics.jsonl"
    t0 = time.time()
    compared = None
    try:
        before = image_stats(trainer) if with_images else None
        trainer.train()
        if with_images:
            compared = compare_images(before, image_stats(trainer), eval_reward_names(trainer),
                                      out / f"samples_{mode}.png")
    finally:
        trainer.cleanup()
    print(f"[{mode}] {epochs} epochs in {time.time() - t0:.0f} s")
    return read_metrics(metrics), eval_reward_names(trainer), trainer.cfg, compared


def gradient_reproducibility(model: str, out: Path, batches: int, extra: List[str]) -> Dict[str, float]:
    """Each reward's mean cosine between its policy-gradient estimates from ``batches`` independent batches at
    the same (base) weights: the QP sees ``g_k = s_k + noise``, and with independent noise the expected cosine
    of two estimates is about ``|s_k|^2 / E|g_k|^2``, the share of a per-batch gradient that is signal. A reward
    near 0 is mostly sampling noise to the QP, so a positive ``cos(d, g_k)`` on the batch says little about
    that reward's change. Runs MARBLE's full mode (one gradient per reward per step) with the optimizer step
    skipped, on one process (the gradients are taken before any all-reduce)."""
    import torch

    from diffalign.balance import between_batch_cosines_se

    trainer = make_trainer(model, out / "grad_noise", [
        "train.aggregation=marble", "train.marble_mode=full", f"train.num_epochs={batches}", "train.eval_every=0",
        *extra])
    grads: List = []
    solve = trainer.reward_grads.harmonize_into_grad

    def keep_and_solve(harmonizer, world_size, loss_scale=1.0):
        grads.append(trainer.reward_grads.buffer[:harmonizer.num_rewards].clone())
        return solve(harmonizer, world_size, loss_scale)

    trainer.reward_grads.harmonize_into_grad = keep_and_solve
    trainer.optimizer.step = lambda *a, **k: None  # the weights stay at the base model
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    if len(grads) != batches:
        raise SystemExit(f"--grad-noise: expected one gradient per batch ({batches}), got {len(grads)}; use one "
                         "optimizer step per epoch (the config's defaults) and train.num_inner_epochs=1")
    cos, se = between_batch_cosines_se(torch.stack(grads))  # [K] each
    return {n: (float(cos[i]), float(se[i])) for i, n in enumerate(trainer.rewards.names)}


def qp_share(cfg) -> float:
    """The share ``f`` of QP steps in a run without diagnostics: 1 full MARBLE, 1/N amortised, 0 otherwise."""
    if cfg.aggregation != "marble":
        return 0.0
    return 1.0 if cfg.marble_mode == "full" else 1.0 / cfg.marble_every


def worst_cosine_summary(train_rows: List[Dict], f: float) -> Dict:
    """Worst-reward cosine of the applied direction, as the run's steps have it: the QP steps' values (>= 0 by
    construction: the min-norm point of the batch's own gradients) and the diagnosed plain steps' values, each
    averaged, then mixed as the run mixes its steps (``1 - f`` plain, ``f`` QP). Pooling the rows instead
    over-weighted amortised MARBLE's QP steps (a third of the measured steps at N = 5 with diagnostics every 2,
    a fifth of the run's steps). Needs one optimizer step per epoch row (a row mixing kinds cannot be split)."""
    qp, plain = [], []
    for r in train_rows:
        if "marble/worst_cos" not in r:
            continue
        kinds = [k for k in ("refresh", "diagnose") if r.get(f"steps/{k}", 0) > 0]
        if len(kinds) != 1 or r.get(f"steps/{kinds[0]}") != 1:
            raise SystemExit(f"epoch {r.get('epoch')}: the worst cosine averages steps of kinds {kinds}; run one "
                             "optimizer step per epoch (the config's default batch arithmetic)")
        (qp if kinds[0] == "refresh" else plain).append(float(r["marble/worst_cos"]))

    def mix(values_qp, values_plain):
        parts = [(f, values_qp), (1 - f, values_plain)]
        if any(w > 0 and not v for w, v in parts):
            return float("nan")  # a kind the run has was never measured
        return float(sum(w * np.mean(v) for w, v in parts if w > 0))

    return {"worst_cos_mean": mix(qp, plain),
            "worst_cos_negative_fraction": mix([c < 0 for c in qp], [c < 0 for c in plain]),
            "num_cos_steps": len(qp) + len(plain), "num_cos_qp": len(qp), "num_cos_plain": len(plain),
            "worst_cos_mean_qp": float(np.mean(qp)) if qp else float("nan"),
            "worst_cos_mean_plain": float(np.mean(plain)) if plain else float("nan")}


def summarise(mode: str, rows: List[Dict], names: List[str], cfg, base: Dict) -> Dict:
    evals = [r for r in rows if any(k.startswith("eval/reward/") for k in r)]
    final = evals[-1]
    out = {"mode": mode, "base": {n: base[f"eval/reward/{n}"] for n in names},
           "final": {n: final[f"eval/reward/{n}"] for n in names}}
    out["delta"] = {n: out["final"][n] - out["base"][n] for n in names}
    train_rows = [r for r in rows if "epoch" in r]
    f = qp_share(cfg)
    out.update(worst_cosine_summary(train_rows, f))

    def mean_time(kind):
        # process CPU time of the step: wall time on a shared machine measures the other jobs too
        t = sum(r.get(f"cpu_time/step_{kind}", 0.0) for r in train_rows)
        c = sum(r.get(f"steps/{kind}", 0) for r in train_rows)
        return t / c if c else float("nan")

    plain, qp = mean_time("plain"), mean_time("refresh")
    out["time_per_step"] = qp if f == 1 else plain if f == 0 else (1 - f) * plain + f * qp
    out["time_plain_step"], out["time_qp_step"] = plain, qp
    alpha_keys = [k for k in train_rows[-1] if k.startswith("marble/alpha_bar/")]
    out["alpha_bar_final"] = {k.split("/")[-1]: train_rows[-1][k] for k in alpha_keys}
    out["train_reward_first_last"] = {n: (train_rows[0][f"reward/{n}"], train_rows[-1][f"reward/{n}"])
                                      for n in names if f"reward/{n}" in train_rows[0]}  # eval_rewards: eval only
    return out


def table(results: List[Dict], names: List[str]) -> str:
    head = ["mode"] + [f"Δ {n} (base {results[0]['base'][n]:.4g})" for n in names] + [
        "worst-reward cos (mean)", "steps with worst cos < 0 (measured QP + plain)", "CPU time / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["mode"]] + [f"{r['delta'][n]:+.4f}" for n in names] + [
            f"{r['worst_cos_mean']:+.3f}",
            f"{r['worst_cos_negative_fraction']:.0%} ({r['num_cos_qp']} + {r['num_cos_plain']})",
            f"{r['time_per_step']:.2f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(out: Path, runs: Dict[str, List[Dict]], names: List[str], base: Dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(prefix: str, filename: str, smooth: int, title: str):
        # eval_rewards columns have evaluation points only: no empty panels in the training-reward figure
        shown = [n for n in names if any(f"{prefix}{n}" in r for rows in runs.values() for r in rows)]
        fig = Figure(figsize=(4.2 * len(shown), 3.4))
        FigureCanvasAgg(fig)
        for j, n in enumerate(shown):
            ax = fig.add_subplot(1, len(shown), j + 1)
            for mode, rows in runs.items():
                pts = [(r["step"], r[f"{prefix}{n}"]) for r in rows if f"{prefix}{n}" in r and "step" in r]
                if prefix.startswith("eval") and pts and pts[0][0] != 0:
                    pts.insert(0, (0, base[f"{prefix}{n}"]))  # the shared base-model evaluation
                if not pts:
                    continue
                x, y = map(np.asarray, zip(*pts))
                if smooth > 1 and len(y) >= smooth:
                    y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
                    x = x[smooth - 1:]
                ax.plot(x, y, label=mode, marker="o" if prefix.startswith("eval") else None)
            ax.set_title(n)
            ax.set_xlabel("epoch")
        fig.axes[0].legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)

    figure("eval/reward/", "eval_rewards.png", 1, "eval reward (deterministic sampling, fixed prompts)")
    figure("reward/", "train_rewards.png", 5, "training batch reward (5-epoch moving average)")
    fig = Figure(figsize=(6, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for mode, rows in runs.items():
        pts = [(r["step"], r["marble/worst_cos"]) for r in rows if "marble/worst_cos" in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker=".", label=mode)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("min_k cos(d, g_k)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "worst_cosine.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every mode")
    ap.add_argument("--model", default="builtin:shapes-flow")
    ap.add_argument("--tiny", action="store_true", help="tiny random SD3 pipeline (harness check only)")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--diag-every", type=int, default=2, help="gradient-cosine diagnostics every N steps")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "marble_experiment"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plots from OUT/*/metrics.jsonl")
    ap.add_argument("--image-stats", action="store_true",
                    help="paired per-prompt reward changes and what the images became (OUT/image_stats.json)")
    ap.add_argument("--grad-noise", type=int, default=0, metavar="B",
                    help="instead of training: each reward's mean gradient cosine between B independent batches at "
                    "the base weights (how much of a per-batch gradient the QP sees is signal)")
    args = ap.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, extra = args.model, list(args.overrides)
    if args.tiny:
        from diffalign.testing.tiny import tiny_sd3_pipeline

        model = str(Path(tempfile.mkdtemp(prefix="marble_exp_")) / "tiny-sd3")
        tiny_sd3_pipeline(seed=0).save_pretrained(model)
        extra = TINY_OVERRIDES + extra
    if args.grad_noise:
        if args.grad_noise < 3:
            raise SystemExit(f"--grad-noise needs at least 3 batches (a cosine and its standard error), got "
                             f"{args.grad_noise}")
        res = gradient_reproducibility(model, out, args.grad_noise, extra)
        text = (f"mean gradient cosine between {args.grad_noise} independent batches at the base weights "
                f"(overrides={extra}), +- jackknife standard error:\n"
                + "\n".join(f"  {n}: {c:+.3f} +- {e:.3f}" for n, (c, e) in res.items()) + "\n")
        (out / "grad_noise.txt").write_text(text, encoding="utf-8")
        print(text)
        return 0
    if args.replot:
        from diffalign.logging import read_metrics

        runs = {m: read_metrics(out / m / "metrics.jsonl") for m in args.modes.split(",")}
        first = runs[args.modes.split(",")[0]]
        base = next(r for r in first if any(k.startswith("eval/reward/") for k in r))
        names = [k.split("/")[-1] for k in base if k.startswith("eval/reward/")]
        plots(out, runs, names, base)
        return 0
    runs, results, names = {}, [], None
    base = None
    compared = {}
    for mode in args.modes.split(","):
        rows, names, cfg, compared[mode] = run_mode(mode, model, out, args.epochs, args.diag_every, extra,
                                                    eval_base=base is None, with_images=args.image_stats)
        if base is None:
            base = next(r for r in rows if any(k.startswith("eval/reward/") for k in r))
        runs[mode] = rows
        results.append(summarise(mode, rows, names, cfg, base))
    md = table(results, names)
    header = (f"model={'tiny-sd3 (harness check)' if args.tiny else args.model}, epochs={args.epochs} "
              f"(1 optimizer step each), threads={torch.get_num_threads()}, overrides={extra}\n\n")
    (out / "table.md").write_text(header + md + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    plots(out, runs, names, base)
    print("\n" + header + md)
    if args.image_stats:
        (out / "image_stats.json").write_text(json.dumps(compared, indent=2), encoding="utf-8")
        for mode, c in compared.items():
            print(f"{mode}: paired change per prompt " + ", ".join(
                f"{n} {m:+.4f} +- {e:.4f}" for n, (m, e) in c["paired_delta"].items()))
            print("  images before -> after: " + ", ".join(
                f"{k} {c['before'][k]:.3f} -> {c['after'][k]:.3f}" for k in c["after"]))
    for r in results:
        if r["alpha_bar_final"]:
            print(f"{r['mode']}: final alpha_bar " + ", ".join(f"{k}={v:.3f}" for k, v in r["alpha_bar_final"].items()))
    print(f"wrote {out / 'table.md'}, results.json and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
