#!/usr/bin/env python
"""How much of a trainer's per-update gradient is reward signal? (a diagnostic, not a benchmark)

    python scripts/grad_snr.py configs/shapes/flow_grpo.yaml --batches 16
    python scripts/grad_snr.py configs/shapes/nft.yaml --batches 16 sample.num_batches_per_epoch=4 \\
        train.gradient_accumulation_steps=4

Runs the config's trainer (GRPO, DDPO-style or DiffusionNFT) for ``--batches`` epochs with the optimizer step
skipped, so every epoch draws a fresh batch (new prompts, new noise) at the *same* weights, and keeps each
update's gradient (after clipping, exactly what the optimizer would see). With
``g_b = s + n_b`` and independent noise, the mean cosine of two estimates is about ``c = |s|^2 / E|g|^2``, the
share of a per-update gradient that is signal (:func:`diffalign.balance.between_batch_cosines_se`). Printed:

* ``c`` and its jackknife standard error over batches (a ``c`` within two standard errors of 0 is not resolved:
  the signal is smaller than this many batches can show; near 0 the jackknife is conservative, about sqrt(2));
* the signal-to-noise ratio of one update, ``c / (1 - c)``, and per second of the epochs' sampling, rewards and
  training (from ``metrics.jsonl``), the figure to compare trainers and settings by: an update's noise averages
  out over updates, so progress per second goes with it (point estimates when ``c`` is not resolved);
* the samples per update at which the gradient would be half signal, ``n (1 - c) / c`` (noise falls as
  ``1 / n``); when ``c`` is not resolved, a lower bound from the largest share not ruled out,
  ``max(c, 0) + 2 se``.

Needs one optimizer update per epoch (the shipped shapes configs' batch arithmetic; otherwise it stops at the
second update naming the accumulation to set), one inner epoch, one process, and no state carried between
updates (MARBLE's amortised mode or ``marble_grad_ema`` are refused). Writes ``OUT/snr.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a run config (yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for diffalign train")
    p.add_argument("--batches", type=int, default=16, help="independent batches (epochs) at the base weights")
    p.add_argument("--out", default="outputs/grad_snr", help="output folder (the run's metrics and snr.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_intermixed_args(argv)
    if args.batches < 3:
        p.error(f"--batches {args.batches}: need at least 3 (two for a cosine, one more for its standard error)")
    return args


def jackknife_cosine(grads) -> Dict[str, float]:
    """Mean pairwise cosine of ``grads`` ``[B, D]`` and its jackknife standard error
    (:func:`diffalign.balance.between_batch_cosines_se`)."""
    from diffalign.balance import between_batch_cosines_se

    cos, se = between_batch_cosines_se(grads.double()[:, None, :])
    return {"cos": float(cos[0]), "se": float(se[0])}


def summarise(cos: float, se: float, samples: int, seconds: float) -> Dict[str, float]:
    """The figures printed per config (see the module docstring); ``resolved`` is ``cos > 2 se``. Unresolved, the
    share used for the sample count is the largest the batches cannot rule out, ``max(cos, 0) + 2 se``, so the
    count is a lower bound; the signal-to-noise figures are then only reported with ``resolved`` false."""
    resolved = cos > 2 * se
    c = cos if resolved else max(cos, 0.0) + 2 * se
    c = min(max(c, 1e-12), 1.0 - 1e-12)
    snr = cos / (1 - min(cos, 1.0 - 1e-12))
    return {"cos": cos, "se": se, "resolved": resolved, "snr_per_update": snr, "snr_per_second": snr / seconds,
            "seconds_per_update": seconds, "samples_per_update": samples,
            # noise ~ 1/n: the gradient is half signal at n (1 - c) / c samples (a lower bound if unresolved)
            "samples_for_half_signal": samples * (1 - c) / c}


def check_config(cfg) -> None:
    """Refuse settings whose consecutive updates are not independent estimates at the same weights."""
    from diffalign.config import resolve_train_section

    t = resolve_train_section(cfg)
    marble = getattr(t, "aggregation", None) == "marble"
    if marble and getattr(t, "marble_grad_ema", 0.0) > 0:
        raise SystemExit(f"train.marble_grad_ema={t.marble_grad_ema}: the applied gradient then averages earlier "
                         "batches', so consecutive updates agree by construction; set train.marble_grad_ema=0")
    if marble and getattr(t, "marble_mode", "full") == "amortized":
        raise SystemExit("train.aggregation=marble with train.marble_mode=amortized: the coefficients change between "
                         "updates at fixed weights; set train.marble_mode=full (or another aggregation)")
    if getattr(t, "num_inner_epochs", 1) != 1:
        raise SystemExit(f"train.num_inner_epochs={t.num_inner_epochs}: a second pass re-uses the batch; set "
                         "train.num_inner_epochs=1")


def collect_gradients(config: str, overrides: List[str], batches: int, out: Path):
    """``(grads [batches, D], trainer, seconds per update)``: one update's gradient per epoch, weights unchanged.

    The gradient is the one the optimizer would see (after clipping). Seconds per
    update are the epochs' sampling, reward and training time from ``metrics.jsonl`` (not the final evaluation,
    checkpoint or plots). One process only."""
    import torch

    from diffalign.config import RunConfig, load_config
    from diffalign.logging import read_metrics
    from trainers.run import _trainer_class, make_accelerator

    cfg = load_config(RunConfig, config, [
        *overrides, f"output_dir={out}", f"train.num_epochs={batches}", "train.max_minutes=null",
        "train.eval_every=0", "checkpoint.every=0", "checkpoint.resume_from=null", "logging.image_every=0"])
    check_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run per invocation
    trainer = _trainer_class(cfg.trainer)(cfg, make_accelerator(cfg.model.device))
    trainer.setup()
    if trainer.dist.world_size != 1:
        trainer.cleanup()
        raise SystemExit(f"grad_snr measures on one process (got {trainer.dist.world_size}); run it without "
                         "accelerate launch / torchrun")
    grads: List[torch.Tensor] = []
    epochs: List[int] = []

    def keep_gradient(*args, **kwargs):  # replaces optimizer.step: the weights stay at the base model
        if epochs and epochs[-1] == trainer.epoch:
            s, t = cfg.sample, trainer.cfg
            need = -(-s.batch_size * s.num_batches_per_epoch // t.batch_size)
            raise SystemExit(f"a second optimizer update in epoch {trainer.epoch}: grad_snr needs one update per "
                             f"epoch; set train.gradient_accumulation_steps={need} (the epoch's "
                             f"{s.batch_size * s.num_batches_per_epoch} samples / train.batch_size {t.batch_size})")
        epochs.append(trainer.epoch)
        grads.append(torch.cat([p.grad.detach().flatten().double().cpu() if p.grad is not None
                                else torch.zeros(p.numel(), dtype=torch.float64) for p in trainer.params]))

    trainer.optimizer.step = keep_gradient
    try:
        with warnings.catch_warnings():  # the LR scheduler notices the replaced step; it does not matter here
            warnings.filterwarnings("ignore", message=".*optimizer.step.*", category=UserWarning)
            trainer.train()
    finally:
        trainer.cleanup()
    if len(grads) != batches:
        raise SystemExit(f"expected one optimizer update per epoch ({batches}), got {len(grads)}; an update with a "
                         "non-finite gradient is skipped (train/skipped_steps in OUT/metrics.jsonl)")
    G = torch.stack(grads)
    zero = int((G.norm(dim=1) == 0).sum())
    if zero:
        raise SystemExit(f"{zero} of {batches} updates had a zero gradient (e.g. every group's rewards tied under "
                         "train.drop_zero_std_groups): their cosine is undefined; use larger groups or more batches")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "time/train" in r]
    seconds = sum(r["time/sample"] + r["time/reward"] + r["time/train"] for r in rows) / max(len(rows), 1)
    return G, trainer, seconds


def measure(config: str, overrides: List[str], batches: int, out: Path) -> Dict[str, float]:
    grads, trainer, seconds = collect_gradients(config, overrides, batches, out)
    s = trainer.run.sample
    samples = s.batch_size * s.num_batches_per_epoch
    return {**summarise(**jackknife_cosine(grads), samples=samples, seconds=seconds),
            "batches": batches, "num_params": int(grads.shape[1])}


def report(res: Dict[str, float]) -> str:
    half = f"{res['samples_for_half_signal']:.0f}"
    lines = [
        f"per-update gradient over {res['batches']} independent batches of {res['samples_per_update']} samples "
        f"({res['num_params']} trained parameters):",
        f"  signal share c = mean between-batch cosine: {res['cos']:+.4f} +- {res['se']:.4f} (jackknife s.e.)"
        + ("" if res["resolved"] else "  -- not resolved (c <= 2 s.e.)"),
        f"  signal-to-noise per update c/(1-c): {res['snr_per_update']:+.4f}; per second of training "
        f"({res['seconds_per_update']:.2f} s/update): {res['snr_per_second']:+.5f}"
        + ("" if res["resolved"] else "  -- point estimates, not resolved"),
        f"  samples per update for a half-signal gradient: {'>= ' if not res['resolved'] else ''}{half}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = measure(args.config, args.overrides, args.batches, out)
    text = report(res)
    print(text)
    with open(out / "snr.json", "w") as f:
        json.dump({"config": args.config, "overrides": args.overrides, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
