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
    sample = {"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 1}
    sample.update(overrides.pop("sample", {}))
    return run_config(model, out, trainer="nft", sample=sample,
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
    # three rewards: the min-norm point of two normalised gradients is always their midpoint, so with two the
    # coefficients were (1/2, 1/2) whether or not a resume restored them
    model = save_tiny(tmp_path)
    rewards = REWARDS + [{"name": "colorfulness"}]
    train = {"num_epochs": 4, "aggregation": "marble", "ema": True, **marble}
    full = _train(nft_config(model, tmp_path / "full", train, rewards=rewards))
    _train(nft_config(model, tmp_path / "split", {**train, "stop_after_epochs": 2}, rewards=rewards))
    assert resolve_resume(tmp_path / "split", "latest").name.endswith("00000002")
    resumed = _train(nft_config(model, tmp_path / "split", train, rewards=rewards))
    assert (full.harmonizer.alpha_bar - 1 / 3).abs().max() > 1e-3  # the coefficients moved: a lost state shows
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


def test_the_first_update_lowers_diffusionnfts_own_loss_on_its_samples(tmp_path, monkeypatch):
    """The trainer's direction, against the loss functions' hand-checked values: the loss of DiffusionNFT's eq. (8)
    recomputed from the pure functions on the update's own noised samples, timesteps and advantages falls after
    the first update. At the first update v = v_old, where the positive and negative terms' gradients are exact
    opposites, so a trainer that swapped them (fitting high-advantage samples to the negative policy) raises this
    loss by as much; no test saw such a swap (the loss functions' own tests pass whatever the trainer feeds them)."""
    import trainers.nft as nft

    records = []
    real_velocities, real_terms, real_policy = NFTTrainer._velocities, nft.nft_loss_terms, nft.nft_policy_loss

    def velocities(self, model_fn, x_t, timesteps):
        v_old, v_ref, v = real_velocities(self, model_fn, x_t, timesteps)
        records.append({"model_fn": model_fn, "x_t": x_t.detach().clone(), "t": timesteps.clone(),
                        "v_old": v_old.detach().clone()})
        return v_old, v_ref, v

    def terms(v, v_old, x_t, x0, sigma, **kw):
        records[-1].update(x0=x0.detach().clone(), sigma=sigma.detach().clone(), terms_kw=kw)
        return real_terms(v, v_old, x_t, x0, sigma, **kw)

    def policy(l_pos, l_neg, advantages, **kw):
        records[-1].update(adv=advantages.detach().clone(), policy_kw=kw)
        return real_policy(l_pos, l_neg, advantages, **kw)

    monkeypatch.setattr(NFTTrainer, "_velocities", velocities)
    monkeypatch.setattr(nft, "nft_loss_terms", terms)
    monkeypatch.setattr(nft, "nft_policy_loss", policy)
    cfg = nft_config(save_tiny(tmp_path), tmp_path / "run", {"num_epochs": 1, "kl_weight": 0.0, "learning_rate": 1e-3},
                     rewards=[{"name": "jpeg_compressibility"}])
    trainer = _train(cfg)
    assert len(records) == 3 and all(r["adv"].abs().max() > 0 for r in records)  # 3 timesteps, one update

    def loss(after: bool) -> float:
        total = 0.0
        with torch.no_grad():
            for r in records:
                v = r["model_fn"](r["x_t"], r["t"]).float() if after else r["v_old"]
                l_pos, l_neg = real_terms(v, r["v_old"], r["x_t"], r["x0"], r["sigma"], **r["terms_kw"])
                total += float(real_policy(l_pos, l_neg, r["adv"], **r["policy_kw"]))
        return total

    before, after = loss(False), loss(True)
    assert after < before - 5e-6 * abs(before), (before, after)  # measured: 17.04030 -> 17.04012
    assert any(v.abs().sum() > 0 for k, v in trainer.adapter.lora_state_dict().items() if "lora_B" in k)


@pytest.mark.parametrize("kind, scale, trained", [("flux", 3.5, 3.5), ("sd3", 3.0, None)], ids=["flux_dev", "sd3_cfg"])
def test_training_uses_the_velocity_field_that_drew_the_samples(tmp_path, kind, scale, trained):
    """FLUX.1-dev's guidance embedding runs no CFG pass: the samples come from the field at the sampling value, so
    v, v_old and v_ref are taken there too (it trained at 1.0). With CFG (SD3) training stays CFG-free: a single,
    conditional batch."""
    cfg = nft_config(save_tiny(tmp_path, kind), tmp_path / "run", train={"num_epochs": 1},
                     sample={"guidance_scale": scale})
    trainer = NFTTrainer(cfg)
    trainer.setup()
    seen, phase = [], ["sample"]
    forward = trainer.adapter.denoiser.forward

    def spy(*args, **kwargs):
        g = kwargs.get("guidance")
        seen.append((phase[0], None if g is None else sorted(set(g.tolist())), len(kwargs["hidden_states"])))
        return forward(*args, **kwargs)

    trainer.adapter.denoiser.forward = spy
    train_epoch = trainer._train_epoch

    def in_training(*args, **kwargs):
        phase[0] = "train"
        try:
            return train_epoch(*args, **kwargs)
        finally:
            phase[0] = "after"

    trainer._train_epoch = in_training
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    sampled = [s for s in seen if s[0] == "sample"]
    trained_calls = [s for s in seen if s[0] == "train"]
    assert sampled and trained_calls
    if trained is not None:
        assert {tuple(s[1]) for s in sampled} == {tuple(s[1]) for s in trained_calls} == {(trained,)}
    else:
        assert {s[1] for s in trained_calls} == {None}
        assert {s[2] for s in sampled} == {8}                          # CFG: [uncond, cond] of 4 samples
        assert {s[2] for s in trained_calls} == {4}                    # CFG-free training


def test_marble_coefficients_belong_to_their_rewards_across_a_resume(tmp_path):
    """A resume that lists the same rewards in another order restored the coefficients by position, silently
    giving each reward another's weight (an audit); they restart uniform with a warning, tracked gradients too."""
    from diffalign.checkpoint import load_checkpoint

    model = save_tiny(tmp_path)
    rewards = REWARDS + [{"name": "colorfulness"}]
    train = {"num_epochs": 2, "aggregation": "marble", "marble_mode": "full", "marble_grad_ema": 0.9}
    first = _train(nft_config(model, tmp_path / "run", train, rewards=rewards))
    assert (first.harmonizer.alpha_bar - 1 / 3).abs().max() > 1e-3
    saved = resolve_resume(tmp_path / "run", "latest")
    assert load_checkpoint(saved).sampler_state["harmonizer"]["rewards"] == first.rewards.names
    reordered = [rewards[2], rewards[0], rewards[1]]
    cfg = nft_config(model, tmp_path / "run", {**train, "num_epochs": 3}, rewards=reordered)
    trainer = NFTTrainer(cfg)
    with pytest.warns(UserWarning, match=r"MARBLE coefficients are for the rewards \['jpeg_compressibility', "
                                         r"'shapes', 'colorfulness'\], this run has \['colorfulness', "):
        trainer.setup()
    try:
        torch.testing.assert_close(trainer.harmonizer.alpha_bar, torch.full((3,), 1 / 3, dtype=torch.float64))
        assert trainer.harmonizer.tracked is None
    finally:
        trainer.cleanup()
    # the same order restores them
    same = NFTTrainer(nft_config(model, tmp_path / "run", {**train, "num_epochs": 3}, rewards=rewards))
    same.setup()
    try:
        torch.testing.assert_close(same.harmonizer.alpha_bar, first.harmonizer.alpha_bar)
        assert same.harmonizer.tracked is not None
    finally:
        same.cleanup()
