"""Hand-derived values of the GRPO loss pieces (Flow-GRPO eq. (6), DDPO §4.3)."""

import math

import pytest
import torch

from trainers.grpo import grpo_loss, kl_to_reference, resolve_kl_form, select_train_steps


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = grpo_loss(lp, lp.detach().clone(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert st.ratio_mean.item() == 1.0 and st.approx_kl.item() == 0.0 and st.clip_frac.item() == 0.0
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A / B
    torch.testing.assert_close(lp.grad, -adv / 3)


def test_clipping_hand_computed():
    old = torch.zeros(2)
    lp = torch.tensor([0.2, -0.2], requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    eps = 0.1
    loss, st = grpo_loss(lp, old, adv, clip_range=eps, adv_clip_max=5.0)
    # sample 0: ratio e^0.2 > 1 + eps with A > 0 -> clipped branch -A (1 + eps) is the max, no gradient
    # sample 1: ratio e^-0.2 < 1 - eps with A > 0 -> max(-A r, -A (1 - eps)) = -A r (unclipped), gradient flows
    expected = (-(1 + eps) + -math.exp(-0.2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert st.clip_frac.item() == 1.0
    loss.backward()
    assert lp.grad[0].item() == 0.0 and lp.grad[1].item() == pytest.approx(-math.exp(-0.2) / 2, rel=1e-6)


def test_advantage_clip_and_kl_weight():
    lp = torch.zeros(2)
    loss, st = grpo_loss(lp, lp, torch.tensor([10.0, -10.0]), clip_range=1e-4, adv_clip_max=5.0,
                         kl=torch.tensor([0.5, 1.5]), beta=0.1)
    assert loss.item() == pytest.approx(0.0 + 0.1 * 1.0)
    assert st.kl_loss.item() == pytest.approx(1.0)


def test_kl_forms():
    mean = torch.ones(2, 3)
    ref = torch.zeros(2, 3)
    std = torch.tensor([0.5, 0.5])
    g = torch.tensor([2.0, 2.0])
    torch.testing.assert_close(kl_to_reference(mean, ref, std, form="gaussian"), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, form="flow_grpo", g=g), torch.tensor([0.125, 0.125]))
    v = torch.full((2, 3), 3.0)
    torch.testing.assert_close(kl_to_reference(mean, ref, std, form="velocity", velocity=v, ref_velocity=v * 0),
                               torch.tensor([9.0, 9.0]))
    assert resolve_kl_form("auto", "flow_sde") == "flow_grpo" and resolve_kl_form("auto", "ddim") == "gaussian"
    with pytest.raises(ValueError, match="flow_sde"):
        resolve_kl_form("flow_grpo", "ddim")


def test_select_train_steps_never_last_and_random_subsets():
    stoch = torch.ones(10, dtype=torch.bool)
    first = select_train_steps(stoch, 3, fraction=0.99, mode="first")
    assert first.shape == (3, 9) and first[0].tolist() == list(range(9))
    rnd = select_train_steps(stoch, 4, fraction=0.5, mode="random", generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (4, 5)
    assert all(len(set(row.tolist())) == 5 for row in rnd)
    assert not all(torch.equal(rnd[0], rnd[i]) for i in range(1, 4))
    window = torch.zeros(10, dtype=torch.bool)
    window[2:5] = True
    assert select_train_steps(window, 1, fraction=1.0, mode="first")[0].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="no stochastic steps"):
        select_train_steps(torch.zeros(4, dtype=torch.bool), 1, fraction=1.0, mode="first")


def test_the_timestep_fraction_applies_to_the_trajectory_not_to_its_stochastic_steps():
    """Flow-GRPO / DDPO take int(T * fraction) of the T steps: with 0.99 of 10, a deterministic last step
    (flow_cps, DDIM into sigma 0) leaves steps 0-8 trained (before: 0-7), and a Flow-GRPO-Fast window inside them
    is trained whole (before: its last step dropped); random draws that many of the stochastic steps."""
    last_det = torch.ones(10, dtype=torch.bool)
    last_det[9] = False
    assert select_train_steps(last_det, 2, fraction=0.99, mode="first").tolist() == [list(range(9))] * 2
    window = torch.zeros(10, dtype=torch.bool)
    window[2:5] = True
    assert select_train_steps(window, 1, fraction=0.99, mode="first").tolist() == [[2, 3, 4]]
    late = torch.zeros(10, dtype=torch.bool)
    late[7:] = True
    assert select_train_steps(late, 1, fraction=0.99, mode="first").tolist() == [[7, 8]]  # never the last step
    assert select_train_steps(late, 1, fraction=0.05, mode="first").tolist() == [[7]]  # at least one
    rnd = select_train_steps(last_det, 3, fraction=0.99, mode="random", generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (3, 9) and all(sorted(row.tolist()) == list(range(9)) for row in rnd)
    rnd = select_train_steps(window, 2, fraction=0.99, mode="random", generator=torch.Generator().manual_seed(0))
    assert all(sorted(row.tolist()) == [2, 3, 4] for row in rnd)
    rnd = select_train_steps(last_det, 2, fraction=0.3, mode="random", generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (2, 3) and int(rnd.max()) <= 8


def test_masked_samples_leave_the_average():
    """drop_zero_std_groups (Flow-GRPO's zero-advantage filtering): the masked loss equals the loss of the kept
    samples alone, policy and KL, instead of being diluted by the dropped ones."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, generator=g, requires_grad=True)
    old, adv, kl = logp.detach() + 1e-5 * torch.randn(6, generator=g), torch.randn(6, generator=g), torch.rand(6)
    keep = torch.tensor([True, False, True, True, False, True])
    masked, _ = grpo_loss(logp, old, adv * keep, clip_range=1e-4, adv_clip_max=5.0, kl=kl, beta=0.1, mask=keep)
    alone, _ = grpo_loss(logp[keep], old[keep], adv[keep], clip_range=1e-4, adv_clip_max=5.0, kl=kl[keep],
                         beta=0.1)
    torch.testing.assert_close(masked, alone)
    # the diagnostics too are over the kept samples: log-ratios 0.2 and 0 kept, 0.6 and 0.4 dropped
    lr, m = torch.tensor([0.2, 0.6, 0.0, 0.4]), torch.tensor([True, False, True, False])
    _, d = grpo_loss(lr, torch.zeros(4), torch.ones(4) * m, clip_range=0.1, adv_clip_max=5.0, mask=m)
    assert float(d.approx_kl) == pytest.approx(0.5 * 0.2**2 / 2)  # 0.07 over all four
    assert float(d.clip_frac) == pytest.approx(0.5)  # |e^0.2 - 1| > 0.1, |e^0 - 1| = 0; 0.75 over all four
    assert float(d.ratio_mean) == pytest.approx((math.exp(0.2) + 1) / 2)
    none, st_none = grpo_loss(logp, old, adv * 0, clip_range=1e-4, adv_clip_max=5.0,
                              mask=torch.zeros(6, dtype=torch.bool))
    assert float(none) == 0.0 and math.isnan(float(st_none.ratio_mean))  # skipped by the trainer


def test_drop_zero_std_groups_weighs_every_kept_sample_of_an_update_alike(tmp_path, monkeypatch):
    """The trainer passes each minibatch its mask and the window's kept count: over an update's minibatches the
    kept samples get equal weight 1 / (kept in the window), however they are spread over the minibatches."""
    import trainers.grpo as grpo_mod
    from grpo_helpers import run_config, save_tiny, train_run

    calls = []
    orig = grpo_mod.grpo_loss

    def spy(*args, **kwargs):
        calls.append((kwargs.get("mask"), kwargs.get("denominator")))
        return orig(*args, **kwargs)

    monkeypatch.setattr(grpo_mod, "grpo_loss", spy)
    # a reward that is 0 (a tie) for prompts without "circle", groups of 2; 2 minibatches of 4 per update, 3 trained
    # steps
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", rewards=[{"name": "plugins.reward_plugins:brightness_if",
                                                                      "kwargs": {"word": "circle"}}],
                     sample={"group_size": 2}, train={"num_epochs": 1, "drop_zero_std_groups": True})
    train_run(cfg)
    masks = [m for m, _ in calls[::3]]  # one call per trained step; the mask is per minibatch
    assert len(masks) == 2 and all(m is not None for m in masks)
    kept = sum(float(m.sum()) for m in masks)
    assert 0 < kept < 8  # some groups dropped, some kept: the test can tell the kept count from the batch size
    accum = cfg.train["gradient_accumulation_steps"]
    for m, den in calls:
        assert den == pytest.approx(kept / accum)  # weight per kept sample: 1 / (den * accum) = 1 / kept


def test_an_update_whose_groups_all_tie_makes_no_optimizer_step(tmp_path):
    """With every group tied (a reward constant on the batch, as OCR before the model writes any text), the
    update has no kept sample: no optimizer step (AdamW's weight decay would still shrink the LoRA), no LR or
    EMA move; counted as ``train/empty_updates``."""
    from grpo_helpers import run_config, save_tiny, train_run

    from diffalign.logging import read_metrics

    out = tmp_path / "run"
    cfg = run_config(save_tiny(tmp_path), out, rewards=[{"name": "plugins.reward_plugins:brightness",
                                                         "kwargs": {"scale": 0.0}}],
                     train={"num_epochs": 2, "drop_zero_std_groups": True, "ema": True, "weight_decay": 0.1})
    trainer = train_run(cfg)
    assert trainer.global_step == 0 and trainer.ema.num_updates == 0
    assert all(not s for s in trainer.optimizer.state.values())  # Adam never stepped
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/updates" in r]
    assert [(r["train/updates"], r["train/empty_updates"]) for r in rows] == [(0, 1), (0, 1)]


def test_velocity_kl_is_the_squared_velocity_difference_to_the_reference(tmp_path):
    """``train.kl_form=velocity`` (the CFG-free recipe, flow_grpo#198): the trainer's KL of a step is
    ``mean_dims (v - v_ref)^2``, v the adapted model's velocity and v_ref the base model's (adapter off), at the
    stored state."""
    from grpo_helpers import run_config, save_tiny

    from samplers import rollout, score_steps
    from trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(run_config(save_tiny(tmp_path), tmp_path / "run",
                                     train={"beta": 0.1, "kl_form": "velocity"}))
    trainer.setup()
    try:
        adapter = trainer.adapter
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in trainer.params:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        cond = adapter.encode_prompts(["a red circle", "a blue square"], guidance_scale=1.0)
        schedule = adapter.make_schedule(4, 32, 32)
        model_fn = adapter.model_fn(cond, 1.0)
        with torch.no_grad():
            traj = rollout(model_fn, schedule, adapter.prepare_latents(2, 32, 32, g), step="flow_sde",
                           noise_level=0.7, generator=g)
            out = score_steps(model_fn, schedule, traj, 1)
            kl = trainer._reference_kl(model_fn, schedule, traj, 1, out)
            x_t, t = traj.latents[:, 1], schedule.timesteps[1].expand(2)
            v = model_fn(x_t, t)
            with adapter.disable_adapter():
                v_ref = model_fn(x_t, t)
        expected = ((v.float() - v_ref.float()) ** 2).mean(dim=(1, 2, 3))
        assert float(expected.min()) > 1e-6  # the adapter moved the model
        torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-8)
    finally:
        trainer.cleanup()
