"""``scripts/bench_sample_processes.py``: one process against two, the same files (byte for byte)."""

from __future__ import annotations

import json

import pytest
from grpo_helpers import load_script, run_config, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_differences_ignore_only_the_fields_that_must_differ(tmp_path):
    script = load_script("bench_sample_processes")
    one, many = tmp_path / "one", tmp_path / "many"
    for d, procs, wall in ((one, 1, 3.0), (many, 2, 1.5)):
        d.mkdir()
        (d / "samples.png").write_bytes(b"\x89PNG same")
        (d / "guidance_rewards.json").write_text(json.dumps(
            {"num_processes": procs, "methods": {"doob": {"wall_s": wall, "rewards": [[0.5]]}}}))
    assert script.differences(one, many) == []
    (many / "samples.png").write_bytes(b"\x89PNG other")
    (many / "guidance_rewards.json").write_text(json.dumps(
        {"num_processes": 2, "methods": {"doob": {"wall_s": 1.5, "rewards": [[0.25]]}}}))
    (many / "extra.png").write_bytes(b"")
    assert script.differences(one, many) == ["extra.png: only in many", "guidance_rewards.json: the records differ",
                                             "samples.png: the images differ"]


def test_one_and_two_processes_write_the_same_files(tmp_path, capsys):
    from diffalign.config import save_config

    model = save_tiny(tmp_path)
    cfg = run_config(model, tmp_path / "unused", model={"path": model, "device": "cpu"},
                     prompts={"source": "shapes", "eval_size": 5}, sample={"batch_size": 1, "num_batches_per_epoch": 4},
                     checkpoint={"every": 0, "resume_from": None})
    save_config(cfg, tmp_path / "sample.yaml")
    out = tmp_path / "bench"
    # overrides after the options, as the docstring's command gives them
    bench = load_script("bench_sample_processes")
    assert bench.main([str(tmp_path / "sample.yaml"), "--out", str(out), "--", "prompts.eval_size=3"]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "outputs: the same images and records" in text
    assert (out / "many" / "samples.png").read_bytes() == (out / "one" / "samples.png").read_bytes()
    record = json.loads((out / "many" / "samples_rewards.json").read_text())
    assert record["num_processes"] == 2 and len(record["rewards"]) == 3  # the override reached both runs
