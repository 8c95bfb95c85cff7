"""Guided sampling through a real (tiny, random) diffusers pipeline: adapter glue, the comparison table, and
``diffalign sample`` with a ``guidance`` section."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffalign.config import RunConfig, from_dict
from samplers.guided.pipeline import compare_methods, format_table, guided_sample_prompts

PROMPTS = ["a red circle", "two blue squares"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffalign.testing.tiny import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("guidance") / "tiny-sd3"
    tiny_sd3_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter(tiny_folder):
    from diffalign.generators import load_generator

    return load_generator(tiny_folder)


def strict_brightness(images, prompts, metadata):
    assert not torch.is_grad_enabled() and not images.requires_grad
    assert len(prompts) == images.shape[0] == len(metadata)
    return images.float().mean(dim=(1, 2, 3))


KW = dict(seed=0, num_steps=4, guidance_scale=1.0, negative_prompt="", height=32, width=32, step="flow_sde",
          noise_level=0.7)


def test_doob_on_a_diffusers_pipeline(adapter):
    with torch.enable_grad():
        out = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "doob", prompt_ids=[0, 1],
                                    group_size=2,
                                    options=dict(num_candidates=2, lookahead="denoise"), **KW)
    assert out.images.shape == (2, 3, 32, 32) and out.rewards.shape == (2, 1)
    c = out.counter
    # 4 steps x 4 particles; DOIT skips sigma = 1; denoise lookahead: 2 candidates at 2 inner steps
    assert c.vjp_evals == 3 * 4
    assert c.model_evals == 4 * 4 + 2 * 2 * 4
    assert c.reward_evals == 3 * 2 * 4 + 4
    zero = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "doob", prompt_ids=[0, 1],
                                 options=dict(gamma=0.0, num_candidates=2), **KW)
    none = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "none", prompt_ids=[0, 1], **KW)
    assert torch.equal(zero.images, none.images)


def test_candidate_batches_reuse_the_prompt_conditioning(adapter):
    """SVDD sends M * B rows through the model: the prompts' conditioning is repeated, not broadcast."""
    out = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "svdd", prompt_ids=[0, 1],
                                options=dict(num_candidates=3), **KW)
    assert out.counter.model_evals == 2 + 3 * 3 * 2
    assert torch.isfinite(out.rewards).all()


def test_compare_methods_table(adapter):
    methods = ["none", "best_of_n", "fk", "svdd", "doob"]
    options = {"doob": dict(num_candidates=2), "svdd": dict(num_candidates=2), "fk": dict(every=2)}
    res = compare_methods(adapter, PROMPTS, strict_brightness, methods, options, batch_size=1,
                          group_size={m: 1 if m in ("none", "svdd") else 2 for m in methods}, **KW)
    table = format_table(res, [1.0], ["brightness"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(methods)
    assert lines[0].startswith("| method | model evals/prompt")
    assert res["best_of_n"].counter.reward_evals == 4 and res["none"].counter.reward_evals == 2


def test_compare_methods_offsets_prompt_ids_and_takes_no_prompts(adapter):
    """A process's share of a multi-process ``diffalign sample``: ``first_prompt_id`` gives its prompts the noise
    they get in the whole set, and an empty share gives empty results of the right shapes."""
    kw = dict(batch_size=1, group_size={"best_of_n": 2}, **KW)
    whole = compare_methods(adapter, PROMPTS, strict_brightness, ["best_of_n"], {}, **kw)["best_of_n"]
    second = compare_methods(adapter, PROMPTS[1:], strict_brightness, ["best_of_n"], {}, first_prompt_id=1,
                             **kw)["best_of_n"]
    assert torch.equal(second.images, whole.images[1:]) and torch.equal(second.rewards, whole.rewards[1:])
    shifted = compare_methods(adapter, PROMPTS[1:], strict_brightness, ["best_of_n"], {}, **kw)["best_of_n"]
    assert not torch.equal(shifted.images, whole.images[1:])  # prompt id 0's noise
    empty = compare_methods(adapter, [], strict_brightness, ["best_of_n"], {}, **kw)["best_of_n"]
    assert empty.images.shape == (0, 3, 32, 32) and empty.rewards.shape == (0, 1)
    assert empty.counter.reward_evals == 0


def _cfg(tiny_folder, out, eval_rewards=(), **guidance):
    return from_dict(RunConfig, {
        "eval_rewards": list(eval_rewards),
        "seed": 1, "output_dir": str(out),
        "model": {"path": tiny_folder, "lora": {"enabled": False}},
        "prompts": {"source": "shapes", "eval_size": 2},
        "sample": {"eval_num_steps": 3, "step": "flow_sde", "noise_level": 0.7, "height": 32, "width": 32,
                   "batch_size": 2},
        "rewards": [{"name": "jpeg_compressibility"}],
        "guidance": guidance,
    })


def test_sample_command_with_guidance(tiny_folder, tmp_path, capsys):
    from trainers.run import sample_main

    cfg = _cfg(tiny_folder, tmp_path / "g", method="doob", compare=["none", "best_of_n", "fk", "svdd"],
               num_particles=2, num_candidates=2)
    assert sample_main(cfg) == 0
    printed = capsys.readouterr().out
    for m in ("none", "best_of_n", "fk", "svdd", "doob"):
        assert (tmp_path / "g" / f"samples_{m}.png").exists()
        assert f"| {m} |" in printed
    record = json.loads((tmp_path / "g" / "guidance_rewards.json").read_text())
    assert record["step"] == "flow_sde" and len(record["methods"]["doob"]["rewards"]) == 2
    assert record["methods"]["best_of_n"]["reward_evals"] == 4
    assert (tmp_path / "g" / "guidance_table.md").read_text().count("\n") == 7
    # the unguided path is unchanged
    assert sample_main(_cfg(tiny_folder, tmp_path / "u")) == 0
    assert (tmp_path / "u" / "samples.png").exists()


def test_sample_command_scores_eval_rewards_as_judges(tiny_folder, tmp_path, capsys):
    """``eval_rewards`` score the final images after sampling: a judge that is the guiding reward under another
    label gives the same values; without judges the record has no judge entries."""
    from trainers.run import sample_main

    judge = [{"name": "jpeg_compressibility", "label": "jpeg_judge"}]
    kw = dict(method="best_of_n", compare=["none"], num_particles=2)
    assert sample_main(_cfg(tiny_folder, tmp_path / "g", eval_rewards=judge, **kw)) == 0
    assert "judge jpeg_judge" in capsys.readouterr().out
    record = json.loads((tmp_path / "g" / "guidance_rewards.json").read_text())
    assert record["eval_names"] == ["jpeg_judge"]
    for m in ("none", "best_of_n"):
        row = record["methods"][m]
        assert row["eval_rewards"]["jpeg_judge"] == pytest.approx([r[0] for r in row["rewards"]], abs=1e-6)
    assert sample_main(_cfg(tiny_folder, tmp_path / "g0", **kw)) == 0  # no judges
    plain = json.loads((tmp_path / "g0" / "guidance_rewards.json").read_text())
    assert "eval_names" not in plain
    assert all("eval_rewards" not in plain["methods"][m] for m in ("none", "best_of_n"))
    # plain sampling: the judge column beside the training one, per image
    assert sample_main(_cfg(tiny_folder, tmp_path / "u", eval_rewards=judge)) == 0
    scored = json.loads((tmp_path / "u" / "samples_rewards.json").read_text())
    assert scored["names"] == ["jpeg_compressibility", "jpeg_judge"] and len(scored["rewards"]) == 2
    assert scored["eval_names"] == ["jpeg_judge"]
    assert all(a == pytest.approx(b, abs=1e-6) for a, b in scored["rewards"])


def test_keep_simulated_and_resampling_reach_the_sampler_from_the_config():
    from diffalign.config import ConfigError, GuidanceConfig
    from samplers.guided.pipeline import method_options

    cfg = GuidanceConfig(method="doob", num_particles=2, gamma=1.0, num_candidates=2, temperature=1.0,
                         window=[1, 3], lookahead="rollout", keep_simulated=True, resample_lambda=5.0)
    opts = method_options("doob", cfg)
    assert opts["keep_simulated"] is True and opts["lookahead"] == "rollout" and opts["window"] == (1, 3)
    assert opts["resample_lambda"] == 5.0
    with pytest.raises(ConfigError, match="num_particles >= 2"):
        GuidanceConfig(method="doob", num_particles=1, resample_lambda=5.0)
    with pytest.raises(ConfigError, match="num_particles >= 2"):  # doob as a comparison row counts too
        GuidanceConfig(method="best_of_n", compare=["doob"], num_particles=1, resample_lambda=5.0)
    with pytest.raises(ConfigError, match="gamma > 0"):
        GuidanceConfig(method="doob", num_particles=2, gamma=0.0, resample_lambda=5.0)


def test_every_method_starts_particle_j_from_the_same_noise(adapter):
    """The unguided sample of a prompt is particle 0 of its best-of-N (same noise stream whatever the number
    of particles), so best-of-N never scores below unguided on the reward it selects by."""
    kw = dict(KW, step="flow_euler", noise_level=0.0)  # deterministic: the image depends on the initial noise only
    none = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "none", prompt_ids=[0, 1], **kw)
    every = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "fk", prompt_ids=[0, 1], group_size=3,
                                  options=dict(select="all", every=100), **kw)  # no resampling: plain particles
    best = guided_sample_prompts(adapter, PROMPTS, strict_brightness, "best_of_n", prompt_ids=[0, 1], group_size=3,
                                 **kw)
    assert every.images.shape[0] == 6
    torch.testing.assert_close(every.images[0::3], none.images, rtol=0, atol=1e-6)
    assert bool((best.rewards[:, 0] >= none.rewards[:, 0]).all())


def test_table_counts_per_prompt_when_every_particle_is_kept(adapter):
    res = compare_methods(adapter, PROMPTS, strict_brightness, ["fk"], {"fk": dict(select="all", every=100)},
                          batch_size=2, group_size={"fk": 3}, **KW)
    assert res["fk"].images.shape[0] == 6 and res["fk"].prompts == 2
    per_prompt = res["fk"].counter.reward_evals / 2
    row = format_table(res, [1.0], ["brightness"]).splitlines()[2]
    assert float(row.split("|")[4]) == per_prompt >= 3  # not divided by the 6 images kept


def test_reward_failures_during_guidance_are_counted_per_method(tiny_folder, tmp_path, capsys):
    from trainers.run import sample_main

    cfg = _cfg(tiny_folder, tmp_path / "f", method="doob", compare=["none"], num_particles=2, num_candidates=2)
    flaky = dataclasses.replace(cfg.rewards[0], name="plugins.reward_plugins:nan_second", on_error="skip")
    cfg = dataclasses.replace(cfg, rewards=[flaky])
    with pytest.warns(RuntimeWarning, match="reward 'nan_second' failed"):
        assert sample_main(cfg) == 0
    printed = capsys.readouterr().out
    assert "reward failures" in printed.splitlines()[-4]  # the table's header
    record = json.loads((tmp_path / "f" / "guidance_rewards.json").read_text())
    # nan_second fails on the second sample of every call with 2 or more samples: DOIT's candidate evaluations
    # fail too, unguided sampling only in its scoring
    none, doob = (record["methods"][m]["reward_failures"].get("nan_second", 0) for m in ("none", "doob"))
    assert 1 <= none < doob


def test_methods_are_compared_on_the_reward_columns_that_scored_in_all_of_them():
    """A judge that failed (NaN under ``on_error: skip``) on one method's image of a prompt is left out of that
    prompt's score in every method: scored alone, the failed method's other column was scaled up to the total
    weight (0.9 -> 1.35 with weights 1 and 0.5) and headed the table."""
    from samplers.guided.common import EvalCounter
    from samplers.guided.pipeline import MethodResult, compared_scores

    images = torch.zeros(2, 3, 4, 4)
    ok = MethodResult("none", images, torch.tensor([[0.9, 0.2], [0.5, 0.4]]), EvalCounter(), 0.0)
    failed = MethodResult("best_of_n", images, torch.tensor([[0.9, float("nan")], [0.5, 0.4]]), EvalCounter(), 0.0)
    scores = compared_scores({"none": ok, "best_of_n": failed}, [1.0, 0.5])
    # prompt 0: the first column only, rescaled to the total weight 1.5, in both methods; prompt 1: both columns
    torch.testing.assert_close(scores["none"], torch.tensor([1.35, 0.7]))
    torch.testing.assert_close(scores["best_of_n"], torch.tensor([1.35, 0.7]))
    assert failed.score([1.0, 0.5])[0] == pytest.approx(1.35) and ok.score([1.0, 0.5])[0] == pytest.approx(1.0)
    rows = format_table({"none": ok, "best_of_n": failed}, [1.0, 0.5], ["a", "b"]).splitlines()[2:]
    assert [float(r.split("|")[6]) for r in rows] == [1.025, 1.025]
    # and each column's mean over the prompts it scored in every method (prompt 1 only for b: 0.4 in both; the
    # failed method's b was averaged over the prompts where it had not failed, the other's over both: 0.4 vs 0.3)
    assert [float(r.split("|")[8]) for r in rows] == [0.4, 0.4]
    assert [float(r.split("|")[7]) for r in rows] == [0.7, 0.7]
