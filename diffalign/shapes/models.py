"""The two small text-to-image models of the shapes world, as genuine diffusers pipeline folders.

* ``shapes-flow``: a rectified-flow model (velocity prediction) in a ``StableDiffusion3Pipeline``: two
  tiny CLIP text encoders sharing one tokenizer, no T5, an ``SD3Transformer2DModel`` over 16x16x4
  latents, a small ``AutoencoderKL`` (2x down-sampling), ``FlowMatchEulerDiscreteScheduler``.
  Trained without T5 tokens, so call it with ``max_sequence_length=0`` (diffalign does this for you,
  from the folder's ``diffalign.json``; with plain diffusers pass it to the pipeline call, otherwise 256
  zero tokens are appended). Plain diffusers 0.42 also needs the absent T5 named on load:
  ``DiffusionPipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
* ``shapes-ddpm``: an epsilon-prediction diffusion model in a ``StableDiffusionPipeline``: one tiny
  CLIP text encoder, a ``UNet2DConditionModel``, the same kind of VAE, ``DDIMScheduler``.

Both load with plain ``DiffusionPipeline.from_pretrained`` (see the T5 note above) and through
diffalign's adapters (``load_generator``).
The weights live in the repository (``diffalign/shapes/models/<name>``); ``scripts/pretrain_shapes.py``
reproduces them from a seed. ``resolve_model_path("builtin:shapes-flow")`` gives the folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from diffalign.config import ConfigError

__all__ = ["BUILTIN_MODELS", "MODELS_DIR", "resolve_model_path", "build_vae", "build_flow_pipeline",
           "build_ddpm_pipeline", "TOKENIZER_MAX_LENGTH"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUILTIN_MODELS = {"shapes-flow": MODELS_DIR / "shapes-flow", "shapes-ddpm": MODELS_DIR / "shapes-ddpm"}
TOKENIZER_MAX_LENGTH = 24
#: A 2,000-token slice of CLIP's BPE keeps every shapes prompt under 20 tokens.
VOCAB_SIZE = 2000
#: Extra keyword arguments the shipped flow pipeline must be called with (see module docstring).
FLOW_CALL_KWARGS = {"max_sequence_length": 0}


#: what a Hugging Face hub id looks like ("org/name"); anything else that is not a folder cannot load
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str, cache_dir: Optional[str] = None) -> str:
    """Map ``builtin:<name>`` to the shipped folder; a folder or a hub id passes through unchanged. A path that is
    neither, or (offline, ``HF_HUB_OFFLINE``) a hub id not in the hub cache (``cache_dir`` when the loader is
    given one), fails here with the fix."""
    if isinstance(path, str) and path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            valid = sorted("builtin:" + n for n in BUILTIN_MODELS)
            raise ConfigError(f"got {path!r}: unknown built-in model; valid: {valid}", key="model.path")
        folder = BUILTIN_MODELS[name]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"builtin model {name!r} is missing at {folder}; rebuild it with "
                f"`python scripts/pretrain_shapes.py --stage {name.split('-')[1]}` (after `--stage vae` when "
                f"{folder.parent / '_vae'} does not exist)"
            )
        return str(folder)
    path = os.fspath(path)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    builtins = sorted("builtin:" + n for n in BUILTIN_MODELS)
    choices = f"give a local pipeline folder (with model_index.json) or one of {builtins}"
    if not _HUB_ID.match(path):
        raise ConfigError(f"got {path!r}: no such folder; {choices}", key="model.path")
    if _offline() and not _in_hub_cache(path, cache_dir):
        # diffusers would report a failed connection; the cause is that offline a hub id must be cached
        raise ConfigError(f"got {path!r}: not a local folder, and with HF_HUB_OFFLINE=1 a hub id must already be in "
                          f"the local cache (it is not); {choices}", key="model.path")
    return path


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)  # the hub's own reading of HF_HUB_OFFLINE (1 / true / yes / on)
    except Exception:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str, cache_dir: Optional[str] = None) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir(cache_dir).repos)
    except Exception:  # no cache folder yet, or an unreadable one
        return False


def _clip_config(tokenizer, hidden: int = 48, layers: int = 3):
    from transformers import CLIPTextConfig

    n = len(tokenizer)
    return CLIPTextConfig(
        vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1, hidden_size=hidden,
        intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=layers, projection_dim=hidden,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu", attention_dropout=0.0, dropout=0.0,
    )


def build_vae():
    """A 2x-downsampling ``AutoencoderKL``: 32x32x3 images <-> 16x16x4 latents (scaling set after training)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(24, 48), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
    )


def build_flow_pipeline(vae=None, seed: int = 0):
    """Untrained ``StableDiffusion3Pipeline`` of the shapes-flow architecture (float32, eval mode)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from diffalign.testing.tiny import make_clip_tokenizer

    torch.manual_seed(seed)
    tok = make_clip_tokenizer(vocab_size=VOCAB_SIZE, max_length=TOKENIZER_MAX_LENGTH)
    te1 = CLIPTextModelWithProjection(_clip_config(tok))
    te2 = CLIPTextModelWithProjection(_clip_config(tok))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=3, joint_attention_dim=96, caption_projection_dim=96, pooled_projection_dim=96,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae or build_vae(),
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )
    return pipe


def build_ddpm_pipeline(vae=None, seed: int = 0):
    """Untrained ``StableDiffusionPipeline`` (epsilon prediction) of the shapes-ddpm architecture."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffalign.testing.tiny import make_clip_tokenizer

    torch.manual_seed(seed)
    tok = make_clip_tokenizer(vocab_size=VOCAB_SIZE, max_length=TOKENIZER_MAX_LENGTH)
    te = CLIPTextModel(_clip_config(tok))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48, attention_head_dim=8,
        norm_num_groups=16,
    )
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae or build_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
