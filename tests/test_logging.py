"""Run logging: jsonl records and resume truncation (a resumed log equals an uninterrupted one), tensorboard
purge on resume, image grids (size and pixels), reward curves, and silence on non-main ranks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.logging import MetricsLogger, plot_curves, progress, read_metrics, save_image_grid


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_jsonl_records(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": torch.tensor(0.5), "reward": {"shapes": np.float32(0.25), "ocr": float("nan")},
                       "lr": 1e-4, "n": np.int64(3), "phase": "train", "per_reward": torch.tensor([1.0, 2.0])})
        logger.log(2, {"loss": 0.25})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(3, {"step": 1})
        with pytest.raises(TypeError, match="metric 'bad'"):
            logger.log(3, {"bad": object()})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0]  # strict JSON: non-finite values become null
    first, second = read_metrics(tmp_path)
    assert isinstance(first["time"], float) and abs(first["time"] - second["time"]) < 60
    assert _without_time([first, second]) == [
        {"step": 1, "loss": 0.5, "reward/shapes": 0.25, "reward/ocr": None, "lr": 1e-4, "n": 3, "phase": "train",
         "per_reward": [1.0, 2.0]},
        {"step": 2, "loss": 0.25},
    ]
    assert list(first)[:2] == ["step", "time"]


def test_resume_truncates_to_an_uninterrupted_log(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with MetricsLogger(full, tensorboard=False) as logger:
        for step in range(1, 7):
            logger.log(step, {"reward": step / 10})
    with MetricsLogger(resumed, tensorboard=False) as logger:
        for step in range(1, 6):  # the run crashed after step 5, its last checkpoint was step 3
            logger.log(step, {"reward": step / 10})
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a line cut short by the crash
    with pytest.warns(UserWarning, match="malformed"):
        read_metrics(resumed)
    with MetricsLogger(resumed, tensorboard=False, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, {"reward": step / 10})
    assert _without_time(read_metrics(resumed)) == _without_time(read_metrics(full))


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 5):
            logger.log(step, {"reward/shapes": float(step), "phase": "train"})
        logger.log_images(4, torch.rand(2, 3, 8, 8), ["a", "b"])
    with MetricsLogger(tmp_path, resume_step=2) as logger:
        for step in range(3, 5):
            logger.log(step, {"reward/shapes": 10.0 * step})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/shapes")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_fresh_start_moves_the_earlier_tensorboard_events_aside(tmp_path):
    """A fresh start (resume_step=-1) in a used folder moves the earlier run's TensorBoard events aside with its
    metrics log, so the new run's scalars are its own (appended, the folder showed two values per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(3):
            logger.log(step, {"reward/shapes": 1.0})
    with pytest.warns(UserWarning, match="moved the metrics log to metrics.* and the TensorBoard events to "
                                         "tensorboard."):
        logger = MetricsLogger(tmp_path, resume_step=-1)
    with logger:
        for step in range(2):
            logger.log(step, {"reward/shapes": 2.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/shapes")] == [(0, 2.0), (1, 2.0)]
    (kept,) = tmp_path.glob("tensorboard.*")
    old = EventAccumulator(str(kept))
    old.Reload()
    assert [e.step for e in old.Scalars("reward/shapes")] == [0, 1, 2]


def _cell_pixels(grid, x0, y0, h, w, scale):
    return np.asarray(grid)[y0:y0 + h * scale, x0:x0 + w * scale]


def test_image_grid_size_and_pixels(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 4, 6)
    images[0] = 0.0  # a black tile
    path = save_image_grid(images, None, tmp_path / "g.png", ncol=3, scale=2)
    grid = Image.open(path).convert("RGB")
    assert grid.size == (3 * (6 * 2 + 2) + 2, 2 * (4 * 2 + 2) + 2)
    # tile 4 sits in column 1, row 1; every image pixel becomes a 2x2 block (nearest neighbour)
    expected = (images[4].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    expected = expected.repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(_cell_pixels(grid, 2 + 14, 2 + 10, 4, 6, 2), expected)
    assert np.asarray(grid)[0, :].min() == 255  # white gutter
    assert np.asarray(grid)[3, 3].max() == 0

    captions = ["red circle", "a very long caption " * 10, "", "x", "y"]
    path = save_image_grid(images, captions, tmp_path / "c.png", ncol=3, scale=2)
    with_text = np.asarray(Image.open(path).convert("RGB"))
    w, h = with_text.shape[1], with_text.shape[0]
    assert w == 44 and h > 22
    cell_h = (h - 2) // 2
    caption_area = with_text[2 + 8:2 + cell_h - 2, 2:2 + 12]
    assert caption_area.min() < 128  # text was drawn under tile 0
    assert np.array_equal(_cell_pixels(with_text, 2 + 14, 2 + cell_h, 4, 6, 2), expected)
    big = save_image_grid(torch.rand(2, 3, 300, 200), ["a", "b"], tmp_path / "big.png", ncol=2, scale=4)
    assert Image.open(big).size[0] == 2 * (200 + 2) + 2  # large images are not enlarged
    with pytest.raises(ValueError, match="captions for 5 images"):
        save_image_grid(images, ["one"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        save_image_grid(images[0], None, tmp_path / "bad.png")


def test_caption_wrap_truncates():
    from PIL import ImageDraw, ImageFont

    from diffalign.logging import _wrap

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default()
    lines = _wrap(draw, font, "two red circles left of a blue square " * 5, 64, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 64 for line in lines)
    assert _wrap(draw, font, "short", 64, 3) == ["short"]


def test_log_images_path_and_upscaling(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        path = logger.log_images(7, torch.rand(3, 3, 8, 8), ["a", "b", "c"], tag="eval")
    assert path == tmp_path / "samples" / "eval-step000007.png"
    width, _ = Image.open(path).size
    assert width == 3 * (8 * 16 + 2) + 2  # 8 px images are upscaled 16x to reach 128 px tiles


def test_plot_curves_with_given_keys(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            metrics = {"reward/shapes": step / 5, "loss": 1 / step}
            if step % 2 == 0:
                metrics["eval/reward/shapes"] = step / 6
            logger.log(step, metrics)
        logger.log(6, {"reward/shapes": math.nan})

    labels = {}
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        labels["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        labels["points"] = [len(line.get_xdata()) for line in ax.get_lines()]
        labels["title"] = ax.get_title()
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "reward.png",
                      ["reward/shapes", "eval/reward/shapes"], title="shapes")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == {"legend": ["reward/shapes", "eval/reward/shapes"], "points": [5, 2], "title": "shapes"}
    with pytest.raises(ValueError, match=r"'missing' has no values .* available: \['eval/reward/shapes', 'loss'"):
        plot_curves(tmp_path, tmp_path / "x.png", ["missing"])


def test_plot_curves_skips_a_metric_without_values_and_plots_the_rest(tmp_path, monkeypatch):
    """A reward column that never had a value (always failing under on_error=skip: logged as null) is named in the
    legend and warned about; the other columns are still plotted (the whole plot failed before)."""
    from matplotlib.figure import Figure

    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 4):
            logger.log(step, {"reward/shapes": step / 4, "reward/boom": math.nan})
    seen = {}
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["points"] = [list(line.get_ydata()) for line in ax.get_lines()]
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    with pytest.warns(RuntimeWarning, match=r"metric\(s\) \['reward/boom'\] have no values"):
        out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curve.png", ["reward/shapes", "reward/boom"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen == {"legend": ["reward/shapes", "reward/boom: no values"], "points": [[0.25, 0.5, 0.75], []]}
    with pytest.raises(ValueError, match=r"metrics \['reward/boom', 'x'\] have no values"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "none.png", ["reward/boom", "x"])


def test_non_main_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, tensorboard=True, is_main=False, resume_step=3)
    assert logger.log(1, {"loss": 1.0}) is None
    assert logger.log_images(1, torch.rand(2, 3, 8, 8), ["a", "b"]) is None
    logger.close()
    assert not run_dir.exists()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)


class _FakeWandb:
    """Stands in for the wandb package, with its server's rule: a run keeps one history, and a log whose step is
    below the run's last step is dropped (with a warning on the console only)."""

    def __init__(self):
        self.histories, self.configs, self.names = {}, {}, {}
        fake = self

        class Run:
            def __init__(self, run_id):
                self.id = run_id

            def log(self, values, step):
                history = fake.histories[self.id]
                if history and step < history[-1][0]:
                    return  # what W&B does with a redone step
                history.append((step, dict(values)))

            def finish(self):
                pass

        self._run = Run
        self.Image = lambda array: ("image", getattr(array, "shape", None))

    def init(self, project, id, resume, dir, name, config):  # noqa: A002 - wandb's own argument names
        assert resume == "allow"
        self.histories.setdefault(id, [])
        self.configs[id], self.names[id] = config, name
        return self._run(id)


def _wandb_history(fake, run_id):
    """The history as {step: merged values}, as W&B shows it."""
    merged = {}
    for step, values in fake.histories[run_id]:
        merged.setdefault(step, {}).update(values)
    return merged


def test_wandb_resume_that_redoes_steps_starts_a_replayed_run(tmp_path, monkeypatch):
    """A run that went on past its last checkpoint (steps 4..5 logged, checkpoint at 3) and resumes: W&B drops a
    step lower than its run's last one, so the redone steps 4..5 vanished from the W&B run. The resume now starts a
    new W&B run whose history is the jsonl's (replayed up to step 3) plus what the resumed run logs."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=-1, run_name="exp") as logger:
        for step in range(6):
            logger.log(step, {"reward": step / 10, "eval": {"shapes": 0.5} if step == 2 else None})
    first = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert set(fake.histories) == {first}
    with pytest.warns(UserWarning, match=r"resumes at step 3, but 2 metric record\(s\) or image grid\(s\) after "
                                         r"it.*new W&B run"):
        logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=3, run_name="exp",
                               wandb_config={"seed": 0})
    with logger:
        for step in (4, 5):
            logger.log(step, {"reward": step + 0.5})  # the redone steps differ from the first time
    second = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert second != first and set(fake.histories) == {first, second}
    assert fake.configs[second] == {"seed": 0, "wandb_resumed_from": first} and fake.names[second] == "exp-resumed@3"
    expected = {0: {"reward": 0.0}, 1: {"reward": 0.1}, 2: {"reward": 0.2, "eval/shapes": 0.5}, 3: {"reward": 0.3},
                4: {"reward": 4.5}, 5: {"reward": 5.5}}
    assert _wandb_history(fake, second) == expected
    jsonl = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time") and v is not None}
             for r in read_metrics(tmp_path)}
    assert jsonl == expected
    # a resume at the last logged step redoes nothing: the same W&B run goes on
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=5) as logger:
        logger.log(6, {"reward": 0.6})
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == second
    assert _wandb_history(fake, second)[6] == {"reward": 0.6} and set(fake.histories) == {first, second}


def test_wandb_resume_counts_image_grids_logged_after_the_checkpoint(tmp_path, monkeypatch):
    """With logging.log_every > 1 an epoch can send only an image grid to W&B; a resume before it redoes that
    step too, which W&B would drop from the old run."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=-1) as logger:
        logger.log(2, {"reward": 0.2})
        logger.log_images(3, torch.rand(2, 3, 8, 8), ["a", "b"])  # no metrics row at step 3
    first = (tmp_path / "wandb_run_id.txt").read_text().strip()
    with pytest.warns(UserWarning, match=r"1 metric record\(s\) or image grid\(s\)"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=2).close()
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() != first
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=3) as logger:  # nothing redone
        pass
    assert len(fake.histories) == 2


def test_progress():
    bar = progress(3, "steps")
    assert bar.total == 3 and bar.desc.startswith("steps")
    bar.close()
    quiet = progress(range(4), "rollout", is_main=False)
    assert quiet.disable and list(quiet) == [0, 1, 2, 3]
    assert progress(range(2), disable=True).disable
