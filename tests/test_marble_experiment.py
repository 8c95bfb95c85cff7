"""``scripts/marble_experiment.py --grad-noise``: the harness runs against the trainer it wraps.

Its gradient recorder replaces ``RewardGradients.harmonize_into_grad``; when that method gained the float16
``loss_scale`` argument the wrapper's narrower signature broke the script with a TypeError that no test saw.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_grad_noise_harness_on_a_tiny_model(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "marble_experiment.py"
    spec = importlib.util.spec_from_file_location("marble_experiment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--tiny", "--grad-noise", "3", "--out", str(tmp_path)]) == 0
    lines = [ln for ln in (tmp_path / "grad_noise.txt").read_text().splitlines() if ln.startswith("  ")]
    assert len(lines) == 3  # the experiment's three rewards
    for line in lines:
        cos, se = (float(x) for x in line.split(":")[1].split("+-"))
        assert -1.0 <= cos <= 1.0 and math.isfinite(se)
