"""Known answers for group advantages, the per-prompt tracker, and the repeat assignment."""

import math

import pytest
import torch

from diffalign.advantages import PerPromptStatTracker, RunningMoments, group_advantages, group_ids_from_keys
from diffalign.distributed import repeat_assignment


def test_group_std_hand_computed():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    res = group_advantages(r, g, std_mode="group", eps=0.0, clip=None)
    torch.testing.assert_close(res.advantages[:2], torch.tensor([-1.0, 1.0]))
    assert res.advantages[2:4].tolist() == [0.0, 0.0]
    torch.testing.assert_close(res.advantages[4:], torch.tensor([-1.0, 1.0]))
    assert res.zero_std_fraction == pytest.approx(1 / 3)


def test_batch_std_is_flow_grpo_global_std():
    r = torch.tensor([1.0, 3.0, 5.0, 9.0])
    g = torch.tensor([0, 0, 1, 1])
    res = group_advantages(r, g, std_mode="batch", eps=1e-4, clip=None)
    std = r.std(unbiased=False).item()
    expected = [(1 - 2) / (std + 1e-4), (3 - 2) / (std + 1e-4), (5 - 7) / (std + 1e-4), (9 - 7) / (std + 1e-4)]
    torch.testing.assert_close(res.advantages, torch.tensor(expected))


def test_nan_rewards_are_excluded_and_get_zero_advantage():
    r = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    g = torch.tensor([0, 0, 0, 1])
    res = group_advantages(r, g, std_mode="group", eps=0.0, clip=None)
    assert res.advantages[1] == 0 and not res.keep[1]
    torch.testing.assert_close(res.advantages[[0, 2]], torch.tensor([-1.0, 1.0]))


def test_zero_std_fraction_counts_only_groups_with_a_finite_reward(tmp_path):
    """A group whose rewards are all NaN is neither zero-std nor not; with no finite reward at all the fraction
    (and the mean group std) is NaN, not 0.0 ("no zero-std groups"), and it is logged as null."""
    from diffalign.logging import MetricsLogger, read_metrics

    nan = float("nan")
    res = group_advantages(torch.tensor([1.0, 1.0, nan, nan, 1.0, 3.0]), torch.tensor([0, 0, 1, 1, 2, 2]),
                           std_mode="group", eps=0.0, clip=None)
    assert res.zero_std_fraction == 0.5 and res.group_std_mean == 0.5
    res = group_advantages(torch.full((4,), nan), torch.tensor([0, 0, 1, 1]), std_mode="batch")
    assert math.isnan(res.zero_std_fraction) and math.isnan(res.group_std_mean)
    assert res.advantages.tolist() == [0.0] * 4 and not res.keep.any()
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"zero_std_fraction": res.zero_std_fraction})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["zero_std_fraction"] is None


def test_clip_and_drop_zero_std():
    r = torch.tensor([0.0, 100.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    res = group_advantages(r, g, std_mode="batch", eps=0.0, clip=0.5, drop_zero_std=True)
    assert res.advantages.abs().max() == 0.5
    assert res.keep.tolist() == [True, True, False, False]


def test_running_moments_match_concatenation():
    m = RunningMoments()
    a, b = torch.randn(7), torch.randn(11) * 3 + 1
    m.update(a)
    m.update(b)
    allv = torch.cat([a, b]).double()
    assert m.mean == pytest.approx(allv.mean().item())
    assert m.std == pytest.approx(allv.std(unbiased=False).item())
    m2 = RunningMoments()
    m2.load_state_dict(m.state_dict())
    assert m2.std == m.std


def test_per_prompt_tracker_uses_batch_stats_until_min_count():
    t = PerPromptStatTracker(buffer_size=4, min_count=3, eps=0.0)
    adv = t.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 7.0]))
    batch = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(adv, (batch - batch.mean()) / batch.std(unbiased=False))
    adv = t.update(["a", "a"], torch.tensor([5.0, 7.0]))  # buffer a = [1, 3, 5, 7] >= min_count
    buf = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(adv, (torch.tensor([5.0, 7.0]) - buf.mean()) / buf.std(unbiased=False))
    assert len(t.state_dict()["buffers"]["a"]) == 4


def test_group_ids_from_keys():
    assert group_ids_from_keys(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]


def test_repeat_assignment_spreads_groups_and_is_rank_consistent():
    prompts = ["p0", "p1", "p2", "p3"]
    a0 = repeat_assignment(prompts, 4, epoch=3, seed=1, rank=0, world_size=2)
    a1 = repeat_assignment(prompts, 4, epoch=3, seed=1, rank=1, world_size=2)
    single = repeat_assignment(prompts, 4, epoch=3, seed=1, rank=0, world_size=1)
    assert a0.global_prompts == a1.global_prompts == single.global_prompts
    assert a0.prompts + a1.prompts == single.prompts
    assert a0.sample_ids + a1.sample_ids == single.sample_ids
    assert len(set(single.sample_ids)) == 16 and min(single.sample_ids) == 3 * 16
    for p in prompts:
        assert single.global_prompts.count(p) == 4
    with pytest.raises(ValueError, match="cannot be split evenly"):
        repeat_assignment(prompts[:3], 3, epoch=0, seed=0, rank=0, world_size=2)


def test_std_mode_error_lists_choices():
    with pytest.raises(ValueError, match="std_mode must be one of"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), std_mode="prompt")
    assert math.isfinite(group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long)).advantages.sum().item())


def test_gdpo_known_answer_with_an_all_nan_row():
    """GDPO (seed_algorithms.md §7.1): normalise each reward within its group, weighted-sum, whiten over the
    batch; a row without any reward is outside every statistic and gets 0."""
    from diffalign.advantages import gdpo_advantages

    nan = float("nan")
    r = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0], [nan, nan], [0.0, 5.0], [4.0, 1.0]])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    w, eps = [1.0, 0.5], 1e-4

    def norm(col, idx):  # group z-score over the non-NaN entries, population std
        v = col[idx]
        v = v[~torch.isnan(v)]
        return (col[idx] - v.mean()) / (v.std(unbiased=False) + eps)

    per = torch.zeros(6, 2, dtype=torch.float64)
    for k in range(2):
        col = r[:, k].double()
        for g in (0, 1):
            idx = (groups == g).nonzero().flatten()
            per[idx, k] = torch.nan_to_num(norm(col, idx), nan=0.0)
    s = per @ torch.tensor(w, dtype=torch.float64)
    valid = torch.tensor([True, True, True, False, True, True])
    expected = torch.zeros(6, dtype=torch.float64)
    expected[valid] = (s[valid] - s[valid].mean()) / (s[valid].std(unbiased=False) + eps)
    got = gdpo_advantages(r, groups, w, eps=eps, clip=None)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert float(got[3]) == 0.0


def test_tracker_leaves_nan_rewards_out_of_a_prompts_buffer():
    """A NaN reward (OCR on a prompt without quotes, on_error: skip) entering the per-prompt buffer made the prompt's
    mean and std NaN for buffer_size epochs: every step's gradient non-finite, and the run stopped (mutation audit)."""
    t = PerPromptStatTracker(buffer_size=8, min_count=1, eps=0.0)
    adv = t.update(["p", "p", "p"], torch.tensor([0.0, float("nan"), 2.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]))
    assert not any(math.isnan(v) for v in t.buffers["p"])
    assert torch.isfinite(t.update(["p", "p"], torch.tensor([1.0, 1.0]))).all()  # later epochs stay finite


def test_tracker_keeps_only_the_last_buffer_size_rewards():
    t = PerPromptStatTracker(buffer_size=2, min_count=1, eps=0.0)
    t.update(["p"], torch.tensor([100.0]))
    t.update(["p"], torch.tensor([0.0]))
    adv = t.update(["p"], torch.tensor([2.0]))  # buffer [0, 2]: mean 1, std 1, so A = 1 (with 100: about -0.7)
    assert len(t.buffers["p"]) == 2
    torch.testing.assert_close(adv, torch.tensor([1.0]))


def test_gdpo_advantages_are_zero_where_the_combined_reward_is_not_kept():
    """A group whose rows share no finite reward column has no combined reward (NaN): such rows are not kept and
    their GDPO advantage is 0, although the per-column normalisation alone gives rows 1 and 2 -1 and +1 on column 0.
    (Both trainers mask again; the function's contract and the logged advantage statistics did not hold.)"""
    from diffalign.advantages import multi_reward_advantages

    nan = float("nan")
    rewards = torch.tensor([[nan, 1.0], [1.0, nan], [2.0, nan], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    res = multi_reward_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), [1.0, 1.0], aggregation="gdpo")
    assert res.keep.tolist() == [False, False, False, True, True, True]
    assert res.advantages[:3].tolist() == [0.0, 0.0, 0.0] and res.advantages[3:].abs().sum() > 0
