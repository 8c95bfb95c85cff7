"""GRPO trainer behaviour on tiny random pipelines: on-policy ratio, resume equality, export, DDPO path."""

from __future__ import annotations

import pytest
import torch
from grpo_helpers import run_config, save_tiny, train_run

from diffalign.checkpoint import load_checkpoint, resolve_resume
from diffalign.logging import read_metrics
from trainers.grpo import GRPOTrainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train(cfg):
    return train_run(cfg)


def test_single_update_first_ratio_is_exactly_one_and_kl_zero(tmp_path):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 1})
    trainer = _train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["train/updates"] == 1
    assert rows[-1]["train/ratio_mean"] == 1.0
    assert rows[-1]["train/approx_kl"] == 0.0
    assert rows[-1]["train/clip_frac"] == 0.0
    # and the update did change the LoRA weights
    assert any(p.abs().sum() > 0 for n, p in trainer.adapter.lora_state_dict().items() if "lora_B" in n)


def test_second_update_in_an_epoch_is_off_policy(tmp_path):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run",
                     train={"num_epochs": 1, "gradient_accumulation_steps": 1, "clip_range": 1e-6})
    _train(cfg)
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["train/updates"] == 2
    assert row["train/approx_kl"] > 0 and row["train/clip_frac"] > 0


# the per-prompt tracker's buffers (two prompts, so they fill) and the global std's running moments are state
RESUMED_STATE = {"group": {}, "per_prompt_tracker": {"advantage": "per_prompt_tracker", "tracker_buffer_size": 8,
                                                     "tracker_min_count": 2},
                 "global_std": {"std_mode": "global"}}


@pytest.mark.parametrize("state", list(RESUMED_STATE))
def test_resume_equals_uninterrupted_run(tmp_path, state):
    model = save_tiny(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    extra = {"prompts": {"source": "file", "path": str(tmp_path / "prompts.txt"), "eval_size": 2}} if state != "group" \
        else {}

    def cfg(out, **train):
        return run_config(model, out, train={"num_epochs": 4, **RESUMED_STATE[state], **train}, **extra)

    full = _train(cfg(tmp_path / "full"))
    _train(cfg(tmp_path / "split", stop_after_epochs=2))
    assert resolve_resume(tmp_path / "split", "latest").name.endswith("00000002")
    resumed = _train(cfg(tmp_path / "split"))
    a, b = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ra = [r["reward/jpeg_compressibility"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epoch" in r]
    rb = [r["reward/jpeg_compressibility"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "epoch" in r]
    assert ra == rb and len(ra) == 4
    state = load_checkpoint(resolve_resume(tmp_path / "split", "latest"))
    assert state.counters["epoch"] == 4


def test_ddpo_path_random_timesteps_and_kl(tmp_path, monkeypatch):
    import trainers.grpo as grpo

    chosen = []
    real = grpo.select_train_steps
    monkeypatch.setattr(grpo, "select_train_steps", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    cfg = run_config(save_tiny(tmp_path, "sd15"), tmp_path / "run",
                     sample={"step": "ddim", "noise_level": 1.0},
                     train={"num_epochs": 2, "timestep_selection": "random", "timestep_fraction": 0.5,
                            "beta": 0.1, "advantage": "per_prompt_tracker", "tracker_min_count": 2})
    _train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    assert rows[0]["train/ratio_mean"] == 1.0 and rows[0]["train/updates"] == 1
    # LoRA starts as the identity (B = 0), so the first KL to the reference is exactly 0 on every step; once the
    # policy moved, DDPO's Gaussian KL is counted (a test of the first epoch alone passed with the KL dropped)
    assert rows[0]["train/kl_loss"] == 0.0 < rows[1]["train/kl_loss"]
    # DDPO's random selection: int(4 x 0.5) = 2 of the 4 steps per sample, drawn per sample
    steps = torch.cat(chosen)
    assert steps.shape[1] == 2 and len({tuple(sorted(r)) for r in steps.tolist()}) > 1


def test_flow_grpo_kl_with_window(tmp_path):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run",
                     sample={"window": [0, 2], "random_window": [0, 3]},
                     train={"num_epochs": 2, "beta": 0.04, "timestep_fraction": 1.0,
                            "gradient_accumulation_steps": 1})
    _train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    assert rows[-1]["train/kl_loss"] > 0  # the policy moved away from the reference


def test_export_reproduces_trained_samples(tmp_path):
    from diffusers import DiffusionPipeline

    from diffalign.export import export_checkpoint
    from diffalign.generators import adapter_for_pipeline
    from samplers import make_generators, rollout

    model = save_tiny(tmp_path)
    trainer = _train(run_config(model, tmp_path / "run", train={"num_epochs": 1}))
    ckpt = resolve_resume(tmp_path / "run", "latest")
    export_checkpoint(ckpt, tmp_path / "export", merged=True)

    def final_latents(adapter):
        cond = adapter.encode_prompts(["a red circle"] * 2, "", 1.0)
        gens = make_generators(0, [0, 1])
        x = adapter.prepare_latents(2, 32, 32, generator=gens)
        sched = adapter.make_schedule(4, 32, 32)
        return rollout(adapter.model_fn(cond, 1.0), sched, x, step="flow_euler", noise_level=0.0).final

    want = final_latents(trainer.adapter)
    pipe = DiffusionPipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "export" / "lora"))
    torch.testing.assert_close(final_latents(adapter_for_pipeline(pipe)), want, rtol=1e-5, atol=1e-5)
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "export" / "merged"), text_encoder_3=None,
                                               tokenizer_3=None)
    torch.testing.assert_close(final_latents(adapter_for_pipeline(merged)), want, rtol=1e-4, atol=1e-4)


def test_ema_is_checkpointed_under_parameter_names_and_restored(tmp_path):
    model = save_tiny(tmp_path)
    cfg = run_config(model, tmp_path / "run", train={"num_epochs": 2, "ema": True, "ema_decay": 0.5,
                                                     "stop_after_epochs": 1})
    first = _train(cfg)
    state = load_checkpoint(resolve_resume(tmp_path / "run", "latest"))
    assert set(state.ema_state) == set(state.trainable_state)
    assert any(not torch.equal(state.ema_state[k], state.trainable_state[k]) for k in state.ema_state)
    resumed = GRPOTrainer(run_config(model, tmp_path / "run", train={"num_epochs": 2, "ema": True,
                                                                       "ema_decay": 0.5}))
    resumed.setup()
    for a, b in zip(first.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    for a, b in zip(first.params, resumed.params):
        assert torch.equal(a, b)


def test_reward_rises_on_a_fixed_seed(tmp_path):
    """Behaviour: GRPO raises an easy reward (mean brightness) within a few epochs on a tiny model."""
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run",
                     rewards=[{"name": "tests.plugins.reward_plugins:brightness"}],
                     train={"num_epochs": 8, "learning_rate": 3e-2})
    _train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    first, last = rows[0]["reward/brightness"], rows[-1]["reward/brightness"]
    assert last > first + 0.01, (first, last)


def test_shared_group_noise_starts_a_group_from_one_noise(tmp_path):
    """``sample.shared_group_noise``: a prompt's group shares its initial latents (and only those: the
    stochastic steps still draw per-sample noise); different groups and epochs start from different noise."""
    from diffalign.distributed import repeat_assignment

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", sample={"shared_group_noise": True, "group_size": 2})
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    starts = []
    for epoch in range(2):
        a = repeat_assignment(trainer.prompts.epoch_prompts(epoch, 4), 2, epoch=epoch, seed=cfg.seed, rank=0,
                              world_size=1)
        traj = trainer._sample(epoch, a)["traj"]
        x0, x1, groups = traj.latents[:, 0], traj.latents[:, 1], a.groups
        for g in groups.unique():
            i, j = torch.nonzero(groups == g).flatten().tolist()
            assert torch.equal(x0[i], x0[j])  # same initial noise
            assert not torch.equal(x1[i], x1[j])  # different kernel noise at the first stochastic step
        assert len({tuple(x0[k].flatten()[:4].tolist()) for k in range(len(groups))}) == 4  # 4 groups
        starts.append(x0)
    # no initial noise of epoch 1 repeats one of epoch 0 (ids are unique across epochs)
    first = {tuple(r.flatten()[:8].tolist()) for r in starts[0]}
    assert not any(tuple(r.flatten()[:8].tolist()) in first for r in starts[1])
    trainer.cleanup()


@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16", "eval_guidance_scale": 2.0}], ids=["fp32", "bf16_cfg2"])
def test_diffalign_eval_of_a_checkpoint_reproduces_the_logged_evaluation(tmp_path, extra):
    """`diffalign eval` and `diffalign sample` sample the evaluation prompts like the trainer's evaluation (noise,
    dtype, CFG), so on one process a checkpoint scores exactly what its run logged (and the base model what it
    logged at epoch 0)."""
    import dataclasses
    import json

    from trainers.run import eval_main, sample_main

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 1, "eval_every": 1})
    if extra:
        model = dataclasses.replace(cfg.model, dtype=extra["dtype"])
        train = {**cfg.train, "eval_guidance_scale": extra["eval_guidance_scale"]}  # RunConfig.train is a dict
        sample = dataclasses.replace(cfg.sample, guidance_scale=3.0)  # the eval CFG (2) must not fall back to it
        cfg = dataclasses.replace(cfg, model=model, train=train, sample=sample)
    _train(cfg)
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reward/jpeg_compressibility" in r]
    base, trained = logged[0], logged[-1]
    assert "epoch" not in base and trained["epoch"] == 1
    assert base["eval/reward/jpeg_compressibility"] != trained["eval/reward/jpeg_compressibility"]
    for resume, expected in (("latest", trained), (None, base)):
        eval_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume_from=resume))
        assert eval_main(eval_cfg) == 0
        out = json.loads((tmp_path / "run" / "eval.json").read_text())
        assert out["eval/reward/jpeg_compressibility"] == expected["eval/reward/jpeg_compressibility"]
        # which checkpoint: as asked and as resolved (`latest` moves on as training continues)
        assert out["checkpoint"] == resume and out["checkpoint_step"] == (1 if resume else None)
        assert out["checkpoint_path"] == (str((tmp_path / "run" / "checkpoints" / "step-00000001").resolve())
                                          if resume else None)
        # `diffalign sample` draws the images it scores (it used the run seed and the sample section's settings)
        assert sample_main(eval_cfg) == 0
        out = json.loads((tmp_path / "run" / "samples_rewards.json").read_text())
        assert out["mean"]["jpeg_compressibility"] == expected["eval/reward/jpeg_compressibility"]


def test_eval_rewards_are_scored_only_at_evaluation(tmp_path):
    """``eval_rewards`` columns follow the training ones at every evaluation (trainer and ``diffalign eval``) and
    never enter training: the same run without them trains to the same weights and logs the same rewards."""
    import dataclasses
    import json

    from trainers.run import eval_main

    extra = [{"name": "colorfulness"}]
    runs = {}
    for name, eval_rewards in (("with", extra), ("without", [])):
        cfg = run_config(save_tiny(tmp_path), tmp_path / name, train={"num_epochs": 1, "eval_every": 1},
                         eval_rewards=eval_rewards)
        runs[name] = (cfg, _train(cfg), read_metrics(tmp_path / name / "metrics.jsonl"))
    cfg, trainer, rows = runs["with"]
    evals = [r for r in rows if "eval/reward/jpeg_compressibility" in r]
    assert len(evals) == 2 and all("eval/reward/colorfulness" in r for r in evals)
    assert not any("reward/colorfulness" in r for r in rows)  # not a training column
    plain = [r for r in runs["without"][2] if "epoch" in r][0]
    assert [r for r in rows if "epoch" in r][0]["reward/jpeg_compressibility"] == plain["reward/jpeg_compressibility"]
    for a, b in zip(trainer.params, runs["without"][1].params):
        assert torch.equal(a, b)
    latest = dataclasses.replace(cfg.checkpoint, resume_from="latest")
    assert eval_main(dataclasses.replace(cfg, checkpoint=latest)) == 0
    out = json.loads((tmp_path / "with" / "eval.json").read_text())
    assert out["eval/reward/colorfulness"] == evals[-1]["eval/reward/colorfulness"]
    clash = run_config(save_tiny(tmp_path), tmp_path / "clash", eval_rewards=[{"name": "jpeg_compressibility"}])
    with pytest.raises(ValueError, match=r"eval_rewards: columns \['jpeg_compressibility'\] are already"):
        _train(clash)


def test_time_limited_run_ends_with_an_evaluation(tmp_path):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 50, "max_minutes": 0.0})
    _train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    assert len(rows) == 1 and rows[0]["epoch"] == 1  # stopped after its first epoch
    assert "eval/reward/jpeg_compressibility" in rows[0]
    assert resolve_resume(tmp_path / "run", "latest").name.endswith("00000001")


def test_time_limit_decision_is_shared_by_all_ranks():
    """One rank whose clock ran out stops every rank (no rank left alone in a collective)."""
    import time
    from types import SimpleNamespace

    from diffalign.distributed import DistContext
    from trainers.common import should_stop

    cfg = SimpleNamespace(max_minutes=10.0, stop_after_epochs=None)
    now = time.time()
    other_timed_out = DistContext(rank=0, world_size=2, gather_fn=lambda t: torch.cat([t, torch.tensor([[1.0, 0]])]))
    nobody = DistContext(rank=0, world_size=2, gather_fn=lambda t: torch.cat([t, torch.zeros(1, 2)]))
    assert should_stop(cfg, 1, now, other_timed_out) == (True, True, 0)
    assert should_stop(cfg, 1, now, nobody) == (False, False, 0)
    assert should_stop(cfg, 1, now - 601, nobody) == (True, True, 0)
    assert should_stop(SimpleNamespace(max_minutes=None, stop_after_epochs=2), 2, now) == (True, False, 0)


def test_a_signal_on_one_rank_stops_every_rank(monkeypatch):
    """SIGTERM / SIGINT under diffalign.interrupt.GracefulStop: the first only requests a stop (shared by all
    ranks, also without a time limit), a second SIGINT stops at once, a second SIGTERM changes nothing."""
    import signal
    import time
    from types import SimpleNamespace

    from diffalign.distributed import DistContext
    from diffalign.interrupt import GracefulStop, stop_active, stop_requested
    from trainers.common import should_stop

    cfg = SimpleNamespace(max_minutes=None, stop_after_epochs=None)
    other_got_term = DistContext(rank=0, world_size=2,
                                 gather_fn=lambda t: torch.cat([t, torch.tensor([[0.0, float(signal.SIGTERM)]])]))
    nobody = DistContext(rank=0, world_size=2, gather_fn=lambda t: torch.cat([t, torch.zeros(1, 2)]))
    now = time.time()
    assert should_stop(cfg, 1, now, other_got_term) == (False, False, 0)  # no GracefulStop: no collective
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(announce=False) as stop:
        assert stop_active() and stop_requested() is None
        assert should_stop(cfg, 1, now, nobody) == (False, False, 0)
        assert should_stop(cfg, 1, now, other_got_term) == (True, False, signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the process is not terminated: a stop is requested
        assert stop.requested == signal.SIGTERM == stop_requested()
        assert should_stop(cfg, 1, now) == (True, False, signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # repeated SIGTERM: still only the request
        assert stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second interrupt"):
            signal.raise_signal(signal.SIGINT)
    assert not stop_active() and stop_requested() is None and signal.getsignal(signal.SIGTERM) is before


def test_learning_rate_schedules(tmp_path):
    """Warmup then constant, linear or cosine decay to 0 over ``lr_decay_steps`` (known values), wired into the
    trainer's scheduler; a decay without its length is a config error."""
    import math

    from diffalign.config import ConfigError
    from trainers.common import lr_factor

    assert [lr_factor(s, 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 0, "linear", 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    cos = [lr_factor(s, 1, "cosine", 4) for s in range(7)]
    expected = [1.0] + [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)] + [0.0]
    assert all(abs(a - b) < 1e-12 for a, b in zip(cos, expected)), cos
    trainer = train_run(run_config(save_tiny(tmp_path), tmp_path / "run",
                                   train={"num_epochs": 2, "lr_schedule": "linear", "lr_decay_steps": 4}))
    # 2 epochs x 1 update (gradient_accumulation_steps 2 over 2 minibatches): the rate after 2 steps is half
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.5e-2)
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        GRPOTrainer(run_config(save_tiny(tmp_path), tmp_path / "bad", train={"lr_schedule": "cosine"}))


def test_log_every_writes_a_row_every_n_epochs_and_at_the_last(tmp_path):
    out = tmp_path / "run"
    train_run(run_config(save_tiny(tmp_path), out, train={"num_epochs": 5}, logging={"log_every": 2}))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert "eval/reward/jpeg_compressibility" in rows[-1] and "reward/combined" in rows[0]


def test_eval_json_is_strict_json_when_a_column_has_no_finite_value(tmp_path):
    """A reward column that failed on every prompt (``on_error: skip``) is ``null`` in ``eval.json``, as in
    ``metrics.jsonl``; Python's json wrote a bare ``NaN``, which strict JSON readers (jq, JavaScript) reject."""
    import json

    from trainers.run import eval_main

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", checkpoint={"resume_from": None},
                     rewards=[{"name": "jpeg_compressibility"},
                              {"name": "plugins.reward_plugins:raising", "on_error": "skip"}])
    assert eval_main(cfg) == 0

    def refuse(constant):
        raise AssertionError(f"eval.json holds {constant}, not strict JSON")

    out = json.loads((tmp_path / "run" / "eval.json").read_text(), parse_constant=refuse)
    assert out["eval/reward/raising"] is None
    assert isinstance(out["eval/reward/jpeg_compressibility"], float)


@pytest.mark.parametrize("kind,sample,key", [
    ("sd3", {"step": "flow_cps", "window": [0, 1], "random_window": [0, 4]}, "sample.random_window"),
    ("sd3", {"step": "flow_cps", "window": [3, 4]}, "sample.window"),
    ("sd3", {"step": "flow_cps", "random_window": [0, 4]}, "sample.random_window"),  # one-step windows drawn
    ("sd3", {"step": "flow_cps", "num_steps": 1, "eval_num_steps": 1}, "sample.num_steps"),
    ("sd15", {"step": "ddim", "noise_level": 1.0, "window": [0, 1], "random_window": [1, 4]}, None),
])
def test_windows_that_can_leave_an_epoch_nothing_to_train_are_refused_before_sampling(tmp_path, kind, sample, key):
    """flow_cps (and DDIM into noise level 0) take the last step without noise: a one-step window drawn there left
    its epoch no stochastic step, and the run stopped at that epoch (a resume drew the same window again). Such
    settings are refused at setup; DDIM on SD1.5 (final noise above 0: set_alpha_to_one is false) draws noise at
    its last step too and trains every window."""
    from diffalign.config import ConfigError
    from trainers.grpo import select_train_steps

    cfg = run_config(save_tiny(tmp_path, kind), tmp_path / "run", sample=sample)
    trainer = GRPOTrainer(cfg)
    if key is not None:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            trainer.setup()
        return
    trainer.setup()
    try:
        from trainers.common import sample_batch

        assert float(trainer.adapter.make_schedule(4, 32, 32).sigmas[-1]) > 0
        assert (3, 4) in {trainer._window(epoch) for epoch in range(40)}  # the last step is drawn, and is noisy:
        traj, *_ = sample_batch(trainer.adapter, ["a red circle"], [0], seed=0, num_steps=4, guidance_scale=1.0,
                                negative_prompt="", height=32, width=32, step="ddim", noise_level=1.0, window=(3, 4))
        assert select_train_steps(traj.stochastic, 1, fraction=1.0, mode="first").tolist() == [[3]]
    finally:
        trainer.cleanup()


def test_a_wandb_run_gets_the_resolved_config_and_the_output_folders_name(tmp_path, monkeypatch):
    """The trainers opened W&B without the config or a name (the README promised both)."""
    import diffalign.logging as logging_mod

    seen = {}
    real = logging_mod.MetricsLogger

    class Recording(real):
        def __init__(self, run_dir, **kwargs):
            seen.update(kwargs)
            super().__init__(run_dir, **{**kwargs, "wandb": False})  # W&B itself is tested in test_logging.py

    monkeypatch.setattr(logging_mod, "MetricsLogger", Recording)
    cfg = run_config(save_tiny(tmp_path), tmp_path / "my-run", train={"num_epochs": 1},
                     logging={"wandb": True, "image_every": 0})
    _train(cfg)
    assert seen["wandb"] is True and seen["run_name"] == "my-run"
    assert seen["wandb_config"]["trainer"] == "grpo" and seen["wandb_config"]["train"]["num_epochs"] == 1


def test_a_rank_transform_ranks_the_whole_group_whatever_the_sampling_batch(tmp_path):
    """``rank`` compares a prompt's samples; applied per reward call it ranked whichever samples shared a sampling
    batch (and a process), so 2 batches of 4 and 1 batch of 8 of the same samples got other advantages (an audit:
    advantage/abs_mean 0.9998 vs 0.8942). The trainers transform the gathered epoch; evaluations their whole set."""
    from rewards import MultiReward

    model = save_tiny(tmp_path)
    spec = [{"name": "colorfulness", "transform": {"name": "rank", "by": "prompt"}}]
    rows = []
    for b, n in ((4, 2), (8, 1)):
        cfg = run_config(model, tmp_path / f"run{b}", rewards=spec,
                         sample={"batch_size": b, "num_batches_per_epoch": n, "group_size": 4},
                         train={"num_epochs": 1, "eval_every": 1})
        train_run(cfg)
        rows.append([r for r in read_metrics(tmp_path / f"run{b}" / "metrics.jsonl") if "epoch" in r][-1])
    for key in ("advantage/abs_mean", "reward/colorfulness", "eval/reward/colorfulness"):
        assert rows[0][key] == pytest.approx(rows[1][key], abs=1e-6), key
    assert rows[0]["reward/colorfulness"] == pytest.approx(0.5)  # ranks of groups of 4: mean 0.5 exactly
    # the whole set at once equals the transform of one call over it
    multi = MultiReward(spec)
    images = torch.rand(6, 3, 8, 8)
    prompts = ["a", "b", "a", "b", "a", "b"]
    whole = multi(images, prompts).rewards
    raw = multi(images, prompts, transform=False).rewards
    torch.testing.assert_close(multi.apply_transforms(raw, prompts), whole)
