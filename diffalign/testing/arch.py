"""Random-weight pipelines with a real architecture, built from a folder of diffusers configs (no weights).

A diffusers model folder (or a copy of its JSON files alone: ``model_index.json`` and each component's
``config.json`` / ``scheduler_config.json``) fixes every layer size. :func:`random_pipeline` builds that
pipeline with freshly initialised weights, so the speed and memory of a real-size model (SD3.5-Medium's 2.5 B
parameter MMDiT-X with its T5-XXL, say) can be measured without downloading a checkpoint
(``scripts/bench_grpo.py --arch``).

Tokenizers are never in such a folder's configs: a ``CLIPTokenizer`` gets OpenAI CLIP's real byte-level BPE
(open_clip's bundled merges, :func:`diffalign.testing.tiny.make_clip_tokenizer`) at the text encoder's vocab
size, a T5 tokenizer a small locally trained Unigram model (its ids are valid for any T5 vocabulary). Token
ids therefore have the real sequence lengths, which is all a benchmark of random weights needs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Union

import torch

__all__ = ["random_pipeline", "parameter_counts"]

_CONFIG_FILES = ("config.json", "scheduler_config.json")


def _component_config(folder: str, name: str) -> Dict[str, Any]:
    for fname in _CONFIG_FILES:
        path = os.path.join(folder, name, fname)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise FileNotFoundError(f"{os.path.join(folder, name)} holds none of {list(_CONFIG_FILES)}; a diffusers "
                            "model folder (or its JSON files) has one per component listed in model_index.json")


class _quiet_diffusers:
    def __enter__(self):
        from diffusers.utils import logging

        self.level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self.level)


def _tokenizer(cls_name: str, encoder_cfg: Optional[Dict[str, Any]]):
    from diffalign.testing.tiny import make_clip_tokenizer, make_t5_tokenizer

    if cls_name.startswith("CLIPTokenizer"):
        vocab = int(encoder_cfg.get("vocab_size", 49408)) if encoder_cfg else 49408
        max_len = int(encoder_cfg.get("max_position_embeddings", 77)) if encoder_cfg else 77
        return make_clip_tokenizer(vocab_size=min(vocab, 49408), max_length=max_len)
    if cls_name.startswith("T5Tokenizer"):
        return make_t5_tokenizer(max_length=512)
    raise ValueError(f"no offline recipe for tokenizer class {cls_name!r}; supported: CLIPTokenizer, "
                     "T5Tokenizer(Fast)")


def random_pipeline(
    folder: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
):
    """The pipeline that ``folder``'s ``model_index.json`` names, every model randomly initialised from its
    config, in ``dtype`` on ``device`` (built directly there: a 4.7 B-parameter T5-XXL initialises in seconds on
    a GPU; each model is built in float32 and then cast, so the peak is its float32 size), in eval mode.

    ``overrides``: per-component config changes, e.g. ``{"transformer": {"num_layers": 2}}`` (a smaller model of
    the same family for a smoke run; the caller keeps the components consistent). Deterministic given ``seed``
    and the device.
    """
    folder = os.fspath(folder)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} has no model_index.json: pass a diffusers model folder (its JSON "
                                "files are enough)")
    with open(index_path) as f:
        index = json.load(f)
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - set(index))
    if unknown:
        raise ValueError(f"overrides for {unknown}, which {index_path} does not list; components: "
                         f"{sorted(k for k in index if not k.startswith('_'))}")
    dev = torch.device(device)  # "cuda" without an index: fork_rng and torch.cuda.device take the current GPU
    cuda = dev.type == "cuda"
    # seeded without touching the caller's random state: only the generators the build uses are seeded (a plain
    # torch.manual_seed would also reseed every GPU, which fork_rng does not restore)
    with torch.random.fork_rng(devices=[dev] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        return _build(folder, index, overrides, dtype, device)


def _build(folder: str, index: Dict[str, Any], overrides: Dict[str, Dict[str, Any]], dtype: torch.dtype,
           device: Union[str, torch.device]):
    import inspect

    import diffusers
    import transformers

    components: Dict[str, Any] = {}
    configs: Dict[str, Dict[str, Any]] = {}
    tokenizers: Dict[str, str] = {}
    pipeline_cls = getattr(diffusers, index["_class_name"])
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, (list, tuple)) or len(spec) != 2:
            if name in accepted:  # a pipeline option saved in model_index.json, e.g. force_zeros_for_empty_prompt
                components[name] = spec
            continue
        library, cls_name = spec
        if library is None:
            components[name] = None
            continue
        if "tokenizer" in name.lower() or cls_name.endswith(("Tokenizer", "TokenizerFast")):
            tokenizers[name] = cls_name
            continue
        if name in ("safety_checker", "feature_extractor", "image_encoder"):
            components[name] = None
            continue
        cfg = {**_component_config(folder, name), **overrides.get(name, {})}
        configs[name] = cfg
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            if cls_name.endswith("Scheduler"):
                components[name] = cls.from_config(cfg)
                continue
            with torch.device(device):
                module = cls.from_config(cfg)
        elif library == "transformers":
            cls = getattr(transformers, cls_name)
            dropped = ("architectures", "torch_dtype", "dtype", "_name_or_path", "transformers_version")
            config = cls.config_class.from_dict({k: v for k, v in cfg.items() if k not in dropped})
            with torch.device(device):
                module = cls(config)
        else:
            raise ValueError(f"component {name!r}: library {library!r} is neither diffusers nor transformers")
        with _quiet_diffusers():  # diffusers warns on every .to(dtype) of a model with no fp32-only modules
            components[name] = module.to(dtype=dtype).eval().requires_grad_(False)
    for name, cls_name in tokenizers.items():
        encoder = name.replace("tokenizer", "text_encoder")
        components[name] = _tokenizer(cls_name, configs.get(encoder))
    if "requires_safety_checker" in accepted:  # no safety checker is built (as load_generator does not load one)
        components["requires_safety_checker"] = False
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipeline) -> Dict[str, int]:
    """Parameters per ``torch.nn.Module`` component of ``pipeline`` (LoRA weights included if attached)."""
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
