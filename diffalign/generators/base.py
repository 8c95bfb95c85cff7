"""One interface over diffusers text-to-image pipelines.

A :class:`GeneratorAdapter` wraps a loaded pipeline and exposes what samplers and trainers need:
prompt encoding into a sliceable :class:`Conditioning`, the pipeline's own noise schedule as a
:class:`~samplers.schedules.Schedule`, initial noise drawn exactly as the pipeline draws it, a model
prediction with classifier-free guidance, VAE decode/encode, and LoRA (peft) management. Subclasses
(:mod:`.sd3`, :mod:`.flux`, :mod:`.unet`) only implement the architecture-specific pieces.

Conventions:

* ``predict`` / ``model_fn`` take float32 ``x_t [B, *L]`` and float32 ``timestep [B]`` in the units of
  ``Schedule.timesteps`` (flow: ``1000 * sigma``; VP: the integer training timestep) and return float32
  model output in the schedule's ``prediction_type`` (velocity ``eps - x0`` for flow models).
* Inputs are cast to the denoiser's dtype; the output is cast back to float32 before guidance is
  combined, so CFG arithmetic and all sampler math stay float32.
* Precision of re-scoring (measured on CPU by ``tests/test_generators.py::test_rescore_*`` and a wider
  sweep on the tiny SD3 / FLUX / SD1.5 pipelines: 3 seeds, 8 samples, 4 and 10 steps, CFG on): under
  unchanged parameters a float32 re-score of a stored stochastic step reproduces the stored log-prob
  exactly (bitwise), and so does a re-score under the same ``torch.autocast("cpu", dtype=torch.bfloat16)``
  as the rollout, also on a re-sliced sub-batch. Re-scoring a float32 rollout under bf16 autocast
  changes the per-sample log-prob (mean over latent dims) by up to, per step kind: ``flow_sde``
  (a=0.7) 5.5e-3, ``ddim`` (eta=1) 1.8e-2, ``flow_cps`` (a=0.8) 1.9e-1 -- the error scales like
  ``|delta mean| / std``, and CPS's std is small near the end. :data:`BF16_LOG_PROB_ATOL` holds the
  asserted tolerances (2.6x-3.6x margin). Roll out and train under the same precision.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from samplers.parametrization import to_x0_eps, velocity_from_x0_eps, x0_eps_to_model_output  # noqa: F401
from samplers.schedules import Schedule

__all__ = ["Conditioning", "GeneratorAdapter", "BF16_LOG_PROB_ATOL"]

#: Documented absolute tolerance, per step kind, of a bf16-autocast re-score against a float32
#: rollout's log-prob (measured maxima 5.5e-3 / 1.8e-2 / 1.9e-1; see the module docstring).
BF16_LOG_PROB_ATOL = {"flow_sde": 2e-2, "ddim": 5e-2, "flow_cps": 5e-1}

Prompts = Union[str, Sequence[str]]


@dataclass
class Conditioning:
    """Encoded prompts of a batch, kept per sample so trainers can store and re-slice them.

    Attributes (``B`` samples; ``S`` text tokens; ``D`` the denoiser's text width):
        prompt_embeds: ``[B, S, D]`` conditional text embeddings.
        pooled_prompt_embeds: ``[B, P]`` pooled embeddings (SD3, FLUX, SDXL); ``None`` for SD1.5.
        negative_prompt_embeds / negative_pooled_prompt_embeds: the unconditional (negative-prompt)
            counterparts, present only when the batch was encoded for classifier-free guidance.
        add_time_ids / negative_add_time_ids: ``[B, 6]`` SDXL micro-conditioning (size/crop).
        text_ids: ``[S, 3]`` FLUX text position ids; shared by every sample (not batched).
        latent_grid: ``(h, w)`` FLUX latent grid of the images these prompts were encoded for (``encode_prompts``
            with ``height`` / ``width``); the image position ids of a prediction come from it, not from the last
            size the adapter prepared (latents of 32x48 and 48x32 pixels have the same token count). Not a tensor.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None
    add_time_ids: Optional[torch.Tensor] = None
    negative_add_time_ids: Optional[torch.Tensor] = None
    text_ids: Optional[torch.Tensor] = None
    latent_grid: Optional[Tuple[int, int]] = None

    #: Fields without a batch axis.
    SHARED = ("text_ids",)
    #: Fields that are not tensors: every copy keeps them as they are.
    META = ("latent_grid",)

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def has_uncond(self) -> bool:
        return self.negative_prompt_embeds is not None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], shared_fn=None) -> "Conditioning":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in self.META:
                value = (shared_fn(value) if shared_fn else value) if f.name in self.SHARED else fn(value)
            out[f.name] = value
        return Conditioning(**out)

    def index_select(self, index: Union[torch.Tensor, Sequence[int]]) -> "Conditioning":
        """Select samples ``index`` (``[K]`` long) along the batch axis."""
        index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda v: v.index_select(0, index.to(v.device)))

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        """Repeat each sample ``repeats`` times (K images per prompt: ``[p0, p0, p1, p1, ...]``)."""
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def expand(self, batch_size: int) -> "Conditioning":
        """Broadcast a batch of one to ``batch_size`` samples (a no-op when sizes already match)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"conditioning has {self.batch_size} samples but the latents have {batch_size}; encode one "
                "prompt per sample or use Conditioning.repeat_interleave / index_select to match them"
            )
        return self._map(lambda v: v.expand(batch_size, *v.shape[1:]))

    def to(
        self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
    ) -> "Conditioning":
        """Move (and optionally cast floating) tensors."""

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)

        return self._map(move, move)

    def detach(self) -> "Conditioning":
        return self._map(lambda v: v.detach(), lambda v: v.detach())

    def guidance_batch(self) -> "Conditioning":
        """The doubled batch ``[uncond, cond]`` the pipelines run for classifier-free guidance."""
        if not self.has_uncond:
            raise ValueError(
                "classifier-free guidance needs unconditional embeddings; encode the prompts with "
                "encode_prompts(..., guidance_scale > 1)"
            )

        def both(neg: Optional[torch.Tensor], pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if pos is None else torch.cat([neg, pos], dim=0)

        return Conditioning(
            prompt_embeds=both(self.negative_prompt_embeds, self.prompt_embeds),
            pooled_prompt_embeds=both(self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds),
            add_time_ids=both(self.negative_add_time_ids, self.add_time_ids),
            text_ids=self.text_ids,
            latent_grid=self.latent_grid,
        )

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis (all items encoded the same way)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        out: Dict[str, Any] = {}
        for f in fields(items[0]):
            values = [getattr(c, f.name) for c in items]
            if any((v is None) != (values[0] is None) for v in values):
                raise ValueError(f"Conditioning.cat: field {f.name!r} is set on some items but not others")
            if values[0] is None:
                out[f.name] = None
            elif f.name in Conditioning.META:
                if any(v != values[0] for v in values):
                    raise ValueError(f"Conditioning.cat: items encoded for different image sizes ({f.name} "
                                     f"{sorted(set(values))}); concatenate items of one size")
                out[f.name] = values[0]
            elif f.name in Conditioning.SHARED:
                out[f.name] = values[0]
            else:
                out[f.name] = torch.cat(values, dim=0)
        return Conditioning(**out)


def _as_list(prompts: Prompts) -> List[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


#: LoRA targets of the MMDiT joint attention (SD3, FLUX): the image- and text-stream projections under ``attn.``,
#: Flow-GRPO's target list (research/grpo_family.md §1.4); SD3.5-Medium's second, image-only ``attn2`` is not adapted.
JOINT_ATTENTION_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


class GeneratorAdapter:
    """Base adapter. Attributes: ``pipeline``, ``denoiser`` (transformer / UNet ``nn.Module``), ``kind``
    (``"flow"`` | ``"vp"``), ``prediction_type``, ``device``, ``dtype``.

    After construction the VAE and text encoders are frozen and every denoiser parameter is trainable
    (full fine-tuning); :meth:`add_lora` switches to training only the LoRA weights.
    """

    kind: str = "flow"
    denoiser_name: str = "transformer"
    #: LoRA target module names used when ``add_lora(target_modules=None)``.
    default_lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        #: call arguments the model folder requires (see ``load_generator``); used as defaults
        self.call_kwargs: Dict[str, Any] = {}
        self.denoiser: torch.nn.Module = getattr(pipeline, self.denoiser_name)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name != self.denoiser_name:
                component.requires_grad_(False)
        self.denoiser.requires_grad_(True)
        self.prediction_type = "flow"
        # The pipeline's own (SDPA) attention processors, restored by set_attention_backend("sdpa").
        self._sdpa_processors = dict(getattr(self.denoiser, "attn_processors", {}))

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the VAE's downsampling times the denoiser's patch
        (the multiple diffusers' pipelines check)."""
        patch = getattr(getattr(self.denoiser, "config", None), "patch_size", None) or 1
        return self.vae_scale_factor * int(patch)

    def to(
        self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
    ) -> "GeneratorAdapter":
        """Move (and cast) every pipeline component; returns ``self``."""
        self.pipeline.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.pipeline).__name__}, kind={self.kind!r}, "
            f"prediction_type={self.prediction_type!r}, device={self.device}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ prompts
    def encode_prompts(
        self,
        prompts: Prompts,
        negative_prompt: Prompts = "",
        guidance_scale: float = 1.0,
        *,
        max_sequence_length: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> Conditioning:
        """Encode ``B`` prompts (no gradient) into a :class:`Conditioning` on the adapter's device.

        Unconditional embeddings of ``negative_prompt`` (one string or one per prompt) are added only when
        ``guidance_scale`` needs classifier-free guidance. ``max_sequence_length`` (T5 tokens; SD3 default
        256, FLUX 512) must match between encoding and any pipeline call it is compared with.
        ``height``/``width`` only matter for SDXL's size conditioning.
        """
        prompts = _as_list(prompts)
        negatives = None
        if self.uses_cfg(guidance_scale):
            negatives = _as_list(negative_prompt) if negative_prompt is not None else [""]
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                    "pass one negative prompt or one per prompt"
                )
        if max_sequence_length is None:
            max_sequence_length = self.call_kwargs.get("max_sequence_length")
        # Pipelines' encode_prompt is not wrapped in no_grad; embeddings with a graph break a 2nd backward.
        with torch.no_grad():
            cond = self._encode(
                prompts, negatives, max_sequence_length=max_sequence_length, height=height, width=width
            )
        return cond.detach()

    def _encode(self, prompts: List[str], negatives: Optional[List[str]], **kwargs: Any) -> Conditioning:
        raise NotImplementedError

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` runs classifier-free guidance (a doubled [uncond, cond] batch)."""
        return guidance_scale > 1.0

    # ------------------------------------------------------------------ sampling
    def make_schedule(self, num_steps: int, height: int, width: int, **overrides: Any) -> Schedule:
        """The schedule the pipeline's own call would use for ``num_steps`` at ``height x width`` pixels."""
        raise NotImplementedError

    def default_image_size(self) -> Tuple[int, int]:
        """``(height, width)`` in pixels that the pipeline generates when none is given."""
        size = getattr(self.pipeline, "default_sample_size", None) or self.denoiser.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return int(size[0]) * self.vae_scale_factor, int(size[1]) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> Tuple[int, ...]:
        """Shape ``L`` of one sample's latent for an image of ``height x width`` pixels."""
        raise NotImplementedError

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Union[None, torch.Generator, List[torch.Generator]] = None,
    ) -> torch.Tensor:
        """Initial noise ``[B, *L]`` float32, drawn exactly as the pipeline's ``prepare_latents`` (same
        ``randn_tensor`` call; a list gives one generator per sample). Bitwise equal for float32 pipelines;
        half-precision pipelines draw in their own dtype, ours stays float32."""
        raise NotImplementedError

    def predict(
        self,
        x_t: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        cond: Conditioning,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Model output ``[B, *L]`` float32 at ``x_t`` ``[B, *L]`` and ``timestep`` ``[B]`` (or a scalar).

        With ``guidance_scale > 1`` (and an architecture that uses CFG) runs the doubled batch
        ``[uncond, cond]`` and returns ``uncond + g (cond - uncond)``; ``guidance_scale == 1`` skips the
        unconditional pass entirely.
        """
        batch = x_t.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=x_t.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        cond = cond.expand(batch)
        if not self.uses_cfg(guidance_scale):
            return self._forward(x_t, timestep, cond, guidance_scale).float()
        out = self._forward(
            torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), cond.guidance_batch(), guidance_scale
        ).float()
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def _forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def model_fn(
        self, cond: Conditioning, guidance_scale: float = 1.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``model_fn(x_t, timestep)`` for :func:`samplers.rollout.rollout` with ``cond`` bound."""

        def fn(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.predict(x_t, timestep, cond, guidance_scale)

        return fn

    def to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, alpha, sigma
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``(x0_hat, eps_hat)`` from this model's output at noise level ``(alpha, sigma)``
        (scalars or ``[B]``; e.g. ``schedule.alphas[i], schedule.sigmas[i]``)."""
        return to_x0_eps(model_output, x_t, alpha, sigma, self.prediction_type)

    # ------------------------------------------------------------------ VAE
    def _unpack(self, latents: torch.Tensor, height: Optional[int], width: Optional[int]) -> torch.Tensor:
        return latents

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    #: the VAE overflows in float16 (NaN / black images) and runs in float32 when its config says
    #: ``force_upcast``: only SDXL's (:class:`~diffalign.generators.unet.UNetAdapter` sets it per pipeline), as in
    #: diffusers, whose SDXL pipelines alone upcast; every AutoencoderKL config defaults ``force_upcast`` to True
    upcast_fp16_vae: bool = False

    def _vae(self):
        """The pipeline's VAE; an SDXL VAE in float16 (``upcast_fp16_vae`` and ``force_upcast``) is first moved to
        float32, where it stays (latents are cast to its dtype on the way in): diffusers' SDXL pipeline upcasts
        the same way before decoding. That costs the VAE's weights twice over (160 MB) and float32 activations."""
        vae = self.pipeline.vae
        if self.upcast_fp16_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(dtype=torch.float32)
        return vae

    def decode(
        self, latents: torch.Tensor, *, height: Optional[int] = None, width: Optional[int] = None
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in ``[0, 1]`` from latents ``[B, *L]`` (differentiable).

        Undoes the VAE scaling (and shift), and FLUX's packing (``height``/``width`` in pixels when the
        image is not square).
        """
        vae = self._vae()
        z = self._unpack(latents, height, width)
        stats = self._latent_stats(vae, z)
        if stats is not None:
            z = z * stats[1] / vae.config.scaling_factor + stats[0]
        else:
            z = z / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                z = z + shift
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        return (image / 2 + 0.5).clamp(0, 1)

    def encode_images(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Latents ``[B, *L]`` float32 of images ``[B, 3, H, W]`` in ``[0, 1]`` (posterior mode, or a
        sample drawn with ``generator``), scaled as the denoiser expects."""
        vae = self._vae()
        dist = vae.encode((images * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist
        z = (dist.sample(generator) if generator is not None else dist.mode()).float()
        stats = self._latent_stats(vae, z)
        if stats is not None:
            return self._pack((z - stats[0]) * vae.config.scaling_factor / stats[1])
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        return self._pack(z * vae.config.scaling_factor)

    #: whether the VAE's per-channel ``latents_mean`` / ``latents_std`` (when its config has them) normalise the
    #: latents, as diffusers' SDXL pipelines do (its SD3 / FLUX / SD1.5 pipelines use scaling and shift only)
    uses_latent_stats = False

    def _latent_stats(self, vae, like: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(mean, std)`` as ``[1, C, 1, 1]`` tensors like ``like`` when the pipeline normalises with them."""
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if not self.uses_latent_stats or mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean).view(shape).to(like.device, like.dtype),
                torch.tensor(std).view(shape).to(like.device, like.dtype))

    # ------------------------------------------------------------------ training knobs
    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.denoiser.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str = "sdpa") -> None:
        """``"sdpa"`` (PyTorch scaled-dot-product attention, the default) or ``"xformers"`` (CUDA only)."""
        if backend == "sdpa":
            if self._sdpa_processors:
                self.denoiser.set_attn_processor(dict(self._sdpa_processors))
            if any(hasattr(p, "_attention_backend") for p in self._sdpa_processors.values()):
                self.denoiser.set_attention_backend("native")  # diffusers' name for torch SDPA
        elif backend == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise ValueError(
                    "attention backend 'xformers' needs the xformers package; install it "
                    "(pip install 'diffalign[gpu]') or use backend='sdpa'"
                )
            if self.device.type != "cuda":
                raise ValueError(
                    f"attention backend 'xformers' runs only on CUDA, the denoiser is on "
                    f"{self.device}; move it with adapter.to('cuda') or use backend='sdpa'"
                )
            self.denoiser.enable_xformers_memory_efficient_attention()
        else:
            raise ValueError(f"attention backend must be 'sdpa' or 'xformers', got {backend!r}")

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """Parameters the optimizer should update (LoRA weights after :meth:`add_lora`, else all)."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ LoRA (see lora.py)
    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def add_lora(
        self,
        rank: int = 8,
        alpha: Optional[float] = None,
        target_modules: Optional[Sequence[str]] = None,
        init: Union[str, bool] = "gaussian",
        adapter_name: str = "default",
        dropout: float = 0.0,
    ) -> None:
        """Attach a peft LoRA adapter to the denoiser; only its weights stay trainable.

        ``alpha`` defaults to ``rank`` (scale 1). ``target_modules=None`` uses
        :attr:`default_lora_targets`. ``init="gaussian"`` (Flow-GRPO) keeps ``B = 0`` so the adapted
        model starts equal to the base model.
        """
        from diffalign.generators import lora

        lora.add_lora(
            self.denoiser,
            rank=rank,
            alpha=alpha,
            target_modules=target_modules or self.default_lora_targets,
            init=init,
            adapter_name=adapter_name,
            dropout=dropout,
        )

    def lora_state_dict(self, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
        """The adapter's weights in peft naming (for checkpoints)."""
        from diffalign.generators import lora

        return lora.lora_state_dict(self.denoiser, adapter_name)

    def load_lora_state_dict(
        self, state_dict: Dict[str, torch.Tensor], adapter_name: str = "default"
    ) -> None:
        """Inverse of :meth:`lora_state_dict` (the adapter must already be attached)."""
        from diffalign.generators import lora

        lora.load_lora_state_dict(self.denoiser, state_dict, adapter_name)

    def save_lora(self, directory: str, adapter_name: str = "default") -> None:
        """Write the adapter in diffusers' format: ``pipeline.load_lora_weights(directory)`` loads it."""
        from diffalign.generators import lora

        lora.save_lora(
            self.pipeline,
            self.denoiser_name,
            directory,
            adapter_name,
            diffusers_keys=self.denoiser_name == "unet",
        )

    def load_lora(self, directory: str, adapter_name: str = "default", trainable: bool = True) -> None:
        """Load a diffusers-format LoRA (ours or any trainer's) into the denoiser as ``adapter_name``."""
        from diffalign.generators import lora

        lora.load_lora(self.pipeline, self.denoiser, directory, adapter_name, trainable=trainable)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the frozen base model (the reference policy) inside the block; restores afterwards.

        ``requires_grad`` flags are restored exactly (peft's enable/disable would otherwise change them).
        """
        if not self.has_lora:
            raise ValueError(
                "disable_adapter needs a LoRA adapter (add_lora / load_lora); with full "
                "fine-tuning keep a frozen copy of the denoiser as the reference model"
            )
        flags = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)
