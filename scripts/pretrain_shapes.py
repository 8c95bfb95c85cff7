#!/usr/bin/env python
"""Pretrain the shapes world's two shipped models from a seed (CPU, no download).

Stages (a rerun starts the stage over; weights land in ``--out``, by default diffalign/shapes/models/, replacing
the shipped models: pass ``--out DIR`` to keep them; ``flow`` and ``ddpm`` need ``OUT/_vae`` from ``vae``):

1. ``vae``  : a 2x-downsampling AutoencoderKL on renders of held-in prompts (MSE + tiny KL); its
   latent mean / std set ``shift_factor`` / ``scaling_factor``.
2. ``flow`` : StableDiffusion3Pipeline (rectified flow, velocity loss ``||v - (eps - x0)||^2`` at
   logit-normal sigmas, SD3 paper §3.1) trained jointly with its two tiny CLIP text encoders.
3. ``ddpm`` : StableDiffusionPipeline (epsilon loss at uniform DDPM timesteps, Ho et al. 2020 eq. (14))
   trained jointly with its CLIP text encoder.

Both denoisers see the empty prompt 10% of the time so that classifier-free guidance works, and the
saved weights are an EMA of the trained ones. Only held-in prompts are used (see diffalign.shapes.prompts).

    python scripts/pretrain_shapes.py --stage all --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffalign.shapes.models import (  # noqa: E402
    FLOW_CALL_KWARGS,
    MODELS_DIR,
    build_ddpm_pipeline,
    build_flow_pipeline,
    build_vae,
)
from diffalign.shapes.prompts import PromptSampler  # noqa: E402
from diffalign.shapes.render import render_batch  # noqa: E402


def batches(seed: int, batch_size: int, size: int = 32):
    """Endless (prompts, images [B,3,H,W] in [-1,1]) batches of held-in prompts; reproducible from seed."""
    sampler = PromptSampler(seed=seed, split="held_in")
    step = 0
    while True:
        prompts = sampler.sample_batch(batch_size)
        images = render_batch(prompts, size=size, seed=seed * 1_000_003 + step) * 2 - 1
        step += 1
        yield prompts, images


class EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_vae(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    data = batches(args.seed + 1, args.batch_size)
    bar = tqdm(range(args.vae_steps), desc="vae")
    for step in bar:
        _, x = next(data)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.5f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(next(data)[1]).latent_dist.mode() for _ in range(8)])
    vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(out / "_vae")
    print(f"vae: shift {lat.mean():.4f} scale {1 / lat.std():.4f}")


def encode_latents(vae, images, shift: bool):
    with torch.no_grad():
        lat = vae.encode(images).latent_dist.sample()
    s = vae.config.shift_factor if shift else 0.0
    return (lat - s) * vae.config.scaling_factor


def drop_prompts(prompts, rng: np.random.Generator, p: float = 0.1):
    return [("" if rng.random() < p else q) for q in prompts]


def meta(args, kind: str, steps: int, t0: float) -> dict:
    """What a saved model records of its pretraining (``diffalign_pretrain.json``)."""
    return {"seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
            "vae_steps": args.vae_steps, "seconds": round(time.time() - t0),
            "call_kwargs": FLOW_CALL_KWARGS if kind == "flow" else {}}


def write_meta(folder: Path, info: dict) -> None:
    """``diffalign_pretrain.json`` and ``diffalign.json`` (the keyword arguments every call of this pipeline needs,
    read by diffalign's adapters: without it the flow model's prompts get 256 extra T5 positions it never saw)."""
    (folder / "diffalign_pretrain.json").write_text(json.dumps(info, indent=2))
    (folder / "diffalign.json").write_text(json.dumps({"call_kwargs": info["call_kwargs"]}, indent=2))


def train_denoiser(args, out: Path, kind: str) -> None:
    from diffusers import AutoencoderKL

    if not (out / "_vae" / "config.json").exists():
        raise SystemExit(f"error: --stage {kind} needs the VAE of --stage vae, and {out / '_vae'} does not exist; "
                         f"run `python scripts/pretrain_shapes.py --stage vae --out {out}` first (or --stage all)")
    vae = AutoencoderKL.from_pretrained(out / "_vae").eval()
    vae.requires_grad_(False)
    if kind == "flow":
        pipe = build_flow_pipeline(vae=vae, seed=args.seed)
        names = ["transformer", "text_encoder", "text_encoder_2"]
    else:
        pipe = build_ddpm_pipeline(vae=vae, seed=args.seed)
        names = ["unet", "text_encoder"]
    trained = [getattr(pipe, n) for n in names]
    for m in trained:
        m.train()
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = EMA(trained, args.ema)
    data = batches(args.seed + (2 if kind == "flow" else 3), args.batch_size)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    acp = pipe.scheduler.alphas_cumprod if kind == "ddpm" else None
    steps = args.flow_steps if kind == "flow" else args.ddpm_steps
    bar = tqdm(range(steps), desc=kind)
    t0 = time.time()
    for step in bar:
        prompts, images = next(data)
        x0 = encode_latents(vae, images, shift=(kind == "flow"))
        eps = torch.randn(x0.shape, generator=gen)
        prompts = drop_prompts(prompts, rng)
        if kind == "flow":
            pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  **FLOW_CALL_KWARGS)
            sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))  # logit-normal (SD3 §3.1)
            s = sigma.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * eps
            pred = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pe,
                                    pooled_projections=pooled).sample
            loss = F.mse_loss(pred, eps - x0)
        else:
            pe, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
            t = torch.randint(0, acp.shape[0], (x0.shape[0],), generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            pred = pipe.unet(x_t, t, encoder_hidden_states=pe).sample
            loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.snapshot_every and step > 0 and step % args.snapshot_every == 0:
            snapshot = copy.deepcopy(pipe)
            ema_snapshot = EMA([getattr(snapshot, n) for n in names], 0.0)
            for dst, src in zip(ema_snapshot.params, ema.shadow):
                dst.data.copy_(src)
            snap_dir = out / f".shapes-{kind}.step{step}"
            snapshot.save_pretrained(snap_dir, safe_serialization=True)
            # the EMA after step + 1 updates: what `--{kind}-steps {step + 1}` saves as its final model
            write_meta(snap_dir, {**meta(args, kind, step + 1, t0), "snapshot_of_run_with_steps": steps})
    print(f"{kind}: {steps} steps in {time.time() - t0:.0f} s")
    ema.copy_to()
    for m in trained:
        m.eval()
    target = out / f"shapes-{kind}"
    tmp = out / f".shapes-{kind}.tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_meta(tmp, meta(args, kind, steps, t0))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    print(f"saved {target}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "flow", "ddpm", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--flow-steps", type=int, default=1500)
    p.add_argument("--ddpm-steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--out", type=Path, default=MODELS_DIR)
    p.add_argument("--snapshot-every", type=int, default=500, help="save an EMA snapshot every N steps (0: never)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(args, args.out)
    if args.stage in ("flow", "all"):
        train_denoiser(args, args.out, "flow")
    if args.stage in ("ddpm", "all"):
        train_denoiser(args, args.out, "ddpm")


if __name__ == "__main__":
    main()
