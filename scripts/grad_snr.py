#!/usr/bin/env python
"""How much of a trainer's per-update gradient is reward signal? (a diagnostic, not a benchmark)

    python scripts/grad_snr.py configs/shapes/flow_grpo.yaml --batches 16
    python scripts/grad_snr.py configs/shapes/nft.yaml --batches 16 sample.num_batches_per_epoch=4 \\
        train.gradient_accumulation_steps=4

Runs the config's trainer (GRPO, DDPO-style or DiffusionNFT) for ``--batches`` epochs with the optimizer step
skipped, so every epoch draws a fresh batch (new prompts, new noise) at the *same* weights, and keeps each
update's gradient (after the cross-rank all-reduce and clipping, exactly what the optimizer would see). With
``g_b = s + n_b`` and independent noise, the mean cosine of two estimates is about ``c = |s|^2 / E|g|^2``, the
share of a per-update gradient that is signal (:func:`diffalign.balance.between_batch_cosines_se`). Printed:

* ``c`` and its jackknife standard error over batches (a ``c`` within about two standard errors of 0 is not
  resolved: the signal is smaller than this many batches can show);
* the signal-to-noise ratio of one update, ``c / (1 - c)``, and per second of training (sampling, rewards and
  backward included), the figure to compare trainers and settings by: an update's noise averages out over
  updates, so progress per second goes with it;
* the samples per update at which the gradient would be half signal, ``n (1 - c) / c`` (noise falls as
  ``1 / n``), or a lower bound when ``c`` is not resolved.

Needs one optimizer update per epoch (the shipped shapes configs' batch arithmetic). Writes ``OUT/snr.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    """The figures printed per config (see the module docstring); ``resolved`` is ``cos > 2 se``."""
    resolved = cos > 2 * se
    c = cos if resolved else max(2 * se, 1e-12)  # unresolved: the largest share the batches cannot rule out
    snr = cos / (1 - cos)
    return {"cos": cos, "se": se, "resolved": resolved, "snr_per_update": snr, "snr_per_second": snr / seconds,
            "seconds_per_update": seconds, "samples_per_update": samples,
            # noise ~ 1/n: the gradient is half signal at n (1 - c) / c samples (a lower bound if unresolved)
            "samples_for_half_signal": samples * (1 - c) / c}


def collect_gradients(config: str, overrides: List[str], batches: int, out: Path):
    """``(grads [batches, D], trainer, seconds per update)``: one update's gradient per epoch, weights unchanged."""
    import torch

    from diffalign.config import RunConfig, load_config
    from trainers.run import _trainer_class, make_accelerator

    cfg = load_config(RunConfig, config, [
        *overrides, f"output_dir={out}", f"train.num_epochs={batches}", "train.max_minutes=null",
        "train.eval_every=0", "checkpoint.every=0", "checkpoint.resume_from=null", "logging.image_every=0"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run per invocation
    trainer = _trainer_class(cfg.trainer)(cfg, make_accelerator(cfg.model.device))
    trainer.setup()
    grads: List[torch.Tensor] = []

    def keep_gradient(*args, **kwargs):  # replaces optimizer.step: the weights stay at the base model
        grads.append(torch.cat([p.grad.detach().flatten().double().cpu() if p.grad is not None
                                else torch.zeros(p.numel(), dtype=torch.float64) for p in trainer.params]))

    trainer.optimizer.step = keep_gradient
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the LR scheduler notices the replaced step; it does not matter here
            warnings.filterwarnings("ignore", message=".*optimizer.step.*", category=UserWarning)
            trainer.train()
    finally:
        trainer.cleanup()
    seconds = (time.perf_counter() - t0) / max(len(grads), 1)
    if len(grads) != batches:
        raise SystemExit(f"expected one optimizer update per epoch ({batches}), got {len(grads)}: set "
                         "train.gradient_accumulation_steps so that one update takes the whole epoch's samples "
                         "(and train.num_inner_epochs=1)")
    return torch.stack(grads), trainer, seconds


def measure(config: str, overrides: List[str], batches: int, out: Path) -> Dict[str, float]:
    grads, trainer, seconds = collect_gradients(config, overrides, batches, out)
    s = trainer.run.sample
    samples = s.batch_size * s.num_batches_per_epoch * trainer.dist.world_size
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
        f"({res['seconds_per_update']:.2f} s/update): {res['snr_per_second']:+.5f}",
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
