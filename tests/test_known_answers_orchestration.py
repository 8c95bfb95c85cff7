"""Known answers for the trainers' orchestration (mutation-testing pass over trainers/common.py, the GRPO / NFT
training loops outside their loss functions, samplers/rollout.py bookkeeping and the LoRA helpers).

Most tests drive the shared machinery on stub trainers (exact counts, schedules, cadences, state round trips);
the trainer-level ones replace the loss with ``sum(params)``, whose gradient is 1 for every element at every
micro-step, so the gradient an optimizer step sees is exactly (micro-steps in its window) / per_update.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from grpo_helpers import run_config, save_tiny

import trainers.common as common
from diffalign.distributed import DistContext, seed_for
from diffalign.logging import read_metrics
from trainers.common import EMA, LossScaler, NonFiniteError, optimizer_update

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- optimizer_update (stub trainer)


def _trainer(on_nonfinite="skip", max_skipped_steps=3, scaler=None, ema=False, lr_lambda=lambda s: 1.0 / (s + 1)):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = NS(max_grad_norm=0.0, on_nonfinite=on_nonfinite, max_skipped_steps=max_skipped_steps)
    return NS(cfg=cfg, params=[p], optimizer=opt, global_step=0, scaler=scaler or LossScaler(False),
              lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), ema=EMA([p], 0.9) if ema else None)


def _set_grad(trainer, grad):
    trainer.params[0].grad = torch.tensor(grad)


def test_an_applied_step_steps_the_schedule_clears_the_gradient_and_counts():
    trainer, metrics = _trainer(), {}
    _set_grad(trainer, [1.0, 2.0])
    assert optimizer_update(trainer, metrics)
    torch.testing.assert_close(trainer.params[0].detach(), torch.tensor([-1.0, -2.0]))  # SGD lr 1 x factor 1
    assert trainer.params[0].grad is None  # zero_grad(set_to_none) after the step
    assert trainer.global_step == 1 and trainer.skipped_streak == 0
    assert trainer.lr_scheduler.get_last_lr() == [0.5]  # LambdaLR stepped once: factor 1 / (1 + 1)
    assert "train/skipped_steps" not in metrics


def test_a_caller_reported_non_finite_step_is_skipped_even_with_a_finite_gradient():
    """``finite=False`` (MARBLE found its own inputs non-finite) drops the step although ``.grad`` is finite."""
    trainer, metrics = _trainer(), {}
    _set_grad(trainer, [1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert not optimizer_update(trainer, metrics, finite=False)
    assert torch.equal(trainer.params[0].detach(), torch.zeros(2))
    assert trainer.params[0].grad is None  # the dropped gradient does not leak into the next step
    assert trainer.global_step == 0 and trainer.skipped_streak == 1
    assert trainer.lr_scheduler.get_last_lr() == [1.0]
    assert metrics == {"train/skipped_steps": [1.0]}
    _set_grad(trainer, [1.0, 0.0])  # the next step applies only its own gradient
    assert optimizer_update(trainer, metrics)
    torch.testing.assert_close(trainer.params[0].detach(), torch.tensor([-1.0, 0.0]))


def test_on_nonfinite_raise_stops_at_the_first_bad_step():
    trainer = _trainer(on_nonfinite="raise", max_skipped_steps=5)
    _set_grad(trainer, [float("nan"), 0.0])
    with pytest.raises(NonFiniteError, match="train.on_nonfinite=raise"):
        optimizer_update(trainer, {})


def test_float16_overflow_is_not_a_skip_and_clean_steps_grow_the_scale():
    scaler = LossScaler(True, init_scale=8.0, growth_interval=2)
    trainer, metrics = _trainer(scaler=scaler, max_skipped_steps=0), {}
    _set_grad(trainer, [float("inf"), 0.0])
    with pytest.warns(RuntimeWarning, match="overflow"):
        assert not optimizer_update(trainer, metrics)  # max_skipped_steps=0: a counted skip would raise
    assert scaler.scale == 4.0 and getattr(trainer, "skipped_streak", 0) == 0
    assert metrics == {"train/loss_scale": [8.0], "train/overflow_steps": [1.0]}
    for _ in range(2):
        _set_grad(trainer, [0.0, 0.0])
        assert optimizer_update(trainer, metrics)
    assert scaler.scale == 8.0 and scaler.good_steps == 0  # growth_interval clean steps double it
    assert common.update_metrics(trainer, {"train/overflow_steps": [1.0, 1.0], "train/skipped_steps": [1.0]}) == {
        "train/skipped_steps": 1, "train/loss_scale": 8.0, "train/overflow_steps": 2}


def test_loop_state_round_trip():
    src = _trainer(scaler=LossScaler(True, init_scale=8.0))
    src.scaler.good_steps, src.skipped_streak = 3, 2
    state = common.loop_state(src)
    dst = _trainer(scaler=LossScaler(True))
    common.restore_loop_state(dst, state)
    assert (dst.scaler.scale, dst.scaler.good_steps, dst.skipped_streak) == (8.0, 3, 2)
    common.restore_loop_state(dst, {})  # a checkpoint without the entries starts the count afresh
    assert dst.skipped_streak == 0


# ----------------------------------------------------------------------------- optimizer / LR schedule


def test_build_optimizer_passes_every_adam_setting_and_checks_the_schedule_up_front():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = NS(learning_rate=0.1, adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.3, adam_eps=1e-6, warmup_steps=2,
             lr_schedule="linear", lr_decay_steps=4)
    opt, sched = common.build_optimizer([p], cfg)
    g = opt.param_groups[0]
    assert (g["betas"], g["weight_decay"], g["eps"]) == ((0.8, 0.95), 0.3, 1e-6)
    factors = [common.lr_factor(s, 2, "linear", 4) for s in range(8)]
    assert factors == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * f for f in factors[:7]])
    with pytest.raises(ValueError, match="lr_decay_steps"):  # at build time, not at the first decayed step
        common.build_optimizer([p], NS(**{**vars(cfg), "warmup_steps": 100, "lr_decay_steps": 0}))


# ----------------------------------------------------------------------------- run_epochs (stub trainer)


class _StubTrainer:
    """What :func:`trainers.common.run_epochs` uses, recording every call."""

    def __init__(self, *, num_epochs, eval_every=0, image_every=0, log_every=1, ckpt_every=0, stop_after=None,
                 max_minutes=None, epoch=0, batch_size=4, num_batches=5, group_size=2):
        sample = NS(batch_size=batch_size, num_batches_per_epoch=num_batches, group_size=group_size)
        self.run = NS(sample=sample, seed=3, output_dir="unused", logging=NS(image_every=image_every,
                                                                               log_every=log_every),
                      checkpoint=NS(every=ckpt_every))
        self.cfg = NS(num_epochs=num_epochs, eval_every=eval_every, max_minutes=max_minutes,
                      stop_after_epochs=stop_after)
        self.dist, self.device, self.epoch = DistContext(), torch.device("cpu"), epoch
        self.rewards = NS(total_failures={}, names=[], specs=[])
        self.evals, self.logged, self.images, self.saved, self.requested, self.assignments = [], [], [], [], [], []
        self.positions = []
        self.prompts = NS(epoch_prompts=self._epoch_prompts)
        self.logger = NS(log=lambda step, m: self.logged.append(step),
                         log_images=lambda step, imgs, prompts: self.images.append((step, len(imgs), len(prompts))))

    def _epoch_prompts(self, epoch, n, position=None):
        self.requested.append((epoch, n))
        self.positions.append(position)
        return [f"p{epoch}-{i}" for i in range(n)]

    def evaluate(self):
        self.evals.append(self.epoch)
        return {"eval/reward/r": float(self.epoch)}

    def save_checkpoint(self):
        self.saved.append(self.epoch)

    def one_epoch(self, epoch, assignment):
        self.assignments.append((epoch, assignment.sample_ids[:2], assignment.global_prompts[:1]))
        n = len(assignment.sample_ids)
        return {"reward_seconds": 0.0, "images": torch.zeros(n, 3, 2, 2)}, {"reward/combined": 0.0}, 0.0

    def go(self):
        return common.run_epochs(self, "stub", self.one_epoch)


def test_run_epochs_evaluates_logs_saves_and_draws_prompts_on_schedule():
    t = _StubTrainer(num_epochs=5, eval_every=2, image_every=2, log_every=3, ckpt_every=2)
    last = t.go()
    assert t.evals == [0, 2, 4, 5]  # before training, every eval_every epochs, and at the end
    assert last == {"eval/reward/r": 5.0}
    assert t.logged == [0, 2, 3, 4, 5]  # log_every, every evaluation, the last epoch
    assert t.images == [(2, 16, 16), (4, 16, 16)]  # 20 samples per epoch, the first 16 shown
    assert t.saved == [2, 4, 5]
    assert t.requested == [(e, 10) for e in range(5)]  # 1 x 4 x 5 samples / group 2 = 10 prompts of epoch e
    assert t.positions == [10 * e for e in range(5)]  # the shapes stream runs on from where the last epoch stopped
    for e, (epoch, ids, prompt) in enumerate(t.assignments):
        assert epoch == e and ids == [20 * e, 20 * e + 1]  # global ids unique across epochs
        assert prompt[0].startswith(f"p{e}-")


def test_run_epochs_without_eval_every_evaluates_only_at_the_end():
    t = _StubTrainer(num_epochs=2, eval_every=0)
    t.go()
    assert t.evals == [2] and t.logged == [1, 2] and t.saved == [2] and t.images == []


def test_a_resumed_run_stops_after_stop_after_epochs_and_logs_and_saves_there():
    t = _StubTrainer(num_epochs=10, eval_every=4, log_every=4, ckpt_every=4, stop_after=3, epoch=2)
    t.go()
    assert [a[0] for a in t.assignments] == [2, 3, 4]  # continues at the sampler position of epoch 2
    assert t.evals == [4]  # no evaluation before a resumed run's first epoch; epoch 5 is neither due nor last
    assert t.logged == [4, 5]  # the stopping epoch is logged although log_every says no
    assert t.saved == [4, 5]  # and checkpointed although checkpoint.every says no


def test_the_time_limit_stops_at_exactly_max_minutes_and_evaluates(monkeypatch):
    calls = []

    def clock():  # run_epochs' start at 0, every later reading exactly one minute later
        calls.append(1)
        return 0.0 if len(calls) == 1 else 60.0

    monkeypatch.setattr(time, "time", clock)
    t = _StubTrainer(num_epochs=10, max_minutes=1.0)
    t.go()
    assert [a[0] for a in t.assignments] == [0]
    assert t.evals == [1] and t.logged == [1] and t.saved == [1]


# ----------------------------------------------------------------------------- evaluation, EMA, checkpoint state


def test_evaluation_scores_the_ema_weights_then_restores_the_trained_ones(monkeypatch):
    p = torch.nn.Parameter(torch.ones(1))
    ema = EMA([p])
    ema.shadow[0].fill_(5.0)
    calls = []

    def score(adapter, reward_sets, prompts, ids, **kw):
        calls.append((list(prompts), list(ids), kw["num_steps"], kw["guidance_scale"], kw["seed"]))
        return torch.full((len(prompts), 1), float(p.detach())), None

    monkeypatch.setattr(common, "score_prompts", score)
    trainer = NS(run=NS(sample=NS(eval_num_steps=3, guidance_scale=4.5, batch_size=16), seed=3),
                 cfg=NS(eval_num_steps=7, eval_guidance_scale=None), dist=DistContext(), device=torch.device("cpu"),
                 adapter=None, ema=ema, prompts=NS(eval_prompts=lambda: ["a", "b"]), rewards=NS(names=["r"]),
                 eval_only_rewards=None, height=32, width=32, dtype=torch.float32)
    assert common.evaluate_run(trainer) == {"eval/reward/r": 5.0}
    assert float(p.detach()) == 1.0
    assert calls == [(["a", "b"], [0, 1], 7, 4.5, common.eval_seed(3))]


def test_evaluation_pads_the_gather_on_the_scores_device(monkeypatch):
    """10 prompts in batches of 4 on one process: the gather is padded to 12 rows with NaN on the device the scores
    are on (on a GPU the NaN rows were made on the CPU and the concatenation failed); the padding is left out of
    the mean. ``meta`` stands in for an accelerator."""
    gathered = []
    monkeypatch.setattr(common, "score_prompts", lambda adapter, sets, prompts, ids, **kw: (
        torch.ones(len(prompts), 1, device="meta"), None))

    def gather(t):
        gathered.append((t.device.type, tuple(t.shape)))
        return torch.cat([torch.arange(10, dtype=torch.float32), torch.full((2,), float("nan"))])[:, None]

    trainer = NS(run=NS(sample=NS(eval_num_steps=3, guidance_scale=4.5, batch_size=4), seed=3),
                 cfg=NS(eval_num_steps=None, eval_guidance_scale=None), dist=NS(rank=0, world_size=1, gather=gather),
                 device=torch.device("meta"), adapter=None, ema=None,
                 prompts=NS(eval_prompts=lambda: [str(i) for i in range(10)]), rewards=NS(names=["r"]),
                 eval_only_rewards=None, height=32, width=32, dtype=torch.float32)
    assert common.evaluate_run(trainer) == {"eval/reward/r": 4.5}  # mean of 0..9, the two NaN rows left out
    assert gathered == [("meta", (12, 1))]


def _linear_adapter():
    den = torch.nn.Linear(1, 1, bias=False)
    return NS(has_lora=False, denoiser=den), list(den.parameters())


def test_checkpoint_weights_and_counters_carry_the_ema_and_its_update_count():
    adapter, params = _linear_adapter()
    with torch.no_grad():
        params[0].fill_(1.0)
    ema = EMA(params)
    ema.shadow[0].fill_(3.0)
    ema.num_updates = 7
    saved = {}
    ckpt = NS(save=lambda epoch, **kw: saved.update(epoch=epoch, **kw), rank=0)
    common.save_run_state(ckpt, adapter, ema, epoch=4, step=9, optimizer=None, lr_scheduler=None,
                          sampler_state={"x": 1}, config={})
    assert saved["counters"] == {"epoch": 4, "step": 9, "ema_updates": 7}
    assert saved["sampler_state"] == {"x": 1, "prompt_epoch": 4}
    assert float(saved["trainable_state"]["weight"]) == 1.0 and float(saved["ema_state"]["weight"]) == 3.0
    assert float(params[0].detach()) == 1.0
    assert saved["trainable_state"]["weight"].device.type == "cpu"  # copies for the writer, on the CPU
    other = {}  # a rank other than the writer's: no copies (the writer takes rank 0's), the same checks
    common.save_run_state(NS(save=lambda epoch, **kw: other.update(kw), rank=1), adapter, ema, epoch=4, step=9,
                          optimizer=None, lr_scheduler=None, sampler_state={}, config={})
    assert other["trainable_state"] == {} and other["ema_state"] == {}
    ema.shadow[0].fill_(float("nan"))
    with pytest.raises(common.NonFiniteError, match="refusing to write checkpoint 4: 1 EMA tensors are not finite"):
        common.save_run_state(NS(save=lambda epoch, **kw: None, rank=1), adapter, ema, epoch=4, step=9,
                              optimizer=None, lr_scheduler=None, sampler_state={}, config={})
    assert float(params[0].detach()) == 1.0  # the EMA swapped back out
    ema.shadow[0].fill_(3.0)

    fresh_adapter, fresh_params = _linear_adapter()
    fresh_ema = EMA(fresh_params)
    state = NS(ema_state=saved["ema_state"], trainable_state=saved["trainable_state"],
               counters=saved["counters"], path="ckpt")
    common.restore_weights(fresh_adapter, fresh_params, fresh_ema, state)
    assert fresh_ema.num_updates == 7 and float(fresh_ema.shadow[0]) == 3.0 and float(fresh_params[0].detach()) == 1.0


def test_build_adapter_applies_the_model_section(tiny_sd3, tmp_path):
    import dataclasses

    cfg = run_config(tiny_sd3, tmp_path / "run")
    lora = dataclasses.replace(cfg.model.lora, rank=2, alpha=6.0, target_modules=["to_q", "to_v"])
    model = dataclasses.replace(cfg.model, lora=lora, dtype="bfloat16", gradient_checkpointing=True)
    adapter = common.build_adapter(model, torch.device("cpu"))
    peft = adapter.denoiser.peft_config["default"]
    assert (peft.r, peft.lora_alpha, set(peft.target_modules)) == (2, 6.0, {"to_q", "to_v"})
    params = adapter.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)  # trained in fp32 under a bf16 model
    assert adapter.denoiser.is_gradient_checkpointing
    assert not any(p.requires_grad for p in adapter.pipeline.text_encoder.parameters())
    adapter.disable_gradient_checkpointing()
    assert not adapter.denoiser.is_gradient_checkpointing


# ----------------------------------------------------------------------------- GRPO: windows and the epoch loop


def test_random_window_known_answer_and_range():
    from trainers.grpo import GRPOTrainer

    from diffalign.config import SampleConfig, from_dict

    def windows(window, random_window, epochs=40):
        sample = from_dict(SampleConfig, {"num_steps": 4, "window": None if window is None else list(window),
                                          "random_window": None if random_window is None else list(random_window)})
        stub = NS(run=NS(sample=sample, seed=3))
        return [GRPOTrainer._window(stub, e) for e in range(epochs)]

    assert windows((1, 3), None, 2) == [(1, 3), (1, 3)]
    assert windows(None, None, 1) == [None]
    got = windows((0, 2), (0, 4))
    assert {w[1] - w[0] for w in got} == {2}  # the window's length
    assert {w[0] for w in got} == {0, 1, 2}  # every start in [lo, hi - k], hi - k included
    want = [int(np.random.default_rng(seed_for(3, e, 5)).integers(0, 3)) for e in range(40)]
    assert [w[0] for w in got] == want  # a fresh draw per epoch from the run seed
    single = windows(None, (1, 4))
    assert {w[1] - w[0] for w in single} == {1} and {w[0] for w in single} == {1, 2, 3}


def test_select_train_steps_trains_at_least_one_step():
    from trainers.grpo import select_train_steps

    stoch = torch.tensor([False, True, True, True])
    assert select_train_steps(stoch, 2, fraction=0.1, mode="first").tolist() == [[1], [1]]  # int(0.3) = 0 -> 1
    assert select_train_steps(stoch, 1, fraction=0.99, mode="first").tolist() == [[1, 2]]
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    want = [int(torch.tensor([1, 2, 3])[torch.randperm(3, generator=torch.Generator().manual_seed(s))[0]])
            for s in (0, 1)]
    assert select_train_steps(stoch, 2, fraction=0.2, mode="random", generators=gens).flatten().tolist() == want


def _sum_loss(params):
    return sum(p.sum() for p in params)


def test_grpo_epoch_minibatches_accumulation_and_counts(tiny_sd3, tmp_path, monkeypatch):
    """12 samples, minibatches of 4, accumulation 2, 2 inner epochs, 3 trained steps: per inner epoch a full
    window (2 minibatches) and the last minibatch alone; each update is the mean over its own micro-steps, so both
    gradients are exactly 1 (a partial last window is not a half step)."""
    import trainers.grpo as grpo_mod
    from diffalign.types import Trajectory
    from trainers.grpo import GRPOTrainer

    cfg = run_config(tiny_sd3, tmp_path / "run",
                     sample={"num_batches_per_epoch": 3},
                     train={"num_epochs": 2, "num_inner_epochs": 2, "shuffle": True, "max_grad_norm": 1e9,
                            "lr_schedule": "linear", "lr_decay_steps": 16, "beta": 0.0},
                     checkpoint={"every": 0})
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    orig_loss, orig_update, orig_select = grpo_mod.grpo_loss, common.optimizer_update, Trajectory.index_select
    grads, minibatches = [], []

    def loss(*a, **k):
        _, st = orig_loss(*a, **k)
        return _sum_loss(trainer.params), st

    def update(tr, metrics, **k):
        grads.append(sorted({round(float(v), 6) for p in tr.params for v in p.grad.flatten()}))
        return orig_update(tr, metrics, **k)

    def select(self, index):
        if self.latents.shape[0] == 12:  # the epoch's trajectory (not a minibatch of it)
            minibatches.append(index.tolist())
        return orig_select(self, index)

    monkeypatch.setattr(grpo_mod, "grpo_loss", loss)
    monkeypatch.setattr(common, "optimizer_update", update)
    monkeypatch.setattr(Trajectory, "index_select", select)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert grads == [[1.0], [1.0], [1.0], [1.0]] * 2
    want = []
    for epoch in range(2):
        gen = torch.Generator().manual_seed(seed_for(3, epoch, 0, 11))
        for _ in range(2):
            order = torch.randperm(12, generator=gen).tolist()
            want += [order[0:4], order[4:8], order[8:12]]
    assert minibatches == want
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    assert [r["train/updates"] for r in rows] == [4, 4]
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-2 * 12 / 16, 1e-2 * 8 / 16])
    assert [r["train/kl_loss"] for r in rows] == [0.0, 0.0]  # beta 0: no KL computed although the policy moved
    # the epoch's mean gradient norm (max_grad_norm 1e9 logs it without clipping): sqrt(D) for every update
    d = sum(p.numel() for p in trainer.params)
    assert [r["train/grad_norm"] for r in rows] == pytest.approx([math.sqrt(d)] * 2, rel=1e-5)
    assert trainer.global_step == 8


def test_grpo_drop_zero_std_shares_each_window_over_its_kept_samples(tiny_sd3, tmp_path, monkeypatch):
    """drop_zero_std_groups: 12 samples (shuffle off), minibatches of 4, accumulation 2; the first 8 kept, the last 4
    dropped. Window 1 (minibatches 1-2) keeps 8: each minibatch's masked sum is divided by 8 / accum = 4; window 2
    keeps none: no optimizer step (train/empty_updates)."""
    import trainers.grpo as grpo_mod
    from trainers.grpo import GRPOTrainer

    cfg = run_config(tiny_sd3, tmp_path / "run", sample={"num_batches_per_epoch": 3},
                     train={"num_epochs": 1, "drop_zero_std_groups": True}, checkpoint={"every": 0})
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    keep = torch.tensor([True] * 8 + [False] * 4)
    trainer._advantages = lambda rewards, assignment: (torch.linspace(-1, 1, 12), keep, {"reward/combined": 0.0})
    orig_loss, calls = grpo_mod.grpo_loss, []

    def loss(*a, mask=None, denominator=None, **k):
        calls.append((mask.tolist(), denominator))
        return orig_loss(*a, mask=mask, denominator=denominator, **k)

    monkeypatch.setattr(grpo_mod, "grpo_loss", loss)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert calls == [([True] * 4, 4.0)] * 6 + [([False] * 4, 0.0)] * 3  # 3 trained steps per minibatch
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r][-1]
    assert (row["train/updates"], row["train/empty_updates"]) == (1, 1)
    assert trainer.global_step == 1


# ----------------------------------------------------------------------------- DiffusionNFT


def _nft_config(model, out, rewards=({"name": "jpeg_compressibility"},), **train):
    t = {"num_epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 2,
         "eval_every": 0, "kl_weight": 0.0, "shuffle": True, "max_grad_norm": 0.0}
    t.update(train)
    return run_config(model, out, trainer="nft",
                      sample={"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 3},
                      rewards=list(rewards), train=t,
                      checkpoint={"every": 0, "resume_from": "latest"})


def test_nft_epoch_timesteps_minibatches_accumulation_and_old_policy_sampling(tiny_sd3, tmp_path, monkeypatch):
    """12 samples, minibatches of 4, accumulation 2, 3 of 4 timesteps per sample drawn from the sample's own
    stream in draw order; the rollouts of epoch 2 come from the old policy (not the current weights)."""
    import trainers.nft as nft_mod
    from diffalign.generators.base import Conditioning
    from samplers.rollout import make_generators
    from trainers.common import TRAIN_SEED_STREAM
    from trainers.nft import NFTTrainer

    trainer = NFTTrainer(_nft_config(tiny_sd3, tmp_path / "run"))
    trainer.setup()
    orig_policy, orig_update, orig_select = nft_mod.nft_policy_loss, common.optimizer_update, Conditioning.index_select
    orig_sample, orig_velocities = common.sample_batch, trainer._velocities
    grads, minibatches, timesteps, sampled = [], [], [], []

    def policy(*a, **k):
        return _sum_loss(trainer.params) + 0 * orig_policy(*a, **k)

    def update(tr, metrics, **k):
        grads.append(sorted({round(float(v), 6) for p in tr.params for v in p.grad.flatten()}))
        return orig_update(tr, metrics, **k)

    def select(self, index):
        minibatches.append(index.tolist())
        return orig_select(self, index)

    def sample_batch(*a, **k):
        sampled.append([p.detach().clone() for p in trainer.params])
        return orig_sample(*a, **k)

    def velocities(model_fn, x_t, t):
        timesteps.append(t.clone())
        return orig_velocities(model_fn, x_t, t)

    monkeypatch.setattr(nft_mod, "nft_policy_loss", policy)
    monkeypatch.setattr(common, "optimizer_update", update)
    monkeypatch.setattr(Conditioning, "index_select", select)
    monkeypatch.setattr(common, "sample_batch", sample_batch)
    trainer._velocities = velocities
    shadows, ids = [], []
    orig_epoch = trainer._train_epoch

    def train_epoch(epoch, data, *a):
        shadows.append([s.clone() for s in trainer.old.shadow])
        ids.append(list(data["sample_ids"]))
        return orig_epoch(epoch, data, *a)

    trainer._train_epoch = train_epoch
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert grads == [[1.0], [1.0]] * 2  # the last window holds one minibatch: divided by 1 x 3 micro-steps, not 2 x 3
    assert trainer.global_step == 4
    sched = trainer.adapter.make_schedule(4, 32, 32)
    want_mb, want_t = [], []
    for epoch in range(2):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(seed_for(3, epoch, 0, 11))).tolist()
        gens = make_generators(seed_for(3, TRAIN_SEED_STREAM), ids[epoch])
        t_idx = torch.stack([torch.randperm(4, generator=g)[:3] for g in gens])
        for i in range(0, 12, 4):
            mb = order[i:i + 4]
            want_mb.append(mb)
            want_t += [sched.timesteps[t_idx[mb, j]] for j in range(3)]
    assert minibatches == want_mb
    assert len(timesteps) == len(want_t) == 18
    for got, want in zip(timesteps, want_t):
        torch.testing.assert_close(got, want.to(got))
    # 3 rollout batches per epoch (then the final evaluation's); epoch 2's use the old policy's weights
    assert len(sampled) == 7
    for weights in sampled[3:6]:
        for w, s in zip(weights, shadows[1]):
            torch.testing.assert_close(w, s.to(w), rtol=0, atol=0)
    assert any(not torch.equal(s, p.detach()) for s, p in zip(shadows[1], sampled[2]))  # old != current there
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    assert [r["train/updates"] for r in rows] == [2, 2]


def test_nft_step_kind_is_decided_before_every_optimizer_step(tiny_sd3, tmp_path):
    """Amortised MARBLE with marble_every 2 over 3 optimizer steps of one epoch: QP at steps 0 and 2, a plain step
    at 1; gradient diagnostics only with more than one reward."""
    from grpo_helpers import train_run
    from trainers.nft import NFTTrainer

    out = tmp_path / "run"
    trainer = train_run(_nft_config(tiny_sd3, out, rewards=[{"name": "jpeg_compressibility"}, {"name": "shapes"}],
                                    aggregation="marble", marble_mode="amortized", marble_every=2, num_epochs=1,
                                    gradient_accumulation_steps=1), NFTTrainer)
    row = [r for r in read_metrics(out / "metrics.jsonl") if "epoch" in r][-1]
    assert (row["steps/refresh"], row["steps/plain"], row["steps/diagnose"]) == (2, 1, 0)
    assert len(trainer.alpha_history) == 2 and trainer.global_step == 3

    def kind(step, num_rewards):
        cfg = NS(aggregation="weighted_sum", marble_mode="full", marble_every=10, grad_diagnostics_every=2)
        return NFTTrainer._step_kind(NS(cfg=cfg, global_step=step, num_rewards=num_rewards))

    assert [kind(s, 2) for s in range(3)] == [(False, True), (False, False), (False, True)]
    assert [kind(s, 1) for s in range(3)] == [(False, False)] * 3


def test_nft_kl_to_the_reference_is_measured_and_trained(tiny_sd3, tmp_path):
    """The reference is the adapter-disabled base: KL 0 before the LoRA moves (B = 0), > 0 after; and its gradient
    enters the update (the weights differ from a run without it)."""
    from grpo_helpers import train_run
    from trainers.nft import NFTTrainer

    runs = {}
    for kl in (0.0, 1.0):
        out = tmp_path / f"kl{kl}"
        # one update per epoch (3 minibatches x 3 timesteps), so epoch 1 trains on the unmoved LoRA throughout
        runs[kl] = (train_run(_nft_config(tiny_sd3, out, kl_weight=kl, gradient_accumulation_steps=3,
                                          num_epochs=2), NFTTrainer),
                    [r for r in read_metrics(out / "metrics.jsonl") if "epoch" in r])
    rows = runs[1.0][1]
    assert rows[0]["train/kl_loss"] == 0.0 and rows[1]["train/kl_loss"] > 0
    assert [r["train/kl_loss"] for r in runs[0.0][1]] == [0.0, 0.0]
    assert any(not torch.equal(a, b) for a, b in zip(runs[1.0][0].params, runs[0.0][0].params))


def test_nft_checkpoint_carries_the_running_moments(tiny_sd3, tmp_path):
    from diffalign.checkpoint import load_checkpoint, resolve_resume
    from grpo_helpers import train_run
    from trainers.nft import NFTTrainer

    out = tmp_path / "run"
    first = train_run(_nft_config(tiny_sd3, out, std_mode="global", num_epochs=1, gradient_accumulation_steps=6),
                      NFTTrainer)
    want = first.moments.state_dict()
    state = load_checkpoint(resolve_resume(out, "latest"))
    assert state.sampler_state["moments"] == want
    resumed = NFTTrainer(_nft_config(tiny_sd3, out, std_mode="global", num_epochs=2))
    resumed.setup()
    try:
        assert resumed.moments.state_dict() == want and resumed.epoch == 1
    finally:
        resumed.cleanup()


# ----------------------------------------------------------------------------- rollout bookkeeping


def _toy_flow():
    from samplers.schedules import flow_schedule, flow_sigmas

    def model(x, t):
        return 0.5 * x

    return model, flow_schedule(flow_sigmas(4, shift=3.0)), torch.randn(2, 1, 2, 2, generator=torch.Generator()
                                                                           .manual_seed(0))


def test_stochastic_window_bounds():
    from samplers.rollout import stochastic_mask

    assert stochastic_mask(4, (2, 4)).tolist() == [False, False, True, True]
    assert stochastic_mask(4, None).tolist() == [True] * 4
    for bad in ((2, 5), (2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="stochastic window"):
            stochastic_mask(4, bad)


def test_rollout_marks_only_steps_that_drew_noise_and_score_steps_refuses_deterministic_ones():
    from samplers import rollout, score_steps

    model, sched, x = _toy_flow()
    sde = rollout(model, sched, x, step="flow_sde", noise_level=0.7, generator=torch.Generator().manual_seed(1))
    assert sde.stochastic.tolist() == [True] * 4 and set(sde.extras) == {"g"}
    traj = rollout(model, sched, x, step="flow_cps", noise_level=0.7, generator=torch.Generator().manual_seed(1))
    # CPS's last step lands on sigma 0 with std 0: it drew no noise, so it is not stochastic (not trainable)
    assert traj.stochastic.tolist() == [True, True, True, False]
    assert traj.extras == {}  # the SDE's g is flow_sde's only
    with pytest.raises(ValueError, match="needs stochastic steps"):
        score_steps(model, sched, traj, torch.tensor([0, 3]))
    assert score_steps(model, sched, traj, torch.tensor([0, 2])).log_prob.shape == (2,)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        rollout(model, sched, x, noise_level=-0.5)


# ----------------------------------------------------------------------------- LoRA helpers


@pytest.fixture(scope="module")
def sd3_adapter_factory():
    from diffalign.generators import adapter_for_pipeline
    from diffalign.testing.tiny import tiny_sd3_pipeline

    return lambda: adapter_for_pipeline(tiny_sd3_pipeline())


def test_lora_options_and_a_second_adapter(sd3_adapter_factory, tmp_path):
    from diffalign.generators.lora import is_lora_parameter

    gen = sd3_adapter_factory()
    gen.add_lora(rank=2, alpha=3.0, dropout=0.25, target_modules=["to_q"])
    cfg = gen.denoiser.peft_config["default"]
    assert (cfg.lora_dropout, cfg.lora_alpha, set(cfg.target_modules)) == (0.25, 3.0, {"to_q"})
    gen.save_lora(str(tmp_path / "a"))
    gen.add_lora(rank=2, adapter_name="second")
    names = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert names and all(".second." in n for n in names)  # only the newest adapter trains
    assert not is_lora_parameter("blocks.0.to_q.lora_A.default_2.weight", "default")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'second'"):
        gen.load_lora(str(tmp_path / "a"), adapter_name="second")
    gen.load_lora(str(tmp_path / "a"), adapter_name="third")  # resume training a loaded LoRA: only it trains
    names = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert names and all(".third." in n for n in names)
    fresh = sd3_adapter_factory()
    fresh.load_lora(str(tmp_path / "a"))
    assert fresh.denoiser.peft_config["default"].lora_alpha == 3.0  # alpha travels as adapter metadata
    frozen = sd3_adapter_factory()
    frozen.load_lora(str(tmp_path / "a"), adapter_name="ref", trainable=False)  # a frozen reference adapter
    flags = [p.requires_grad for p in frozen.denoiser.parameters()]
    with frozen.disable_adapter():
        pass
    assert [p.requires_grad for p in frozen.denoiser.parameters()] == flags  # restored exactly (peft would thaw it)


def test_a_unet_lora_is_saved_with_diffusers_keys(tmp_path):
    from safetensors.torch import load_file

    from diffalign.generators import adapter_for_pipeline
    from diffalign.testing.tiny import tiny_sd15_pipeline

    gen = adapter_for_pipeline(tiny_sd15_pipeline())
    gen.add_lora(rank=2)
    gen.save_lora(str(tmp_path))
    keys = list(load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)




def test_gather_rows_concatenates_uneven_shares_in_rank_order():
    """``DistContext.gather_rows`` (``diffalign sample`` on several processes): ranks holding 3, 0 and 1 rows give
    the 4 rows in rank order; the row counts travel first, then the rows padded to the largest count, whole or
    ``chunk_rows`` at a time; with ``main_only`` the other ranks keep nothing."""
    shares = [torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.zeros(0, 2),
              torch.tensor([[7.0, float("nan")]])]
    expected = torch.cat(shares)

    def gather_for(rank, seen):
        calls = {"n": 0}

        def gather(t):
            seen.append(tuple(t.shape))
            if t.dtype == torch.int64:  # the counts
                return torch.tensor([len(x) for x in shares])
            lo = calls["n"] * (seen[1][0] if len(seen) > 1 else 0)  # chunks are taken in order
            calls["n"] += 1
            pieces = [x[lo:lo + t.shape[0]] for x in shares]
            return torch.cat([torch.cat([p, p.new_zeros(t.shape[0] - len(p), 2)]) for p in pieces])
        return gather

    for chunk, shapes in ((None, [(1,), (3, 2)]), (2, [(1,), (2, 2), (1, 2)])):
        for rank in range(3):
            seen = []
            out = DistContext(rank, 3, gather_for(rank, seen)).gather_rows(shares[rank], chunk_rows=chunk)
            assert torch.equal(out[:, 0], expected[:, 0]) and out.shape == (4, 2) and out[3, 1].isnan()
            assert torch.equal(out[:3], expected[:3]) and seen == shapes
            seen = []
            kept = DistContext(rank, 3, gather_for(rank, seen)).gather_rows(shares[rank], chunk_rows=chunk,
                                                                            main_only=True)
            assert kept.shape == ((4, 2) if rank == 0 else (0, 2)) and seen == shapes  # the same collectives
    alone = torch.tensor([[7.0, 8.0]])
    assert torch.equal(DistContext().gather_rows(alone), alone)
    assert DistContext(0, 2, lambda t: torch.tensor([0, 0])).gather_rows(torch.zeros(0, 2)).shape == (0, 2)


def test_weights_of_another_shape_are_a_checkpoint_error_and_other_failures_are_not():
    """Same-named layers of another width (an SD3.5-M LoRA on SD3.5-L) raise torch's RuntimeError "Error(s) in
    loading state_dict": a CheckpointError naming the checkpoint (it was a traceback), like other names (ValueError);
    any other RuntimeError (out of memory) is not dressed up as one."""
    from diffalign.checkpoint import CheckpointError

    adapter, params = _linear_adapter()
    wide = torch.nn.Linear(2, 2, bias=False).state_dict()
    state = NS(ema_state=None, trainable_state=wide, counters={}, path="ckpt-7")
    with pytest.raises(CheckpointError,
                       match="(?s)checkpoint ckpt-7: Error\\(s\\) in loading state_dict .*size mismatch"):
        common.restore_weights(adapter, params, None, state)
    assert common.weights_mismatch(ValueError("LoRA state dict has keys the adapter does not"))
    assert not common.weights_mismatch(RuntimeError("CUDA out of memory"))
