"""Atomic checkpoints of a whole training run and resume (export to diffusers / peft: :mod:`diffalign.export`).

Layout of ``run_dir/checkpoints/``::

    step-00000100/
        trainable.safetensors   the trained weights: ``adapter.lora_state_dict()`` (LoRA, peft keys) or the
                                denoiser's ``state_dict()`` (full fine-tuning)
        ema.safetensors         EMA of the same tensors (only when EMA is on)
        optimizer.pt            ``optimizer.state_dict()``
        scheduler.pt            ``lr_scheduler.state_dict()`` (optional)
        scaler.pt               ``grad_scaler.state_dict()`` (optional)
        rng-rank{r}.pt          every rank's RNG: torch CPU (+ CUDA), numpy, python ``random``, named generators
        state.json              counters, sampler_state, extra, world_size, time, and the list of files above
        config.yaml             the resolved run config
    latest                      text file: the name of the newest complete checkpoint

Guarantees (the gaps users hit in Flow-GRPO / DDPO / TRL, see research/grpo_family.md section 4):

* **Atomic.** Files go into a hidden sibling folder, are fsynced, and the folder is renamed into place with
  ``os.replace``; ``latest`` is rewritten the same way afterwards. An exception while writing leaves the
  previous checkpoint and ``latest`` untouched and removes the temporary folder. ``state.json`` is written
  last and lists every file, so a folder is complete exactly when ``state.json`` and its files exist.
* **No rank-0-only collectives.** Every rank calls :meth:`CheckpointManager.save`; all ranks pass the same
  three barriers whatever fails, so an error never leaves the others waiting. Rank r writes only its
  ``rng-rank{r}.pt``; rank 0 writes the rest (the run dir must be on a filesystem all ranks share).
  Gathering sharded (FSDP / ZeRO-3) weights and optimizer state is the caller's job, before ``save``.
* **Safe loading.** Only safetensors and ``torch.load(weights_only=True)``: nothing is unpickled.
* **Reload gives the trained model.** Export (:mod:`diffalign.export`) checks that the checkpoint's LoRA keys
  are exactly the ones of the re-created adapter instead of silently leaving part of it at its initial (zero)
  value.

Typical use in a trainer::

    ckpt = CheckpointManager(cfg.output_dir, keep_last=cfg.checkpoint.keep_last, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone)
    resume = ckpt.resolve_resume(cfg.checkpoint.resume_from)
    if resume is not None:
        state = ckpt.load(resume)
        adapter.load_lora_state_dict(state.trainable_state)
        restore_training_state(state, optimizer, lr_scheduler)
        restore_rng(state, generators={"sampler": sampler_gen})
    ...
    ckpt.save(step, trainable_state=adapter.lora_state_dict(), ema_state=ema.state_dict(), optimizer=optimizer,
              lr_scheduler=lr_scheduler, counters={"step": step, "epoch": epoch},
              sampler_state=prompt_sampler.state_dict(), config=to_dict(cfg))
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from diffalign.config import UserError

__all__ = [
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "RunDirInUseError",
    "lock_run_dir",
    "CheckpointManager",
    "CheckpointState",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "missing_files",
    "resolve_resume",
    "load_checkpoint",
    "restore_rng",
    "restore_training_state",
    "capture_rng_state",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
_NAME_RE = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, or does not fit what it is loaded into."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (a full disk, a read-only folder): nothing was published and the
    previous checkpoint is intact. An :class:`OSError` too, for callers that catch the underlying error."""


class RunDirInUseError(UserError, RuntimeError):
    """Another training run holds the run folder's lock (:func:`lock_run_dir`)."""


#: The lock file of a run folder (:func:`lock_run_dir`); it stays after the run, naming its last holder.
LOCK_FILE = ".diffalign.lock"


def lock_run_dir(run_dir: PathLike) -> Optional[Any]:
    """Take the exclusive lock of ``run_dir`` for one training run; returns the open lock file (the lock lasts
    until it is closed or the process ends, also by a kill) or ``None`` where locks are unavailable (no
    ``fcntl`` on Windows, or a filesystem without locks: a warning).

    Two runs writing one folder delete each other's temporary checkpoints, move each other's checkpoints aside as
    a replaced run and truncate each other's metrics log; the second is refused with
    :class:`RunDirInUseError` naming the holder (its pid, host and start time, written into the file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    import socket

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(run_dir) / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} "):
            holder += ": an earlier trainer in this process, whose cleanup() was not called"
        raise RunDirInUseError(f"{run_dir} is in use by another training run ({holder}); wait for it to finish or "
                               "stop it, or give this run another output_dir") from None
    except OSError as exc:  # e.g. a network filesystem without lock support: run unprotected
        handle.close()
        warnings.warn(f"could not lock {run_dir} ({exc}); nothing stops a second run from writing to it",
                      stacklevel=2)
        return None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
    except OSError:  # e.g. a full disk: let go of the lock before the error surfaces
        handle.close()
        raise
    return handle


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``step-00000100``."""
    return f"step-{int(step):08d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{int(rank)}.pt"


# ----------------------------------------------------------------------------------------------------
# low-level writers (module functions so tests can make one of them fail)
# ----------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the renames inside ``path`` durable; not supported on every platform (Windows), hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_os_error(exc: BaseException) -> Optional[OSError]:
    """The operating system's error behind a failed write (a full disk, a lost permission), or ``None``.
    ``torch.save`` reports it as a ``RuntimeError`` of its zip writer raised while handling the ``OSError``, and
    safetensors as a ``SafetensorError`` ("I/O error: ... (os error 28)")."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(seen))
        if found:
            return OSError(int(found.group(2)), found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(_plain_tensors(tensors), str(path), metadata=metadata)
    _fsync_path(path)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses tied tensors): clone only where needed."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state entry {key!r} is a {type(value).__name__}, not a tensor; weight dicts "
                                  "hold tensors only (put other values in counters / extra)")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _json_text(data: Any, what: str) -> str:
    try:
        return json.dumps(data, indent=2, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {exc}; "
                              "convert tensors with .tolist() / .item()") from None


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """This process's RNG states as tensors / ints / floats / strings only (``weights_only`` loadable):
    torch CPU, every CUDA device (if CUDA is initialised), numpy's global ``RandomState``, python ``random``,
    and the given named ``torch.Generator`` objects."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state[0]),
            # uint32 words fit in int64; torch has no uint32 tensors that weights_only reads everywhere
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the state of this process's device only: restored into its device on resume, whatever devices the
        # resumed process sees (every rank saving all visible devices, restored by index, swapped ranks' states
        # when a resume saw one GPU per process)
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(rng: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda_device" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda_device"])  # this process's (current) device
    elif "cuda" in rng and torch.cuda.is_available():  # checkpoints before: every visible device, by index
        cuda_states = list(rng["cuda"])
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(cuda_states)} devices, this process sees "
                          f"{torch.cuda.device_count()}; restoring the first ones only", stacklevel=3)
        for device, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    n = rng["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = rng["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    saved = rng.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            warnings.warn(f"checkpoint has no state for generator {name!r} (saved: {sorted(saved) or 'none'}); "
                          "it keeps its current state", stacklevel=3)
            continue
        gen.set_state(saved[name])


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


@dataclass
class CheckpointState:
    """Everything :meth:`CheckpointManager.save` wrote, as loaded for one rank.

    ``trainable_state`` / ``ema_state``: name -> tensor (CPU). ``*_state`` of optimizer, scheduler and scaler:
    their ``state_dict()`` (CPU tensors; ``load_state_dict`` moves them to the parameters' device).
    ``rng_state``: this rank's RNG states, ``None`` when the checkpoint has none for this rank.
    """

    path: Path
    step: int
    trainable_state: Dict[str, torch.Tensor]
    ema_state: Optional[Dict[str, torch.Tensor]]
    optimizer_state: Optional[Dict[str, Any]]
    scheduler_state: Optional[Dict[str, Any]]
    scaler_state: Optional[Dict[str, Any]]
    rng_state: Optional[Dict[str, Any]]
    counters: Dict[str, Any]
    sampler_state: Dict[str, Any]
    extra: Dict[str, Any]
    config: Dict[str, Any]
    world_size: int
    time: float
    rank: int = 0
    files: List[str] = field(default_factory=list)


def _read_state_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path / STATE_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {exc}") from None
    if not isinstance(data, dict) or "files" not in data:
        raise CheckpointError(f"{path / STATE_FILE} is not a diffalign checkpoint state (no 'files' list)")
    return data


def missing_files(path: PathLike) -> List[str]:
    """Files a complete checkpoint at ``path`` lacks ([] = complete); ``state.json`` lists them."""
    path = Path(path)
    if not path.is_dir():
        return ["(the folder itself)"]
    if not (path / STATE_FILE).is_file():
        return [STATE_FILE]
    try:
        listed = _read_state_json(path)["files"]
    except CheckpointError:
        return [f"{STATE_FILE} (unreadable)"]
    return [name for name in listed if not (path / name).is_file()]


def _step_of(path: Path) -> Optional[int]:
    m = _NAME_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: PathLike, complete_only: bool = True) -> List[Path]:
    """Checkpoint folders of ``run_dir``, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    if complete_only:
        found = [p for p in found if not missing_files(p)]
    return sorted(found, key=lambda p: _step_of(p))


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint ``latest`` names, or a newer one written after it: ``latest`` is rewritten just
    after a new folder is renamed into place, so a kill between the two leaves it one checkpoint behind; a complete
    checkpoint of a higher step whose ``state.json`` is newer than the ``latest`` file is that interrupted save's,
    and is used (with a warning). (A higher step that is older than ``latest`` belongs to a replaced timeline, when
    ``latest`` was deliberately pointed back by a save of a lower step.) If ``latest`` is absent or names an
    incomplete folder, the newest complete checkpoint; ``None`` if there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    found = list_checkpoints(run_dir)
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = root / name
        if name and not missing_files(target):
            written = pointer.stat().st_mtime
            after = [p for p in found if _step_of(p) > _step_of(target) and (p / STATE_FILE).stat().st_mtime > written]
            if after:
                warnings.warn(f"{pointer} names {name!r}, but the complete {after[-1].name} was written after it (a "
                              f"save was interrupted before it updated {LATEST_FILE}); using {after[-1].name}",
                              stacklevel=2)
                return after[-1]
            return target
        warnings.warn(f"{pointer} names {name!r}, which is not a complete checkpoint; using the newest complete "
                      "one instead", stacklevel=2)
    return found[-1] if found else None


def _available(run_dir: PathLike) -> str:
    names = [p.name for p in list_checkpoints(run_dir)] if Path(run_dir).is_dir() else []
    return f"{run_dir} has {', '.join(names)}" if names else f"{run_dir} has no complete checkpoint"


def resolve_resume(run_dir: PathLike, resume_from: Optional[PathLike], key: str = "resume_from") -> Optional[Path]:
    """Which checkpoint to resume from (or, for ``diffalign export``, to export; ``key`` names the setting in
    messages).

    ``None`` / ``""``: start fresh (``None``). ``"latest"``: the newest complete checkpoint of ``run_dir``, or
    ``None`` when there is none yet (so one config both starts and resumes a run). A path (or a checkpoint
    name inside ``run_dir/checkpoints``): that folder, which must be a complete checkpoint.
    """
    if resume_from is None or str(resume_from).strip() == "":
        return None
    text = os.fspath(resume_from).strip()
    if text == "latest":
        return latest_checkpoint(run_dir)
    path = Path(text).expanduser()
    if not path.exists() and (Path(run_dir) / CHECKPOINTS_DIR / text).exists():
        path = Path(run_dir) / CHECKPOINTS_DIR / text
    if path.is_file() and path.name == LATEST_FILE and path.parent.name == CHECKPOINTS_DIR:
        # the run's `latest` pointer given as a path: the newest complete checkpoint of that run, as 'latest' is
        found = latest_checkpoint(path.parent.parent)
        if found is None:
            raise CheckpointError(f"{key}={text!r} is the run's pointer to its latest checkpoint, and the run has no "
                                  "complete checkpoint yet")
        return found
    if not path.exists():
        fresh = ", or null to start fresh" if key == "resume_from" else ""
        names = Path(run_dir).is_dir() and list_checkpoints(run_dir)
        raise CheckpointError(f"{key}={text!r}: no such folder ({_available(run_dir)}); give 'latest', "
                              f"{'one of those names ' if names else ''}or a checkpoint folder such as "
                              f"{Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(100)}{fresh}")
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / STATE_FILE).exists():
        raise CheckpointError(f"{key}={text!r} is a run folder, not a checkpoint; give one of its "
                              f"checkpoints ({path / CHECKPOINTS_DIR}/step-*) or set output_dir={text} "
                              "resume_from=latest")
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{key}={text!r} is not a complete checkpoint: missing {missing}; it may be "
                              "from an interrupted save: pick an older checkpoint or 'latest'")
    return path


def load_checkpoint(path: PathLike, rank: int = 0, world_size: Optional[int] = None) -> CheckpointState:
    """Read a checkpoint for process ``rank`` (safetensors and ``torch.load(weights_only=True)`` only).

    Warns when ``world_size`` (the current number of processes) differs from the saved one: ranks the
    checkpoint has no RNG file for start from their current RNG state, so sampling will not replay exactly.
    """
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: missing {missing}")
    from safetensors.torch import load_file

    meta = _read_state_json(path)
    files = list(meta["files"])
    saved_ws = int(meta.get("world_size", 1))
    if world_size is not None and int(world_size) != saved_ws:
        warnings.warn(f"checkpoint {path.name} was saved by {saved_ws} process(es), resuming with {world_size}: "
                      "weights, optimizer and counters are restored, but RNG streams of ranks without a saved "
                      "state keep their fresh seeds and the sampler may not replay the same prompts",
                      stacklevel=2)
    rng = None
    if rng_file(rank) in files:
        rng = _read(path, rng_file(rank), _load_torch)
    else:
        warnings.warn(f"checkpoint {path.name} has no RNG state for rank {rank} (saved ranks 0..{saved_ws - 1}); "
                      "this rank keeps its current RNG state", stacklevel=2)

    def optional(name: str, loader: Callable[[Path], Any]) -> Any:
        return _read(path, name, loader) if name in files else None

    def weights(p: Path) -> Dict[str, torch.Tensor]:
        state = load_file(str(p), device="cpu")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # a checkpoint of non-finite weights is never written: the file changed on disk
            raise ValueError(f"{len(bad)} tensors are not finite (first: {bad[0]})")
        return state

    return CheckpointState(
        path=path,
        step=int(meta["step"]),
        trainable_state=_read(path, TRAINABLE_FILE, weights),
        ema_state=optional(EMA_FILE, weights),
        optimizer_state=optional(OPTIMIZER_FILE, _load_torch),
        scheduler_state=optional(SCHEDULER_FILE, _load_torch),
        scaler_state=optional(SCALER_FILE, _load_torch),
        rng_state=rng,
        counters=dict(meta.get("counters") or {}),
        sampler_state=dict(meta.get("sampler_state") or {}),
        extra=dict(meta.get("extra") or {}),
        config=_read(path, CONFIG_FILE, lambda p: _read_config(p.parent)),
        world_size=saved_ws,
        time=float(meta.get("time", 0.0)),
        rank=int(rank),
        files=files,
    )


def _read(path: Path, name: str, loader: Callable[[Path], Any]) -> Any:
    """``loader(path / name)``; a file that cannot be read (truncated, overwritten, damaged on disk) is a
    :class:`CheckpointError` naming it and an older checkpoint to use instead, not a parser's traceback."""
    try:
        return loader(path / name)
    except (CheckpointError, MemoryError):  # too little memory says nothing about the file
        raise
    except (PermissionError, FileNotFoundError, NotADirectoryError) as exc:  # access, not the file's contents
        raise CheckpointError(f"{path / name} cannot be read: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors, torch.load and yaml each raise their own types
        step = _step_of(path)
        older = [p for p in list_checkpoints(path.parent.parent)
                 if step is not None and (_step_of(p) or 0) < step]
        instead = (f"use the checkpoint before it, {older[-1]} (checkpoint.resume_from=PATH; export: --checkpoint "
                   "PATH)" if older else "this run has no older checkpoint: start afresh (checkpoint.resume_from=null)")
        raise CheckpointError(f"{path / name} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              f"the checkpoint is damaged: {instead}") from None


def _read_config(path: Path) -> Dict[str, Any]:
    import yaml

    with open(path / CONFIG_FILE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data or {}


#: ``model.lora`` keys that decide what a checkpoint's weights mean: another value cannot load them (``enabled``,
#: ``rank``, ``target_modules``) or silently changes the function they compute (``alpha``)
LORA_WEIGHT_KEYS = ("enabled", "rank", "alpha", "target_modules")

#: keys a resumed run may change without a warning (its length, limits, where and how it logs and checkpoints)
_RESUME_FREE = ("output_dir", "checkpoint.", "logging.", "model.device", "train.num_epochs", "train.max_minutes",
                "train.stop_after_epochs", "train.eval_every")


def _flat(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_config(state: CheckpointState, model_cfg: Any, use: str) -> None:
    """Refuse to load ``state``'s weights into a model configured with other ``model.lora`` settings than the
    run that wrote them (:data:`LORA_WEIGHT_KEYS`); ``use`` names what the caller does (for the message).
    Checkpoints without a recorded config are not checked."""
    saved = (state.config or {}).get("model", {}).get("lora")
    if not isinstance(saved, Mapping):
        return
    now = getattr(model_cfg, "lora", None)
    if now is None or (not saved.get("enabled", True) and not now.enabled):
        return  # full fine-tuning on both sides: the LoRA settings are unused
    diffs = [f"model.lora.{k}: checkpoint {saved[k]!r}, config {getattr(now, k)!r}" for k in LORA_WEIGHT_KEYS
             if k in saved and _norm(saved[k], k) != _norm(getattr(now, k), k)]
    if diffs:
        raise CheckpointError(
            f"cannot {use} {state.path}: its weights were trained with other model.lora settings ({'; '.join(diffs)}). "
            "Use the checkpoint's values (drop the overrides, or see its config.yaml), or start fresh with "
            "checkpoint.resume_from=null")


def _norm(v: Any, key: str = "") -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(sorted(v)) if key.endswith("target_modules") else tuple(v)  # peft treats modules as a set
    return v


def config_changes(state: CheckpointState, config: Mapping[str, Any], limit: int = 12) -> List[str]:
    """``KEY: checkpoint A -> now B`` for every key of the resolved ``config`` that differs from the one the
    checkpoint recorded, except those a resume may change freely (:data:`_RESUME_FREE`) and keys the checkpoint
    does not record (settings added to diffalign after it was written)."""
    saved, now = _flat(state.config or {}), _flat(config)
    keys = sorted(k for k in set(saved) & set(now)
                  if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _RESUME_FREE)
                  and _norm(saved[k], k) != _norm(now[k], k))
    lines = [f"{k}: checkpoint {saved.get(k)!r} -> now {now.get(k)!r}" for k in keys[:limit]]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def restore_rng(state: CheckpointState, generators: Optional[Mapping[str, torch.Generator]] = None) -> bool:
    """Put this rank's RNG states back (torch, CUDA, numpy, python ``random``, and the named generators
    that were saved with ``save(..., generators=...)``). Returns ``False`` (with a warning) when the
    checkpoint has no RNG state for this rank."""
    if state.rng_state is None:
        warnings.warn(f"no RNG state for rank {state.rank} in {state.path}; RNG not restored", stacklevel=2)
        return False
    _set_rng_state(state.rng_state, generators)
    return True


def restore_training_state(state: CheckpointState, optimizer: Any = None, lr_scheduler: Any = None,
                           grad_scaler: Any = None) -> None:
    """``load_state_dict`` of each object given from the checkpoint. An object whose state the checkpoint
    lacks is left as is, with a warning (e.g. a scaler added when switching to fp16)."""
    for obj, saved, what in ((optimizer, state.optimizer_state, "optimizer"),
                             (lr_scheduler, state.scheduler_state, "lr scheduler"),
                             (grad_scaler, state.scaler_state, "grad scaler")):
        if obj is None:
            continue
        if saved is None:
            warnings.warn(f"checkpoint {state.path.name} has no {what} state; the {what} starts fresh", stacklevel=2)
            continue
        obj.load_state_dict(saved)


# ----------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------


def _dump_config(config: Any) -> str:
    from diffalign.config import dump_yaml

    return dump_yaml({} if config is None else config)


def _file_id(path: Path) -> Optional[Tuple[int, int]]:
    """``(device, inode)`` of ``path`` (kept by a rename), or None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class CheckpointManager:
    """Saves, lists, prunes and loads the checkpoints of ``run_dir`` for process ``rank`` of ``world_size``.

    ``barrier``: a callable every process calls together (``accelerator.wait_for_everyone``); required when
    ``world_size > 1``. ``keep_last``: how many checkpoints to keep (``None`` = all); the one ``latest``
    names is never deleted.
    """

    def __init__(self, run_dir: PathLike, keep_last: Optional[int] = 3, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], Any]] = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if world_size > 1 and barrier is None:
            raise ValueError(f"world_size={world_size} needs a barrier (e.g. accelerator.wait_for_everyone) so that "
                             "every rank can write its RNG state before rank 0 publishes the checkpoint")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self._aside_after: Optional[int] = None  # set_aside_after
        self.run_lock: Optional[Any] = None  # the run folder's lock file while a trainer holds it (lock_run_dir)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._barrier_fn = barrier

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def _barrier(self) -> None:
        if self._barrier_fn is not None:
            self._barrier_fn()

    def set_aside_after(self, step: int) -> List[str]:
        """Mark the checkpoints of a step above ``step`` as another timeline (a resume from an older checkpoint, or
        ``step=-1``: a fresh start or a resume from outside this folder): just before this run publishes its
        first checkpoint, :meth:`save` moves them (and the leftovers of their interrupted saves) into
        ``checkpoints/superseded-<time>/``, kept but out of the way. Otherwise ``keep_last`` pruning, which ranks
        by step, would delete the live run's checkpoints before those, and a ``latest`` fallback could pick
        them. Until then nothing moves, so a run that fails before its first checkpoint leaves the folder as it
        was. Call on every rank; returns the names that will move (all ranks see the same folder)."""
        self._aside_after = int(step)
        return [p.name for p in self._above(self._aside_after)]

    def _above(self, step: int) -> List[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            bare = p.name[len(_OLD_PREFIX):] if p.name.startswith(_OLD_PREFIX) else p.name
            n = _step_of(Path(bare))
            if p.is_dir() and n is not None and n > step:
                found.append(p)
        return sorted(found, key=lambda p: p.name)

    def _move_aside(self) -> Optional[BaseException]:
        """The deferred move of :meth:`set_aside_after` (every rank calls it at the start of a save; rank 0 moves,
        and every rank passes the barrier whatever happens). Returns rank 0's error instead of raising it, so that
        :meth:`save` skips the write and every rank still passes its barriers (a raise here left the other ranks
        waiting at the next one)."""
        step, self._aside_after = self._aside_after, None
        if step is None:
            return None
        error: Optional[BaseException] = None
        try:
            above = self._above(step) if self.rank == 0 else []
            if above:
                dest = self.checkpoints_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
                while dest.exists():
                    dest = dest.with_name(dest.name + "x")
                dest.mkdir()
                for p in above:
                    os.replace(p, dest / p.name)
                pointer = self.checkpoints_dir / LATEST_FILE
                if pointer.is_file() and (dest / pointer.read_text(encoding="utf-8").strip()).is_dir():
                    kept = list_checkpoints(self.run_dir)  # `latest` named a moved one: the newest left, or none
                    if kept:
                        _write_text_atomic(pointer, kept[-1].name + "\n")
                    else:
                        pointer.unlink()
                _fsync_dir(self.checkpoints_dir)
                print(f"moved the replaced run's checkpoints {[p.name for p in above]} to {dest}", flush=True)
        except Exception as exc:  # noqa: BLE001 - raised by save() after its barriers
            error = exc
        finally:
            self._barrier()
        return error

    # ------------------------------------------------------------------ queries
    def checkpoints(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.run_dir)

    def resolve_resume(self, resume_from: Optional[PathLike]) -> Optional[Path]:
        return resolve_resume(self.run_dir, resume_from)

    def load(self, path: PathLike) -> CheckpointState:
        return load_checkpoint(path, rank=self.rank, world_size=self.world_size)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        trainable_state: Mapping[str, torch.Tensor],
        ema_state: Optional[Mapping[str, torch.Tensor]] = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        grad_scaler: Any = None,
        counters: Optional[Mapping[str, Any]] = None,
        sampler_state: Optional[Mapping[str, Any]] = None,
        config: Any = None,
        extra: Optional[Mapping[str, Any]] = None,
        generators: Optional[Mapping[str, torch.Generator]] = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and return its folder. Call on EVERY rank.

        Weights, optimizer, scheduler, scaler, config and ``state.json`` are taken from rank 0's arguments
        (other ranks may pass empty dicts); each rank saves its own RNG state and ``generators``.
        ``counters`` / ``sampler_state`` / ``extra`` must be JSON-serialisable; ``config`` is a dict or a
        config dataclass. On error nothing is published, the temporary folder is removed, and the error is
        raised on the rank where it happened (the other ranks raise a CheckpointError).
        """
        step = int(step)
        error: Optional[BaseException] = self._move_aside()
        name = checkpoint_name(step)
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f"{_TMP_PREFIX}{name}"
        files: List[str] = []
        published = False
        mine = None  # (device, inode) of this rank's RNG file: proof, after the publish, that it is this save's
        try:
            if self.rank == 0 and error is None:
                try:
                    # JSON problems surface before anything is written
                    _json_text([counters, sampler_state, extra], "counters / sampler_state / extra")
                    self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
                    self._remove_stale()
                    tmp.mkdir()
                except Exception as exc:  # noqa: BLE001 - re-raised after the barriers
                    error = exc
            self._barrier()
            # 1. every rank: its RNG file (rank 0 also writes everything else)
            if error is None and tmp.is_dir():
                try:
                    _save_torch(capture_rng_state(generators), tmp / rng_file(self.rank))
                    mine = _file_id(tmp / rng_file(self.rank))
                    if self.rank == 0:
                        files = self._write_payload(tmp, step, trainable_state, ema_state, optimizer,
                                                    lr_scheduler, grad_scaler, config)
                except Exception as exc:  # noqa: BLE001
                    error = exc
            self._barrier()
            # 2. rank 0: state.json last, then publish
            if self.rank == 0 and error is None:
                try:
                    files += [rng_file(r) for r in range(self.world_size)]
                    absent = [f for f in files if not (tmp / f).is_file()]
                    if absent:
                        raise CheckpointError(f"checkpoint {name}: files {absent} were not written (did every rank "
                                              "call save()? is the run dir on a filesystem all ranks share?)")
                    state = {
                        "format_version": FORMAT_VERSION,
                        "step": step,
                        "counters": dict(counters or {"step": step}),
                        "sampler_state": dict(sampler_state or {}),
                        "extra": dict(extra or {}),
                        "world_size": self.world_size,
                        "time": time.time(),
                        "files": files,
                    }
                    _write_text(tmp / STATE_FILE, _json_text(state, "counters / sampler_state / extra"))
                    _fsync_dir(tmp)
                    self._publish(tmp, final)
                    published = True
                except Exception as exc:  # noqa: BLE001
                    error = exc
            if published:
                self._prune(keep=final)
        finally:
            if self.rank == 0 and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        os_error = None if error is None or isinstance(error, CheckpointError) else write_os_error(error)
        if os_error is not None:
            error = os_error
            previous = latest_checkpoint(self.run_dir)
            raise CheckpointWriteError(
                f"could not write checkpoint {name} in {self.checkpoints_dir}: {error.strerror or error}; nothing "
                f"was published and {previous.name if previous else 'no earlier checkpoint'} is intact: free disk "
                "space (or fix the folder's permissions), then run the same command to resume from it") from error
        if error is not None:
            raise error
        if self.rank != 0:
            # `latest` naming this step is not enough: a re-save of the step it names (a resume that saves the step
            # it resumed from, or the replaced timeline's copy of that step) would pass on the earlier copy
            pointer = self.checkpoints_dir / LATEST_FILE
            published_here = (pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == name
                              and not missing_files(final) and mine is not None
                              and _file_id(final / rng_file(self.rank)) == mine)
            if not published_here:
                raise CheckpointError(f"checkpoint {name} was not published by rank 0 (see its error)")
        return final

    def _write_payload(self, tmp: Path, step: int, trainable_state, ema_state, optimizer, lr_scheduler,
                       grad_scaler, config) -> List[str]:
        if trainable_state is None or len(trainable_state) == 0:
            raise CheckpointError("trainable_state is empty; pass adapter.lora_state_dict() (LoRA) or the "
                                  "denoiser's state_dict() (full fine-tuning)")
        # Serialise the config first: a bad value fails before any large file is written.
        config_text = _dump_config(config)
        meta = {"format": "pt", "step": str(step)}
        files = [TRAINABLE_FILE, CONFIG_FILE]
        _save_safetensors(trainable_state, tmp / TRAINABLE_FILE, {**meta, "kind": "trainable"})
        if ema_state is not None:
            _save_safetensors(ema_state, tmp / EMA_FILE, {**meta, "kind": "ema"})
            files.append(EMA_FILE)
        for obj, filename in ((optimizer, OPTIMIZER_FILE), (lr_scheduler, SCHEDULER_FILE),
                              (grad_scaler, SCALER_FILE)):
            if obj is not None:
                _save_torch(obj.state_dict(), tmp / filename)
                files.append(filename)
        _write_text(tmp / CONFIG_FILE, config_text)
        return files

    def _publish(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # re-saving a step (e.g. right after resuming): move the old copy aside first
            old = final.with_name(_OLD_PREFIX + final.name)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        moved = False
        try:
            os.replace(tmp, final)
            moved = True
            _fsync_dir(self.checkpoints_dir)
            _write_text_atomic(self.checkpoints_dir / LATEST_FILE, final.name + "\n")
            _fsync_dir(self.checkpoints_dir)
        except BaseException:
            # Roll back to exactly the state before this save: `latest` still names the previous checkpoint.
            if moved:
                os.replace(final, tmp)
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Temporary folders of saves that crashed (only one run writes to a run dir at a time)."""
        for p in self.checkpoints_dir.iterdir():
            if not p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                continue
            original = self.checkpoints_dir / p.name[len(_OLD_PREFIX):]
            if p.name.startswith(_OLD_PREFIX) and p.is_dir() and not original.exists() and not missing_files(p):
                # killed between moving a same-step checkpoint aside and renaming its successor in: put it back
                os.replace(p, original)
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        found = list_checkpoints(self.run_dir, complete_only=False)
        for old in found[: max(0, len(found) - self.keep_last)]:
            if old.name == keep.name:
                continue
            try:
                shutil.rmtree(old)
            except OSError as exc:  # the new checkpoint is safe; a failed cleanup must not fail the save
                warnings.warn(f"could not delete old checkpoint {old}: {exc}", stacklevel=3)


def __getattr__(name: str) -> Any:
    # export_checkpoint / export_main lived here before diffalign.export; keep old imports working
    if name in ("export_checkpoint", "export_main"):
        from diffalign import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
