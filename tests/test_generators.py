"""Generator adapters against the diffusers pipelines they wrap (tiny random SD3 / FLUX / SD1.5).

Known answers first: schedules equal ``scheduler.set_timesteps``, a deterministic rollout equals the
pipeline's own call, decode equals the pipeline's images; then behaviour (guidance batching, re-scoring,
reload, slicing) and the network guard.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from generators_helpers import BUILDERS, PROMPTS, SEQ_LEN, no_network, rel_err, single_thread, text_kwargs  # noqa: F401

from diffalign.generators import (
    BF16_LOG_PROB_ATOL,
    Conditioning,
    FluxAdapter,
    SD3Adapter,
    UNetAdapter,
    adapter_for_pipeline,
    load_generator,
)
from diffalign.testing.tiny import make_clip_tokenizer, make_t5_tokenizer, tiny_sd3_pipeline
from samplers import rollout, score_steps


def _gen(name):
    return adapter_for_pipeline(BUILDERS[name]())


# ----------------------------------------------------------------------------- tiny builders


def test_clip_tokenizer_matches_open_clip_and_tiny_vocab():
    import open_clip

    full = make_clip_tokenizer(vocab_size=49408)
    prompt = "Two RED circles, left of a blue square!"
    ours = full(prompt)["input_ids"]
    ref = open_clip.get_tokenizer("ViT-B-32")([prompt])[0].tolist()
    assert ours == ref[: len(ours)]

    tiny = make_clip_tokenizer()
    assert len(tiny) == 1000
    ids = tiny(prompt)["input_ids"]
    assert ids[0] == 998 and ids[-1] == 999 and max(ids) < 1000


def test_t5_tokenizer_special_ids():
    tok = make_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red circle")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15"])
def test_tiny_pipelines_are_eval_float32(name):
    pipe = BUILDERS[name]()
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert modules and all(not m.training for m in modules)
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    assert pipe.vae_scale_factor == 2


def test_adapter_dispatch_and_attributes():
    sd3, flux, sd15 = _gen("sd3"), _gen("flux"), _gen("sd15_v")
    assert isinstance(sd3, SD3Adapter) and isinstance(flux, FluxAdapter) and isinstance(sd15, UNetAdapter)
    assert (sd3.kind, sd3.prediction_type) == ("flow", "flow")
    assert (sd15.kind, sd15.prediction_type) == ("vp", "v_prediction")
    assert sd3.denoiser is sd3.pipeline.transformer and sd15.denoiser is sd15.pipeline.unet
    assert sd3.device == torch.device("cpu") and sd3.dtype == torch.float32
    assert sd3.latent_shape(32, 48) == (4, 16, 24)
    assert flux.latent_shape(32, 48) == (8 * 12, 16)
    with pytest.raises(ValueError, match="supported"):
        adapter_for_pipeline(object())


# ----------------------------------------------------------------------------- schedules


def test_make_schedule_sd3_shift3_matches_scheduler():
    gen = _gen("sd3")
    sched = gen.make_schedule(7, 32, 32)
    ref = gen.pipeline.scheduler
    assert ref.config.shift == 3.0
    ref.set_timesteps(7)
    assert torch.equal(sched.sigmas, ref.sigmas) and torch.equal(sched.timesteps, ref.timesteps)


def test_make_schedule_sd3_dynamic_matches_scheduler():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    gen = adapter_for_pipeline(tiny_sd3_pipeline(use_dynamic_shifting=True))
    sched = gen.make_schedule(5, 64, 32)
    cfg = gen.pipeline.scheduler.config
    mu = calculate_shift(16 * 8, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    gen.pipeline.scheduler.set_timesteps(5, mu=mu)
    assert torch.equal(sched.sigmas, gen.pipeline.scheduler.sigmas)


def test_make_schedule_flux_dynamic_matches_scheduler():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    gen = _gen("flux")
    n = 6
    sched = gen.make_schedule(n, 32, 32)
    ref = gen.pipeline.scheduler
    assert ref.config.use_dynamic_shifting
    mu = calculate_shift(
        64,
        ref.config.base_image_seq_len,
        ref.config.max_image_seq_len,
        ref.config.base_shift,
        ref.config.max_shift,
    )
    ref.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert torch.equal(sched.sigmas, ref.sigmas) and torch.equal(sched.timesteps, ref.timesteps)


def test_make_schedule_ddim_leading_offset_matches_scheduler():
    gen = _gen("sd15")
    ref = gen.pipeline.scheduler
    assert ref.config.timestep_spacing == "leading" and ref.config.steps_offset == 1
    sched = gen.make_schedule(10)
    ref.set_timesteps(10)
    assert torch.equal(sched.timesteps.long(), ref.timesteps)
    acp = ref.alphas_cumprod
    assert torch.allclose(sched.alphas[:-1] ** 2, acp[ref.timesteps], atol=1e-6)
    assert sched.alphas[-1] ** 2 == pytest.approx(
        float(ref.final_alpha_cumprod), abs=1e-6
    )  # set_alpha_to_one=False
    with pytest.raises(ValueError, match="valid"):
        gen.make_schedule(10, bogus=1)


def test_unet_non_ddim_scheduler_gets_ddim_schedule():
    from diffusers import PNDMScheduler

    gen = _gen("sd15")
    ddim_sched = gen.make_schedule(10)
    gen.pipeline.scheduler = PNDMScheduler.from_config(gen.pipeline.scheduler.config, skip_prk_steps=True)
    gen2 = adapter_for_pipeline(gen.pipeline)
    other = gen2.make_schedule(10)
    assert torch.equal(other.timesteps, ddim_sched.timesteps) and torch.equal(other.alphas, ddim_sched.alphas)


def test_load_generator_drops_the_unused_safety_checker(tmp_path):
    """An SD1.x folder's safety checker (~0.6 GB in float16 at full size) is never run by the adapters: it is not
    loaded onto the device, unless kept for the export of a complete folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from diffalign.testing.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=small, projection_dim=16,
                                                      vision_config={**small, "image_size": 32, "patch_size": 8}))
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(tmp_path)
    gen = load_generator(str(tmp_path))
    assert gen.pipeline.safety_checker is None and "safety_checker" not in {
        k for k, v in gen.pipeline.components.items() if v is not None}
    kept = load_generator(str(tmp_path), keep_safety_checker=True)
    assert isinstance(kept.pipeline.safety_checker, StableDiffusionSafetyChecker)


# ----------------------------------------------------------------------------- ODE parity with the pipeline

PARITY_CASES = [
    ("sd3", 1.0),
    ("sd3", 4.5),
    ("sd3_t5", 3.0),
    ("flux", 3.5),  # guidance embedding, no CFG
    ("sd15", 1.0),
    ("sd15", 7.5),
    ("sd15_v", 3.0),
    ("sdxl", 1.0),
    ("sdxl", 5.0),  # zeros for the empty negative prompt (force_zeros_for_empty_prompt), size ids
]


def _pipeline_latents(gen, name, guidance, steps, seed, **extra):
    return gen.pipeline(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        height=32,
        width=32,
        **text_kwargs(name),
        **extra,
    ).images


@pytest.mark.parametrize("name,guidance", PARITY_CASES)
def test_ode_rollout_reproduces_pipeline(name, guidance):
    gen = _gen(name)
    steps, seed = 4, 3
    expected = _pipeline_latents(gen, name, guidance, steps, seed)
    cond = gen.encode_prompts(PROMPTS, guidance_scale=guidance, **text_kwargs(name))
    x_T = gen.prepare_latents(len(PROMPTS), 32, 32, torch.Generator().manual_seed(seed))
    step = "flow_sde" if gen.kind == "flow" else "ddim"
    traj = rollout(
        gen.model_fn(cond, guidance), gen.make_schedule(steps, 32, 32), x_T, step=step, noise_level=0.0
    )
    # output_type="latent" returns the sampler's latents as they are (packed for FLUX, VAE-scaled).
    assert traj.final.shape == expected.shape == (len(PROMPTS), *gen.latent_shape(32, 32))
    assert rel_err(traj.final, expected) < 1e-5
    assert rel_err(traj.final, x_T) > 0.1  # the sampler actually moved


def test_sdxl_rollouts_at_a_non_native_size_carry_that_size_in_their_conditioning():
    """SDXL conditions on (original size, crop, target size). The trainers' and guided sampling's rollouts encoded
    their prompts without the size, so at 48x64 they were conditioned on the model's native size while diffusers'
    pipeline (and so the exported LoRA's users) conditions on 48x64."""
    from samplers.guided.pipeline import guided_sample_prompts
    from trainers.common import sample_batch

    gen = _gen("sdxl")
    assert gen.default_image_size() == (32, 32)
    kwargs = dict(seed=0, num_steps=3, guidance_scale=5.0, negative_prompt="", height=48, width=64, step="ddim",
                  noise_level=0.0)
    traj, cond, _, _ = sample_batch(gen, PROMPTS, [0, 1], **kwargs)
    assert cond.add_time_ids[0].tolist() == [48.0, 64.0, 0.0, 0.0, 48.0, 64.0]
    expected = gen.pipeline(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=traj.latents[:, 0],
                            output_type="latent", height=48, width=64).images
    assert rel_err(traj.final, expected) < 1e-5
    seen = []
    real = gen.encode_prompts
    gen.encode_prompts = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    try:
        guided_sample_prompts(gen, PROMPTS[:1], lambda images, prompts, meta: torch.zeros(len(prompts)), "none",
                              prompt_ids=[0], **kwargs)
    finally:
        del gen.encode_prompts
    assert seen[0].add_time_ids[0].tolist() == [48.0, 64.0, 0.0, 0.0, 48.0, 64.0]


def test_sdxl_vae_latents_mean_and_std_normalise_as_in_the_pipeline():
    """A VAE whose config has per-channel latents_mean / latents_std: diffusers' SDXL pipeline decodes
    ``z * std / scaling + mean`` (and its img2img encodes the inverse); the adapter used scaling only (images off
    by 0.25). And an EDM scheduler, which has no DDPM betas, is refused instead of sampled with DDIM's defaults."""
    from diffusers import EDMEulerScheduler

    from trainers.common import sample_batch

    gen = _gen("sdxl")
    gen.pipeline.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[0.7, 1.3, 0.9, 1.1])
    try:
        traj, _, images, _ = sample_batch(gen, PROMPTS, [0, 1], seed=0, num_steps=2, guidance_scale=5.0,
                                          negative_prompt="", height=32, width=32, step="ddim", noise_level=0.0)
        expected = gen.pipeline(PROMPTS, num_inference_steps=2, guidance_scale=5.0, latents=traj.latents[:, 0],
                                output_type="pt", height=32, width=32).images
        assert rel_err(images, expected) < 1e-5
        latents = gen.encode_images(images)  # the inverse normalisation, as diffusers' SDXL img2img encodes
        z = gen.pipeline.vae.encode(images * 2 - 1).latent_dist.mode()
        mean = torch.tensor([0.3, -0.2, 0.1, 0.5]).view(1, 4, 1, 1)
        std = torch.tensor([0.7, 1.3, 0.9, 1.1]).view(1, 4, 1, 1)
        torch.testing.assert_close(latents, (z - mean) * gen.pipeline.vae.config.scaling_factor / std)
    finally:
        gen.pipeline.vae.register_to_config(latents_mean=None, latents_std=None)
    pipe = BUILDERS["sdxl"]()
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="EDMEulerScheduler defines no DDPM betas"):
        adapter_for_pipeline(pipe)


def test_flux_true_cfg_without_guidance_embedding_matches_pipeline():
    name, g = "flux_schnell", 2.5
    gen = _gen(name)
    expected = gen.pipeline(
        PROMPTS,
        num_inference_steps=3,
        true_cfg_scale=g,
        negative_prompt="",
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        height=32,
        width=32,
        max_sequence_length=SEQ_LEN,
    ).images
    cond = gen.encode_prompts(PROMPTS, guidance_scale=g, max_sequence_length=SEQ_LEN)
    x_T = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    traj = rollout(
        gen.model_fn(cond, g), gen.make_schedule(3, 32, 32), x_T, step="flow_euler", noise_level=0.0
    )
    assert rel_err(traj.final, expected) < 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15"])
def test_decode_matches_pipeline_images(name):
    gen = _gen(name)
    latents = _pipeline_latents(gen, name, 1.0, 2, 0)
    images = gen.pipeline(
        PROMPTS,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=32,
        width=32,
        **text_kwargs(name),
    ).images
    decoded = gen.decode(latents)
    assert decoded.shape == images.shape == (2, 3, 32, 32) and decoded.dtype == torch.float32
    assert torch.allclose(decoded, images, atol=1e-6)


def test_flux_predictions_take_their_image_ids_from_the_size_the_prompts_were_encoded_for():
    """Packed FLUX latents of 32x48 and 48x32 pixels have the same token count; the image position ids came from
    the last size the adapter prepared, so a prediction on 32x48 latents after a 48x32 batch was prepared used
    transposed ids. A conditioning encoded for a size keeps that size's grid, through CFG doubling, selection
    and concatenation."""
    from diffalign.generators import Conditioning

    gen = _gen("flux")
    cond = gen.encode_prompts(PROMPTS, guidance_scale=3.5, height=32, width=48, **text_kwargs("flux"))
    assert cond.latent_grid == gen._latent_grid(32, 48) == (16, 24)  # the VAE grid (packed: 8 x 12 tokens)
    x = gen.prepare_latents(2, 32, 48, torch.Generator().manual_seed(0))
    t = gen.make_schedule(4, 32, 48).timesteps[1].expand(2)
    with torch.no_grad():
        want = gen.predict(x, t, cond, 3.5)
        gen.prepare_latents(2, 48, 32, torch.Generator().manual_seed(1))  # another size in between
        assert torch.equal(gen.predict(x, t, cond, 3.5), want)
        unbound = Conditioning(**{**vars(cond), "latent_grid": None})
        assert not torch.equal(gen.predict(x, t, unbound, 3.5), want)  # what it did before
    assert cond.index_select([1]).latent_grid == Conditioning.cat([cond, cond]).latent_grid == (16, 24)
    other = gen.encode_prompts(PROMPTS, guidance_scale=3.5, height=48, width=32, **text_kwargs("flux"))
    with pytest.raises(ValueError, match="different image sizes"):
        Conditioning.cat([cond, other])


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15"])
def test_encode_images_gives_latents_the_decoder_reads(name):
    gen = _gen(name)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    latents = gen.encode_images(images)
    assert latents.shape == (2, *gen.latent_shape(32, 48))
    assert gen.decode(latents, height=32, width=48).shape == images.shape
    if name == "flux":  # packing is a bijection
        z = torch.randn(2, 4, 16, 24)
        assert torch.equal(gen._unpack(gen._pack(z), 32, 48), z)


def test_a_float16_vae_that_asks_for_upcasting_decodes_and_encodes_in_float32():
    """SDXL's VAE overflows in float16 (NaN / black images); its config says ``force_upcast`` and diffusers' SDXL
    pipeline decodes in float32. The adapter does the same: such a VAE is moved to float32 at its first use and
    decodes the float32 VAE's images; one without the flag, or in bfloat16, keeps its dtype, and so do the other
    models' VAEs (every AutoencoderKL config says ``force_upcast``; diffusers upcasts SDXL's only)."""
    gen = _gen("sdxl")
    latents = torch.randn(2, *gen.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gen.pipeline.vae.to(torch.float16).to(torch.float32)  # the weights a float16 VAE has, in float32
    want_images, want_latents = gen.decode(latents), gen.encode_images(images)
    assert gen.pipeline.vae.config.force_upcast
    gen.pipeline.vae.to(torch.float16)
    torch.testing.assert_close(gen.decode(latents), want_images)
    assert gen.pipeline.vae.dtype == torch.float32
    gen.pipeline.vae.to(torch.float16)
    torch.testing.assert_close(gen.encode_images(images), want_latents)
    assert gen.pipeline.vae.dtype == torch.float32
    gen.pipeline.vae.to(torch.bfloat16)
    gen.decode(latents)
    assert gen.pipeline.vae.dtype == torch.bfloat16
    gen.pipeline.vae.register_to_config(force_upcast=False)
    gen.pipeline.vae.to(torch.float16)
    gen._vae()
    assert gen.pipeline.vae.dtype == torch.float16
    sd15 = _gen("sd15")
    assert sd15.pipeline.vae.config.force_upcast
    sd15.pipeline.vae.to(torch.float16)
    sd15._vae()
    assert sd15.pipeline.vae.dtype == torch.float16


# ----------------------------------------------------------------------------- prediction and guidance


def _batch_sizes(module):
    sizes = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(
            (kwargs.get("hidden_states", args[0] if args else None)).shape[0]
        ),
        with_kwargs=True,
    )
    return sizes, handle


@pytest.mark.parametrize("name", ["sd3", "sd15", "flux"])
def test_guidance_batching(name):
    gen = _gen(name)
    kw = text_kwargs(name)
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = gen.make_schedule(4, 32, 32).timesteps[1]
    sizes, handle = _batch_sizes(gen.denoiser)
    cond1 = gen.encode_prompts(PROMPTS, guidance_scale=1.0, **kw)
    out1 = gen.predict(x, t, cond1, 1.0)
    cond5 = gen.encode_prompts(PROMPTS, guidance_scale=5.0, **kw)
    out5 = gen.predict(x, t, cond5, 5.0)
    handle.remove()
    assert out1.dtype == out5.dtype == torch.float32 and out1.shape == x.shape
    assert not torch.allclose(out1, out5)
    if name == "flux":  # guidance-distilled: guidance goes to the embedding, one pass of B
        assert sizes == [2, 2] and not cond5.has_uncond
    else:
        assert sizes == [2, 4] and cond5.has_uncond and not cond1.has_uncond
        with pytest.raises(ValueError, match="guidance_scale > 1"):
            gen.predict(x, t, cond1, 5.0)


def test_predict_matches_manual_cfg():
    gen = _gen("sd3")
    cond = gen.encode_prompts(
        PROMPTS, negative_prompt="blurry", guidance_scale=3.0, max_sequence_length=SEQ_LEN
    )
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    uncond = Conditioning(
        prompt_embeds=cond.negative_prompt_embeds, pooled_prompt_embeds=cond.negative_pooled_prompt_embeds
    )
    with torch.no_grad():
        expected = gen.predict(x, t, uncond) + 3.0 * (gen.predict(x, t, cond) - gen.predict(x, t, uncond))
        got = gen.predict(x, t, cond, 3.0)
    assert torch.allclose(got, expected, atol=1e-5)


def test_conditioning_slicing():
    gen = _gen("flux")
    cond = gen.encode_prompts(["p0", "p1", "p2"], max_sequence_length=SEQ_LEN)
    assert cond.text_ids.shape == (SEQ_LEN, 3) and cond.batch_size == 3
    rep = cond.repeat_interleave(2)
    assert rep.batch_size == 6 and torch.equal(rep.prompt_embeds[3], cond.prompt_embeds[1])
    sel = rep.index_select(torch.tensor([5, 0]))
    assert torch.equal(sel.pooled_prompt_embeds, cond.pooled_prompt_embeds[[2, 0]])
    assert torch.equal(sel.text_ids, cond.text_ids)
    cat = Conditioning.cat([sel, cond])
    assert cat.batch_size == 5 and torch.equal(cat.prompt_embeds[2:], cond.prompt_embeds)
    assert cond.to("cpu", torch.bfloat16).prompt_embeds.dtype == torch.bfloat16
    assert cond.index_select([1]).expand(4).batch_size == 4
    with pytest.raises(ValueError, match="repeat_interleave"):
        cond.expand(4)
    # Predicting on a sliced conditioning equals slicing the batched prediction.
    x = gen.prepare_latents(3, 32, 32, torch.Generator().manual_seed(0))
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        full = gen.predict(x, t, cond, 3.5)
        part = gen.predict(x[[2, 0]], t[:2], cond.index_select([2, 0]), 3.5)
    assert torch.allclose(part, full[[2, 0]], atol=1e-6)


def test_encode_prompts_carries_no_graph():
    gen = _gen("sd3")
    cond = gen.encode_prompts(PROMPTS, guidance_scale=2.0, max_sequence_length=SEQ_LEN)
    assert not any(
        t.requires_grad for t in (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds)
    )
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    for _ in range(2):  # a second backward through the same embeddings must work
        gen.predict(x, torch.full((2,), 500.0), cond, 2.0).square().mean().backward()
    assert gen.denoiser.proj_out.weight.grad is not None


def test_attention_backend():
    gen = _gen("flux")
    cond = gen.encode_prompts(PROMPTS, max_sequence_length=SEQ_LEN)
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        before = gen.predict(x, t, cond)
        gen.set_attention_backend("sdpa")
        assert torch.equal(gen.predict(x, t, cond), before)
    with pytest.raises(ValueError, match="xformers"):
        gen.set_attention_backend("xformers")  # not installed, or not on CUDA
    with pytest.raises(ValueError, match="'sdpa' or 'xformers'"):
        gen.set_attention_backend("flash")


# ----------------------------------------------------------------------------- re-scoring


def _stochastic_rollout(name, step, noise_level, guidance, steps=4, autocast=False):
    gen = _gen(name)
    cond = gen.encode_prompts(PROMPTS * 2, guidance_scale=guidance, **text_kwargs(name))
    sched = gen.make_schedule(steps, 32, 32)
    x_T = gen.prepare_latents(4, 32, 32, torch.Generator().manual_seed(0))
    fn = gen.model_fn(cond, guidance)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        traj = rollout(
            fn, sched, x_T, step=step, noise_level=noise_level, generator=torch.Generator().manual_seed(1)
        )
    return gen, cond, sched, traj


RESCORE_CASES = [
    ("sd3", "flow_sde", 0.7, 4.5),
    ("sd3", "flow_cps", 0.8, 1.0),
    ("flux", "flow_sde", 0.7, 3.5),
    ("sd15", "ddim", 1.0, 5.0),
]


def _scored_steps(traj):
    # Steps with a log-prob (CPS / DDIM-on-flow end with std 0 at sigma_next = 0).
    return [i for i in range(traj.num_steps) if bool(traj.stochastic[i]) and float(traj.stds[i]) > 0]


@pytest.mark.parametrize("name,step,level,guidance", RESCORE_CASES)
def test_rescore_float32_exact_and_bf16_within_tolerance(name, step, level, guidance):
    gen, cond, sched, traj = _stochastic_rollout(name, step, level, guidance)
    fn = gen.model_fn(cond, guidance)
    worst = 0.0
    for i in _scored_steps(traj):
        out = score_steps(fn, sched, traj, i)  # with grad, as in training
        assert out.log_prob.requires_grad
        assert torch.equal(out.log_prob.detach(), traj.log_probs[:, i])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = score_steps(fn, sched, traj, i).log_prob
        worst = max(worst, float((bf16 - traj.log_probs[:, i]).abs().max()))
    print(f"bf16 re-score |d log_prob| max for {name}/{step}: {worst:.2e}")
    assert 0 < worst < BF16_LOG_PROB_ATOL[step]


def test_rescore_under_same_autocast_is_exact_on_a_sub_batch():
    gen, cond, sched, traj = _stochastic_rollout("sd3", "flow_sde", 0.7, 4.5, autocast=True)
    idx = torch.tensor([3, 1])
    sub, fn = traj.index_select(idx), gen.model_fn(cond.index_select(idx), 4.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(traj.num_steps):
            assert torch.equal(score_steps(fn, sched, sub, i).log_prob, sub.log_probs[:, i])


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["sd3", "sd3_t5", "flux", "sd15"])
def test_load_generator_from_saved_folder(name, tmp_path):
    gen = _gen(name)
    gen.pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    if name == "sd3":
        assert index["text_encoder_3"] == [None, None]  # reload needs text_encoder_3=None again
    loaded = load_generator(str(tmp_path))
    assert type(loaded) is type(gen) and not loaded.denoiser.training
    kw = text_kwargs(name)
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = torch.full((2,), 601.0)
    with torch.no_grad():
        a = gen.predict(x, t, gen.encode_prompts(PROMPTS, **kw))
        b = loaded.predict(x, t, loaded.encode_prompts(PROMPTS, **kw))
    assert torch.allclose(a, b, atol=1e-6)
    if name == "sd3":
        half = load_generator(str(tmp_path), dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16
        with torch.no_grad():
            c = half.predict(x, t, half.encode_prompts(PROMPTS, **kw))
        assert c.dtype == torch.float32 and rel_err(c, a) < 0.05


def test_load_generator_offline_missing_model_is_an_error(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    from diffalign.config import ConfigError

    # refused before diffusers, whose offline error reads like a failed connection
    with pytest.raises(ConfigError, match="model.path: .*HF_HUB_OFFLINE=1 a hub id must already be in the local cache"):
        load_generator("diffalign-tests/definitely-not-cached")


def test_network_guard_is_active():
    import socket

    from diffalign.testing import netguard

    with pytest.raises(netguard.NetworkAccessError):
        socket.create_connection(("huggingface.co", 443))
    del netguard.attempts[-1:]  # the deliberate attempt above


def test_default_image_size_is_the_pipelines_own():
    from diffalign.config import SampleConfig
    from diffalign.generators import adapter_for_pipeline
    from diffalign.testing.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline
    from trainers.common import image_size

    for pipe in (tiny_sd3_pipeline(), tiny_sd15_pipeline()):
        adapter = adapter_for_pipeline(pipe)
        f = adapter.vae_scale_factor
        want = int(adapter.denoiser.config.sample_size) * f
        assert adapter.default_image_size() == (want, want)
        assert image_size(adapter, SampleConfig()) == (want, want)
        assert image_size(adapter, SampleConfig(height=64, width=48)) == (64, 48)


def test_ddim_honours_clip_sample_and_refuses_thresholding():
    """A scheduler config with ``clip_sample`` (DDIMScheduler's default) clamps the x0 estimate in diffusers;
    the DDIM rollout must reproduce the pipeline then too. ``thresholding`` is refused, not ignored."""
    from diffusers import DDIMScheduler

    from diffalign.generators import adapter_for_pipeline
    from diffalign.testing.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True, clip_sample_range=0.5)
    gen = adapter_for_pipeline(pipe)
    expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                    output_type="latent", height=32, width=32).images
    cond = gen.encode_prompts(PROMPTS, guidance_scale=1.0)
    x_T = gen.prepare_latents(len(PROMPTS), 32, 32, torch.Generator().manual_seed(3))
    schedule = gen.make_schedule(4, 32, 32)
    assert schedule.clip_sample_range == 0.5
    final = rollout(gen.model_fn(cond, 1.0), schedule, x_T, step="ddim", noise_level=0.0).final
    assert rel_err(final, expected) < 1e-5
    unclipped = rollout(gen.model_fn(cond, 1.0), dataclasses.replace(schedule, clip_sample_range=None), x_T,
                        step="ddim", noise_level=0.0).final
    assert rel_err(unclipped, expected) > 1e-3  # the clamp is active in this case
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, thresholding=True)
    with pytest.raises(ValueError, match="thresholding=true"):
        adapter_for_pipeline(pipe).make_schedule(4, 32, 32)
