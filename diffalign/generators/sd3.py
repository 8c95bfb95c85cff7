"""Adapter for ``StableDiffusion3Pipeline`` (SD3, SD3.5; with or without the T5 encoder)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from diffalign.generators.base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, GeneratorAdapter
from samplers.schedules import Schedule, flow_schedule_from_scheduler_config

__all__ = ["SD3Adapter"]


class SD3Adapter(GeneratorAdapter):
    """MMDiT flow-matching model; latents ``[B, C, H/f, W/f]``, velocity prediction.

    The schedule follows the pipeline: static ``shift`` (SD3 / SD3.5: 3.0) or, when the scheduler config
    sets ``use_dynamic_shifting``, ``mu`` from the image token count ``(H/f/p) * (W/f/p)``.
    """

    kind = "flow"
    denoiser_name = "transformer"
    # Joint attention, Flow-GRPO's SD3 targets (SD3.5-Medium's image-only `attn2` is not adapted, as in Flow-GRPO)
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS

    def _encode(
        self,
        prompts: List[str],
        negatives: Optional[List[str]],
        *,
        max_sequence_length: Optional[int] = None,
        **_: Any,
    ) -> Conditioning:
        pe, npe, pooled, npooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=negatives is not None,
            negative_prompt=negatives,
            max_sequence_length=256 if max_sequence_length is None else max_sequence_length,
        )
        return Conditioning(
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=npe if negatives is not None else None,
            negative_pooled_prompt_embeds=npooled if negatives is not None else None,
        )

    def latent_shape(self, height: int, width: int) -> Tuple[int, ...]:
        f = self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), int(height) // f, int(width) // f)

    def make_schedule(
        self,
        num_steps: int,
        height: int,
        width: int,
        *,
        mu: Optional[float] = None,
        sigmas: Optional[List[float]] = None,
    ) -> Schedule:
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        return flow_schedule_from_scheduler_config(
            self.pipeline.scheduler.config, num_steps, image_seq_len=(h // p) * (w // p), mu=mu, sigmas=sigmas
        )

    def prepare_latents(self, batch_size: int, height: int, width: int, generator=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        dtype = self.dtype
        # The pipeline passes the scheduler's float32 timesteps whatever the model dtype.
        return self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled_prompt_embeds.to(dtype),
            return_dict=False,
        )[0]
