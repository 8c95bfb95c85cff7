"""Generator adapters: one interface over diffusers text-to-image pipelines.

>>> gen = load_generator("path/or/hub-id")                      # picks SD3Adapter / FluxAdapter / UNetAdapter
>>> cond = gen.encode_prompts(["a red circle"], guidance_scale=4.5)
>>> schedule = gen.make_schedule(10, 512, 512)
>>> x_T = gen.prepare_latents(1, 512, 512, torch.Generator().manual_seed(0))
>>> traj = samplers.rollout(gen.model_fn(cond, 4.5), schedule, x_T, step="flow_sde")
>>> images = gen.decode(traj.final)                              # [B, 3, H, W] in [0, 1]

Nothing is downloaded at import time; ``load_generator`` resolves paths and hub ids exactly as
``DiffusionPipeline.from_pretrained`` does (set ``HF_HUB_OFFLINE=1`` to forbid network access).
"""

from __future__ import annotations

from typing import Any, Dict, Type, Union

import torch

from diffalign.generators.base import BF16_LOG_PROB_ATOL, Conditioning, GeneratorAdapter
from diffalign.generators.flux import FluxAdapter
from diffalign.generators.sd3 import SD3Adapter
from diffalign.generators.unet import UNetAdapter
from samplers.parametrization import to_x0_eps, velocity_from_x0_eps, x0_eps_to_model_output

__all__ = [
    "BF16_LOG_PROB_ATOL",
    "Conditioning",
    "GeneratorAdapter",
    "SD3Adapter",
    "FluxAdapter",
    "UNetAdapter",
    "ADAPTERS",
    "adapter_for_pipeline",
    "load_generator",
    "wrap_pipeline",
    "folder_call_kwargs",
    "to_x0_eps",
    "velocity_from_x0_eps",
    "x0_eps_to_model_output",
]

#: Pipeline class name -> adapter class. Subclasses of these pipelines resolve through their bases.
ADAPTERS: Dict[str, Type[GeneratorAdapter]] = {
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
    "StableDiffusionPipeline": UNetAdapter,
    "StableDiffusionXLPipeline": UNetAdapter,
}


def adapter_for_pipeline(pipeline: Any) -> GeneratorAdapter:
    """Wrap an in-memory diffusers pipeline in the adapter for its class."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](pipeline)
    raise ValueError(
        f"no generator adapter for pipeline class {type(pipeline).__name__!r}; supported: {sorted(ADAPTERS)}"
    )


def _absent_components(path_or_id: str, load_kwargs: Dict[str, Any], keep_safety_checker: bool = True
                       ) -> Dict[str, Any]:
    """Components saved as ``[null, null]`` in model_index.json (e.g. SD3 without T5): diffusers needs them
    passed as ``None`` again on reload; without ``keep_safety_checker``, a listed SD1.x safety checker is not
    loaded either (``safety_checker=None, requires_safety_checker=False``)."""
    from diffusers import DiffusionPipeline

    keys = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
    index = DiffusionPipeline.load_config(path_or_id, **{k: load_kwargs[k] for k in keys if k in load_kwargs})
    absent = {}
    for name, value in index.items():
        if name.startswith("_") or name in load_kwargs:
            continue
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is None and value[1] is None:
            absent[name] = None
        elif name == "safety_checker" and not keep_safety_checker:
            absent.update(safety_checker=None, requires_safety_checker=False)
    return absent


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns since 0.36-ish).
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_generator(
    path_or_id: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    keep_safety_checker: bool = False,
    **pipeline_kwargs: Any,
) -> GeneratorAdapter:
    """``DiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, **pipeline_kwargs)`` wrapped in its
    adapter, moved to ``device`` and set to eval mode.

    Components saved as absent (SD3 without T5: ``text_encoder_3=None, tokenizer_3=None``) are passed as
    ``None`` again automatically; explicit ``pipeline_kwargs`` win. An SD1.x pipeline's safety checker (a CLIP
    ViT-L, ~0.6 GB in float16) is not loaded, as in DDPO: the adapters decode with the VAE and never run it (a
    direct ``adapter.pipeline(...)`` call is therefore unfiltered); ``keep_safety_checker`` loads it (the export of
    a complete merged folder).
    """
    from diffusers import DiffusionPipeline

    from diffalign.shapes.models import resolve_model_path

    # "builtin:shapes-flow" -> the shipped folder; a missing folder / uncached hub id offline fails with the fix
    path_or_id = resolve_model_path(path_or_id, cache_dir=pipeline_kwargs.get("cache_dir"))
    kwargs = {**_absent_components(str(path_or_id), pipeline_kwargs, keep_safety_checker), **pipeline_kwargs}
    kwargs[_dtype_keyword()] = dtype
    pipeline = DiffusionPipeline.from_pretrained(path_or_id, **kwargs)
    adapter = wrap_pipeline(pipeline, device=device)
    adapter.call_kwargs = folder_call_kwargs(path_or_id)
    return adapter


def wrap_pipeline(pipeline: Any, *, dtype: torch.dtype | None = None,
                  device: Union[str, torch.device, None] = None) -> GeneratorAdapter:
    """An in-memory diffusers pipeline (built in Python, not loaded from a folder) moved to ``device`` and
    ``dtype`` (each optional: ``None`` leaves it), set to eval mode and wrapped in its adapter.

    This is what :func:`load_generator` does after ``from_pretrained``; the trainers' ``pipeline=`` argument
    uses it to train a pipeline object directly (e.g. one built with random weights for a benchmark).
    """
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    if device is not None:
        want = torch.device(device)
        # compare types and indices ("cuda" is "cuda:<current>"); a pipeline split over devices is moved whole
        if want.type == "cuda" and want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        if any(t.device != want for m in modules for t in (*m.parameters(), *m.buffers())):
            pipeline.to(device)
    if dtype is not None:
        for module in modules:  # each by its first floating parameter: layers kept in float32 on purpose stay so
            current = next((p.dtype for p in module.parameters() if p.is_floating_point()), dtype)
            if current != dtype:
                module.to(dtype=dtype)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return adapter_for_pipeline(pipeline)


def folder_call_kwargs(path_or_id: str) -> Dict[str, Any]:
    """Keyword arguments a model folder says every call needs (``diffalign.json``'s ``call_kwargs``), e.g.
    the shipped shapes-flow model was trained without T5 tokens: ``{"max_sequence_length": 0}``."""
    import json
    import os

    path = os.path.join(str(path_or_id), "diffalign.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return dict(json.load(f).get("call_kwargs", {}))
