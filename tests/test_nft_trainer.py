"""DiffusionNFT trainer on a tiny random SD3 pipeline: every aggregation mode trains, resume equality."""

from __future__ import annotations

import pytest
import torch

from diffalign.checkpoint import resolve_resume
from diffalign.logging import read_metrics
from grpo_helpers import run_config, save_tiny, train_run
from trainers.nft import NFTTrainer

REWARDS = [{"name": "jpeg_compressibility"}, {"name": "shapes"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def nft_config(model, out, train=None, **overrides):
    """4 samples (2 prompts x group 2) per epoch, one minibatch, 3 trained timesteps, one update."""
    t = {"num_epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
         "eval_every": 0, "kl_weight": 1e-2}
    t.update(train or {})
    return run_config(model, out, trainer="nft",
                      sample={"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 1},
                      rewards=overrides.pop("rewards", REWARDS), train=t, **overrides)


def _train(cfg):
    return train_run(cfg, NFTTrainer)


@pytest.mark.parametrize("train", [
    {"aggregation": "weighted_sum", "grad_diagnostics_every": 1},
    {"aggregation": "gdpo"},
    {"aggregation": "marble", "marble_mode": "full"},
    {"aggregation": "marble", "marble_mode": "full", "marble_batched_backward": True},
], ids=["weighted_sum", "gdpo", "marble_full", "marble_full_vmapped"])
def test_each_aggregation_trains_and_logs(tmp_path, train):
    trainer = _train(nft_config(save_tiny(tmp_path), tmp_path / "run", {"num_epochs": 1, **train}))
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["train/updates"] == 1
    assert any(v.abs().sum() > 0 for k, v in trainer.adapter.lora_state_dict().items() if "lora_B" in k)
    # old = current before the first update, so the implicit policies start at the trained one
    assert row["train/approx_kl"] == 0.0
    if train.get("aggregation") == "marble" or train.get("grad_diagnostics_every"):
        assert -1.0 <= row["marble/worst_cos"] <= 1.0
    if train.get("aggregation") == "marble":
        alphas = [row[f"marble/alpha/{n}"] for n in ("jpeg_compressibility", "shapes")]
        assert abs(sum(alphas) - 1) < 1e-9 and min(alphas) >= 0
        assert row["marble/worst_cos"] >= -1e-6  # the min-norm direction never opposes a reward


@pytest.mark.parametrize("marble", [
    {"marble_mode": "amortized", "marble_every": 2},
    # tracked per-reward gradients are state: a resume that restarted them would diverge
    {"marble_mode": "full", "marble_grad_ema": 0.9},
], ids=["amortized", "full_tracked"])
def test_marble_resume_equals_uninterrupted_run(tmp_path, marble):
    model = save_tiny(tmp_path)
    train = {"num_epochs": 4, "aggregation": "marble", "ema": True, **marble}
    full = _train(nft_config(model, tmp_path / "full", train))
    _train(nft_config(model, tmp_path / "split", {**train, "stop_after_epochs": 2}))
    assert resolve_resume(tmp_path / "split", "latest").name.endswith("00000002")
    resumed = _train(nft_config(model, tmp_path / "split", train))
    a, b = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    for s, t in zip(full.old.shadow, resumed.old.shadow):
        torch.testing.assert_close(s, t, rtol=0, atol=1e-6)
    torch.testing.assert_close(full.harmonizer.alpha_bar, resumed.harmonizer.alpha_bar)
    rows = [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "epoch" in r]
    if marble["marble_mode"] == "amortized":
        assert [r["steps/refresh"] for r in rows] == [1, 0, 1, 0]  # QP on steps 0 and 2 only
    else:
        torch.testing.assert_close(full.harmonizer.tracked, resumed.harmonizer.tracked, rtol=0, atol=1e-7)
        assert full.harmonizer.num_solves == 4
    ra = [r["reward/shapes"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epoch" in r]
    assert ra == [r["reward/shapes"] for r in rows]


def test_config_rejects_stochastic_sampler(tmp_path):
    from diffalign.config import ConfigError

    cfg = nft_config(save_tiny(tmp_path), tmp_path / "run")
    cfg.sample.step = "flow_sde"
    with pytest.raises(ConfigError, match="flow_euler"):
        NFTTrainer(cfg)


@pytest.mark.parametrize("train", [
    {"aggregation": "marble", "marble_mode": "amortized", "marble_grad_ema": 0.9},
    {"aggregation": "weighted_sum", "marble_grad_ema": 0.9},
], ids=["amortized", "weighted_sum"])
def test_config_rejects_tracked_gradients_without_full_marble(tmp_path, train):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="marble_mode=full"):
        NFTTrainer(nft_config(save_tiny(tmp_path), tmp_path / "run", train))
