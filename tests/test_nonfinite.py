"""A NaN never reaches the weights or a checkpoint (``train.on_nonfinite``, ``train.max_skipped_steps``), and a
reward failure tolerated by ``on_error: skip`` is counted in the run's metrics.

One loss call is made NaN (as a reward returning inf, an fp16 overflow or a bad batch would); the optimizer step
that would apply it is skipped, leaving weights, optimizer moments, LR schedule and EMA exactly as before, or
the run stops with an error, leaving the last good checkpoint as ``latest``. A checkpoint of non-finite weights
is refused.
"""

from __future__ import annotations

import pytest
import torch
from grpo_helpers import run_config, save_tiny, train_run

import trainers.grpo as grpo_mod
import trainers.nft as nft_mod
from diffalign.checkpoint import list_checkpoints, load_checkpoint, resolve_resume
from diffalign.logging import read_metrics
from trainers.common import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: run_config's batch arithmetic: 2 minibatches x 3 trained steps = 6 loss calls = one optimizer step per epoch
CALLS_PER_EPOCH = 6


def _nan_on(monkeypatch, module, name: str, calls) -> dict:
    """Make ``module.name`` (a loss returning ``(loss, ...)`` or a loss tensor) return NaN on the given calls."""
    orig, count = getattr(module, name), {"n": 0}

    def patched(*args, **kwargs):
        out = orig(*args, **kwargs)
        count["n"] += 1
        if count["n"] in calls:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(module, name, patched)
    return count


def _weights(ckpt_dir):
    return load_checkpoint(ckpt_dir).trainable_state


def _finite(state) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def test_grpo_skips_a_nan_step_and_leaves_everything_untouched(tmp_path, monkeypatch):
    _nan_on(monkeypatch, grpo_mod, "grpo_loss", {CALLS_PER_EPOCH + 1})  # one micro-step of epoch 2
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="non-finite gradient .* step skipped"):
        trainer = train_run(run_config(save_tiny(tmp_path), out, train={"num_epochs": 3}))
    assert trainer.global_step == 2  # epochs 1 and 3 stepped
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts][-3:] == ["step-00000001", "step-00000002", "step-00000003"]
    w1, w2, w3 = (_weights(p) for p in ckpts[-3:])
    assert all(_finite(w) for w in (w1, w2, w3))
    for k in w1:  # the skipped epoch changed nothing; the next one trained
        assert torch.equal(w1[k], w2[k]), k
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    opt1, opt2 = (load_checkpoint(p).optimizer_state for p in ckpts[-3:-1])
    t1, t2 = _tensors(opt1), _tensors(opt2)  # Adam's moments and step count untouched too
    assert len(t1) == len(t2) > 0 and all(torch.equal(a, b) for a, b in zip(t1, t2))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/skipped_steps" in r]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 0]
    assert [r["train/updates"] for r in rows] == [1, 0, 1]


def _tensors(obj):
    """Every tensor in a nested state dict, in a fixed order (to compare optimizer states)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_raise_policy_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_on(monkeypatch, grpo_mod, "grpo_loss", {CALLS_PER_EPOCH + 1})
    out = tmp_path / "run"
    cfg = run_config(save_tiny(tmp_path), out, train={"num_epochs": 3, "on_nonfinite": "raise"})
    with pytest.raises(NonFiniteError, match="train.on_nonfinite=raise"):
        train_run(cfg)
    latest = resolve_resume(out, "latest")
    assert latest.name == "step-00000001" and _finite(_weights(latest))


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    _nan_on(monkeypatch, grpo_mod, "grpo_loss", set(range(CALLS_PER_EPOCH + 1, 10 * CALLS_PER_EPOCH)))
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 6, "max_skipped_steps": 2})
    with pytest.warns(RuntimeWarning, match="step skipped"), \
            pytest.raises(NonFiniteError, match="3 steps in a row > train.max_skipped_steps=2"):
        train_run(cfg)
    assert _finite(_weights(resolve_resume(tmp_path / "run", "latest")))


def test_a_resume_continues_the_count_of_skipped_steps(tmp_path, monkeypatch):
    # every step from epoch 2 on is NaN: epoch 2 is skipped before the stop, epochs 3 and 4 after the resume make
    # 3 in a row (> 2); a resume that restarted the count would see only 2
    _nan_on(monkeypatch, grpo_mod, "grpo_loss", set(range(CALLS_PER_EPOCH + 1, 10 * CALLS_PER_EPOCH)))
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="step skipped"):
        first = train_run(run_config(save_tiny(tmp_path), out, train={"num_epochs": 2, "max_skipped_steps": 2}))
    assert first.skipped_streak == 1
    cfg = run_config(save_tiny(tmp_path), out, train={"num_epochs": 4, "max_skipped_steps": 2})
    with pytest.warns(RuntimeWarning, match="step skipped"), \
            pytest.raises(NonFiniteError, match="3 steps in a row > train.max_skipped_steps=2"):
        train_run(cfg)


def test_nft_marble_skip_keeps_the_qp_state_finite(tmp_path, monkeypatch):
    from test_nft_trainer import nft_config

    # NFT: 1 minibatch x 3 timesteps per epoch; per timestep MARBLE full mode calls the loss for the applied
    # advantages (stats only) and once per reward (2, the QP's inputs): call 11 is epoch 2's first per-reward loss
    _nan_on(monkeypatch, nft_mod, "nft_policy_loss", {11})
    cfg = nft_config(save_tiny(tmp_path), tmp_path / "run", {"num_epochs": 3, "aggregation": "marble",
                                                              "marble_mode": "full"})
    with pytest.warns(RuntimeWarning, match="step skipped"):
        trainer = train_run(cfg, nft_mod.NFTTrainer)
    assert trainer.global_step == 2 and len(trainer.alpha_history) == 2  # no QP on the skipped step
    assert bool(torch.isfinite(trainer.harmonizer.alpha_bar).all())
    assert all(bool(torch.isfinite(p).all()) for p in trainer.params)
    assert all(bool(torch.isfinite(t).all()) for t in trainer.old.shadow)


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    out = tmp_path / "run"
    trainer = train_run(run_config(save_tiny(tmp_path), out, train={"num_epochs": 1}))
    good = resolve_resume(out, "latest")
    with torch.no_grad():
        trainer.params[0].view(-1)[0] = float("nan")
    trainer.epoch += 1
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint 2: 1 trained tensors are not finite"):
        trainer.save_checkpoint()
    assert resolve_resume(out, "latest") == good and _finite(_weights(good))


def test_skipped_reward_failures_are_logged_per_epoch(tmp_path):
    rewards = [{"name": "jpeg_compressibility"},
               {"name": "plugins.reward_plugins:nan_second", "on_error": "skip", "weight": 0.0}]
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="reward 'nan_second' failed on 1 of 4 samples"):
        train_run(run_config(save_tiny(tmp_path), out, rewards=rewards, train={"num_epochs": 2}))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/updates" in r]
    # one failed sample per 4-sample batch, 2 batches per epoch; the error-free column logs none
    assert [r["reward_failures/nan_second"] for r in rows] == [2.0, 2.0]
    assert not any("reward_failures/jpeg_compressibility" in r for r in rows)


def test_nft_leaves_a_failed_reward_out_of_the_sample_gradients(tmp_path, monkeypatch):
    """NFT under MARBLE with a reward that fails on one sample of each batch (``on_error: skip``): that sample
    gets weight 0 in the failed reward's per-reward loss, 1 in the other reward's, and in the combined (amortised)
    loss the coefficient of the reward that worked. Before, the zeroed advantage still pulled the sample's velocity
    towards the old policy (r = 1/2) in every loss."""
    from test_nft_trainer import nft_config

    weights = []
    orig = nft_mod.nft_policy_loss

    def recording(*args, **kwargs):
        weights.append(kwargs.get("weight"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(nft_mod, "nft_policy_loss", recording)
    rewards = [{"name": "jpeg_compressibility"},
               {"name": "plugins.reward_plugins:nan_second", "on_error": "skip", "weight": 0.0}]
    cfg = nft_config(save_tiny(tmp_path), tmp_path / "run", {"num_epochs": 1, "aggregation": "marble",
                                                              "marble_mode": "full", "shuffle": False},
                     rewards=rewards)
    with pytest.warns(RuntimeWarning, match="reward 'nan_second' failed"):
        train_run(cfg, nft_mod.NFTTrainer)
    # per trained timestep: the combined loss, then one loss per reward (3 timesteps, one minibatch of 4)
    assert len(weights) == 9
    for combined, first, second in zip(weights[0::3], weights[1::3], weights[2::3]):
        # the combined loss (logged; the QP takes the per-reward ones) at the uniform start alpha_bar = (1/2, 1/2)
        assert combined.tolist() == [1.0, 0.5, 1.0, 1.0] and first.tolist() == [1.0, 1.0, 1.0, 1.0]
        assert second.tolist() == [1.0, 0.0, 1.0, 1.0]
    # amortised MARBLE (a QP on the first step, then one loss per timestep): the failed sample weighs
    # alpha_bar of the rewards that worked (trainers.nft.amortised_advantages)
    weights.clear()
    cfg = nft_config(save_tiny(tmp_path), tmp_path / "amortised",
                     {"num_epochs": 2, "aggregation": "marble", "marble_mode": "amortized", "marble_every": 5,
                      "shuffle": False}, rewards=rewards)
    with pytest.warns(RuntimeWarning, match="reward 'nan_second' failed"):
        trainer = train_run(cfg, nft_mod.NFTTrainer)
    assert len(weights) == 9 + 3
    alpha_first = float(trainer.harmonizer.alpha_bar[0])
    for w in weights[9:]:
        torch.testing.assert_close(w, torch.tensor([1.0, alpha_first, 1.0, 1.0], dtype=w.dtype))
    assert 0 < alpha_first < 1


def test_a_nan_kl_gradient_skips_the_step_before_marble_moves(tmp_path, monkeypatch):
    """The KL gradient sits in ``.grad`` outside MARBLE's per-reward buffers: a NaN there must stop the step
    before the QP updates its coefficient EMA or history."""
    from test_nft_trainer import nft_config

    _nan_on(monkeypatch, nft_mod, "velocity_kl", {4})  # epoch 2's first timestep (3 per epoch)
    cfg = nft_config(save_tiny(tmp_path), tmp_path / "run", {"num_epochs": 3, "aggregation": "marble",
                                                              "marble_mode": "full", "kl_weight": 1e-2})
    with pytest.warns(RuntimeWarning, match="step skipped"):
        trainer = train_run(cfg, nft_mod.NFTTrainer)
    assert trainer.global_step == 2 and len(trainer.alpha_history) == 2
    assert bool(torch.isfinite(trainer.harmonizer.alpha_bar).all())


@pytest.mark.parametrize("trainer", ["grpo", "nft"])
def test_an_epoch_without_any_finite_reward_makes_no_update(tmp_path, trainer):
    """A reward that works for the first epoch, then fails on every sample under ``on_error: skip`` (a remote
    server that went down): the later epochs make no optimizer step, so Adam's momentum, weight decay and
    regularizers do not move the weights of a run that has no reward (they did: about one real update's size)."""
    rewards = [{"name": "plugins.reward_plugins:works_then_fails", "on_error": "skip",
                "kwargs": {"key": str(tmp_path), "calls": 2 if trainer == "grpo" else 1}}]  # calls: epoch 1's
    train = {"num_epochs": 3, "weight_decay": 0.1, "ema": True}
    if trainer == "grpo":
        cfg, cls = run_config(save_tiny(tmp_path), tmp_path / "run", rewards=rewards, train=train), None
    else:
        from test_nft_trainer import nft_config

        cfg, cls = nft_config(save_tiny(tmp_path), tmp_path / "run", train, rewards=rewards), nft_mod.NFTTrainer
    with pytest.warns(UserWarning, match="epoch 2: no sample has a finite combined reward .*: no update this epoch"):
        train_run(cfg, cls)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/updates" in r]
    assert [r["train/updates"] for r in rows] == [1, 0, 0]
    assert [r.get("train/no_reward_epochs", 0) for r in rows] == [0, 1, 1]
    first, last = (load_checkpoint(p) for p in (list_checkpoints(tmp_path / "run")[0],
                                                list_checkpoints(tmp_path / "run")[-1]))
    assert first.counters["epoch"] == 1 and last.counters["epoch"] == 3
    assert last.counters["step"] == first.counters["step"] == 1
    for a, b in ((first.trainable_state, last.trainable_state), (first.ema_state, last.ema_state)):
        assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in first.trainable_state.items() if "lora_B" in k)  # epoch 1 learned


@pytest.mark.parametrize("trainer", ["grpo", "nft"])
def test_weights_that_make_nan_images_stop_the_run_before_a_reward_or_a_checkpoint(tmp_path, monkeypatch, trainer):
    """An update with a finite but huge gradient (learning_rate 1e6, found by an audit) left finite weights that
    decode NaN images: the verifier scored them 0.25, each skipped epoch still wrote a checkpoint and pruning
    deleted the good ones. The rollout's images are checked before any reward sees them; evaluations leave
    non-finite images out of their means, with a warning."""
    from diffalign.generators.base import GeneratorAdapter
    from trainers.common import score_prompts

    decode, broken, scored = GeneratorAdapter.decode, {"on": False}, []

    def patched(self, latents, **kwargs):
        images = decode(self, latents, **kwargs)
        return images * float("nan") if broken["on"] else images

    monkeypatch.setattr(GeneratorAdapter, "decode", patched)
    model = save_tiny(tmp_path)
    extra = {"sample": {"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 1},
             "train": {"num_epochs": 3, "gradient_accumulation_steps": 1}} if trainer == "nft" else {}
    cfg = run_config(model, tmp_path / "run", trainer=trainer, **extra)
    cls = nft_mod.NFTTrainer if trainer == "nft" else grpo_mod.GRPOTrainer
    t = cls(cfg)
    t.setup()
    rewards_call = t.rewards.__class__.__call__

    def counting(self, images, *args, **kwargs):
        scored.append(bool(torch.isfinite(images).all()))
        return rewards_call(self, images, *args, **kwargs)

    monkeypatch.setattr(t.rewards.__class__, "__call__", counting)
    save = t.save_checkpoint

    def save_then_break(*args, **kwargs):
        out = save(*args, **kwargs)
        broken["on"] = True  # the weights after the first epoch's update make NaN images
        return out

    t.save_checkpoint = save_then_break
    try:
        with pytest.raises(NonFiniteError, match=r"samples are not finite at epoch 2 .*resume from a checkpoint"):
            t.train()
    finally:
        t.cleanup()
    assert scored and all(scored)  # no reward ever saw a NaN image
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001"]
    # an evaluation of the broken model: NaN rows (skipped by the means) and a warning, not the verifier's 0.25
    with pytest.warns(RuntimeWarning, match="evaluation images are not finite"):
        rows, _ = score_prompts(t.adapter, t.rewards, ["a red circle", "a blue square"], [0, 1],
                                sample_cfg=cfg.sample, seed=0, num_steps=2, guidance_scale=1.0, height=32,
                                width=32, dtype=torch.float32)
    assert rows.shape == (2, 1) and bool(torch.isnan(rows).all())


def test_an_evaluation_leaves_out_only_the_non_finite_images(tmp_path, monkeypatch):
    """Some images of a batch NaN, the rest scored as usual (rows on the images' device, as the other batches')."""
    from diffalign.generators.base import GeneratorAdapter
    from trainers.common import score_prompts

    decode = GeneratorAdapter.decode

    def first_nan(self, latents, **kwargs):
        images = decode(self, latents, **kwargs).clone()
        images[0] = float("nan")
        return images

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", sample={"batch_size": 2})
    t = grpo_mod.GRPOTrainer(cfg)
    t.setup()
    try:
        prompts, kw = ["a red circle", "a blue square", "a circle"], dict(
            sample_cfg=cfg.sample, seed=0, num_steps=2, guidance_scale=1.0, height=32, width=32, dtype=torch.float32)
        clean, _ = score_prompts(t.adapter, t.rewards, prompts, [0, 1, 2], **kw)
        monkeypatch.setattr(GeneratorAdapter, "decode", first_nan)
        with pytest.warns(RuntimeWarning, match="1 of 2 evaluation images are not finite"):
            rows, _ = score_prompts(t.adapter, t.rewards, prompts, [0, 1, 2], **kw)
    finally:
        t.cleanup()
    # batches [0, 1] and [2]: the first image of each is NaN
    assert torch.isnan(rows[0]).all() and torch.isnan(rows[2]).all()
    torch.testing.assert_close(rows[1], clean[1])


def test_a_checking_rank_reads_the_ema_shadow_without_swapping_it_in(tmp_path, monkeypatch):
    """Ranks other than the checkpoint writer only check the weights; swapping the EMA in cloned every trained
    parameter on its device first (a full fine-tune: one more float32 denoiser on each GPU at every checkpoint)."""
    from trainers.common import EMA, checkpoint_weights

    t = grpo_mod.GRPOTrainer(run_config(save_tiny(tmp_path), tmp_path / "run", train={"ema": True}))
    t.setup()
    try:
        t.ema.shadow[1][0] = float("nan")
        monkeypatch.setattr(EMA, "swapped_in", lambda self: (_ for _ in ()).throw(AssertionError("swapped in")))
        seen = {}
        trained, ema_state = checkpoint_weights(t.adapter, t.ema, copy=False,
                                                check=lambda label, names: seen.setdefault(label, names))
        assert trained == {} and ema_state == {}
        assert seen["trained"] == [] and len(seen["EMA"]) == 1
        live = list(t.adapter.lora_state_dict())
        assert seen["EMA"][0] in live
    finally:
        t.cleanup()
