"""Known answers for advantages and the GRPO / DiffusionNFT training math (each value derived by hand).

Pins down:

* :func:`diffalign.advantages.group_advantages`: ``drop_zero_std`` off keeps zero-std groups; ``std_mode="global"``
  divides by the supplied running std, not the batch's.
* :class:`PerPromptStatTracker` (DDPO, research/grpo_family.md §3.2): a prompt with exactly ``min_count`` rewards
  uses its own buffer; a restored tracker keeps its buffers bounded by ``buffer_size``.
* GDPO (research/seed_algorithms.md §7.1): the final clip applies; MARBLE (seed_algorithms.md §6.2) per-reward
  advantages honour ``std_mode``.
* :func:`trainers.grpo.grpo_loss`: ``approx_kl = 0.5 mean (logp - logp_old)^2``.
* DiffusionNFT (research/grpo_family.md §2.4, arXiv 2509.16117 eq. (8), x0 form): ``v+ = (1 - b) v_old + b v``,
  ``v- = (1 + b) v_old - b v``, ``L+- = mean (x0+- - x0)^2 / stopgrad(mean |x0+- - x0|)``,
  ``L = C mean(r L+ + (1 - r) L-) / b``; old policy ``theta_old <- d theta_old + (1 - d) theta``; amortised MARBLE
  trains on ``A_bar = sum_k alpha_bar_k A_k`` (seed_algorithms.md §6.3).
* The NFT trainer on a tiny SD3 model: the model's timestep is ``1000 sigma`` for the sigma that built
  ``x_t = (1 - sigma) x0 + sigma eps``; ``v_old`` comes from the old-policy shadow weights; after each epoch the
  shadow is ``d old + (1 - d) new``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffalign.advantages import (PerPromptStatTracker, gdpo_advantages, group_advantages,
                                  multi_reward_advantages)
from trainers.grpo import grpo_loss
from trainers.nft import NFTTrainer, OldPolicy, nft_loss_terms, nft_policy_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------- advantages


def test_zero_std_group_kept_unless_dropping_is_requested():
    r, g = torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1])
    res = group_advantages(r, g, std_mode="group", eps=0.0, clip=None)
    # group 0 = [1, 1]: std 0 -> advantage 0 but still kept; group 1 = [0, 2]: mean 1, std 1 -> [-1, 1]
    assert res.keep.tolist() == [True, True, True, True]
    torch.testing.assert_close(res.advantages, torch.tensor([0.0, 0.0, -1.0, 1.0]))
    assert res.zero_std_fraction == 0.5
    dropped = group_advantages(r, g, std_mode="group", eps=0.0, clip=None, drop_zero_std=True)
    assert dropped.keep.tolist() == [False, False, True, True]


def test_global_std_mode_divides_by_the_supplied_std():
    # [1, 3]: mean 2 -> centred [-1, 1]; / global_std 4 -> [-0.25, 0.25] (the batch std, 1, would give [-1, 1])
    res = group_advantages(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), std_mode="global", global_std=4.0,
                           eps=0.0, clip=None)
    torch.testing.assert_close(res.advantages, torch.tensor([-0.25, 0.25]))


def test_tracker_uses_own_buffer_at_exactly_min_count():
    prompts, r = ["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 9.0])
    # 2 rewards per prompt == min_count 2: own stats; a: mean 2, std 1 -> [-1, 1]; b: mean 7, std 2 -> [-1, 1]
    adv = PerPromptStatTracker(buffer_size=4, min_count=2, eps=0.0).update(prompts, r)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # min_count 3 > 2: batch stats, mean 4.5, var (3.5^2 + 1.5^2 + 0.5^2 + 4.5^2) / 4 = 8.75
    adv = PerPromptStatTracker(buffer_size=4, min_count=3, eps=0.0).update(prompts, r)
    torch.testing.assert_close(adv, (r - 4.5) / math.sqrt(8.75))


def test_tracker_buffers_stay_bounded_after_load_state_dict():
    t = PerPromptStatTracker(buffer_size=2, min_count=1, eps=0.0)
    t.update(["a", "a"], torch.tensor([1.0, 2.0]))
    fresh = PerPromptStatTracker(buffer_size=2, min_count=1, eps=0.0)
    fresh.load_state_dict(t.state_dict())
    adv = fresh.update(["a"], torch.tensor([3.0]))
    # buffer [2, 3] (the 1 fell out): mean 2.5, std 0.5 -> (3 - 2.5) / 0.5 = 1; unbounded [1, 2, 3] would give 1.22
    assert len(fresh.buffers["a"]) == 2
    torch.testing.assert_close(adv, torch.tensor([1.0]))
    fresh.update(["a", "a"], torch.tensor([4.0, 5.0]))
    assert list(fresh.buffers["a"]) == [4.0, 5.0]


def test_gdpo_clips_last():
    # per group [0, 1] -> [-1, 1] / (0.5 + eps) ~ +-2; whitened ~ +-1; clip 0.5 -> exactly +-0.5
    rewards = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    adv = gdpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), [1.0], clip=0.5)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]), rtol=0, atol=0)
    assert float(adv.abs().max()) <= 0.5


def test_marble_per_reward_advantages_follow_std_mode():
    # column 0 = [0, 6, 8, 14], groups [0, 0, 1, 1]: group-centred [-3, 3, -3, 3] (group std 3);
    # batch mean 7, deviations [-7, -1, 1, 7] -> var (49 + 1 + 1 + 49) / 4 = 25, std 5 -> [-0.6, 0.6, -0.6, 0.6].
    # Column 1 is column 0 reversed: [0.6, -0.6, 0.6, -0.6]. (std_mode="group" would give +-1.)
    rewards = torch.tensor([[0.0, 14.0], [6.0, 8.0], [8.0, 6.0], [14.0, 0.0]])
    g = torch.tensor([0, 0, 1, 1])
    res = multi_reward_advantages(rewards, g, [1.0, 1.0], aggregation="marble", std_mode="batch", eps=0.0, clip=None)
    want = torch.tensor([[-0.6, 0.6], [0.6, -0.6], [-0.6, 0.6], [0.6, -0.6]])
    torch.testing.assert_close(res.advantages, want)
    grp = multi_reward_advantages(rewards, g, [1.0, 1.0], aggregation="marble", std_mode="group", eps=0.0, clip=None)
    torch.testing.assert_close(grp.advantages, want / 0.6)


# ----------------------------------------------------------------------------------------- GRPO loss


def test_grpo_approx_kl_is_half_mean_squared_log_ratio():
    # log ratio 0.2 -> 0.5 * 0.04 = 0.02
    _, stats = grpo_loss(torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor([0.0]), clip_range=1e-4,
                         adv_clip_max=5.0)
    assert float(stats.approx_kl) == pytest.approx(0.02, rel=1e-6)


# ----------------------------------------------------------------------------------------- NFT loss


def test_nft_terms_with_old_velocity_and_beta():
    # x0 = 0, x_t = 1, sigma = 1/2, v = 1, v_old = 1/2, beta = 1/2:
    #   v+ = 0.5 * 0.5 + 0.5 * 1 = 0.75 -> err+ = 1 - 0.375 = 0.625, L+ = 0.625^2 / 0.625 = 0.625
    #   v- = 1.5 * 0.5 - 0.5 * 1 = 0.25 -> err- = 1 - 0.125 = 0.875, L- = 0.875
    l_pos, l_neg = nft_loss_terms(torch.ones(2, 3), torch.full((2, 3), 0.5), torch.ones(2, 3), torch.zeros(2, 3),
                                  torch.full((2,), 0.5), beta=0.5)
    torch.testing.assert_close(l_pos, torch.full((2,), 0.625))
    torch.testing.assert_close(l_neg, torch.full((2,), 0.875))


def test_nft_policy_loss_divides_by_beta():
    lp, ln = torch.tensor([0.625]), torch.tensor([0.875])
    # A = 0 -> r = 1/2: 5 * (0.3125 + 0.4375) / 0.5 = 7.5
    got = nft_policy_loss(lp, ln, torch.tensor([0.0]), beta=0.5, adv_clip_max=5.0)
    torch.testing.assert_close(got, torch.tensor(7.5))
    # A = 2.5 -> r = 0.75: 5 * (0.75 * 0.625 + 0.25 * 0.875) / 0.5 = 5 * 0.6875 / 0.5 = 6.875
    got = nft_policy_loss(lp, ln, torch.tensor([2.5]), beta=0.5, adv_clip_max=5.0)
    torch.testing.assert_close(got, torch.tensor(6.875))


def test_nft_adaptive_weight_is_stop_gradient():
    # v_old = 0, beta = 1, x0 = 0, x_t = 1, sigma = 1/2, v = 0 (2 dims): err+ = 1 - v/2 = 1, err- = 1 + v/2 = 1.
    # With w = stopgrad(mean |err|) = 1: dL+/dv_i = (1/2) * 2 err_i * (-1/2) / w = -0.5, dL-/dv_i = +0.5.
    # (Differentiating through w, L = sum err^2 / sum |err| would give -0.25 / +0.25.)
    for which, want in ((0, -0.5), (1, 0.5)):
        v = torch.zeros(1, 2, requires_grad=True)
        terms = nft_loss_terms(v, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.5]),
                               beta=1.0)
        terms[which].sum().backward()
        torch.testing.assert_close(v.grad, torch.full((1, 2), want))


def test_old_policy_update_convention():
    # theta_old <- d theta_old + (1 - d) theta: old 0, theta 1, d = 0.25 -> 0.75
    p = torch.nn.Parameter(torch.zeros(2))
    old = OldPolicy([p])
    with torch.no_grad():
        p.fill_(1.0)
    old.update(0.25)
    torch.testing.assert_close(old.shadow[0], torch.full((2,), 0.75))


def test_amortised_marble_applies_alpha_bar_weighted_advantages():
    stub = SimpleNamespace(harmonizer=SimpleNamespace(alpha_bar=torch.tensor([0.25, 0.75], dtype=torch.float64)))
    adv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -2.0]])
    # A_bar = 0.25 A_0 + 0.75 A_1: [0.25, 0.75, 0.5 - 1.5 = -1], each sample weighing 1
    got, weight = NFTTrainer._applied_advantages(stub, adv, torch.ones(3), torch.ones(3, 2))
    torch.testing.assert_close(got, torch.tensor([0.25, 0.75, -1.0]))
    torch.testing.assert_close(weight, torch.ones(3))
    one_d, kept = torch.tensor([1.0, -2.0]), torch.tensor([1.0, 0.0])
    got, weight = NFTTrainer._applied_advantages(stub, one_d, kept, torch.ones(2, 1))
    assert got is one_d and weight is kept  # a [n] advantage is applied as is, the kept mask as its weight


# ----------------------------------------------------------------------------------------- NFT trainer


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from grpo_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"))


def test_nft_trainer_timesteps_old_velocity_and_old_update(tiny_sd3, tmp_path, monkeypatch):
    """Two epochs, one update each; decay d = min(0.25 step, 0.5): 0.25 after epoch 1, 0.5 after epoch 2."""
    import trainers.nft as nft_mod
    from grpo_helpers import run_config

    cfg = run_config(tiny_sd3, tmp_path / "run", trainer="nft",
                     sample={"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "num_batches_per_epoch": 1,
                             "num_steps": 2},
                     rewards=[{"name": "jpeg_compressibility"}],
                     train={"num_epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                            "eval_every": 0, "kl_weight": 0.0, "timestep_fraction": 0.99,
                            "old_decay_rate": 0.25, "old_decay_max": 0.5, "old_decay_start": 0},
                     checkpoint={"every": 0})
    # (32x32, run_config's default: at 16x16 the tiny model's images all have the same JPEG size, A = 0 and the
    # first update does not move the LoRA weights, so old == current and the v_old check would have no teeth)
    trainer = NFTTrainer(cfg)
    trainer.setup()

    # every torch.randn of trainers.nft (the forward noise) is recorded through a proxy of the torch module
    noises = []

    class TorchProxy:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def randn(*a, **k):
            out = torch.randn(*a, **k)
            noises.append(out.clone())
            return out

    monkeypatch.setattr(nft_mod, "torch", TorchProxy())

    calls = []  # one dict per trained micro-step

    def forward_with(model_fn, x_t, t, weights):
        backup = [p.detach().clone() for p in trainer.params]
        with torch.no_grad():
            for p, w in zip(trainer.params, weights):
                p.copy_(w)
            out = model_fn(x_t, t).float()
            for p, b in zip(trainer.params, backup):
                p.copy_(b)
        return out

    orig_velocities = trainer._velocities

    def spy_velocities(model_fn, x_t, t):
        want_old = forward_with(model_fn, x_t, t, [s.clone() for s in trainer.old.shadow])
        want_cur = forward_with(model_fn, x_t, t, [p.detach().clone() for p in trainer.params])
        v_old, v_ref, v = orig_velocities(model_fn, x_t, t)
        calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "v_old": v_old.detach().clone(),
                      "want_old": want_old, "want_cur": want_cur, "epoch": trainer.epoch})
        return v_old, v_ref, v

    orig_terms = nft_mod.nft_loss_terms

    def spy_terms(velocity, old_velocity, x_t, x0, sigma, **kw):
        calls[-1].update(loss_x_t=x_t.detach().clone(), x0=x0.detach().clone(), sigma=sigma.detach().clone(),
                         noise=torch.stack(noises[-x0.shape[0]:]))
        return orig_terms(velocity, old_velocity, x_t, x0, sigma, **kw)

    monkeypatch.setattr(nft_mod, "nft_loss_terms", spy_terms)

    epochs = []  # (shadow before, params after, shadow after, global step after) per epoch
    orig_epoch = trainer._train_epoch

    def spy_epoch(*a, **k):
        before = [s.clone() for s in trainer.old.shadow]
        out = orig_epoch(*a, **k)
        epochs.append((before, [p.detach().clone() for p in trainer.params], [s.clone() for s in trainer.old.shadow],
                       trainer.global_step))
        return out

    trainer._velocities, trainer._train_epoch = spy_velocities, spy_epoch
    try:
        trainer.train()
    finally:
        trainer.cleanup()

    # 2 epochs x 1 minibatch x int(2 * 0.99) = 1 timestep
    assert len(calls) == 2 and len(epochs) == 2
    for c in calls:
        s = c["sigma"].reshape(-1, 1, 1, 1)
        # the model's timestep is 1000 sigma of the sigma the loss uses ...
        torch.testing.assert_close(c["t"], 1000 * c["sigma"])
        # ... which also built x_t = (1 - sigma) x0 + sigma eps, the x_t the model saw
        torch.testing.assert_close(c["loss_x_t"], (1 - s) * c["x0"] + s * c["noise"])
        torch.testing.assert_close(c["x_t"], c["loss_x_t"], rtol=0, atol=0)
        # v_old is the prediction of the shadow (old-policy) weights
        torch.testing.assert_close(c["v_old"], c["want_old"], rtol=1e-5, atol=1e-6)
    # epoch 2 (after the first old update, d = 0.25): old != current, so the v_old check above had teeth
    assert all((c["want_old"] - c["want_cur"]).abs().max() > 1e-4 for c in calls[1:])

    # old update after each epoch: d = min(0.25 * step, 0.5); shadow_new = d shadow_old + (1 - d) params_new
    for i, ((before, params, after, step), d) in enumerate(zip(epochs, (0.25, 0.5))):
        assert step == i + 1  # one optimizer step per epoch
        assert any((p - b).abs().max() > 0 for p, b in zip(params, before))  # the update moved the weights
        for b, p, a in zip(before, params, after):
            torch.testing.assert_close(a, d * b + (1 - d) * p.float(), rtol=1e-6, atol=1e-7)


def test_eval_shard_gives_ranks_whole_batches_of_the_one_process_run():
    """Every evaluation image is sampled in the same batch on 1 or N processes (batched kernels round by shape)."""
    from trainers.common import eval_shard

    # 10 prompts in batches of 4 on one process: [0..3] [4..7] [8, 9]
    assert eval_shard(10, 4, 0, 1) == (list(range(10)), 12)
    # two processes: rank 0 the first two batches, rank 1 the last (halves of 5 cut the second batch apart)
    assert eval_shard(10, 4, 0, 2) == (list(range(8)), 8)
    assert eval_shard(10, 4, 1, 2) == ([8, 9], 8)
    # more ranks than batches: the last rank gets nothing (padded in the gather)
    assert [eval_shard(6, 4, r, 3)[0] for r in range(3)] == [[0, 1, 2, 3], [4, 5], []]
    for n, bs, world in ((96, 16, 2), (97, 16, 3), (5, 8, 4), (33, 4, 5)):
        shards = [eval_shard(n, bs, r, world) for r in range(world)]
        assert sum((idx for idx, _ in shards), []) == list(range(n))  # disjoint, in order, complete
        for idx, per in shards:
            assert len(idx) <= per and per % bs == 0
            one_process_batches = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
            assert all([idx[i:i + bs] for i in range(0, len(idx), bs)][j] in one_process_batches
                       for j in range(math.ceil(len(idx) / bs)))
