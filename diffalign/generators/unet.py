"""Adapter for UNet diffusion pipelines: ``StableDiffusionPipeline`` (SD1.x/2.x) and
``StableDiffusionXLPipeline`` (SDXL, with its pooled text embedding and size micro-conditioning)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from diffalign.generators.base import Conditioning, GeneratorAdapter
from samplers.schedules import Schedule, vp_schedule

__all__ = ["UNetAdapter"]


class UNetAdapter(GeneratorAdapter):
    """Variance-preserving epsilon / v-prediction UNet; latents ``[B, C, H/f, W/f]``.

    Sampling always uses a DDIM schedule built from the pipeline scheduler's config (its
    ``alphas_cumprod``, ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``prediction_type``),
    also when the pipeline ships another scheduler (PNDM for SD1.5, Euler for SDXL): DDIM is the sampler
    whose stochastic version has the tractable Gaussian steps the trainers need (DDPO).
    """

    kind = "vp"
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline: Any):
        super().__init__(pipeline)
        self.ddim_scheduler = self._ddim_scheduler()
        self.prediction_type = self.ddim_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                "expected 'epsilon', 'v_prediction' or 'sample'"
            )

    def _ddim_scheduler(self):
        from diffusers import DDIMScheduler

        scheduler = self.pipeline.scheduler
        if isinstance(scheduler, DDIMScheduler):
            return scheduler
        config = scheduler.config
        if "beta_schedule" not in config and config.get("trained_betas") is None:
            # an EDM scheduler (Playground v2.5): DDIM would fall back to its default betas, another model's noise
            raise ValueError(f"the pipeline's {type(scheduler).__name__} defines no DDPM betas (beta_schedule or "
                             "trained_betas); diffalign samples diffusion models with DDIM on the model's betas, so "
                             "EDM-parametrised models (sigma_min / sigma_max / sigma_data) are not supported")
        return DDIMScheduler.from_config(config)

    @property
    def uses_latent_stats(self) -> bool:  # diffusers' SDXL pipelines normalise by the VAE's latents_mean / std
        return self.is_sdxl

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"

    @property
    def upcast_fp16_vae(self) -> bool:  # SDXL's VAE overflows in float16 (GeneratorAdapter.upcast_fp16_vae)
        return self.is_sdxl

    def _encode(
        self,
        prompts: List[str],
        negatives: Optional[List[str]],
        *,
        height: Optional[int] = None,
        width: Optional[int] = None,
        **_: Any,
    ) -> Conditioning:
        cfg = negatives is not None
        if not self.is_sdxl:
            pe, npe = self.pipeline.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=negatives)
            return Conditioning(prompt_embeds=pe, negative_prompt_embeds=npe if cfg else None)
        # As the pipeline's default (negative_prompt=None): empty negatives become zeros when the config
        # sets force_zeros_for_empty_prompt (SDXL base).
        empty = cfg and all(n == "" for n in negatives)
        pe, npe, pooled, npooled = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=None if empty else negatives,
        )
        default_h, default_w = self.default_image_size()
        size = (height or default_h, width or default_w)
        enc2 = getattr(self.pipeline, "text_encoder_2", None)
        proj_dim = int(pooled.shape[-1]) if enc2 is None else enc2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj_dim
        )
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        return Conditioning(
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            add_time_ids=time_ids,
            negative_prompt_embeds=npe if cfg else None,
            negative_pooled_prompt_embeds=npooled if cfg else None,
            negative_add_time_ids=time_ids.clone() if cfg else None,
        )

    def latent_shape(self, height: int, width: int) -> Tuple[int, ...]:
        f = self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), int(height) // f, int(width) // f)

    def make_schedule(
        self, num_steps: int, height: Optional[int] = None, width: Optional[int] = None, **overrides: Any
    ) -> Schedule:
        """DDIM schedule; ``overrides`` may set ``prediction_type``, ``timestep_spacing``, ``steps_offset``
        or ``set_alpha_to_one`` (height/width do not matter for VP models)."""
        config = self.ddim_scheduler.config
        valid = ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one")
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown schedule overrides {unknown}; valid: {list(valid)}")
        opts = {k: overrides.get(k, config.get(k)) for k in valid}
        if config.get("thresholding", False):
            raise ValueError("the scheduler config sets thresholding=true (dynamic thresholding, for pixel-space "
                             "models), which diffalign's DDIM step does not implement; set it to false in the "
                             "model's scheduler/scheduler_config.json")
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        return vp_schedule(self.ddim_scheduler.alphas_cumprod, num_steps, clip_sample_range=clip, **opts)

    def prepare_latents(self, batch_size: int, height: int, width: int, generator=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, *self.latent_shape(height, width))
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        # DDIM's init_noise_sigma (1.0): the DDIM sampler starts from unit-variance noise.
        return noise * float(self.ddim_scheduler.init_noise_sigma)

    def _forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        dtype = self.dtype
        added = None
        if self.is_sdxl:
            added = {
                "text_embeds": cond.pooled_prompt_embeds.to(dtype),
                "time_ids": cond.add_time_ids.to(dtype),
            }
        return self.denoiser(
            x_t.to(dtype),
            timestep,
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
