"""The GRPO trainer's MARBLE full mode and GDPO aggregation on a tiny random SD3 pipeline."""

from __future__ import annotations

import pytest

from diffalign.logging import read_metrics
from grpo_helpers import run_config, save_tiny
from trainers.grpo import GRPOTrainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("aggregation", ["marble", "gdpo"])
def test_grpo_multi_reward_aggregation(tmp_path, aggregation):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run",
                     sample={"group_size": 2, "num_batches_per_epoch": 1},
                     rewards=[{"name": "jpeg_compressibility"}, {"name": "shapes"}],
                     train={"num_epochs": 1, "gradient_accumulation_steps": 1, "beta": 0.04,
                            "aggregation": aggregation})
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["train/updates"] == 1 and row["train/ratio_mean"] == 1.0
    assert any(v.abs().sum() > 0 for k, v in trainer.adapter.lora_state_dict().items() if "lora_B" in k)
    if aggregation == "marble":
        alphas = [row[f"train/marble/alpha/{n}"] for n in ("jpeg_compressibility", "shapes")]
        assert abs(sum(alphas) - 1) < 1e-9 and min(alphas) >= 0
        assert row["train/marble/worst_cos"] >= -1e-6
