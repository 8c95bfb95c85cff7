"""float16 training scales its losses (trainers.common.LossScaler), so small gradients survive float16.

The loss of a real model is a mean over many latent dimensions and trained steps, so its gradients are orders of
magnitude smaller than the tiny test models'; the integration test makes the GRPO loss 1000 times smaller to be
in that regime. Without scaling, float16 activations then flush most of the gradient to zero; with it, the
update's gradient matches the float32 run's.
"""

from __future__ import annotations

import pytest
import torch
from grpo_helpers import run_config, save_tiny, train_run

import trainers.grpo as grpo_mod
from trainers.common import LossScaler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_loss_scaler_rules():
    off = LossScaler(False)
    loss = torch.tensor(3.0)
    assert off(loss) is loss and off.scale == 1.0 and not off.overflowed()
    s = LossScaler(True, init_scale=8.0, growth_interval=2, min_scale=2.0)
    assert float(s(loss)) == 24.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 8.0)
    s.unscale_([p])
    assert torch.equal(p.grad, torch.ones(2))
    assert s.overflowed() and s.scale == 4.0  # an overflow halves the scale (the step is skipped)
    s.step_done()
    s.step_done()
    assert s.scale == 8.0 and s.good_steps == 0  # growth_interval clean steps double it
    assert s.overflowed() and s.overflowed() and s.scale == 2.0
    assert not s.overflowed()  # at min_scale a non-finite gradient is a real NaN / inf, not an overflow
    restored = LossScaler(True)
    restored.load_state_dict(s.state_dict())
    assert restored.scale == 2.0 and restored.good_steps == 0
    fresh = LossScaler(True)
    fresh.load_state_dict(LossScaler(False).state_dict())  # a bfloat16 run resumed as float16: start scaling anew
    assert fresh.scale == 2.0**16


def _update_gradient(tmp_path, name, monkeypatch, factor: float, scaled: bool):
    """The gradient the optimizer sees in the first float16 update with the GRPO loss times ``factor``."""
    orig = grpo_mod.grpo_loss

    def rescaled(*args, **kwargs):
        loss, stats = orig(*args, **kwargs)
        return loss * factor, stats

    monkeypatch.setattr(grpo_mod, "grpo_loss", rescaled)
    cfg = run_config(save_tiny(tmp_path), tmp_path / name, train={"num_epochs": 1, "max_grad_norm": 0.0},
                     model={"path": save_tiny(tmp_path), "dtype": "float16",
                            "lora": {"enabled": True, "rank": 4, "alpha": 8.0}})
    from trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    gradient = _first_update_gradient(trainer, scaled)
    monkeypatch.setattr(grpo_mod, "grpo_loss", orig)
    return gradient, trainer


def _first_update_gradient(trainer, scaled: bool) -> torch.Tensor:
    """Set up and train ``trainer`` (loss scaling switched off unless ``scaled``); the gradient of its first update
    as the optimizer sees it."""
    trainer.setup()
    if not scaled:
        trainer.scaler = LossScaler(False)
    seen = []
    step = trainer.optimizer.step

    def record(*a, **k):
        seen.append(torch.cat([p.grad.detach().flatten().float().clone() for p in trainer.params]))
        return step(*a, **k)

    trainer.optimizer.step = record
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return seen[0]


def test_float16_training_with_loss_scaling_keeps_small_gradients(tmp_path, monkeypatch):
    # the same samples in every run (same seed, same float16 sampler); only the loss's size and the scaling differ.
    # The tiny model's gradients are already small: the reference is the scaled run at the loss's own size.
    ref, trainer = _update_gradient(tmp_path, "ref", monkeypatch, 1.0, scaled=True)
    small, _ = _update_gradient(tmp_path, "scaled", monkeypatch, 1e-3, scaled=True)
    raw, _ = _update_gradient(tmp_path, "raw", monkeypatch, 1e-3, scaled=False)
    assert trainer.scaler.enabled and trainer.scaler.scale == 2.0**16 and float(ref.norm()) > 0
    expected = ref * 1e-3
    cos = float(torch.nn.functional.cosine_similarity(small, expected, dim=0))
    assert cos > 0.99 and abs(float(small.norm() / expected.norm()) - 1) < 0.05, cos
    # without scaling, float16 underflow flushes most of the gradient to zero (measured: 99% zeros, cosine 0.39)
    assert float((raw == 0).float().mean()) > 0.5
    assert float(torch.nn.functional.cosine_similarity(raw, expected, dim=0)) < 0.9


def test_a_float16_overflow_halves_the_scale_and_skips_quietly(tmp_path, monkeypatch):
    from diffalign.checkpoint import load_checkpoint, resolve_resume
    from diffalign.logging import read_metrics

    orig, calls = grpo_mod.grpo_loss, {"n": 0}

    def overflow_once(*args, **kwargs):
        loss, stats = orig(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 7 else loss), stats  # a micro-step of epoch 2

    monkeypatch.setattr(grpo_mod, "grpo_loss", overflow_once)
    out = tmp_path / "run"
    cfg = run_config(save_tiny(tmp_path), out, train={"num_epochs": 3},
                     model={"path": save_tiny(tmp_path), "dtype": "float16",
                            "lora": {"enabled": True, "rank": 4, "alpha": 8.0}})
    with pytest.warns(RuntimeWarning) as record:
        trainer = train_run(cfg)
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert any("float16 gradient overflow at optimizer step 2: step skipped, loss scale halved to 32768" in m
               for m in messages)
    assert not any("non-finite gradient" in m for m in messages)  # an overflow is not a NaN run
    assert trainer.global_step == 2 and trainer.scaler.scale == 2.0**15
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/updates" in r]
    assert [r["train/overflow_steps"] for r in rows] == [0, 1, 0]
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 0]
    assert [r["train/loss_scale"] for r in rows] == [2.0**16, 2.0**15, 2.0**15]
    saved = load_checkpoint(resolve_resume(out, "latest")).sampler_state["loss_scaler"]
    assert saved == {"enabled": True, "scale": 2.0**15, "good_steps": 1}  # a resume continues with the same scale


@pytest.mark.parametrize("train", [
    {"aggregation": "marble", "beta": 0.04},
], ids=["grpo_marble_kl"])
def test_every_gradient_path_is_unscaled_once_grpo(tmp_path, monkeypatch, train):
    """MARBLE's per-reward buffers and the KL part are unscaled exactly once: the float16 update with scaling is
    the one without it up to float16 rounding (a missing or doubled unscale would be 65536x off)."""
    scaled = _first_gradient(tmp_path / "s", "grpo", train, scaled=True)
    plain = _first_gradient(tmp_path / "p", "grpo", train, scaled=False)
    ratio = float(scaled.norm() / plain.norm())
    assert 0.5 < ratio < 2.0 and float(torch.nn.functional.cosine_similarity(scaled, plain, dim=0)) > 0.8


@pytest.mark.parametrize("train", [
    {"aggregation": "marble", "marble_mode": "full"},
    {"aggregation": "weighted_sum", "grad_diagnostics_every": 1},
], ids=["nft_marble_full", "nft_diagnostics"])
def test_every_gradient_path_is_unscaled_once_nft(tmp_path, train):
    scaled = _first_gradient(tmp_path / "s", "nft", train, scaled=True)
    plain = _first_gradient(tmp_path / "p", "nft", train, scaled=False)
    ratio = float(scaled.norm() / plain.norm())
    assert 0.5 < ratio < 2.0 and float(torch.nn.functional.cosine_similarity(scaled, plain, dim=0)) > 0.8


def _first_gradient(tmp_path, trainer_name, train, scaled):
    from test_nft_trainer import REWARDS

    from trainers.grpo import GRPOTrainer
    from trainers.nft import NFTTrainer

    model = {"path": save_tiny(tmp_path), "dtype": "float16", "lora": {"enabled": True, "rank": 4, "alpha": 8.0}}
    if trainer_name == "nft":  # test_nft_trainer.nft_config's run, in float16
        cfg = run_config(save_tiny(tmp_path), tmp_path / "run", trainer="nft", rewards=REWARDS, model=model,
                         sample={"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 1},
                         train={"num_epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "eval_every": 0,
                                "gradient_accumulation_steps": 1, "kl_weight": 1e-2, "max_grad_norm": 0.0, **train})
        trainer = NFTTrainer(cfg)
    else:
        rewards = [{"name": "jpeg_compressibility"}, {"name": "colorfulness"}]
        cfg = run_config(save_tiny(tmp_path), tmp_path / "run", rewards=rewards, model=model,
                         train={"num_epochs": 1, "max_grad_norm": 0.0, **train})
        trainer = GRPOTrainer(cfg)
    return _first_update_gradient(trainer, scaled)
