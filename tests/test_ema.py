"""The EMA of the trained parameters warms up on the optimizer step count (Flow-GRPO's ``EMAModuleWrapper``:
``decay = min(decay_max, (1 + step) / (10 + step))``, moved every ``update_step_interval`` steps)."""

from __future__ import annotations

import torch

from trainers.common import EMA


def _run(values, decay: float, every: int) -> float:
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], decay, every)
    for v in values:  # the live parameter after each optimizer step
        with torch.no_grad():
            p.fill_(v)
        ema.update()
    return float(ema.shadow[0])


def test_every_step_known_answer():
    # steps 1, 2: decay min(0.9, 2/11) then min(0.9, 3/12) -> shadow = (1 - 2/11) * 1, then lerp towards 3
    first = (1 - 2 / 11) * 1.0
    expected = first + (1 - 3 / 12) * (3.0 - first)
    assert abs(_run([1.0, 3.0], 0.9, 1) - expected) < 1e-6


def test_interval_uses_the_optimizer_step_not_the_number_of_moves():
    # every 8: the first move is at optimizer step 8 with decay (1 + 8) / (10 + 8) = 0.5 (a count of moves, t = 1,
    # would give 2 / 11); the second at step 16 with 17 / 26
    values = [float(i) for i in range(1, 17)]
    after_8 = (1 - 9 / 18) * 8.0
    assert abs(_run(values[:8], 0.9, 8) - after_8) < 1e-6
    assert abs(_run(values, 0.9, 8) - (after_8 + (1 - 17 / 26) * (16.0 - after_8))) < 1e-6
    assert _run(values[:7], 0.9, 8) == 0.0  # no move before the 8th step


def test_the_decay_is_capped():
    # at step 200 the warm-up value 201/210 exceeds the cap: one move with every=200 uses decay 0.9
    assert abs(_run([0.0] * 199 + [10.0], 0.9, 200) - 1.0) < 1e-5


def test_ema_turned_on_at_a_resume_starts_from_the_restored_weights():
    """A checkpoint written with ``ema: false`` resumed with ``ema: true``: the shadow is the restored weights (it
    kept the freshly built ones, so an evaluation or export before the next update showed the base model)."""
    from types import SimpleNamespace as NS

    from trainers.common import EMA, restore_weights

    den = torch.nn.Linear(1, 1, bias=False)
    den.weight.data.fill_(0.0)
    params = list(den.parameters())
    ema = EMA(params, decay=0.9)
    state = NS(ema_state=None, trainable_state={"weight": torch.tensor([[1.0]])}, counters={"ema_updates": 0},
               path="step-1")
    restore_weights(NS(has_lora=False, denoiser=den), params, ema, state)
    assert den.weight.item() == 1.0 and ema.shadow[0].item() == 1.0 and ema.num_updates == 0
    with ema.swapped_in():
        assert den.weight.item() == 1.0
