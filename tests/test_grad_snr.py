"""``scripts/grad_snr.py``: the signal share of a trainer's per-update gradient."""

from __future__ import annotations


import pytest
import torch
from grpo_helpers import load_script, run_config, save_tiny

from diffalign.config import save_config


def _script():
    return load_script("grad_snr")


def test_jackknife_cosine_recovers_a_known_signal_share():
    """g_b = s + n_b with |s|^2 = 0.2 E|g|^2: the mean between-batch cosine is about 0.2; pure noise about 0."""
    snr = _script()
    gen = torch.Generator().manual_seed(0)
    D, B = 20000, 12
    s = torch.randn(D, generator=gen)
    s = s / s.norm() * 0.5                                  # |s|^2 = 0.25
    noise = torch.randn(B, D, generator=gen) / D ** 0.5     # E|n|^2 = 1: share 0.25 / 1.25 = 0.2
    res = snr.jackknife_cosine(s + noise)
    assert res["se"] > 0
    assert abs(res["cos"] - 0.2) < max(3 * res["se"], 0.01)
    pure = snr.jackknife_cosine(noise)
    assert abs(pure["cos"]) < 3 * pure["se"] + 1e-3 and abs(pure["cos"]) < 0.01


def test_summary_figures_by_hand():
    snr = _script()
    res = snr.summarise(cos=0.2, se=0.05, samples=64, seconds=4.0)
    assert res["resolved"] and res["snr_per_update"] == pytest.approx(0.25)
    assert res["snr_per_second"] == pytest.approx(0.0625)
    assert res["samples_for_half_signal"] == pytest.approx(64 * 0.8 / 0.2)    # 256
    # not resolved: the bound uses the largest share not ruled out, max(cos, 0) + 2 se
    low = snr.summarise(cos=0.01, se=0.02, samples=64, seconds=4.0)
    assert not low["resolved"] and low["samples_for_half_signal"] == pytest.approx(64 * 0.95 / 0.05)
    neg = snr.summarise(cos=-0.01, se=0.02, samples=64, seconds=4.0)
    assert not neg["resolved"] and neg["samples_for_half_signal"] == pytest.approx(64 * 0.96 / 0.04)
    assert snr.summarise(cos=1.0, se=0.0, samples=64, seconds=1.0)["samples_for_half_signal"] >= 0  # no 1/0


def test_gradients_are_one_per_batch_at_unchanged_weights(tmp_path):
    """Every epoch gives one gradient from a fresh batch; the optimizer never moves the weights; a config with
    two updates per epoch is refused with the fix."""
    snr = _script()
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    grads, trainer, seconds = snr.collect_gradients(str(path), [], 3, tmp_path / "out")
    assert grads.shape[0] == 3 and seconds > 0
    assert torch.isfinite(grads).all() and (grads.norm(dim=1) > 0).all()
    assert not torch.allclose(grads[0], grads[1])                   # a new batch each epoch
    from trainers.common import build_adapter

    torch.manual_seed(cfg.seed)  # the trainer's LoRA initialisation
    fresh = build_adapter(cfg.model, "cpu").trainable_parameters()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(trainer.params, fresh))
    res = snr.measure(str(path), [], 3, tmp_path / "out2")
    assert res["batches"] == 3 and res["samples_per_update"] == 8 and res["num_params"] == grads.shape[1]
    # the tiny config samples 8 per epoch with train.batch_size 4: one update needs accumulation 2
    with pytest.raises(SystemExit, match="gradient_accumulation_steps=2"):
        snr.collect_gradients(str(path), ["train.gradient_accumulation_steps=1"], 3, tmp_path / "out3")
    with pytest.raises(SystemExit, match="num_inner_epochs=1"):
        snr.collect_gradients(str(path), ["train.num_inner_epochs=2"], 3, tmp_path / "out4")


def test_gradients_are_taken_after_clipping(tmp_path):
    """What the optimizer would see: with ``train.max_grad_norm`` tiny every captured gradient has that norm."""
    snr = _script()
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    grads, _, _ = snr.collect_gradients(str(path), ["train.max_grad_norm=1e-6"], 3, tmp_path / "out")
    torch.testing.assert_close(grads.norm(dim=1), torch.full((3,), 1e-6, dtype=torch.float64), rtol=1e-3, atol=0)
