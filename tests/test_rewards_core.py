"""Registry, specs, dotted-path plugins, reward matrix, failure policies, weighted_sum, transforms."""

import math
import os
import sys
import textwrap

import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import rewards  # noqa: E402
from rewards import (  # noqa: E402
    REWARDS,
    TRANSFORMS,
    FunctionReward,
    MultiReward,
    RewardError,
    RewardSpec,
    build_reward,
    build_transform,
    parse_reward_specs,
    register_reward,
    weighted_sum,
)
from rewards.transforms import affine, clip, lsc, par, rank  # noqa: E402

P = "plugins.reward_plugins"
NAN = float("nan")


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g), [f"prompt {i}" for i in range(b)], [{} for _ in range(b)]


# ------------------------------------------------------------------------------------------- registry


def test_builtin_rewards_are_registered():
    expected = {
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "ocr",
        "shapes",
        "clip_score",
        "pickscore",
        "hps",
        "aesthetic",
        "imagereward_style",
        "dino_similarity",
        "remote",
    }
    assert expected <= set(REWARDS)


def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_reward("no_such_reward")
    msg = str(err.value)
    assert (
        "no_such_reward" in msg
        and "jpeg_compressibility" in msg
        and "ocr" in msg
        and "my_pkg.my_module" in msg
    )


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown key.*'wieght'.*valid keys"):
        RewardSpec.from_any({"name": "ocr", "wieght": 1.0})
    with pytest.raises(ValueError, match="on_error='ignore'.*'raise', 'skip'"):
        RewardSpec(name="ocr", on_error="ignore")
    with pytest.raises(ValueError, match="needs a 'name'"):
        RewardSpec.from_any({"weight": 2.0})


def test_parse_reward_specs_forms():
    specs = parse_reward_specs({"jpeg_compressibility": 0.5, "ocr": 0.2})
    assert [(s.name, s.weight) for s in specs] == [("jpeg_compressibility", 0.5), ("ocr", 0.2)]
    specs = parse_reward_specs(["ocr", {"name": "jpeg_compressibility", "weight": 2, "on_error": "skip"}])
    assert specs[1].on_error == "skip" and specs[1].weight == 2.0
    assert parse_reward_specs("ocr")[0].name == "ocr"


def test_register_reward_decorator_and_duplicate_name():
    @register_reward("_test_const")
    def make(value=2.0, batch_size=None, device=None):
        return FunctionReward(lambda im, pr, md: torch.full((im.shape[0],), value), name="_test_const")

    try:
        r = build_reward({"name": "_test_const", "kwargs": {"value": 3.0}})
        images, prompts, md = _batch()
        assert torch.equal(r(images, prompts, md).scores, torch.full((4,), 3.0))
        with pytest.raises(ValueError, match="already registered"):
            register_reward("_test_const")(lambda: None)
    finally:
        REWARDS.pop("_test_const", None)


def test_plugin_plain_function_by_dotted_path():
    images, prompts, md = _batch()
    r = build_reward({"name": f"{P}:brightness", "kwargs": {"scale": 2.0}, "batch_size": 3})
    assert isinstance(r, FunctionReward) and r.range == (0.0, 1.0) and r.batch_size == 3
    assert torch.allclose(r(images, prompts, md).scores, 2.0 * images.mean(dim=(1, 2, 3)))


def test_plugin_factory_by_dotted_path():
    images, prompts, md = _batch()
    r = build_reward(RewardSpec(name=f"{P}:make_brightness", kwargs={"scale": 3.0}, label="bright"))
    assert r.name == "bright" and r.differentiable
    out = r(images, prompts, md)
    assert torch.allclose(out.scores, 3.0 * images.mean(dim=(1, 2, 3)))
    assert out.details[0] == {"prompt": "prompt 0"}


def test_reward_module_outside_the_package_from_config(tmp_path, monkeypatch):
    (tmp_path / "my_reward_pkg").mkdir()
    (tmp_path / "my_reward_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_reward_pkg" / "scorers.py").write_text(
        textwrap.dedent("""
        import torch
        def redness(images, prompts, metadata, bonus=0.0):
            return images[:, 0].mean(dim=(1, 2)) + bonus
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images, prompts, md = _batch()
    multi = MultiReward(
        [
            {"name": "my_reward_pkg.scorers:redness", "kwargs": {"bonus": 1.0}, "label": "red"},
            {"name": f"{P}:brightness"},
        ]
    )
    out = multi(images, prompts, md)
    assert out.names == ["red", "brightness"]
    assert torch.allclose(out.rewards[:, 0], images[:, 0].mean(dim=(1, 2)) + 1.0)
    with pytest.raises(ValueError, match="cannot import module 'my_reward_pkg.nope'"):
        build_reward("my_reward_pkg.nope:redness")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_reward("my_reward_pkg.scorers:missing")


# ------------------------------------------------------------------------------------------- multi


def test_multi_reward_matrix_names_timings_details():
    images, prompts, md = _batch(5)
    multi = MultiReward(
        [
            {"name": f"{P}:brightness", "weight": 2.0},
            {
                "name": f"{P}:make_brightness",
                "kwargs": {"scale": -1.0},
                "transform": {"name": "affine", "shift": 1.0},
            },
        ]
    )
    out = multi(images, prompts, md)
    assert out.rewards.shape == (5, 2) and out.rewards.dtype == torch.float32
    assert out.names == ["brightness", "brightness_factory"]
    mean = images.mean(dim=(1, 2, 3))
    assert torch.allclose(out.rewards[:, 0], mean) and torch.allclose(out.rewards[:, 1], 1.0 - mean)
    assert torch.allclose(out.raw[:, 1], -mean)
    assert set(out.timings) == set(out.names) and all(t >= 0 for t in out.timings.values())
    assert out.details["brightness"] is None and len(out.details["brightness_factory"]) == 5
    assert out.failures == {"brightness": 0, "brightness_factory": 0}
    assert torch.allclose(out.weighted_sum(), 2.0 * mean + (1.0 - mean))
    assert torch.equal(out.column("brightness"), out.rewards[:, 0])


def test_multi_reward_duplicate_columns_need_labels():
    with pytest.raises(ValueError, match="distinct 'label'"):
        MultiReward([f"{P}:brightness", f"{P}:brightness"])
    MultiReward([f"{P}:brightness", {"name": f"{P}:brightness", "label": "b2"}])


@pytest.mark.parametrize(
    "fn, what",
    [
        ("raising", "raised ValueError: boom"),
        ("wrong_shape", "shape (4, 2); expected [4]"),
        ("nan_second", "NaN at indices [1]"),
        ("inf_first", "inf at indices [0]"),
        ("not_a_tensor", "returned a list, not a Tensor[B] or RewardOutput (the reward protocol, rewards/base.py); "
                         "return torch.as_tensor(scores, dtype=torch.float32)"),
    ],
)
def test_failure_policy_raise_names_reward_and_batch(fn, what):
    images, prompts, md = _batch()
    multi = MultiReward([{"name": f"{P}:{fn}", "label": f"bad_{fn}"}])
    with pytest.raises(RewardError) as err:
        multi(images, prompts, md)
    msg = str(err.value)
    assert f"'bad_{fn}'" in msg and what in msg
    assert "batch of 4 sample(s)" in msg and "indices 0..3" in msg and "'prompt 0'" in msg


@pytest.mark.parametrize(
    "fn, nan_rows, failed",
    [
        ("raising", [0, 1, 2, 3], 4),
        ("wrong_shape", [0, 1, 2, 3], 4),
        ("nan_second", [1], 1),
        ("inf_first", [0], 1),
    ],
)
def test_failure_policy_skip_gives_counted_nan(fn, nan_rows, failed):
    images, prompts, md = _batch()
    multi = MultiReward([{"name": f"{P}:{fn}", "on_error": "skip"}, {"name": f"{P}:brightness"}])
    with pytest.warns(RuntimeWarning, match=f"reward '{fn}' failed on {failed} of 4 samples; on_error=skip"):
        out = multi(images, prompts, md)
    col = out.rewards[:, 0]
    assert torch.isnan(col).nonzero().flatten().tolist() == nan_rows
    assert not torch.isnan(out.rewards[:, 1]).any()
    assert out.failures[fn] == failed and len(out.errors[fn]) == 1 and fn in out.errors[fn][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reward, not on every batch
        multi(images, prompts, md)
    assert multi.total_failures[fn] == 2 * failed


def test_nan_allowed_when_reward_declares_it():
    images, prompts, md = _batch()
    out = MultiReward([{"name": f"{P}:nan_second", "allow_nan": True}])(images, prompts, md)
    assert math.isnan(out.rewards[1, 0].item()) and out.failures["nan_second"] == 0


def test_chunk_error_names_the_chunk():
    images, prompts, md = _batch(5)
    r = build_reward({"name": f"{P}:raising", "batch_size": 2})
    with pytest.raises(
        RewardError, match=r"'raising' raised ValueError: boom \(on batch of 2 sample\(s\), indices 0..1"
    ):
        r(images, prompts, md)


def test_multi_reward_gradients_only_when_asked():
    images, prompts, md = _batch()
    images.requires_grad_(True)
    out = MultiReward([f"{P}:make_brightness"])(images, prompts, md)
    assert not out.rewards.requires_grad
    out = MultiReward([f"{P}:make_brightness"], grad=True)(images, prompts, md)
    out.rewards.sum().backward()
    assert images.grad is not None and torch.allclose(images.grad, torch.full_like(images, 1 / (3 * 64)))


# ------------------------------------------------------------------------------------------- weighted_sum


def test_weighted_sum_known_answers():
    m = torch.tensor([[1.0, 2.0, 3.0], [1.0, NAN, 3.0], [NAN, NAN, NAN], [NAN, 5.0, NAN]])
    w = [1.0, 2.0, 1.0]
    # renormalize: row 1 keeps total |w| = 4 over valid weights 2 -> (1 + 3) * 4 / 2
    r = weighted_sum(m, w)
    assert r[0] == 8.0 and r[1] == 8.0 and math.isnan(r[2]) and r[3] == 20.0
    z = weighted_sum(m, w, nan_policy="zero")
    assert z.tolist() == [8.0, 4.0, 0.0, 10.0]
    p = weighted_sum(m, w, nan_policy="propagate")
    assert p[0] == 8.0 and all(math.isnan(v) for v in p[1:].tolist())
    # A zero-weight column never matters, not even its NaN.
    assert weighted_sum(torch.tensor([[2.0, NAN]]), [1.0, 0.0], nan_policy="propagate").item() == 2.0
    with pytest.raises(ValueError, match="nan_policy='mean'"):
        weighted_sum(m, w, nan_policy="mean")
    with pytest.raises(ValueError, match="need 3 weights"):
        weighted_sum(m, [1.0])


# ------------------------------------------------------------------------------------------- transforms


def test_affine_and_clip():
    s = torch.tensor([-1.0, 0.5, 2.0, NAN])
    assert torch.allclose(affine(s, scale=2.0, shift=1.0)[:3], torch.tensor([-1.0, 2.0, 5.0]))
    c = clip(s, min=0.0, max=1.0)
    assert c[:3].tolist() == [0.0, 0.5, 1.0] and math.isnan(c[3])


def test_rank_known_answers_ties_groups_and_nan():
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, NAN])
    r = rank(s)
    assert r[:4].tolist() == [1.0, 0.0, 0.5, 0.5] and math.isnan(r[4])
    prompts = ["a", "a", "b", "b", "b"]
    r = rank(torch.tensor([5.0, 1.0, 0.0, 9.0, 3.0]), by="prompt", prompts=prompts)
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]
    md = [{"g": 0}, {"g": 1}, {"g": 0}]
    assert rank(torch.tensor([1.0, 7.0, 2.0]), by="g", metadata=md).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="metadata key 'h'"):
        rank(torch.tensor([1.0]), by="h", metadata=[{}])


def test_lsc_and_par_known_answers():
    s = torch.tensor([1.0, 0.0, 2.0])
    prompts = ["x", "y", "x"]
    ref = {"x": 1.0, "y": 0.5}
    expect = F.logsigmoid(torch.tensor([0.0, -0.5, 1.0]))
    assert torch.allclose(lsc(s, reference=ref, prompts=prompts), expect)
    assert torch.allclose(lsc(s, reference=torch.tensor([1.0, 0.5, 1.0])), expect)
    assert torch.allclose(
        lsc(s, reference_key="ref", metadata=[{"ref": 1.0}, {"ref": 0.5}, {"ref": 1.0}]), expect
    )
    assert abs(lsc(torch.tensor([0.0]), reference=0.0).item() - math.log(0.5)) < 1e-7
    assert torch.allclose(
        par(s, reference=ref, prompts=prompts), torch.sigmoid(torch.tensor([0.0, -0.5, 1.0]))
    )
    multi_ref = torch.tensor([[0.0, 2.0], [0.0, 0.0], [2.0, 2.0]])
    want = torch.stack(
        [
            (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2,
            torch.sigmoid(torch.tensor(0.0)),
            torch.sigmoid(torch.tensor(0.0)),
        ]
    )
    assert torch.allclose(par(s, reference=multi_ref), want)
    with pytest.raises(ValueError, match="no reference reward for prompt 'z'"):
        lsc(s, reference=ref, prompts=["x", "z", "x"])
    with pytest.raises(ValueError, match="exactly one of reference="):
        par(s)


def test_transform_registry_and_chains():
    assert set(TRANSFORMS) == {"affine", "clip", "rank", "lsc", "par"}
    with pytest.raises(
        ValueError, match=r"unknown reward transform 'sqrt'.*'affine', 'clip', 'lsc', 'par', 'rank'"
    ):
        build_transform("sqrt")
    clip_s = build_transform([{"name": "clip", "min": 0.0}, {"name": "affine", "scale": 2.5}])
    assert clip_s(torch.tensor([-0.2, 0.4])).tolist() == pytest.approx([0.0, 1.0])
    t = build_transform({"name": "lsc", "reference": {"p": 0.0}})
    assert t(torch.tensor([0.0]), prompts=["p"]).item() == pytest.approx(math.log(0.5))
    assert build_transform(None) is None


def test_transform_in_multi_reward_with_per_prompt_reference():
    images, _, md = _batch(4)
    prompts = ["a", "a", "b", "b"]
    out = MultiReward(
        [
            {"name": f"{P}:brightness", "transform": {"name": "par", "reference": {"a": 0.5, "b": 0.4}}},
            {"name": f"{P}:brightness", "label": "ranked", "transform": {"name": "rank", "by": "prompt"}},
        ]
    )(images, prompts, md)
    mean = images.mean(dim=(1, 2, 3))
    assert torch.allclose(out.rewards[:, 0], torch.sigmoid(mean - torch.tensor([0.5, 0.5, 0.4, 0.4])))
    assert sorted(out.rewards[:2, 1].tolist()) == [0.0, 1.0] and sorted(out.rewards[2:, 1].tolist()) == [
        0.0,
        1.0,
    ]


def test_package_exports():
    for name in rewards.__all__:
        assert hasattr(rewards, name), name


@pytest.mark.parametrize("returned", [[0.5] * 4, (0.5,) * 4, "0.5"])
def test_a_reward_returning_a_non_tensor_is_told_it_returned_it(returned):
    """A reward object (not wrapped in FunctionReward) that returns a list or numpy array: the error says it
    *returned* that (it raised nothing) and how to return a tensor; under on_error=skip the column is NaN."""

    class Returns:
        name, differentiable, trainable, range, allows_nan = "as_list", False, False, (0.0, 1.0), False

        def __call__(self, images, prompts, metadata):
            return returned

    images, prompts, md = _batch()
    multi = MultiReward([Returns()])
    with pytest.raises(RewardError) as err:
        multi(images, prompts, md)
    msg = str(err.value)
    assert msg.startswith(f"reward 'as_list' returned a {type(returned).__name__}, not a Tensor[B] or RewardOutput")
    assert "raised" not in msg and "torch.as_tensor(scores" in msg and "batch of 4 sample(s)" in msg


def test_weighted_sum_over_groups_uses_the_columns_every_row_of_a_group_has():
    """A reward that failed (NaN under on_error: skip) on one sample of a prompt's group is left out for the whole
    group, so that sample's advantage is not computed from its other columns rescaled to the total weight (it
    scored 1.5 against its group's 0.95 below); a column NaN for the whole group (not applicable) is left out as
    before, and a group without a common column scores only its fully scored rows."""
    from rewards import weighted_sum

    nan = float("nan")
    m = torch.tensor([[0.75, 0.2], [0.75, nan], [0.5, nan], [0.25, nan], [nan, 0.3], [0.5, nan], [0.4, 0.6],
                      [nan, nan]])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    torch.testing.assert_close(weighted_sum(m, [1.0, 1.0])[:2], torch.tensor([0.95, 1.5]))
    out = weighted_sum(m, [1.0, 1.0], groups=groups)
    torch.testing.assert_close(out[:4], torch.tensor([1.5, 1.5, 1.0, 0.5]))
    assert torch.isnan(out[4:6]).all()
    assert out[6] == pytest.approx(1.0) and torch.isnan(out[7])
    assert torch.equal(weighted_sum(m, [1.0, 0.0], groups=groups).isnan(), torch.tensor([False] * 4 + [True, False,
                                                                                          False, True]))


def test_jpeg_quality_option_is_used():
    """The reward's `quality` kwarg was not guarded: a reward always at quality 95 passed every test."""
    from rewards.jpeg import jpeg_size_kb, to_uint8_hwc

    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = float(build_reward({"name": "jpeg_incompressibility", "kwargs": {"quality": 20}})(img, ["p"]).scores[0])
    assert got == pytest.approx(jpeg_size_kb(to_uint8_hwc(img)[0], quality=20), abs=1e-5)
    assert got < jpeg_size_kb(to_uint8_hwc(img)[0], quality=95)


def test_par_averages_sigmoids_over_references_that_are_not_symmetric():
    """The earlier PAR test's references sat symmetrically around the score, where the mean of the sigmoids equals the
    sigmoid of the mean: the wrong formula passed."""
    want = (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(-3.0))) / 2  # 0.389; sigmoid(1 - 2): 0.269
    torch.testing.assert_close(par(torch.tensor([1.0]), reference=torch.tensor([[0.0, 4.0]])), want.reshape(1))


def test_a_spec_device_and_batch_size_reach_the_factory(monkeypatch):
    """`device` in a reward spec was not guarded: a reward asked onto the CPU (or a second GPU) loading on the
    training device passed every test."""
    from rewards import registry

    seen = {}

    class Probe:
        name, differentiable, trainable, range, allows_nan = "probe", False, False, (0.0, 1.0), False

        def __init__(self, **kwargs):
            seen.update(kwargs)

        def __call__(self, images, prompts, metadata=None):
            return torch.zeros(images.shape[0])

    monkeypatch.setitem(registry.REWARDS, "_device_probe", registry.reward_factory(Probe))
    build_reward({"name": "_device_probe", "device": "cpu", "batch_size": 3})
    assert seen == {"device": "cpu", "batch_size": 3}
