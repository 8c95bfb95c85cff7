"""Tiny random-weight diffusers pipelines and tokenizers, built fully offline.

Used by tests, examples and scripts that need a real ``StableDiffusion3Pipeline``, ``FluxPipeline``,
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` without downloading anything
(research/environment.md §2). Every builder is deterministic given ``seed``, returns float32 modules in
``eval()`` mode (a fresh T5 has dropout 0.1 and would make two calls with the same seed differ) and
targets 32x32 images:

* the VAE downsamples by 2 (``vae_scale_factor == 2``), so a 32 px image has a 16x16 latent;
* SD3: 4 latent channels, patch size 2 (64 image tokens); FLUX: packed latents ``[B, 64, 16]``;
* the CLIP tokenizer is the real OpenAI CLIP BPE (open_clip's bundled merges) cut to a 1000-token vocab,
  the T5 tokenizer a Unigram model trained here on a small corpus.

The resulting pipelines survive ``save_pretrained`` + ``DiffusionPipeline.from_pretrained`` offline (SD3
without T5 needs ``text_encoder_3=None, tokenizer_3=None`` again on reload; ``load_generator`` does that).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from typing import List, Optional

import torch

__all__ = [
    "CORPUS_WORDS",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "tiny_vae",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]

#: Words the tiny T5 tokenizer is trained on (the shapes world's vocabulary plus common prompt words);
#: anything else still tokenizes, through single characters and ``<unk>``.
CORPUS_WORDS = (
    "a an the one two three four five six of and with on in left right above below next to near "
    "red green blue yellow orange purple pink black white gray brown "
    "circle circles square squares triangle triangles star stars shape shapes big small large tiny "
    "photo picture image painting drawing of cat dog car house tree sky person face city mountain "
    "high quality detailed realistic style background"
).split()


def _open_clip_dir() -> str:
    """open_clip's package folder, found without importing it (its ``__init__`` imports timm and torchvision, which
    a benchmark host may hold in versions open_clip does not support: only its data file is needed here)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP tokenizer recipe reads the BPE merges bundled with open-clip-torch; "
                          "pip install open-clip-torch")
    return list(spec.submodule_search_locations)[0]


def _bytes_to_unicode() -> dict:
    """The byte-level BPE alphabet of GPT-2 and CLIP: every byte value maps to one printable unicode character.
    Printable latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves, the other 68 bytes to
    code points 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


@functools.lru_cache(maxsize=None)
def _clip_bpe_merges() -> tuple:
    path = os.path.join(_open_clip_dir(), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    return tuple(lines[1:])  # first line is a version header


def make_clip_tokenizer(vocab_size: int = 1000, max_length: int = 77):
    """A ``CLIPTokenizer`` with OpenAI CLIP's byte-level BPE, truncated to ``vocab_size`` tokens.

    The vocab is 256 byte symbols, the same with ``</w>``, the first ``vocab_size - 514`` merges, then
    ``<|startoftext|>`` (``vocab_size - 2``) and ``<|endoftext|>`` (``vocab_size - 1``). ``vocab_size=49408``
    gives the real CLIP vocabulary. Every string tokenizes (byte-level), fewer merges only mean more tokens.
    """
    from transformers import CLIPTokenizer

    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0 or n_merges > len(_clip_bpe_merges()):
        raise ValueError(f"vocab_size must be in [514, 49408], got {vocab_size}")
    merges = [m for m in _clip_bpe_merges()[:n_merges]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],  # transformers 5 wants tuples, not "a b" strings
        model_max_length=max_length,
    )


def make_t5_tokenizer(words: Optional[List[str]] = None, vocab_size: int = 500, max_length: int = 256):
    """A ``T5Tokenizer`` from a Unigram model trained locally on ``words`` (default :data:`CORPUS_WORDS`).

    Special ids follow T5: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2. Training is deterministic.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    words = list(CORPUS_WORDS if words is None else words)
    corpus = [" ".join(words[i : i + 8]) for i in range(0, len(words), 4)] + words
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(corpus, trainer)
    vocab = [tuple(x) for x in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_text_config(tokenizer, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    n = len(tokenizer)
    return CLIPTextConfig(
        vocab_size=n,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=hidden_size,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
    )


def _tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
        )
    )


def tiny_vae(
    latent_channels: int = 4, shift_factor: Optional[float] = 0.0609, scaling_factor: float = 1.5035
):
    """A 2x-downsampling ``AutoencoderKL`` (``vae_scale_factor == 2``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _finish(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # fresh modules are in train mode (T5 dropout); all are float32 already
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(
    with_t5: bool = False, seed: int = 0, shift: float = 3.0, use_dynamic_shifting: bool = False,
    sd35_medium: bool = False,
):
    """A random ``StableDiffusion3Pipeline`` (0.22 M params; 0.26 M with T5), scheduler shift 3 as SD3.

    ``sd35_medium``: SD3.5-Medium's block layout (a second, image-only attention ``attn2`` in the first block,
    RMS q/k norm)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    cfg = _clip_text_config(tokenizer)
    text_encoder = CLIPTextModelWithProjection(cfg)
    text_encoder_2 = CLIPTextModelWithProjection(cfg)
    t5_tok = make_t5_tokenizer() if with_t5 else None
    t5 = _tiny_t5(t5_tok, 64) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35_medium else {}),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=use_dynamic_shifting)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    return _finish(pipe)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random ``FluxPipeline`` (0.18 M params) with FLUX.1-dev's dynamic-shift scheduler config.

    ``guidance_embeds=True`` mimics FLUX.1-dev (guidance-distilled), ``False`` FLUX.1-schnell.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    t5_tok = make_t5_tokenizer()
    t5 = _tiny_t5(t5_tok, 32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )
    return _finish(pipe)


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A random ``StableDiffusionPipeline`` (0.16 M params) with SD1.5's DDIM schedule.

    ``DDIMScheduler`` with scaled-linear betas 0.00085..0.012, ``steps_offset=1``, ``set_alpha_to_one=False``,
    ``clip_sample=False`` and the given ``prediction_type`` (``"epsilon"`` or ``"v_prediction"``).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(shift_factor=None, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A random ``StableDiffusionXLPipeline``: two CLIP encoders (the second with projection, giving the
    pooled embedding), a UNet with SDXL's ``text_time`` size conditioning, and the same DDIM scheduler as
    :func:`tiny_sd15_pipeline` (real SDXL ships Euler; adapters sample with DDIM either way)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    cfg = _clip_text_config(tokenizer)
    text_encoder, text_encoder_2 = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=4,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled width + 6 size/crop ids x embed dim
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(shift_factor=None, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _finish(pipe)
