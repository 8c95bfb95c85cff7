"""One small CLIP backbone helper shared by the CLIP-family rewards (clip_score, pickscore, hps, aesthetic,
imagereward_style).

Never downloads. A backbone is built from

* ``backend="open_clip"``: an open_clip config name (``model_name="ViT-L-14"``) or an explicit config dict
  (``model_config={"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``), plus ``weights`` = a local
  open_clip checkpoint (``.pt`` / ``.bin`` / ``.safetensors``, loaded with ``weights_only=True``), and
  ``pretrained`` = the open_clip tag those weights are (``"openai"``, ``"laion2b_s32b_b79k"``, ``"webli"``, ...):
  nothing is downloaded, but the tag's activation and normalisation apply as when open_clip loads the weights
  itself: OpenAI's weights need QuickGELU (the plain config builds GELU, and every layer's activations come out
  wrong) and SigLIP's a 0.5 / 0.5 normalisation (its resize mode is not applied); or
* ``backend="transformers"``: ``weights`` = a local folder of a ``CLIPModel`` (``config.json`` + weights, e.g.
  PickScore_v1) with its tokenizer there or in ``tokenizer_path``; or a ``CLIPConfig`` dict in
  ``model_config`` for random weights.

Without ``weights`` the call fails with an explanation unless ``allow_random_weights=True`` (tests, smoke
runs); random weights are drawn from ``seed`` so they are reproducible. Images go through a differentiable
torch preprocessing (bicubic resize of the short side, centre crop, mean/std normalisation), the tensor
equivalent of CLIP's PIL pipeline. Parameters are frozen (``requires_grad=False``) and in eval mode; the
gradient with respect to the images still flows. Backbones are cached per process by their arguments, so
several rewards on the same model share one copy.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ClipBackbone",
    "build_clip_backbone",
    "preprocess_images",
    "missing_weights_error",
    "load_state_dict_file",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "openai_vit_l14",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("open_clip", "transformers")
_CACHE: Dict[str, "ClipBackbone"] = {}
_CACHE_LOCK = threading.Lock()


def missing_weights_error(reward: str, what: str, how: str) -> ValueError:
    return ValueError(
        f"reward {reward!r}: no {what} given. diffalign never downloads model weights; download them "
        f"yourself and pass a local path in the reward's kwargs ({how}), or set allow_random_weights=True "
        "for tests and smoke runs."
    )


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def preprocess_images(
    images: torch.Tensor, image_size: Union[int, Tuple[int, int]], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of ``[B, 3, H, W]`` in [0, 1]: resize, centre crop, normalise.

    The resize scales the binding side to the target and truncates the other (``int(th * w / h)``), as CLIP's
    torchvision ``Resize(n)``; rounding it made a 70x100 image 46 columns wide where CLIP uses 45."""
    th, tw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        if th / h >= tw / w:  # the height binds: it becomes th, the width follows
            nh, nw = th, max(tw, int(th * w / h))
        else:
            nh, nw = max(th, int(tw * h / w)), tw
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class ClipBackbone:
    """Frozen CLIP: ``encode_images([B,3,H,W] in [0,1]) -> [B, D]``, ``encode_text(list[str]) -> [B, D]``.

    Features are NOT normalised (callers normalise when their definition says so). ``logit_scale`` is the
    exponentiated temperature (100 for OpenAI CLIP / PickScore).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenize: Callable[[List[str]], Dict[str, torch.Tensor]],
        backend: str,
        image_size: Union[int, Tuple[int, int]],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.tokenize = tokenize
        self.backend = backend
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = device
        self.dtype = dtype
        with torch.no_grad():
            self.embed_dim = int(self.encode_text(["a"]).shape[-1])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_images(images.to(self.device), self.image_size, self.mean, self.std).to(self.dtype)
        if self.backend == "open_clip":
            feats = self.model.encode_image(x)
        else:
            feats = self.model.get_image_features(pixel_values=x)
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        return feats.float()

    def encode_text(self, prompts: List[str]) -> torch.Tensor:
        tokens = self.tokenize(list(prompts))
        if self.backend == "open_clip":
            feats = self.model.encode_text(tokens["input_ids"].to(self.device))
        else:
            feats = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        return feats.float()

    def encode_unique_text(self, prompts: List[str]) -> torch.Tensor:
        """``encode_text`` that encodes each distinct prompt once (GRPO groups repeat prompts K times)."""
        unique = list(dict.fromkeys(prompts))
        feats = self.encode_text(unique)
        index = {p: i for i, p in enumerate(unique)}
        return feats[torch.tensor([index[p] for p in prompts], device=feats.device)]


def _clip_bpe_tokenizer(vocab_size: int, max_length: int) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's bundled BPE merges.

    OpenAI CLIP's vocab is: 256 byte symbols, the same with ``</w>``, one token per merge, then the two
    special tokens. Taking the first ``vocab_size - 514`` merges gives a complete smaller vocab (tiny models).
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0:
        raise ValueError(
            f"a CLIP BPE vocab needs at least 514 entries, the text config has vocab_size={vocab_size}"
        )
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : n_merges + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=max_length,
    )


def openai_vit_l14(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``kwargs`` with the default backbone of the rewards built on OpenAI's CLIP ViT-L/14 (aesthetic, clip_score,
    imagereward_style): ``model_name="ViT-L-14"`` with ``pretrained="openai"`` (QuickGELU), unless the caller
    gives a tag (``null`` included), a config, another backend or another model name."""
    out = {"model_name": "ViT-L-14", **kwargs}
    other = ("pretrained" in kwargs or "model_config" in kwargs or out.get("backend", "open_clip") != "open_clip"
             or out["model_name"] != "ViT-L-14")
    return out if other else {**out, "pretrained": "openai"}


def _pretrained_settings(reward: str, model_name: str, pretrained: Optional[str]) -> Dict[str, Any]:
    """open_clip's settings for weights ``pretrained`` of ``model_name`` (QuickGELU, mean / std), read from its
    pretrained table without downloading; ``{}`` without a tag."""
    import open_clip

    if pretrained is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"reward {reward!r}: pretrained={pretrained!r} is not an open_clip tag of {model_name!r}; "
                         f"valid: {tags} (or pretrained=null for weights of another origin)")
    return cfg


def _build_open_clip(
    reward: str,
    model_name: str,
    model_config: Optional[Mapping[str, Any]],
    weights: Optional[str],
    tokenizer_path: Optional[str],
    pretrained: Optional[str] = None,
) -> Tuple[torch.nn.Module, Callable, Any, Sequence, Sequence]:
    import open_clip

    settings: Dict[str, Any] = {}
    if model_config is not None:
        cfg = dict(model_config)
        model = open_clip.model.CLIP(**cfg)
        context_length = int(dict(cfg.get("text_cfg", {})).get("context_length", 77))
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    else:
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(
                f"reward {reward!r}: unknown open_clip model_name {model_name!r}; "
                "pick one of open_clip.list_models() "
                "or pass model_config={...}"
            )
        settings = _pretrained_settings(reward, model_name, pretrained)
        model = open_clip.create_model(model_name, pretrained=None,
                                       force_quick_gelu=bool(settings.get("quick_gelu", False)))
        if tokenizer_path is not None:
            tokenizer = open_clip.get_tokenizer(f"local-dir:{tokenizer_path}")
        else:
            tokenizer = open_clip.get_tokenizer(model_name)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"reward {reward!r}: open_clip checkpoint {weights!r} does not exist")
        open_clip.load_checkpoint(model, weights, weights_only=True)
    pp = {**(getattr(model.visual, "preprocess_cfg", None) or {}),
          **{k: settings[k] for k in ("mean", "std") if k in settings}}
    mean, std = pp.get("mean", OPENAI_MEAN), pp.get("std", OPENAI_STD)

    def tokenize(prompts: List[str]) -> Dict[str, torch.Tensor]:
        return {"input_ids": tokenizer(prompts)}

    return model, tokenize, model.visual.image_size, mean, std


def _build_transformers(
    reward: str,
    model_config: Optional[Mapping[str, Any]],
    weights: Optional[str],
    tokenizer_path: Optional[str],
) -> Tuple[torch.nn.Module, Callable, Any, Sequence, Sequence]:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    mean, std = OPENAI_MEAN, OPENAI_STD
    if weights is not None:
        if not os.path.isdir(weights):
            raise FileNotFoundError(
                f"reward {reward!r}: backend='transformers' needs weights= a local CLIPModel folder; "
                f"{weights!r} is not a folder"
            )
        model = CLIPModel.from_pretrained(weights, local_files_only=True)
        pp_file = os.path.join(weights, "preprocessor_config.json")
        if os.path.isfile(pp_file):
            with open(pp_file) as fh:
                pp = json.load(fh)
            mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
    else:
        cfg = dict(model_config or {})
        if tokenizer_path is None:  # the offline BPE tokenizer below: its special tokens are the vocab's last two
            text = dict(cfg.get("text_config") or {})
            vocab = int(text.get("vocab_size", 49408))
            text.setdefault("bos_token_id", vocab - 2)
            text.setdefault("eos_token_id", vocab - 1)
            text.setdefault("pad_token_id", vocab - 1)
            cfg["text_config"] = text
        model = CLIPModel(CLIPConfig(**cfg))
    tok_dir = tokenizer_path or weights
    max_length = int(model.config.text_config.max_position_embeddings)
    if tok_dir is not None and any(
        os.path.isfile(os.path.join(tok_dir, f))
        for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    ):
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    elif weights is not None and tokenizer_path is None:
        raise ValueError(
            f"reward {reward!r}: no tokenizer files in {weights!r}; "
            "pass tokenizer_path= a local folder holding the CLIP "
            "tokenizer (PickScore_v1 uses the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        )
    else:
        tokenizer = _clip_bpe_tokenizer(int(model.config.text_config.vocab_size), max_length)
        # the text is pooled at the first end-of-text token; a config without this tokenizer's ids would pool at
        # position 0 (the start token) and ignore the prompt
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
        model.config.text_config.eos_token_id, model.config.text_config.bos_token_id = eos, bos
        model.config.text_config.pad_token_id = eos
        if hasattr(model.text_model, "eos_token_id"):
            model.text_model.eos_token_id = eos

    def tokenize(prompts: List[str]) -> Dict[str, torch.Tensor]:
        enc = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    size = model.config.vision_config.image_size
    return model, tokenize, size, mean, std


def build_clip_backbone(
    *,
    reward: str = "clip",
    backend: str = "open_clip",
    model_name: str = "ViT-L-14",
    model_config: Optional[Mapping[str, Any]] = None,
    weights: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    pretrained: Optional[str] = None,
    allow_random_weights: bool = False,
    seed: int = 0,
    device: Union[None, str, torch.device] = None,
    dtype: Union[str, torch.dtype] = "float32",
    cache: bool = True,
) -> ClipBackbone:
    """Build (or fetch from the per-process cache) a frozen :class:`ClipBackbone` (see the module doc)."""
    from rewards.base import resolve_device

    if backend not in BACKENDS:
        raise ValueError(f"reward {reward!r}: backend={backend!r} is not valid; use one of {list(BACKENDS)}")
    if weights is None and not allow_random_weights:
        how = (
            "weights='/path/to/open_clip_checkpoint.pt|.safetensors' with model_name=<open_clip config name>"
            if backend == "open_clip"
            else "weights='/path/to/CLIPModel_folder' (e.g. PickScore_v1), tokenizer_path=..."
        )
        raise missing_weights_error(reward, "CLIP weights", how)
    if weights is not None:
        weights = os.path.expanduser(str(weights))
    dev = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    name_key = None if (model_config is not None or backend == "transformers") else model_name
    if pretrained is not None and (backend != "open_clip" or model_config is not None):
        raise ValueError(f"reward {reward!r}: pretrained={pretrained!r} names open_clip weights of a config name; "
                         "it does not apply with backend='transformers' or model_config (set pretrained=null)")
    key = json.dumps(
        [backend, name_key, model_config, weights, tokenizer_path, pretrained, seed, str(dev), str(torch_dtype)],
        sort_keys=True,
        default=str,
    )
    with _CACHE_LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if backend == "open_clip":
                model, tokenize, size, mean, std = _build_open_clip(
                    reward, model_name, model_config, weights, tokenizer_path, pretrained
                )
            else:
                model, tokenize, size, mean, std = _build_transformers(
                    reward, model_config, weights, tokenizer_path
                )
        model = model.to(device=dev, dtype=torch_dtype).eval().requires_grad_(False)
        backbone = ClipBackbone(model, tokenize, backend, size, mean, std, dev, torch_dtype)
        if cache:
            _CACHE[key] = backbone
        return backbone
