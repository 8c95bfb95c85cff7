"""The end of an optimizer step (``trainers.common.optimizer_update``), on a stub trainer: gradient clipping to
``train.max_grad_norm``, the EMA moved by every applied step, and the count of skipped steps in a row reset by
an applied one."""

from __future__ import annotations

import types

import pytest
import torch

from trainers.common import EMA, NonFiniteError, optimizer_update


def _trainer(max_grad_norm=1.0, max_skipped_steps=1, ema=False):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = types.SimpleNamespace(max_grad_norm=max_grad_norm, on_nonfinite="skip", max_skipped_steps=max_skipped_steps)
    return types.SimpleNamespace(cfg=cfg, params=[p], optimizer=opt, global_step=0,
                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                                 ema=EMA([p], 0.9) if ema else None)


def _step(trainer, grad) -> bool:
    trainer.params[0].grad = torch.tensor(grad)
    return optimizer_update(trainer, {})


def test_the_gradient_is_clipped_to_max_grad_norm():
    trainer, metrics = _trainer(max_grad_norm=1.0), {}
    trainer.params[0].grad = torch.tensor([3.0, 4.0])  # norm 5 -> scaled to norm 1
    assert optimizer_update(trainer, metrics)
    torch.testing.assert_close(trainer.params[0].detach(), torch.tensor([-0.6, -0.8]))  # SGD lr 1
    assert metrics["train/grad_norm"] == [5.0] and trainer.global_step == 1


def test_every_applied_step_moves_the_ema():
    trainer = _trainer(ema=True)
    _step(trainer, [-0.6, -0.8])  # p -> [0.6, 0.8] (norm 1: not clipped)
    # decay min(0.9, 2 / 11): shadow = (1 - 2/11) * p
    torch.testing.assert_close(trainer.ema.shadow[0], torch.tensor([0.6, 0.8]) * 9 / 11)
    assert trainer.ema.num_updates == 1


def test_an_applied_step_resets_the_count_of_skips_in_a_row():
    trainer = _trainer(max_skipped_steps=1)
    nan = [float("nan"), 0.0]
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert not _step(trainer, nan)
    assert _step(trainer, [0.1, 0.0])  # isolated NaNs never add up to a stop
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert not _step(trainer, nan)
    with pytest.raises(NonFiniteError, match="2 steps in a row > train.max_skipped_steps=1"):
        _step(trainer, nan)
