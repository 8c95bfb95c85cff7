"""SIGTERM (a scheduler's preemption) during ``diffalign train``: the epoch in progress finishes, a checkpoint is
written, the command exits with 143, and resuming gives the weights of a run that was never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffalign.checkpoint import load_checkpoint, resolve_resume
from diffalign.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICK = ["train.eval_every=0", "sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1",
         "checkpoint.every=0", "checkpoint.keep_last=2", "logging.image_every=0", "train.max_minutes=null",
         "prompts.eval_size=2", "sample.eval_num_steps=2"]


def _command(out: Path, epochs: int) -> list:
    return [sys.executable, "-m", "diffalign", "train", str(REPO / "configs" / "shapes" / "flow_grpo.yaml"),
            f"output_dir={out}", f"train.num_epochs={epochs}", *QUICK]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_checkpoints_the_epoch_then_resume_equals_an_unstopped_run(tmp_path):
    split = tmp_path / "split"
    proc = subprocess.Popen(_command(split, 1000), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        log = split / "metrics.jsonl"
        while not (log.is_file() and any("epoch" in r for r in read_metrics(log))):  # an epoch has finished
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        # a second run on the same folder is refused while this one holds it
        second = subprocess.run(_command(split, 1000), cwd=REPO, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"error: {split} is in use by another training run (pid {proc.pid} on " in second.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "got SIGTERM: stopping after this epoch" in err, err
    stopped = load_checkpoint(resolve_resume(split, "latest")).counters["epoch"]
    assert 1 <= stopped < 1000
    # the config resumes from latest by itself: the message does not ask for the override
    assert f"stopped by SIGTERM after epoch {stopped}, with a checkpoint in {split}; run the same command to continue" \
        in err
    assert [r["epoch"] for r in read_metrics(split / "metrics.jsonl") if "epoch" in r] == list(range(1, stopped + 1))

    # the same command continues from the checkpoint (one more epoch) and matches a run that was never stopped
    for out in (split, tmp_path / "full"):
        done = subprocess.run(_command(out, stopped + 1), cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
    a = load_checkpoint(resolve_resume(split, "latest"))
    b = load_checkpoint(resolve_resume(tmp_path / "full", "latest"))
    assert a.counters["epoch"] == b.counters["epoch"] == stopped + 1
    for ours, theirs in ((a.trainable_state, b.trainable_state), (a.ema_state, b.ema_state)):
        assert ours.keys() == theirs.keys() and ours
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    ra = [r["reward/shapes"] for r in read_metrics(split / "metrics.jsonl") if "epoch" in r]
    rb = [r["reward/shapes"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epoch" in r]
    assert ra == rb and len(ra) == stopped + 1


@pytest.mark.parametrize("when", ["first_evaluation", "checkpoint"])
def test_a_signal_between_epochs_stops_before_the_next_one(tmp_path, when):
    """A signal that arrives after an epoch's stop decision (during the epoch-0 evaluation, or while a
    checkpoint is written) stops the run before the next epoch samples, without a second checkpoint."""
    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_helpers import run_config, save_tiny

    from diffalign.interrupt import GracefulStop
    from trainers.grpo import GRPOTrainer

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 5, "eval_every": 2},
                     checkpoint={"every": 1, "keep_last": 5, "resume_from": None})
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    saves = []
    evaluate, save = trainer.evaluate, trainer.save_checkpoint

    def evaluate_then_signal():
        out = evaluate()
        if when == "first_evaluation" and trainer.epoch == 0:
            signal.raise_signal(signal.SIGTERM)
        return out

    def save_then_signal():
        save()
        saves.append(trainer.epoch)
        if when == "checkpoint" and trainer.epoch == 1:
            signal.raise_signal(signal.SIGTERM)

    trainer.evaluate, trainer.save_checkpoint = evaluate_then_signal, save_then_signal
    try:
        with GracefulStop(announce=False):
            trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.stopped_by == signal.SIGTERM
    assert trainer.saved_any is (when == "checkpoint")  # train_main says "nothing was saved" otherwise
    trained = [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    if when == "first_evaluation":  # nothing trained, nothing to save
        assert trainer.epoch == 0 and saves == [] and trained == []
    else:
        assert trainer.epoch == 1 and saves == [1] and trained == [1]
