"""The image-statistics rewards of the MARBLE experiment: known answers for colourfulness (Hasler & Süsstrunk
2003, eq. (3)) and RMS contrast, and finite gradients on flat images."""

from __future__ import annotations

import pytest
import torch

from rewards import MultiReward
from rewards.colorfulness import colorfulness_score


def test_colorfulness_known_answers():
    grey = torch.full((1, 3, 4, 4), 0.5)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    # grey: rg = yb = 0 -> 0; flat red: rg = 1, yb = 1/2, no spread -> 0.3 * sqrt(1 + 1/4)
    torch.testing.assert_close(colorfulness_score(grey), torch.zeros(1))
    torch.testing.assert_close(colorfulness_score(red), torch.tensor([0.3 * 1.25**0.5]))
    # half red, half green: rg = +-1 (std 1, mean 0), yb = 1/2 everywhere -> 1 + 0.3 * 1/2
    rg = torch.zeros(1, 3, 4, 4)
    rg[:, 0, :, :2] = 1.0
    rg[:, 1, :, 2:] = 1.0
    torch.testing.assert_close(colorfulness_score(rg), torch.tensor([1.15]))


def test_colorfulness_is_registered_and_differentiable():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = MultiReward(["colorfulness"])(images.detach(), ["a", "b"])
    assert out.names == ["colorfulness"] and out.rewards.shape == (2, 1)
    colorfulness_score(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_rms_contrast_known_answers():
    from rewards.contrast import LUMA_WEIGHTS, rms_contrast

    flat = torch.full((1, 3, 4, 4), 0.7)
    torch.testing.assert_close(rms_contrast(flat), torch.zeros(1))
    # half black, half white: luma 0 / 1, std 1/2 (the maximum)
    bw = torch.zeros(1, 3, 4, 4)
    bw[..., :2] = 1.0
    torch.testing.assert_close(rms_contrast(bw), torch.tensor([0.5]))
    # a quarter pure red on black: luma 0.299 on 1/4 of the pixels -> std = 0.299 * sqrt(1/4 * 3/4)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0, :2, :2] = 1.0
    torch.testing.assert_close(rms_contrast(red), torch.tensor([LUMA_WEIGHTS[0] * (3 / 16) ** 0.5]))


def test_contrast_is_registered_and_differentiable():
    from rewards.contrast import rms_contrast

    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = MultiReward(["contrast"])(images.detach(), ["a", "b"])
    assert out.names == ["contrast"] and out.rewards.shape == (2, 1)
    torch.testing.assert_close(out.rewards[:, 0], rms_contrast(images.detach()))
    rms_contrast(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name,low,high", [("contrast", 0.0, 0.5), ("colorfulness", 0.0, 1.25)])
def test_pixel_statistic_rewards_declare_the_protocol_and_pass_gradients(name, low, high):
    from rewards import build_reward

    reward = build_reward(name)
    assert (reward.name, reward.differentiable, reward.trainable, reward.allows_nan) == (name, True, False, False)
    assert reward.range == (low, high)
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    reward(images, ["a", "b", "c"]).scores.sum().backward()  # a reward-gradient trainer backprops through it
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_image_statistics_rewards_backprop_finite_gradients_on_flat_images(value):
    """sqrt of a zero variance: the gradient must be 0, not NaN (shapes-world canvases can be all black)."""
    from rewards.contrast import rms_contrast

    for fn in (rms_contrast, colorfulness_score):
        flat = torch.full((2, 3, 4, 4), value, requires_grad=True)
        out = fn(flat)
        out.sum().backward()
        assert torch.isfinite(flat.grad).all(), fn.__name__
    # and a flat image's contrast is still exactly 0
    torch.testing.assert_close(rms_contrast(torch.full((1, 3, 4, 4), value)), torch.zeros(1))


def test_pixel_statistic_reward_options():
    from rewards import build_reward
    from rewards.colorfulness import colorfulness
    from rewards.contrast import contrast

    assert colorfulness(name="cf").name == "cf" and contrast(batch_size=2).batch_size == 2
    with pytest.raises(TypeError):
        build_reward({"name": "contrast", "kwargs": {"foo": 1}})  # a typo fails when the reward is built
    # NaN pixels stay NaN (reported by MultiReward), never a valid score of 0
    broken = torch.full((1, 3, 4, 4), float("nan"))
    assert torch.isnan(colorfulness()(broken, ["a"]).scores).all()
    assert torch.isnan(contrast()(broken, ["a"]).scores).all()
