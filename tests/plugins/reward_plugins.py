"""Rewards defined outside the ``rewards`` package, used by tests/test_rewards*.py through dotted paths."""

import time

import torch

from diffalign.types import RewardOutput
from rewards import reward_factory


def brightness(images, prompts, metadata, scale=1.0):
    """Plain-function reward: mean pixel value times ``scale``."""
    return scale * images.float().mean(dim=(1, 2, 3))


brightness.range = (0.0, 1.0)


@reward_factory
def make_brightness(scale=1.0, batch_size=None, device=None):
    """Factory returning a reward object."""

    class Brightness:
        name = "brightness_factory"
        differentiable = True
        trainable = False
        range = (0.0, float(scale))
        allows_nan = False

        def __init__(self):
            self.batch_size = batch_size
            self.calls = 0

        def __call__(self, images, prompts, metadata):
            self.calls += 1
            return RewardOutput(
                scores=scale * images.float().mean(dim=(1, 2, 3)), details=[{"prompt": p} for p in prompts]
            )

    return Brightness()


def raising(images, prompts, metadata):
    raise ValueError("boom")


def wrong_shape(images, prompts, metadata):
    return torch.zeros(images.shape[0], 2)


def nan_second(images, prompts, metadata):
    out = torch.ones(images.shape[0])
    out[1] = float("nan")
    return out


def inf_first(images, prompts, metadata):
    out = torch.ones(images.shape[0])
    out[0] = float("inf")
    return out


def not_a_tensor(images, prompts, metadata):
    return [1.0] * images.shape[0]


def slow(images, prompts, metadata, delay=3.0):
    time.sleep(delay)
    return torch.zeros(images.shape[0])


def red_minus_blue(images, prompts, metadata, sign=1.0):
    """Signed global colour reward: ``sign * (mean red - mean blue)``; with ``sign=-1`` the opposite goal. A
    trainer that raises both directions follows the reward, not a drift of the model."""
    x = images.float()
    return sign * (x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2)))


red_minus_blue.range = (-1.0, 1.0)


def brightness_if(images, prompts, metadata, word="circle"):
    """Brightness for prompts containing ``word``, 0 for the others: their groups tie (drop_zero_std_groups)."""
    mask = torch.tensor([word in p for p in prompts], dtype=torch.float32)
    return images.float().mean(dim=(1, 2, 3)) * mask


brightness_if.range = (0.0, 1.0)


_CALLS: dict = {}


def works_then_fails(images, prompts, metadata, key="", calls=1):
    """Mean brightness for the first ``calls`` calls under ``key``, then a ``ConnectionError`` (a reward server
    that went down)."""
    _CALLS[key] = _CALLS.get(key, 0) + 1
    if _CALLS[key] > calls:
        raise ConnectionError("reward server went away")
    return images.float().mean(dim=(1, 2, 3))


class Redness:
    """A class plugin without a ``name`` attribute: its instances score images (the column is named after the
    class)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        return self.scale * images[:, 0].mean(dim=(1, 2))
