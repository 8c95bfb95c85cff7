"""Run logging: metrics (jsonl always; tensorboard and wandb optional), image grids, curves, progress bars.

``run_dir/metrics.jsonl`` is the source of truth: one JSON object per :meth:`MetricsLogger.log` call,
``{"step": 12, "time": 1718000000.0, "reward/shapes": 0.61, ...}``, flushed at once so a crash loses at
most the current line. On resume the lines past the checkpoint's step are dropped first, so the log of a
resumed run equals the log of an uninterrupted one. Only the main process writes anything.

Named ``diffalign.logging``; inside the package the standard library module is imported as
``import logging as _pylogging`` where needed (absolute imports never pick this file up by accident).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from diffalign.config import UserError

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics", "save_image_grid", "plot_curves", "progress"]

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


class _MissingLogger(UserError, ImportError):
    """A logger the config asks for is not installed: a user error (one line from the CLI), and an ImportError."""


PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"reward": {"shapes": 1}}`` -> ``{"reward/shapes": 1}``."""
    out: Dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _plain(key: str, value: Any) -> Any:
    """A JSON value: numbers (non-finite -> null, so the file stays strict JSON), strings, bools, lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars / 0-d arrays
        value = value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(key, v) for v in value]
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log numbers, strings or lists of them "
                    "(images go through log_images)")


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of a run dir), in file order. A line cut short by a crash
    is skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist; give a run dir or its {METRICS_FILE}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: skipping a malformed line (interrupted write?)", stacklevel=2)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _truncate_after(path: Path, step: int) -> int:
    """Drop the records with ``step > step`` (and malformed lines); atomic rewrite. Returns how many records had a
    later step (malformed lines are not counted)."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


def _grid_step(filename: str) -> Optional[int]:
    """The step of an image grid file ``{tag}-step{step:06d}.png`` (:meth:`MetricsLogger.log_images`), or None."""
    stem = filename[:-4] if filename.endswith(".png") else ""
    head, sep, digits = stem.rpartition("-step")
    return int(digits) if sep and head and digits.isdigit() else None


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl`` and, optionally, tensorboard and wandb.

    ``is_main=False`` (every process but the main one) makes every method a no-op that touches no file.
    ``resume_step``: the step of the checkpoint a resumed run starts from; records after it are removed
    from the jsonl (and tensorboard purges its events from ``resume_step + 1`` on). A run that starts afresh in a
    folder that already has a log passes ``-1``: the old jsonl is moved aside to ``metrics.<time>.jsonl`` (with a
    warning), tensorboard appends, and a new W&B run begins. ``wandb_config``: the
    resolved run config shown in the W&B UI; the W&B run id is kept in ``run_dir`` so a resume continues it.

    W&B cannot rewrite a run's history (it drops a logged step lower than the run's last one), so a resume that
    redoes steps the log already has (the run went on past its last checkpoint) does not continue the old W&B run:
    it starts a new one, named after the old, whose history is replayed from the truncated ``metrics.jsonl`` up to
    ``resume_step`` (scalars; image grids are not replayed), with a warning. The new run's config records
    ``wandb_resumed_from`` (the old run's id); the old run stays as it was.
    """

    def __init__(self, run_dir: PathLike, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: Optional[str] = None, is_main: bool = True, resume_step: Optional[int] = None,
                 wandb_config: Optional[Mapping[str, Any]] = None, run_name: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.is_main = bool(is_main)
        self.resume_step = resume_step
        self.path = self.run_dir / METRICS_FILE
        self._use_tensorboard = bool(tensorboard)
        self._tb = None
        self._wandb = None
        self._file = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tb_dir = self.run_dir / TENSORBOARD_DIR
        old_log = self.path.exists() and self.path.stat().st_size > 0
        old_tb = tb_dir.is_dir() and any(tb_dir.iterdir())
        if resume_step is not None and resume_step < 0 and (old_log or old_tb):
            # a fresh start in a used folder: keep the earlier run's logs beside them (they may be all that explains
            # why that run stopped) instead of appending to them (TensorBoard showed two values per step) or
            # deleting them
            stamp = time.strftime("%Y%m%d-%H%M%S")
            moved = []
            if old_log:
                kept = self.path.with_name(f"metrics.{stamp}.jsonl")
                os.replace(self.path, kept)
                moved.append(f"the metrics log to {kept.name}")
            if old_tb:
                kept_tb = tb_dir.with_name(f"{TENSORBOARD_DIR}.{stamp}")
                os.replace(tb_dir, kept_tb)
                moved.append(f"the TensorBoard events to {kept_tb.name}")
            warnings.warn(f"{self.run_dir} already had logs and this run starts afresh: moved "
                          f"{' and '.join(moved)}", UserWarning)
        redone = 0  # records and image grids after resume_step: steps W&B has and would drop when redone
        if resume_step is not None and resume_step >= 0:
            if self.path.exists():
                redone = _truncate_after(self.path, int(resume_step))
            if wandb:  # image grids went to W&B at their own steps, also on epochs without a metrics row
                steps = (_grid_step(p.name) for p in (self.run_dir / SAMPLES_DIR).glob("*-step*.png"))
                redone += sum(1 for step in steps if step is not None and step > resume_step)
        if wandb:  # before opening the jsonl, so a missing package leaves no open file behind
            self._wandb = self._init_wandb(wandb_project or "diffalign", wandb_config, run_name, redone=redone)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run, see close()

    # ------------------------------------------------------------------ backends
    def _init_wandb(self, project: str, config: Optional[Mapping[str, Any]], run_name: Optional[str],
                    redone: int = 0):
        try:
            import wandb
        except ImportError:
            raise _MissingLogger("logging.wandb=true needs the wandb package: pip install 'diffalign[wandb]' "
                              "(or pip install wandb), or set logging.wandb=false") from None
        id_file = self.run_dir / WANDB_ID_FILE
        fresh = self.resume_step is not None and self.resume_step < 0
        old_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() and not fresh else ""
        config = dict(config) if config is not None else None
        rewind = bool(old_id) and redone > 0
        if rewind:
            # the old run's history goes past resume_step: W&B would silently drop every redone step
            warnings.warn(f"this run resumes at step {self.resume_step}, but {redone} metric record(s) or image "
                          f"grid(s) after it were logged (the run went on past its last checkpoint); W&B cannot "
                          f"rewrite run {old_id}'s history, so metrics go to a new W&B run, replayed from "
                          f"metrics.jsonl up to step {self.resume_step}", UserWarning)
            config = {**(config or {}), "wandb_resumed_from": old_id}
            run_name = f"{run_name or old_id}-resumed@{self.resume_step}"
        # our own id: wandb.util.generate_id is gone from recent wandb releases (0.31 has none)
        run_id = old_id if old_id and not rewind else secrets.token_hex(4)
        id_file.write_text(run_id + "\n", encoding="utf-8")
        run = wandb.init(project=project, id=run_id, resume="allow", dir=str(self.run_dir), name=run_name,
                         config=config)
        if rewind:
            for record in read_metrics(self.path):
                values = {k: v for k, v in record.items() if k not in ("step", "time") and v is not None}
                if values and isinstance(record.get("step"), (int, float)):
                    run.log(values, step=int(record["step"]))
        return run

    def _tensorboard(self):
        if self._tb is None and self._use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _MissingLogger("logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                                  "or set logging.tensorboard=false") from None
            # a fresh start (-1) appends to earlier event files rather than deleting them
            purge = None if self.resume_step is None or self.resume_step < 0 else int(self.resume_step) + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        return self._tb

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Write one record ``{"step", "time", **metrics}`` (nested dicts flattened with ``/``); returns it."""
        if not self.is_main:
            return None
        flat = _flatten(metrics)
        clash = {"step", "time"} & set(flat)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved (the logger adds them); rename them, "
                             "e.g. 'train/step'")
        values = {k: _plain(k, v) for k, v in flat.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        tb = self._tensorboard()
        if tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(k, v, int(step))
            tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=int(step))
        return record

    def log_images(self, step: int, images: torch.Tensor, captions: Optional[Sequence[str]] = None,
                   tag: str = "samples", ncol: int = 8) -> Optional[Path]:
        """Save ``images [B, 3, H, W]`` in [0, 1] as ``run_dir/samples/{tag}-step{step:06d}.png`` (captions under
        each tile; small images upscaled) and send the grid to tensorboard / wandb. Returns the path."""
        if not self.is_main:
            return None
        path = self.run_dir / SAMPLES_DIR / f"{tag}-step{int(step):06d}.png"
        save_image_grid(images, captions, path, ncol=ncol, scale=None)
        tb = self._tensorboard()
        if tb is not None or self._wandb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                grid = np.asarray(im.convert("RGB"))
            if tb is not None:
                tb.add_image(tag, grid, int(step), dataformats="HWC")
                tb.flush()
            if self._wandb is not None:
                import wandb

                self._wandb.log({tag: wandb.Image(grid)}, step=int(step))
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------

_PAD = 2
_CAPTION_LINES = 3
_MAX_TILE = 512


def _auto_scale(size: int) -> int:
    # Tiles of at least ~128 px so 32 px shapes images are readable; real models' images stay as they are.
    return max(1, 128 // max(1, size))


def _wrap(draw: Any, font: Any, text: str, width: int, max_lines: int) -> List[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends with '...' when text is left over."""

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    words = text.split()
    lines: List[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while not fits(current) and len(current) > 1:  # a single over-long word: hard-break it
            cut = len(current)
            while cut > 1 and not fits(current[:cut]):
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def save_image_grid(images: Any, captions: Optional[Sequence[str]], path: PathLike, ncol: int = 8,
                    scale: Optional[int] = 4) -> Path:
    """Write ``images [B, 3, H, W]`` (values in [0, 1]) as a PNG grid and return ``path``.

    Small images are upscaled by the integer ``scale`` (nearest neighbour), but tiles never grow past 512 px,
    so large images stay 1:1 (``scale=None``: just enough to reach ~128 px). Tiles are laid out
    ``min(ncol, B)`` per row with a 2 px white gutter; each caption goes under its tile in PIL's default
    font, wrapped to the tile width, at most 3 lines (then cut with '...').
    Grid size: ``W_grid = n_col * (W * scale + 2) + 2``, ``H_grid = n_row * (H * scale + caption_h + 2) + 2``.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3, H, W] (or [B, 1, H, W]), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0:
        raise ValueError("no images to put in a grid (B = 0)")
    if captions is not None and len(captions) != b:
        raise ValueError(f"got {len(captions)} captions for {b} images; give one per image or None")
    if ncol < 1:
        raise ValueError(f"ncol must be >= 1, got {ncol}")
    if scale is not None and int(scale) < 1:
        raise ValueError(f"scale must be a positive integer (or None for automatic), got {scale}")
    # Only small images are enlarged: never beyond _MAX_TILE px, so real models' 1024 px images stay 1:1.
    scale = _auto_scale(max(h, w)) if scale is None else max(1, min(int(scale), _MAX_TILE // max(h, w)))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    tile_w, tile_h = w * scale, h * scale

    n_col = min(ncol, b)
    n_row = -(-b // n_col)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, font, str(c), tile_w, _CAPTION_LINES) for c in captions] if captions else []
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    caption_h = (max(len(lines) for lines in wrapped) * line_h + 2) if wrapped and any(wrapped) else 0

    cell_w, cell_h = tile_w + _PAD, tile_h + caption_h + _PAD
    grid = Image.new("RGB", (n_col * cell_w + _PAD, n_row * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        x0 = _PAD + (i % n_col) * cell_w
        y0 = _PAD + (i // n_col) * cell_h
        grid.paste(Image.fromarray(pixels[i].permute(1, 2, 0).numpy()), (x0, y0))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x0, y0 + tile_h + 1 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------
# curves and progress
# ----------------------------------------------------------------------------------------------------


def plot_curves(metrics_jsonl: PathLike, out_png: PathLike, keys: Sequence[str], title: Optional[str] = None) -> Path:
    """Plot ``keys`` (e.g. ``"reward/shapes"``, ``"eval/reward/shapes"``) against ``step`` into a PNG.

    Records without a key, or with a null (non-finite) value, are skipped. A key with no values at all (a reward
    that always failed under ``on_error: skip``) is left out with a warning and named in the legend as
    ``<key>: no values``; the other keys are plotted. When no key has a value it is an error that lists the keys
    the file has. Uses matplotlib's Agg canvas (no display, no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("keys is empty; give the metric names to plot, e.g. ['reward/shapes']")
    records = read_metrics(metrics_jsonl)
    available = sorted({k for r in records for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"step", "time"})
    series = {}
    empty = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]
        if points:
            series[key] = points
        else:
            empty.append(key)
    if not series:
        which = f"metric {empty[0]!r} has" if len(empty) == 1 else f"metrics {empty} have"
        raise ValueError(f"{which} no values in {metrics_jsonl}; available: {available}")
    if empty:
        warnings.warn(f"{metrics_jsonl}: metric(s) {empty} have no values (every logged value null / non-finite); "
                      f"plotted without them in {out_png}", RuntimeWarning, stacklevel=2)

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    for key in empty:  # named in the legend, without a line
        ax.plot([], [], linestyle="none", label=f"{key}: no values")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def progress(iterable: Union[Iterable[Any], int, None] = None, desc: Optional[str] = None, *,
             total: Optional[int] = None, is_main: bool = True, disable: Optional[bool] = None, **kwargs: Any):
    """A tqdm bar over ``iterable`` (or a manual bar of ``total`` steps when given an int), shown on the main
    process only: ``disable`` defaults to ``not is_main``."""
    from tqdm.auto import tqdm

    if isinstance(iterable, numbers.Integral) and not isinstance(iterable, bool):
        total, iterable = int(iterable), None
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, disable=(not is_main) if disable is None else disable, **kwargs)
