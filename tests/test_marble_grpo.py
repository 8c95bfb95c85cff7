"""The GRPO trainer's MARBLE full mode and GDPO aggregation on a tiny random SD3 pipeline."""

from __future__ import annotations

import pytest

from diffalign.logging import read_metrics
from grpo_helpers import run_config, save_tiny, train_run
from trainers.grpo import GRPOTrainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("aggregation", ["marble", "gdpo"])
def test_grpo_multi_reward_aggregation(tmp_path, aggregation):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run",
                     sample={"group_size": 2, "num_batches_per_epoch": 1},
                     rewards=[{"name": "jpeg_compressibility"}, {"name": "shapes"}],
                     train={"num_epochs": 1, "gradient_accumulation_steps": 1, "beta": 0.04,
                            "aggregation": aggregation})
    trainer = train_run(cfg)
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["train/updates"] == 1 and row["train/ratio_mean"] == 1.0
    assert any(v.abs().sum() > 0 for k, v in trainer.adapter.lora_state_dict().items() if "lora_B" in k)
    if aggregation == "marble":
        # the README's keys, as the NFT trainer logs them
        alphas = [row[f"marble/alpha/{n}"] for n in ("jpeg_compressibility", "shapes")]
        assert abs(sum(alphas) - 1) < 1e-9 and min(alphas) >= 0
        assert row["marble/worst_cos"] >= -1e-6 and row["marble/worst_cos_negative"] == 0.0
        bars = [row[f"marble/alpha_bar/{n}"] for n in ("jpeg_compressibility", "shapes")]
        assert abs(sum(bars) - 1) < 1e-6
        assert not any(k.startswith("train/marble") for k in row)


@pytest.mark.parametrize("grad_ema", [0.0, 0.9], ids=["marble", "tracked"])
def test_grpo_marble_resume_equals_uninterrupted_run(tmp_path, grad_ema):
    """The coefficient EMA and (with ``marble_grad_ema``) the tracked per-reward gradients are checkpointed: 4
    epochs equal 2 epochs, a resume and 2 more (a resume that restarted the averages would diverge)."""
    import torch

    from diffalign.checkpoint import resolve_resume

    model = save_tiny(tmp_path)

    def cfg(out, **extra):
        return run_config(model, out, sample={"group_size": 2, "num_batches_per_epoch": 1},
                          rewards=[{"name": "jpeg_compressibility"}, {"name": "shapes"}],
                          train={"num_epochs": 4, "gradient_accumulation_steps": 1, "aggregation": "marble",
                                 "marble_grad_ema": grad_ema, **extra})

    full = train_run(cfg(tmp_path / "full"))
    train_run(cfg(tmp_path / "split", stop_after_epochs=2))
    assert resolve_resume(tmp_path / "split", "latest").name.endswith("00000002")
    resumed = train_run(cfg(tmp_path / "split"))
    a, b = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    h_full, h_resumed = full.marble[0], resumed.marble[0]
    torch.testing.assert_close(h_full.alpha_bar, h_resumed.alpha_bar)
    assert h_full.num_solves == h_resumed.num_solves
    if grad_ema:
        torch.testing.assert_close(h_full.tracked, h_resumed.tracked, rtol=0, atol=1e-7)
    else:
        assert h_resumed.tracked is None
    rows = [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "epoch" in r]
    ra = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epoch" in r]
    assert [r["reward/shapes"] for r in ra] == [r["reward/shapes"] for r in rows]
    assert [r["train/loss"] for r in ra] == [r["train/loss"] for r in rows]


def test_grpo_tracked_gradients_need_marble_and_old_checkpoints_load(tmp_path):
    import torch

    from diffalign.config import ConfigError
    from trainers.common import TrainingState

    with pytest.raises(ConfigError, match="aggregation=marble"):
        GRPOTrainer(run_config(save_tiny(tmp_path), tmp_path / "run", train={"marble_grad_ema": 0.9}))
    # a GRPO checkpoint written before the optimizer slot became a bundle holds the bare optimizer state
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    TrainingState("grpo", other, [p]).load_state_dict(opt.state_dict())
    torch.testing.assert_close(other.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # an NFT slot (old policy) is refused by GRPO and a GRPO slot by NFT, before the optimizer is touched
    nft = TrainingState("nft", opt, [p], tensors={"old_policy": [p.detach().clone()]}).state_dict()
    for state in (nft, {k: v for k, v in nft.items() if k != "trainer"}):
        with pytest.raises(ValueError, match="another trainer"):
            TrainingState("grpo", other, [p]).load_state_dict(state)
    with pytest.raises(ValueError, match="another trainer"):
        TrainingState("nft", other, [p], tensors={"old_policy": [p]}).load_state_dict(opt.state_dict())
    # ... and when a run resumes, before any weight is restored (restore_weights, given no adapter here, would raise
    # AttributeError instead of the refusal if it ran first)
    from types import SimpleNamespace

    from trainers.common import restore_run_state

    before = p.detach().clone()
    ckpt = SimpleNamespace(optimizer_state=nft, trainable_state={"w": torch.zeros(3)}, ema_state=None)
    with pytest.raises(ValueError, match="another trainer"):
        restore_run_state(ckpt, None, [p], None, TrainingState("grpo", other, [p]), None)
    assert torch.equal(p.detach(), before)  # the optimizer slot's refusal changed nothing
