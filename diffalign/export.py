"""Export of a training checkpoint to the formats diffusers and peft load: the LoRA in diffusers format
(``pipeline.load_lora_weights``) and a merged, complete pipeline folder (``DiffusionPipeline.from_pretrained``);
``diffalign export RUN_DIR``. Checkpoints themselves: :mod:`diffalign.checkpoint`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from diffalign.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    PathLike,
    _json_text,
    _write_text_atomic,
    load_checkpoint,
    resolve_resume,
    write_os_error,
)


def _say(message: str) -> None:
    print(f"[export] {message}", flush=True)


def _normalize_lora_keys(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """Accept ``named_parameters``-style keys (``...lora_A.default.weight``) as well as peft's
    ``get_peft_model_state_dict`` keys (``...lora_A.weight``)."""
    return {k.replace(f".{adapter_name}.", "."): v for k, v in state.items()}


def _load_weights_into(adapter: Any, weights: Mapping[str, torch.Tensor], is_lora: bool) -> None:
    from diffalign.generators.lora import earlier_default_hint

    if is_lora:
        weights = _normalize_lora_keys(weights)
        expected = set(adapter.lora_state_dict())
        got = set(weights)
        if expected != got:
            raise CheckpointError(
                "the checkpoint's LoRA tensors do not match the adapter built from its config.yaml "
                f"(model.lora.rank / target_modules): missing {sorted(expected - got)[:5]}, "
                f"unexpected {sorted(got - expected)[:5]}{earlier_default_hint(got - expected)}"
            )
        adapter.load_lora_state_dict(dict(weights))
        return
    result = adapter.denoiser.load_state_dict(dict(weights), strict=False)
    params = {n for n, _ in adapter.denoiser.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"the checkpoint's weights do not fit the {type(adapter.denoiser).__name__} of "
                              f"model.path: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def _fuse_lora(denoiser: torch.nn.Module) -> None:
    """Merge every LoRA layer into its base weight and remove the peft wrappers (diffusers' fuse + unload)."""
    denoiser.fuse_lora(lora_scale=1.0, safe_fusing=True)
    denoiser.unload_lora()


def load_hint(folder: Path, dtype: torch.dtype, call_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """How to load an exported pipeline folder with plain diffusers: its dtype (without it diffusers loads
    its own models in float32 while transformers keeps the text encoders' saved dtype, and a float16 / bfloat16
    export fails at its first call), the components the pipeline class requires but the folder lacks
    (e.g. the shapes model's T5), which must be named as ``None``, and the keyword arguments every call needs
    (``call_kwargs``, the model folder's ``diffalign.json``: the shapes model's ``max_sequence_length=0``)."""
    import diffusers

    from diffalign.generators import _dtype_keyword

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ""
    optional = set(getattr(getattr(diffusers, str(index.get("_class_name")), None), "_optional_components", []))
    absent = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None
              and k not in optional]
    args = [f"{k}=None" for k in absent]
    note = ""
    if dtype != torch.float32:
        keyword = _dtype_keyword()  # this diffusers' name; the folder may be loaded with another version
        args.append(f"{keyword}=torch.{str(dtype).replace('torch.', '')}")
        note = " (torch_dtype= before diffusers 0.36)" if keyword == "dtype" else " (dtype= from diffusers 0.36)"
    call = ("; call it with " + ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items())) if call_kwargs else ""
    return f"DiffusionPipeline.from_pretrained({str(folder)!r}{''.join(', ' + a for a in args)}){note}{call}"


def export_checkpoint(checkpoint: PathLike, out_dir: PathLike, *, weights: Optional[str] = None,
                      merged: bool = False, dtype: Optional[str] = None, device: str = "cpu") -> Dict[str, Path]:
    """Export a checkpoint: the LoRA in diffusers format (``out_dir/lora``, loadable by
    ``pipeline.load_lora_weights``) and, with ``merged`` or for a full fine-tune, a complete pipeline folder
    (``out_dir/merged``) that ``DiffusionPipeline.from_pretrained`` loads.

    ``weights``: ``"ema"`` | ``"trained"`` | ``None`` (EMA when the checkpoint has it). ``dtype``: dtype of the
    merged pipeline (default: the config's ``model.dtype``); merging itself runs in float32.
    Returns ``{"lora": path, "merged": path}`` (the ones written).
    """
    from diffalign.config import ModelConfig, from_dict
    from diffalign.generators import _dtype_keyword, load_generator
    from diffalign.shapes.models import resolve_model_path

    if weights not in (None, "ema", "trained"):
        raise CheckpointError(f"weights={weights!r}; valid choices: 'ema', 'trained' (or None: EMA when present)")
    state = load_checkpoint(checkpoint)
    if "model" not in state.config:
        raise CheckpointError(f"{state.path / CONFIG_FILE} has no 'model' section; export needs model.path and "
                              "model.lora to rebuild the generator")
    model_cfg = from_dict(ModelConfig, state.config["model"], prefix="model")
    if weights is None:
        weights = "ema" if state.ema_state is not None else "trained"
    if weights == "ema" and state.ema_state is None:
        raise CheckpointError(f"checkpoint {state.path.name} has no EMA weights (EMA was off); use --weights trained")
    tensors = state.ema_state if weights == "ema" else state.trainable_state
    is_lora = any(".lora_" in k for k in tensors)
    if is_lora != model_cfg.lora.enabled:
        raise CheckpointError(
            f"checkpoint {state.path.name} holds {'LoRA' if is_lora else 'full denoiser'} weights but its config "
            f"says model.lora.enabled={model_cfg.lora.enabled}; the config.yaml does not belong to these weights"
        )
    out_dtype = getattr(torch, dtype or model_cfg.dtype)
    model_path = resolve_model_path(model_cfg.path)
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}

    _say(f"checkpoint {state.path} (step {state.step}, {weights} weights, "
         f"{'LoRA' if is_lora else 'full fine-tune'})")
    _say(f"loading base model {model_path}")
    adapter = load_generator(model_path, dtype=out_dtype, device=device, keep_safety_checker=True)
    adapter.denoiser.to(torch.float32)  # merge in float32: bf16 rounding of W + BA would differ from the trained model
    run_dtype = getattr(torch, model_cfg.dtype)
    if run_dtype != out_dtype:
        # the denoiser's base as it was trained (model.dtype): a float32 run exported in bf16 gets bf16(W + s B A), not
        # bf16(bf16(W) + s B A), and a bf16 run's LoRA lands on the bf16 base it saw. The other components stay as
        # diffusers / transformers load them in the export dtype (T5 keeps its float32 `wo` layers in float16).
        _say(f"loading the base denoiser in the run's {model_cfg.dtype}")
        trained_base = type(adapter.denoiser).from_pretrained(
            model_path, subfolder=adapter.denoiser_name, **{_dtype_keyword(): run_dtype})
        adapter.denoiser.load_state_dict(trained_base.state_dict())
        del trained_base
    if is_lora:
        lora = model_cfg.lora
        adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
    _load_weights_into(adapter, tensors, is_lora)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("lora", "merged"):  # the staging folders of an export killed midway
        for kind in ("tmp", "old"):
            for leftover in out_dir.glob(_aside(out_dir / name, kind, "*").name):
                shutil.rmtree(leftover, ignore_errors=True)
    staged: Dict[str, Path] = {}  # written beside their targets, swapped in together once all are written
    try:
        if is_lora:
            _say(f"writing LoRA (diffusers format) to {out_dir / 'lora'}")
            staged["lora"] = _stage_folder(out_dir / "lora", lambda tmp: adapter.save_lora(str(tmp)))
        if merged or not is_lora:
            if is_lora:
                _fuse_lora(adapter.denoiser)
            adapter.denoiser.to(out_dtype)
            _say(f"writing merged pipeline ({str(out_dtype).replace('torch.', '')}) to {out_dir / 'merged'}")

            def write_merged(tmp: Path) -> None:
                adapter.pipeline.save_pretrained(str(tmp), safe_serialization=True)
                if adapter.call_kwargs:  # what the base folder's diffalign.json says every call needs
                    _write_text_atomic(tmp / "diffalign.json", _json_text({"call_kwargs": adapter.call_kwargs},
                                                                          "call_kwargs"))

            staged["merged"] = _stage_folder(out_dir / "merged", write_merged)
    except BaseException as exc:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        os_error = write_os_error(exc) if isinstance(exc, Exception) else None
        if os_error is not None:  # a full disk reached through safetensors / torch: one line, not their traceback
            raise CheckpointWriteError(f"could not write the export into {out_dir}: {os_error.strerror or os_error}; "
                                       "nothing was replaced (an earlier export there is intact): free disk space "
                                       "and run the same command") from None
        raise
    for name, tmp in staged.items():
        _swap_in(tmp, out_dir / name)
        written[name] = out_dir / name
    if (out_dir / "export.json").is_file():  # an earlier export into this folder: drop what this one replaces
        for name in ("lora", "merged"):
            if name not in written and (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
                _say(f"removed the earlier export's {out_dir / name} (this export does not write it)")
    lora_info = ({"rank": model_cfg.lora.rank, "alpha": model_cfg.lora.alpha,
                  "target_modules": model_cfg.lora.target_modules} if is_lora else None)
    info = {"checkpoint": str(state.path.resolve()), "step": state.step, "weights": weights,
            "model_path": model_cfg.path, "lora": lora_info,
            "merged_dtype": str(out_dtype).replace("torch.", "") if "merged" in written else None,
            "outputs": {k: str(v) for k, v in written.items()}}
    _write_text_atomic(out_dir / "export.json", _json_text(info, "export info"))
    _say("done: " + ", ".join(f"{k} -> {v}" for k, v in written.items()))
    if "merged" in written:
        _say(f"load the merged pipeline with {load_hint(written['merged'], out_dtype, adapter.call_kwargs)}")
    return written


def _aside(target: Path, kind: str, pid: object = None) -> Path:
    """The folder beside ``target`` where an export stages (``tmp``) or parks (``old``) it: ``.NAME.KIND-PID``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid() if pid is None else pid}"


def _stage_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a fresh folder beside ``target`` and return it (:func:`_swap_in` puts it in place).

    An export into a used folder thus replaces the earlier one whole: written over in place, a sharded earlier
    export left its shard index beside the new files and the folder did not load. An export that fails leaves the
    earlier one as it was; one killed midway leaves ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders, which the next
    export into the folder removes."""
    tmp = _aside(target, "tmp")
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the staged folder ``tmp``; the earlier folder is put back if the second rename fails."""
    old = _aside(target, "old")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffalign export",
        description="Export a checkpoint of RUN_DIR: the LoRA in diffusers format (pipeline.load_lora_weights) "
                    "and, with --merged, a full pipeline folder (DiffusionPipeline.from_pretrained); a full fine-tune "
                    "has no LoRA and always writes the full pipeline folder.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir (holds checkpoints/)")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (default), a checkpoint name (step-00000100) or a checkpoint folder")
    p.add_argument("--weights", choices=["ema", "trained"], default=None,
                   help="which weights to export (default: EMA when the checkpoint has it, else trained)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/<checkpoint name>)")
    p.add_argument("--merged", action="store_true", help="also write the LoRA merged into the base weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the merged pipeline (default: the config's model.dtype)")
    p.add_argument("--device", default="cpu", help="device used for loading and merging (default: cpu)")
    return p


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """``diffalign export RUN_DIR [--checkpoint latest|PATH] [--weights ema|trained] [--out DIR] [--merged]``."""
    from diffalign.config import ConfigError

    args = _export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    run_dir = Path(args.run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise CheckpointError(f"RUN_DIR {str(run_dir)!r} is a file; give the output_dir of a training run "
                                  "(or one of its checkpoint folders)")
        if not run_dir.is_dir():
            raise CheckpointError(f"RUN_DIR {str(run_dir)!r} does not exist; give the output_dir of a training run")
        if (run_dir / STATE_FILE).exists() and args.checkpoint == "latest":
            # RUN_DIR is itself a checkpoint folder (run/checkpoints/step-N): export that one
            run_dir, args.checkpoint = run_dir.parent.parent, str(run_dir)
        checkpoint = resolve_resume(run_dir, args.checkpoint, key="--checkpoint")
        if checkpoint is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint yet ({run_dir / CHECKPOINTS_DIR} is empty "
                                  "or missing); train with checkpoint.every > 0 or pass --checkpoint PATH")
        out = Path(args.out) if args.out else run_dir / "export" / checkpoint.name
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
        export_checkpoint(checkpoint, out, weights=args.weights, merged=args.merged, dtype=args.dtype,
                          device=args.device)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
