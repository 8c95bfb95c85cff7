"""LoRA adapters on a diffusers denoiser through peft, saved in the format diffusers loads.

The adapter lives inside the denoiser (``denoiser.add_adapter``), so the same module is the policy with
the adapter enabled and the frozen reference model with it disabled. Files written by :func:`save_lora`
load with ``pipeline.load_lora_weights(directory)`` on the matching pipeline class, as the LoRAs of the
diffusers training scripts do (transformer weights in peft naming, UNet weights converted to diffusers
naming, plus the peft config as adapter metadata so ``lora_alpha`` survives the round trip).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import torch

__all__ = [
    "is_lora_parameter",
    "add_lora",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora",
    "load_lora",
]


def is_lora_parameter(name: str, adapter_name: Optional[str] = None) -> bool:
    """Whether a parameter name (``...to_q.lora_A.default.weight``) belongs to a (given) peft LoRA adapter."""
    parts = name.split(".")
    if not any(p.startswith("lora_") for p in parts):
        return False
    return adapter_name is None or adapter_name in parts


def _train_only(denoiser: torch.nn.Module, adapter_name: str) -> None:
    for name, param in denoiser.named_parameters():
        param.requires_grad_(is_lora_parameter(name, adapter_name))


def add_lora(
    denoiser: torch.nn.Module,
    *,
    rank: int,
    alpha: Optional[float],
    target_modules: Sequence[str],
    init: Union[str, bool] = "gaussian",
    adapter_name: str = "default",
    dropout: float = 0.0,
) -> None:
    """Attach a LoRA of ``rank`` (scale ``alpha / rank``) to ``target_modules``; freeze everything else.

    ``init``: ``"gaussian"`` (Flow-GRPO) or ``"default"`` (peft's Kaiming-uniform A, ``init_lora_weights=True``),
    or any value peft's ``init_lora_weights`` takes; ``B`` starts at zero either way."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name in (getattr(denoiser, "peft_config", None) or {}):
        raise ValueError(
            f"the denoiser already has a LoRA adapter named {adapter_name!r}; pick another "
            "adapter_name or load its weights with load_lora_state_dict"
        )
    _check_targets(denoiser, target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=True if init == "default" else init,
        target_modules=list(target_modules),
        lora_dropout=dropout,
    )
    _attach(denoiser, adapter_name, lambda: denoiser.add_adapter(config, adapter_name=adapter_name))
    _train_only(denoiser, adapter_name)


def _attach(denoiser: torch.nn.Module, adapter_name: str, attach) -> None:
    """Run ``attach()`` (diffusers' ``add_adapter`` / ``load_lora_weights``), which makes the new adapter the only
    active one and leaves its modules in train mode: the adapters active before stay active (a second, frozen
    LoRA had switched the trained one off), and the new modules take the denoiser's mode (LoRA dropout ran in
    every rollout, so predictions and log-probs were random). The caller sets the ``requires_grad`` flags after."""
    before = list(denoiser.active_adapters()) if getattr(denoiser, "peft_config", None) else []
    attach()
    if before:
        denoiser.set_adapters(before + [adapter_name])
    denoiser.train(denoiser.training)


def _check_targets(denoiser: torch.nn.Module, target_modules: Sequence[str]) -> None:
    """Every target must name some module (peft matches a module whose name is the target or ends with
    ``.target``): peft refuses a list that matches nothing with a long error, and silently skips one misspelt
    name among valid ones, which then trains fewer layers than asked."""
    from diffalign.config import ConfigError

    names = [n for n, _ in denoiser.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({".".join(n.split(".")[-2:]) for n, m in denoiser.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"{missing} name no module of the {type(denoiser).__name__}; targets are module names or "
                          f"their ends, e.g. {linear[:12]}", key="model.lora.target_modules")


def lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The adapter's tensors with peft keys (adapter name stripped), e.g. ``...to_q.lora_A.weight``."""
    from peft.utils import get_peft_model_state_dict

    _check_adapter(denoiser, adapter_name)
    return get_peft_model_state_dict(denoiser, adapter_name=adapter_name)


def load_lora_state_dict(
    denoiser: torch.nn.Module, state_dict: Dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Load :func:`lora_state_dict` output into an attached adapter; unexpected LoRA keys are an error."""
    from peft.utils import set_peft_model_state_dict

    _check_adapter(denoiser, adapter_name)
    result = set_peft_model_state_dict(denoiser, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA state dict has keys the adapter {adapter_name!r} does not: {unexpected[:5]}"
                         f"{earlier_default_hint(unexpected)}")


def earlier_default_hint(unexpected_keys) -> str:
    """The fix for LoRA keys on SD3.5-Medium's ``attn2``: a LoRA trained with diffalign's earlier default targets
    (bare ``to_q``, ...; now Flow-GRPO's ``attn.*``), or ``""``."""
    if not any(".attn2." in k for k in unexpected_keys):
        return ""
    return ("; a LoRA on SD3.5-Medium's `attn2` comes from diffalign's earlier default targets: set "
            "model.lora.target_modules: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, "
            "to_add_out] to load it")


def save_lora(
    pipeline, denoiser_name: str, directory: str, adapter_name: str = "default", diffusers_keys: bool = False
) -> None:
    """Write ``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    denoiser = getattr(pipeline, denoiser_name)
    state = lora_state_dict(denoiser, adapter_name)
    if diffusers_keys:
        state = convert_state_dict_to_diffusers(state)
    metadata = denoiser.peft_config[adapter_name].to_dict()
    os.makedirs(directory, exist_ok=True)
    type(pipeline).save_lora_weights(
        directory,
        **{f"{denoiser_name}_lora_layers": state, f"{denoiser_name}_lora_adapter_metadata": metadata},
    )


def load_lora(
    pipeline, denoiser: torch.nn.Module, directory: str, adapter_name: str = "default", trainable: bool = True
) -> None:
    """``pipeline.load_lora_weights(directory)`` as ``adapter_name``.

    ``trainable=True`` makes that adapter the only trainable weights (resume LoRA training);
    ``False`` freezes it and leaves the other parameters' flags unchanged. Adapters already active stay active
    (the prediction adds every active LoRA).
    """
    if not os.path.isdir(directory):
        raise ValueError(
            f"LoRA directory {directory!r} does not exist; pass a folder written by save_lora "
            "or pipeline.save_lora_weights"
        )
    if adapter_name in (getattr(denoiser, "peft_config", None) or {}):
        raise ValueError(f"the denoiser already has a LoRA adapter named {adapter_name!r}; pick another name")
    flags = {_base_name(name): param.requires_grad for name, param in denoiser.named_parameters()}
    _attach(denoiser, adapter_name, lambda: pipeline.load_lora_weights(directory, adapter_name=adapter_name))
    if trainable:
        _train_only(denoiser, adapter_name)
        return
    # diffusers' loader freezes the whole denoiser; put the other parameters' flags back.
    for name, param in denoiser.named_parameters():
        param.requires_grad_(
            False if is_lora_parameter(name, adapter_name) else flags.get(_base_name(name), False)
        )


def _base_name(name: str) -> str:
    # peft moves a wrapped layer's own weights under ``base_layer``.
    return name.replace(".base_layer.", ".")


def _check_adapter(denoiser: torch.nn.Module, adapter_name: str) -> None:
    names = list(getattr(denoiser, "peft_config", None) or {})
    if adapter_name not in names:
        raise ValueError(
            f"no LoRA adapter named {adapter_name!r} on the denoiser; attached: {names or 'none'}"
        )
