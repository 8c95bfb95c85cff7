"""Adapter for ``FluxPipeline`` (FLUX.1-dev with guidance embedding, FLUX.1-schnell without)."""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from diffalign.generators.base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, GeneratorAdapter
from samplers.schedules import Schedule, flow_schedule_from_scheduler_config

__all__ = ["FluxAdapter"]


class FluxAdapter(GeneratorAdapter):
    """FLUX flow-matching transformer on packed latents ``[B, (H/2f)(W/2f), 4C]`` (2x2 patches).

    Sampler math is elementwise and log-probs average over all non-batch dims, so the packed layout is
    used throughout; only :meth:`decode` / :meth:`encode_images` unpack / pack.

    Guidance: with ``guidance_embeds`` (FLUX.1-dev) ``guidance_scale`` is fed to the guidance embedding
    and no unconditional pass runs; without it (schnell), ``guidance_scale > 1`` runs true CFG with the
    negative prompt, as the pipeline's ``true_cfg_scale``.

    Schedule: the pipeline's custom sigmas ``linspace(1, 1/n, n)`` shifted dynamically with ``mu`` from
    the packed sequence length.
    """

    kind = "flow"
    denoiser_name = "transformer"
    # Double-stream blocks have both streams' projections; single-stream blocks have to_q/k/v (all under `attn.`).
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS

    @property
    def size_multiple(self) -> int:
        """FLUX packs 2x2 latent patches (its transformer's ``patch_size`` is 1): the VAE's downsampling times 2."""
        return self.vae_scale_factor * 2

    def __init__(self, pipeline: Any):
        super().__init__(pipeline)
        # Latent grid (h, w) of the last resolution seen; packed latents do not carry it.
        self._grid: Optional[Tuple[int, int]] = None

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def uses_cfg(self, guidance_scale: float) -> bool:
        return not self.guidance_embeds and guidance_scale > 1.0

    def _encode(
        self,
        prompts: List[str],
        negatives: Optional[List[str]],
        *,
        max_sequence_length: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        **_: Any,
    ) -> Conditioning:
        msl = 512 if max_sequence_length is None else int(max_sequence_length)
        if not 1 <= msl <= 512:
            # FLUX's only sequence encoder is T5: 0 tokens would leave the transformer no prompt (and 0 used to
            # be read as "unset", silently encoding 512)
            raise ValueError(f"max_sequence_length={max_sequence_length}: FLUX encodes prompts with T5 and needs "
                             "1..512 T5 tokens; leave it unset for 512 (FLUX.1-dev) or use 256 (FLUX.1-schnell)")
        pe, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=msl,
        )
        grid = self._latent_grid(height, width) if height is not None and width is not None else None
        cond = Conditioning(prompt_embeds=pe, pooled_prompt_embeds=pooled, text_ids=text_ids, latent_grid=grid)
        if negatives is not None:
            npe, npooled, _ = self.pipeline.encode_prompt(
                prompt=negatives,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=msl,
            )
            cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = npe, npooled
        return cond

    def _latent_grid(self, height: int, width: int) -> Tuple[int, int]:
        f = self.vae_scale_factor
        # As the pipeline: the VAE grid rounded down to an even size so 2x2 packing fits.
        grid = (2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2)))
        self._grid = grid
        return grid

    def _grid_for(
        self, seq_len: int, height: Optional[int] = None, width: Optional[int] = None
    ) -> Tuple[int, int]:
        if height is not None and width is not None:
            grid = self._latent_grid(height, width)
        elif self._grid is not None and (self._grid[0] // 2) * (self._grid[1] // 2) == seq_len:
            grid = self._grid
        else:
            side = math.isqrt(seq_len)
            if side * side != seq_len:
                raise ValueError(
                    f"cannot infer the image size of packed FLUX latents with {seq_len} tokens; "
                    "pass height= and width= (pixels)"
                )
            grid = (2 * side, 2 * side)
        if (grid[0] // 2) * (grid[1] // 2) != seq_len:
            raise ValueError(
                f"packed latents have {seq_len} tokens but {grid} latents pack to "
                f"{(grid[0] // 2) * (grid[1] // 2)}; check height/width"
            )
        return grid

    def latent_shape(self, height: int, width: int) -> Tuple[int, ...]:
        h, w = self._latent_grid(height, width)
        return ((h // 2) * (w // 2), int(self.denoiser.config.in_channels))

    def make_schedule(
        self,
        num_steps: int,
        height: int,
        width: int,
        *,
        mu: Optional[float] = None,
        sigmas: Optional[List[float]] = None,
    ) -> Schedule:
        config = self.pipeline.scheduler.config
        if sigmas is None and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        seq_len = self.latent_shape(height, width)[0]
        return flow_schedule_from_scheduler_config(
            config, num_steps, image_seq_len=seq_len, mu=mu, sigmas=sigmas
        )

    def prepare_latents(self, batch_size: int, height: int, width: int, generator=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self._latent_grid(height, width)
        channels = int(self.denoiser.config.in_channels) // 4
        noise = randn_tensor(
            (batch_size, channels, h, w), generator=generator, device=self.device, dtype=torch.float32
        )
        return self._pack(noise)

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        self._grid = (h, w)
        return self.pipeline._pack_latents(latents, b, c, h, w)

    def _unpack(self, latents: torch.Tensor, height: Optional[int], width: Optional[int]) -> torch.Tensor:
        h, w = self._grid_for(latents.shape[1], height, width)
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(latents, h * f, w * f, f)

    def _forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        dtype = self.dtype
        batch, seq_len = x_t.shape[0], x_t.shape[1]
        grid = cond.latent_grid
        h, w = grid if grid is not None and (grid[0] // 2) * (grid[1] // 2) == seq_len else self._grid_for(seq_len)
        img_ids = self.pipeline._prepare_latent_image_ids(batch, h // 2, w // 2, x_t.device, dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=x_t.device, dtype=torch.float32)
        # The pipeline casts the timestep to the latent dtype and rescales it to [0, 1].
        return self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=timestep.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            txt_ids=cond.text_ids.to(dtype),
            img_ids=img_ids,
            return_dict=False,
        )[0]
