#!/usr/bin/env python
"""MARBLE benchmark (issue 6, acceptance 4): optimizer-step time of amortised and full MARBLE against a
single-reward DiffusionNFT step, and the QP solve time for K = 5, all measured in the same run.

    python scripts/bench_marble.py                    # the shipped flow model (builtin:shapes-flow)
    python scripts/bench_marble.py --tiny             # a tiny random SD3 pipeline (a smoke run of the harness)
    python scripts/bench_marble.py --model PATH       # any SD3-layout pipeline folder

Three NFT trainers are built from ``configs/shapes/nft_marble.yaml`` (32 samples, 2 minibatches of 16, 9 trained
timesteps, LoRA r16, one optimizer step per call): a single reward (weighted_sum over ``shapes``), MARBLE
amortised (K rewards, QP every N steps), MARBLE full (K backwards and a QP every step). All train on the same
clean samples (drawn once) with fixed random advantages, through the trainers' own ``_train_epoch``; the steps
are interleaved (single, amortised, single, amortised, ..., full every N/2) so load drift cancels. The
amortised ratio is total amortised time over total single time on a whole number of QP windows.
Goal: amortised / single <= 1.15 (MARBLE reports 0.97x on 8 H200s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "shapes" / "nft_marble.yaml"
TINY_OVERRIDES = ["sample.height=32", "sample.width=32", "sample.num_steps=4", "sample.batch_size=8",
                  "sample.group_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=8",
                  "train.gradient_accumulation_steps=1"]
#: K reward columns; only their names matter here (advantages are synthetic), the labels keep them distinct
REWARDS_K = ["shapes", "jpeg_compressibility", "colorfulness", "jpeg_incompressibility", "colorfulness"]


def build_trainer(model: str, out: Path, overrides, k: int, aggregation: str, mode: str, every: int):
    from diffalign.config import RunConfig, load_config
    from trainers.nft import NFTTrainer

    cfg = load_config(RunConfig, CONFIG, [f"model.path={model}", f"output_dir={out}", "train.eval_every=0",
                                          "checkpoint.every=0", "checkpoint.resume_from=null", "logging.image_every=0",
                                          f"train.aggregation={aggregation}", f"train.marble_mode={mode}",
                                          f"train.marble_every={every}", *overrides])
    names = REWARDS_K[:k]
    cfg.rewards = [type(cfg.rewards[0])(name=n, label=f"{n}_{i}") for i, n in enumerate(names)]
    trainer = NFTTrainer(cfg)
    trainer.setup()
    return trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. sample.height=32)")
    ap.add_argument("--model", default="builtin:shapes-flow")
    ap.add_argument("--tiny", action="store_true", help="tiny random SD3 pipeline instead of --model")
    ap.add_argument("--k", type=int, default=5, help="number of rewards")
    ap.add_argument("--every", type=int, default=10, help="amortised: optimizer steps per QP (N)")
    ap.add_argument("--windows", type=int, default=1, help="QP windows of N steps to time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_marble_"))
    overrides = list(args.overrides)
    model = args.model
    if args.tiny:
        from diffalign.testing.tiny import tiny_sd3_pipeline

        model = str(tmp / "tiny-sd3")
        tiny_sd3_pipeline(seed=0).save_pretrained(model)
        overrides = TINY_OVERRIDES + overrides
    k, n_every = args.k, args.every
    single = build_trainer(model, tmp / "single", overrides, 1, "weighted_sum", "amortized", n_every)
    amort = build_trainer(model, tmp / "amortized", overrides, k, "marble", "amortized", n_every)
    full = build_trainer(model, tmp / "full", overrides, k, "marble", "full", n_every)

    from diffalign.distributed import repeat_assignment

    s = single.run.sample
    n = s.batch_size * s.num_batches_per_epoch
    assignment = repeat_assignment(single.prompts.epoch_prompts(0, n // s.group_size), s.group_size, epoch=0,
                                   seed=0, rank=0, world_size=1)
    c0 = time.process_time()
    data = single._sample(assignment)
    t_sample_cpu = time.process_time() - c0 - data["reward_seconds"]  # reward time ~ CPU time (single thread)
    gen = torch.Generator().manual_seed(0)
    per = torch.randn(n, k, generator=gen).clamp(-2.5, 2.5)
    keep = torch.ones(n, dtype=torch.bool)

    cpu = {"single": [], "amort": [], "full": []}
    # each trainer's reward columns (finite: every sample counts in every reward's loss); the samples were
    # scored by the single-reward trainer, and the K-reward ones weight each reward's loss by its column
    widths = {t.num_rewards: {**data, "rewards": torch.zeros(n, t.num_rewards)} for t in (single, amort)}

    def step(trainer, epoch, key=None):
        adv = per[:, 0] if trainer.num_rewards == 1 else per
        t0, c0 = time.perf_counter(), time.process_time()
        # the same samples every call (data["sample_ids"] included, so the same timesteps and noise): a timing only
        trainer._train_epoch(epoch, widths[trainer.num_rewards], adv, per[:, :trainer.num_rewards], keep)
        if key:
            # process CPU time: robust to other jobs on a shared machine (exact when torch runs one thread)
            cpu[key].append(time.process_time() - c0)
        return time.perf_counter() - t0

    # warm-up (allocator, first autograd graph)
    for t in (single, amort, full):
        step(t, 0)
    amort.global_step = 0  # the timed window starts with a QP refresh
    t_single, t_amort, t_full = [], [], []
    total = n_every * args.windows
    for i in range(total):
        t_single.append(step(single, i + 1, "single"))
        t_amort.append(step(amort, i + 1, "amort"))
        if i % max(1, n_every // 2) == 0:
            t_full.append(step(full, i + 1, "full"))
    ratio_amort = sum(t_amort) / sum(t_single)
    ratio_amort_cpu = sum(cpu["amort"]) / sum(cpu["single"])
    ratio_full = statistics.median(t_full) / statistics.median(t_single)

    # QP for K rewards alone: Gram of the LoRA-sized gradients, the solve (single and batched), cvxpy
    from diffalign.balance import gram_matrix, harmonize, min_norm_coefficients, min_norm_cvxpy

    d = sum(p.numel() for p in amort.params)
    grads = torch.randn(k, d, generator=gen)
    gram = gram_matrix(grads)
    gram = gram / torch.outer(gram.diagonal().sqrt(), gram.diagonal().sqrt())

    def timed(fn, reps):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    t_solve = timed(lambda: min_norm_coefficients(gram), 200)
    batch = gram.expand(1024, k, k).clone()
    t_batched = timed(lambda: min_norm_coefficients(batch), 5) / 1024
    t_gram = timed(lambda: gram_matrix(grads), 20)
    t_harm = timed(lambda: harmonize(grads), 20)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_cvx = timed(lambda: min_norm_cvxpy(gram), 10)

    step_single = statistics.median(t_single)
    print(f"\nMARBLE benchmark  model={'tiny-sd3' if args.tiny else args.model}  K={k}  N={n_every}  "
          f"samples/step={n}  LoRA params={d}  threads={torch.get_num_threads()}  device={single.device}")
    print("| measurement | value | ratio to single-reward step |")
    print("|---|---|---|")
    print(f"| single-reward NFT step (median of {len(t_single)}) | {1e3 * step_single:.1f} ms | 1.00 |")
    print(f"| MARBLE amortised step (mean over {len(t_amort)} = {args.windows} QP window(s)) | "
          f"{1e3 * sum(t_amort) / len(t_amort):.1f} ms | **{ratio_amort:.3f}** (goal <= 1.15) |")
    print(f"| MARBLE amortised / single, process CPU time | {1e3 * np.mean(cpu['amort']):.1f} ms | "
          f"**{ratio_amort_cpu:.3f}** |")
    it_single = t_sample_cpu + np.mean(cpu["single"])
    print(f"| whole iteration (ODE sampling of the epoch's {n} images + the step; CPU time) | "
          f"{1e3 * (t_sample_cpu + np.mean(cpu['amort'])):.1f} ms | "
          f"{(t_sample_cpu + np.mean(cpu['amort'])) / it_single:.3f} |")
    print(f"|   of which sampling (rewards excluded) | {1e3 * t_sample_cpu:.1f} ms | "
          f"{t_sample_cpu / np.mean(cpu['single']):.3f} |")
    # every window starts with its QP-refresh step (indices 0, N, 2N, ...); the others are plain steps
    is_refresh = [i % n_every == 0 for i in range(len(t_amort))]
    t_refresh = [t for t, r in zip(t_amort, is_refresh) if r]
    t_plain = [t for t, r in zip(t_amort, is_refresh) if not r] or t_amort
    print(f"|   of which QP-refresh steps (median of {len(t_refresh)}) | {1e3 * statistics.median(t_refresh):.1f} ms | "
          f"{statistics.median(t_refresh) / step_single:.3f} |")
    print(f"|   plain amortised steps (median of {len(t_plain)}) | {1e3 * statistics.median(t_plain):.1f} ms | "
          f"{statistics.median(t_plain) / step_single:.3f} |")
    cpu_refresh = np.mean([c for c, r in zip(cpu["amort"], is_refresh) if r])
    plain = np.mean([c for c, r in zip(cpu["amort"], is_refresh) if not r] or cpu["amort"])
    single_cpu = np.mean(cpu["single"])
    for n_q in (5, 10, 20):
        est = ((n_q - 1) * plain + cpu_refresh) / (n_q * single_cpu)
        print(f"|   amortised ratio for N={n_q} from the measured refresh / plain CPU times | | {est:.3f} |")
    print(f"| MARBLE full step (median of {len(t_full)}) | {1e3 * statistics.median(t_full):.1f} ms | "
          f"{ratio_full:.3f} |")
    print(f"| QP solve K={k} (enumerate, one problem) | {1e3 * t_solve:.3f} ms | {t_solve / step_single:.5f} |")
    print(f"| QP solve K={k} batched (per problem, 1024) | {1e3 * t_batched:.4f} ms | "
          f"{t_batched / step_single:.6f} |")
    print(f"| Gram matrix [K, D={d}] | {1e3 * t_gram:.3f} ms | {t_gram / step_single:.5f} |")
    print(f"| harmonize (Gram + QP + combine) | {1e3 * t_harm:.3f} ms | {t_harm / step_single:.5f} |")
    print(f"| cvxpy reference solve (CLARABEL) | {1e3 * t_cvx:.3f} ms | {t_cvx / step_single:.5f} |")
    for t in (single, amort, full):
        t.logger.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
