"""``scripts/marble_experiment.py --grad-noise``: the harness runs against the trainer it wraps.

Its gradient recorder replaces ``RewardGradients.harmonize_into_grad``; when that method gained the float16
``loss_scale`` argument the wrapper's narrower signature broke the script with a TypeError that no test saw.
"""

from __future__ import annotations

import math

import pytest
from grpo_helpers import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_grad_noise_harness_on_a_tiny_model(tmp_path):
    script = load_script("marble_experiment")
    assert script.main(["--tiny", "--grad-noise", "3", "--out", str(tmp_path)]) == 0
    lines = [ln for ln in (tmp_path / "grad_noise.txt").read_text().splitlines() if ln.startswith("  ")]
    assert len(lines) == 3  # the experiment's three rewards
    for line in lines:
        cos, se = (float(x) for x in line.split(":")[1].split("+-"))
        assert -1.0 <= cos <= 1.0 and math.isfinite(se)


def test_image_stats_pair_the_trainers_own_evaluations(tmp_path):
    """``--image-stats`` samples the evaluation prompts as the trainer's evaluation does: the paired per-prompt
    change of each reward averages to the change between the run's logged base and final evaluations, and the
    image statistics and before/after grid are written."""
    import json

    from diffalign.logging import read_metrics

    script = load_script("marble_experiment")
    assert script.main(["--tiny", "--epochs", "2", "--modes", "weighted_sum", "--image-stats", "--out",
                        str(tmp_path), "train.learning_rate=0.05"]) == 0
    stats = json.loads((tmp_path / "image_stats.json").read_text())["weighted_sum"]
    evals = [r for r in read_metrics(tmp_path / "weighted_sum" / "metrics.jsonl")
             if "eval/reward/jpeg_compressibility" in r]
    assert len(evals) == 2  # the base and the end
    moved = False
    for name, (mean, se) in stats["paired_delta"].items():
        logged = evals[-1][f"eval/reward/{name}"] - evals[0][f"eval/reward/{name}"]
        assert math.isclose(mean, logged, rel_tol=1e-5, abs_tol=1e-6), (name, mean, logged)
        assert math.isfinite(se) and se >= 0
        moved |= abs(logged) > 1e-6
    assert moved  # the learning rate moved the model, so the pairing is tested on a real change
    for side in ("before", "after"):
        assert stats[side]["components_per_image"] >= 0 and 0 <= stats[side]["largest_component_share"] <= 1
        assert {"pass/object", "pass/count", "pass/no_extra"} <= stats[side].keys()
    assert (tmp_path / "samples_weighted_sum.png").stat().st_size > 0


def test_worst_cosine_columns_mix_qp_and_plain_steps_as_the_run_does():
    """Amortised MARBLE (QP every 5 steps, diagnostics every 2): the QP steps' cosines are >= 0 by construction and
    were a third of the pooled rows but are a fifth of the run. The columns weight each kind by its share."""
    script = load_script("marble_experiment")
    rows = [{"epoch": 1, "steps/refresh": 1, "marble/worst_cos": 0.4},
            {"epoch": 2, "steps/plain": 1},
            {"epoch": 3, "steps/diagnose": 1, "marble/worst_cos": -0.2},
            {"epoch": 5, "steps/diagnose": 1, "marble/worst_cos": 0.1},
            {"epoch": 6, "steps/refresh": 1, "marble/worst_cos": 0.2},
            {"epoch": 7, "steps/diagnose": 1, "marble/worst_cos": -0.5}]
    out = script.worst_cosine_summary(rows, 0.2)
    assert out["worst_cos_mean"] == pytest.approx(0.2 * 0.3 + 0.8 * (-0.2))  # pooled: 0.0
    assert out["worst_cos_negative_fraction"] == pytest.approx(0.8 * 2 / 3)  # pooled: 0.4
    assert (out["num_cos_qp"], out["num_cos_plain"]) == (2, 3)
    assert script.worst_cosine_summary(rows[2:4], 0.0)["worst_cos_mean"] == pytest.approx(-0.05)
    assert math.isnan(script.worst_cosine_summary(rows[2:4], 0.2)["worst_cos_mean"])  # QP steps never measured
    with pytest.raises(SystemExit, match="one optimizer step per epoch"):
        script.worst_cosine_summary([{"epoch": 1, "steps/refresh": 1, "steps/diagnose": 1, "marble/worst_cos": 0}],
                                    0.2)
