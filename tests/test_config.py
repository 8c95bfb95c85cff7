"""diffalign.config: coercion, overrides, error messages (key, value, rule, fix), round trips, registry."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import pytest
import yaml

from diffalign import config as C
from diffalign.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    check,
    describe,
    from_dict,
    load_config,
    load_yaml,
    param,
    parse_override,
    resolve_train_section,
    save_config,
    to_dict,
)

# --------------------------------------------------------------------------------------------------
# fixtures: a dataclass with every supported field type, and a registered test trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class Inner:
    x: int = 1
    tags: List[str] = field(default_factory=list)


@dataclass
class Item:
    name: str
    weight: float = 1.0


@dataclass
class Typed:
    i: int = 0
    f: float = 0.0
    b: bool = False
    s: str = "s"
    opt_i: Optional[int] = 3
    opt_s: Optional[str] = "x"
    lit: Literal["a", "b"] = "a"
    lit_int: Literal[1, 2] = 1
    picked: str = field(default="red", metadata={"choices": ("red", "green"), "help": "a colour"})
    lst: List[int] = field(default_factory=lambda: [1])
    tup: Tuple[int, int] = (0, 1)
    opt_tup: Optional[Tuple[int, int]] = None
    var_tup: Tuple[float, ...] = ()
    d: Dict[str, Any] = field(default_factory=dict)
    d_float: Dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    items: List[Item] = field(default_factory=lambda: [Item("first")])


@dataclass
class ToyTrainConfig:
    lr: float = param(1e-4, help="learning rate", min=0.0)
    clip_range: float = param(0.2, help="PPO clip")
    optimizer: Literal["adamw", "sgd"] = param("adamw", help="optimizer")
    min_group: int = param(2, help="group size needed")

    def validate_run(self, run_cfg: RunConfig) -> None:
        check(
            run_cfg.sample.group_size >= self.min_group,
            "sample.group_size",
            f"got {run_cfg.sample.group_size}; toy needs >= {self.min_group} images per prompt",
        )


@pytest.fixture
def toy_trainer(monkeypatch):
    monkeypatch.setitem(C.TRAINER_CONFIGS, "toy", ToyTrainConfig)
    return "toy"


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def _override_err(cls, *overrides: str) -> str:
    return _err(load_config, cls, None, list(overrides))


def _yaml_err(tmp_path, cls, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return _err(load_config, cls, path)


# --------------------------------------------------------------------------------------------------
# coercion tables
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("i=5", "i", 5),
        ("i=-3", "i", -3),
        ("i=1e3", "i", 1000),
        ("i=4.0", "i", 4),
        ("f=1e-4", "f", 1e-4),
        ("f=2.5E+3", "f", 2500.0),
        ("f=3", "f", 3.0),
        ("f=.5", "f", 0.5),
        ("b=true", "b", True),
        ("b=False", "b", False),
        ("b=yes", "b", True),
        ("b=0", "b", False),
        ("s=123", "s", "123"),
        ("s=true", "s", "true"),
        ("s=no", "s", "no"),
        ("s=a b, c", "s", "a b, c"),
        ("s='quoted'", "s", "quoted"),
        ("s=", "s", ""),
        ("opt_i=null", "opt_i", None),
        ("opt_i=~", "opt_i", None),
        ("opt_i=7", "opt_i", 7),
        ("opt_s=null", "opt_s", None),
        ("opt_s=latest", "opt_s", "latest"),
        ("lit=b", "lit", "b"),
        ("lit_int=2", "lit_int", 2),
        ("picked=green", "picked", "green"),
        ("lst=[1,2]", "lst", [1, 2]),
        ("lst=[]", "lst", []),
        ("lst=['3', 4.0]", "lst", [3, 4]),
        ("tup=[0,3]", "tup", (0, 3)),
        ("opt_tup=[2, 5]", "opt_tup", (2, 5)),
        ("opt_tup=null", "opt_tup", None),
        ("var_tup=[1, 2e-3]", "var_tup", (1.0, 2e-3)),
        ("d={a: 1, b: [x]}", "d", {"a": 1, "b": ["x"]}),
        ("d.k=1e-4", "d", {"k": 1e-4}),
        ("d_float.k=3", "d_float", {"k": 3.0}),
    ],
)
def test_override_coercion(override, attr, expected):
    cfg = load_config(Typed, None, [override])
    value = getattr(cfg, attr)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("inner.x=4", Inner(x=4)),
        ("inner.tags=[a, b]", Inner(tags=["a", "b"])),
        ("inner={x: 9}", Inner(x=9)),
    ],
)
def test_override_nested(override, expected):
    assert load_config(Typed, None, [override]).inner == expected


def test_override_list_of_sections_starts_from_default_and_appends():
    cfg = load_config(Typed, None, ["items.0.weight=0.5", "items.1.name=second"])
    assert cfg.items == [Item("first", 0.5), Item("second", 1.0)]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("i=abc", "i: expected int, got 'abc' (str)"),
        ("i=1.5", "i: expected int, got 1.5 (float)"),
        ("i=true", "i: expected int, got True (bool)"),
        ("i=null", "i: expected int, got None (NoneType); this key cannot be null"),
        ("f=abc", "f: expected float, got 'abc' (str)"),
        ("f=[1]", "f: expected float, got [1] (list)"),
        ("b=maybe", "b: expected bool, got 'maybe' (str); use true or false"),
        ("lst=3", "lst: expected list of int, got 3 (int)"),
        ("lst=[1, x]", "lst.1: expected int, got 'x' (str)"),
        ("tup=[1, 2, 3]", "tup: expected [int, int], got [1, 2, 3] (list); exactly 2 items are needed"),
        ("d=3", "d: expected mapping, got 3 (int)"),
        ("d_float.k=x", "d_float.k: expected float, got 'x' (str)"),
        ("inner=5", "inner: expected a section (mapping of keys to values), got 5 (int)"),
        ("inner.x=abc", "inner.x: expected int, got 'abc' (str)"),
        ("items.0.weight=abc", "items.0.weight: expected float, got 'abc' (str)"),
    ],
)
def test_override_wrong_type(override, expected):
    assert _override_err(Typed, override).startswith(expected)


def test_yaml_values_are_coerced_like_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("i: '7'\nf: 1e-4\nb: 'true'\ntup: [0, 2]\nd: {lr: 3e-5}\n")
    cfg = load_config(Typed, path)
    assert (cfg.i, cfg.f, cfg.b, cfg.tup, cfg.d) == (7, 1e-4, True, (0, 2), {"lr": 3e-5})
    # a text field takes an override's raw text, but a YAML list is not text
    assert load_config(Typed, None, ["s=[a]"]).s == "[a]"
    assert _yaml_err(tmp_path, Typed, "s: [a]\n").startswith("s: expected str, got ['a'] (list)")


# --------------------------------------------------------------------------------------------------
# error messages: unknown key / wrong type / invalid choice, top-level / nested / list index,
# from overrides and from YAML files
# --------------------------------------------------------------------------------------------------

SAMPLE_KEYS = "num_steps, eval_num_steps, guidance_scale"
REWARD_KEYS = "name, weight, kwargs, transform"


@pytest.mark.parametrize(
    "override, yaml_text, parts",
    [
        (
            "seeed=1",
            "seeed: 1\n",
            [
                "seeed: unknown key",
                "1",
                "did you mean 'seed'",
                "valid keys at the top level",
                "seed, output_dir, trainer, model",
            ],
        ),
        (
            "sample.num_stepz=5",
            "sample:\n  num_stepz: 5\n",
            [
                "sample.num_stepz: unknown key",
                "5",
                "did you mean 'num_steps'",
                "valid keys of 'sample'",
                SAMPLE_KEYS,
            ],
        ),
        (
            "model.lora.rnk=4",
            "model:\n  lora:\n    rnk: 4\n",
            [
                "model.lora.rnk: unknown key",
                "4",
                "did you mean 'rank'",
                "valid keys of 'model.lora'",
                "enabled, rank",
            ],
        ),
        (
            "rewards.0.wieght=2",
            "rewards:\n- name: r\n  wieght: 2\n",
            [
                "rewards.0.wieght: unknown key",
                "2",
                "did you mean 'weight'",
                "valid keys of 'rewards.0'",
                REWARD_KEYS,
            ],
        ),
    ],
)
def test_unknown_key(tmp_path, override, yaml_text, parts):
    pre = ["rewards.0.name=r"] if override.startswith("rewards") else []
    for message in (_override_err(RunConfig, *pre, override), _yaml_err(tmp_path, RunConfig, yaml_text)):
        for part in parts:
            assert part in message, (part, message)


@pytest.mark.parametrize(
    "override, yaml_text, expected",
    [
        ("seed=abc", "seed: abc\n", "seed: expected int, got 'abc' (str)"),
        (
            "sample.guidance_scale=high",
            "sample: {guidance_scale: high}\n",
            "sample.guidance_scale: expected float, got 'high' (str)",
        ),
        (
            "model.lora.enabled=maybe",
            "model: {lora: {enabled: maybe}}\n",
            "model.lora.enabled: expected bool, got 'maybe' (str)",
        ),
        (
            "rewards.0.weight=abc",
            "rewards: [{name: r, weight: abc}]\n",
            "rewards.0.weight: expected float, got 'abc' (str)",
        ),
        (
            "sample.window=[0, x]",
            "sample: {window: [0, x]}\n",
            "sample.window.1: expected int, got 'x' (str)",
        ),
    ],
)
def test_wrong_type(tmp_path, override, yaml_text, expected):
    pre = ["rewards.0.name=r"] if override.startswith("rewards") else []
    assert _override_err(RunConfig, *pre, override).startswith(expected)
    assert _yaml_err(tmp_path, RunConfig, yaml_text).startswith(expected)


@pytest.mark.parametrize(
    "override, yaml_text, parts",
    [
        ("lit=c", "lit: c\n", ["lit: invalid choice 'c'", "valid choices: 'a', 'b'"]),
        ("picked=blue", "picked: blue\n", ["picked: invalid choice 'blue'", "valid choices: 'red', 'green'"]),
        ("lit_int=3", "lit_int: 3\n", ["lit_int: invalid choice 3", "valid choices: 1, 2"]),
    ],
)
def test_invalid_choice_top_level(tmp_path, override, yaml_text, parts):
    for message in (_override_err(Typed, override), _yaml_err(tmp_path, Typed, yaml_text)):
        for part in parts:
            assert part in message, (part, message)


@pytest.mark.parametrize(
    "override, yaml_text, parts",
    [
        (
            "model.dtype=fp8",
            "model: {dtype: fp8}\n",
            ["model.dtype: invalid choice 'fp8'", "valid choices: 'float32', 'bfloat16', 'float16'"],
        ),
        (
            "model.lora.init=zeros",
            "model: {lora: {init: zeros}}\n",
            ["model.lora.init: invalid choice 'zeros'", "'gaussian', 'default'"],
        ),
        (
            "sample.step=euler",
            "sample: {step: euler}\n",
            [
                "sample.step: invalid choice 'euler'",
                "did you mean 'flow_euler'",
                "'flow_sde', 'flow_cps', 'ddim'",
            ],
        ),
        (
            "rewards.0.on_error=ignore",
            "rewards: [{name: r, on_error: ignore}]\n",
            ["rewards.0.on_error: invalid choice 'ignore'", "valid choices: 'raise', 'skip'"],
        ),
        (
            "model.device=gpu",
            "model: {device: gpu}\n",
            ["model.device: invalid choice 'gpu'", "'auto', 'cpu'"],
        ),
    ],
)
def test_invalid_choice_nested_and_list(tmp_path, override, yaml_text, parts):
    pre = ["rewards.0.name=r"] if override.startswith("rewards") else []
    for message in (_override_err(RunConfig, *pre, override), _yaml_err(tmp_path, RunConfig, yaml_text)):
        for part in parts:
            assert part in message, (part, message)


def test_invalid_trainer_lists_registered(toy_trainer):
    message = _override_err(RunConfig, "trainer=toyy")
    assert message.startswith("trainer: invalid choice 'toyy'")
    assert "did you mean 'toy'" in message and "'toy'" in message


# --------------------------------------------------------------------------------------------------
# bounds and validation hooks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, parts",
    [
        ("sample.num_steps=0", ["sample.num_steps: got 0; must be >= 1"]),
        ("sample.guidance_scale=0.5", ["sample.guidance_scale: got 0.5; must be >= 1.0"]),
        ("sample.noise_level=-0.1", ["sample.noise_level: got -0.1; must be >= 0.0"]),
        ("sample.window=[3,3]", ["sample.window: got [3, 3]", "0 <= start < end <= num_steps (10)"]),
        ("sample.window=[0,11]", ["sample.window: got [0, 11]", "num_steps (10)"]),
        ("sample.window=[-1,2]", ["sample.window: got [-1, 2]"]),
        ("model.lora.alpha=0", ["model.lora.alpha: got 0.0; must be > 0"]),
        ("checkpoint.keep_last=0", ["checkpoint.keep_last: got 0; must be >= 1"]),
        ("model.path=", ["model.path: got ''"]),
        ("guidance.keep_simulated=true", ["guidance.keep_simulated: got true with lookahead='reuse_eps'",
                                          "guidance.lookahead=rollout"]),
    ],
)
def test_validation_rules(override, parts):
    message = _override_err(RunConfig, override)
    for part in parts:
        assert part in message, (part, message)


def test_window_checked_against_overridden_num_steps():
    cfg = load_config(RunConfig, None, ["sample.num_steps=4", "sample.window=[1,4]"])
    assert cfg.sample.window == (1, 4)
    assert "num_steps (3)" in _override_err(RunConfig, "sample.num_steps=3", "sample.window=[1,4]")


def test_missing_required_key_in_list():
    message = _override_err(RunConfig, "rewards.0.weight=2")
    assert message.startswith("rewards.0.name: missing required key")


def test_reward_transform_rules():
    assert "rewards.0.transform_kwargs" in _override_err(
        RunConfig, "rewards.0.name=shapes", "rewards.0.transform_kwargs.a=1"
    )
    assert "rewards.0.transform: got 3" in _override_err(
        RunConfig, "rewards.0.name=shapes", "rewards.0.transform=3"
    )
    cfg = load_config(
        RunConfig,
        None,
        ["rewards.0.name=shapes", "rewards.0.transform=affine", "rewards.0.transform_kwargs.scale=2"],
    )
    assert cfg.rewards[0].registry_kwargs()["transform"] == {"name": "affine", "scale": 2}
    assert "transform_kwargs" not in cfg.rewards[0].registry_kwargs()
    cfg = load_config(RunConfig, None, ["rewards.0={name: shapes, transform: [rank, {name: clip, min: 0}]}"])
    assert cfg.rewards[0].transform == ["rank", {"name": "clip", "min": 0}]


def test_unknown_category_fails_when_read():
    assert "prompts.categories: unknown shapes categories ['colour']" in _override_err(
        RunConfig, "prompts.categories=[counting,colour]")


def test_unknown_reward_or_transform_fails_before_a_command_loads_a_model():
    from rewards.registry import check_reward_config

    def err(*overrides):
        with pytest.raises(ConfigError) as exc:
            check_reward_config(load_config(RunConfig, None, list(overrides)))
        return str(exc.value)

    e = err("rewards.0.name=shape")
    assert "rewards.0.name: unknown reward 'shape'; registered rewards are [" in e and "'shapes'" in e
    assert "registered with @register_reward in your own module is known only once that module is imported" in e
    e = err("rewards.0.name=shapes", "eval_rewards.0.name=shapes", "eval_rewards.0.transform=rnk")
    assert "eval_rewards.0.transform: unknown reward transform 'rnk'; valid transforms are [" in e
    # a dotted path is imported (not built) here: a missing module is a config error on its key
    e = err("rewards.0.name=my_pkg.not_installed:fn")
    assert e.startswith("rewards.0.name: cannot import module 'my_pkg.not_installed' for reward")
    check_reward_config(load_config(RunConfig, None, ["rewards.0.name=plugins.reward_plugins:brightness"]))


@dataclass
class Leaf:
    a: int = 0

    def __post_init__(self):
        if self.a < 0:
            raise ValueError("a must be >= 0")

    def validate(self):
        check(self.a != 13, "a", "got 13; unlucky, pick another")


@dataclass
class Root:
    leaf: Leaf = field(default_factory=Leaf)


def test_post_init_value_error_and_validate_hook_get_the_section_key():
    assert _err(from_dict, Root, {"leaf": {"a": -1}}) == "leaf: a must be >= 0"
    assert _err(from_dict, Root, {"leaf": {"a": 13}}) == "leaf.a: got 13; unlucky, pick another"


# --------------------------------------------------------------------------------------------------
# overrides: structure
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, parts",
    [
        ("seed", ["override 'seed' is not key=value"]),
        ("=3", ["is not key=value"]),
        ("sample..x=1", ["empty key part"]),
        ("rewards.2.name=r", ["rewards.2: index 2 is out of range", "0 to append"]),
        ("rewards.first.name=r", ["rewards.first: rewards is a list; use a number as index"]),
        ("sample.num_steps.x=1", ["sample.num_steps.x: sample.num_steps holds a value (int), not a section"]),
    ],
)
def test_override_structure_errors(override, parts):
    message = _override_err(RunConfig, override)
    for part in parts:
        assert part in message, (part, message)


def test_apply_overrides_without_a_class_and_does_not_mutate():
    data = {"a": {"b": 1}, "l": [{"w": 1}]}
    out = apply_overrides(data, ["a.b=2", "a.c=[1, 2]", "l.0.w=0.5", "l.1.w=null", "n.m=1e-4"])
    assert out == {"a": {"b": 2, "c": [1, 2]}, "l": [{"w": 0.5}, {"w": None}], "n": {"m": 1e-4}}
    assert data == {"a": {"b": 1}, "l": [{"w": 1}]}


def test_parse_override():
    assert parse_override("sample.window=[0,3]") == ("sample.window", [0, 3])
    assert parse_override("x=yes", str) == ("x", "yes")
    assert parse_override("x=yes") == ("x", True)
    assert _err(parse_override, "x").startswith("override 'x' is not key=value")


def test_bad_yaml_in_override_names_the_key():
    assert "override sample.window=[0," in _override_err(RunConfig, "sample.window=[0,")


# --------------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------------


def test_load_yaml_reads_exponent_floats_and_rejects_duplicates(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("lr: 1e-4\nbig: 2E5\nint: 3\nver: 1.10.2\n")
    assert load_yaml(path) == {"lr": 1e-4, "big": 2e5, "int": 3, "ver": "1.10.2"}
    path.write_text("seed: 1\nsample:\n  num_steps: 2\nseed: 2\n")
    message = _err(load_yaml, path)
    assert str(path) in message and "duplicate key 'seed'" in message and "line 4" in message


def test_load_yaml_errors(tmp_path):
    assert "config file not found" in _err(load_yaml, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: [unclosed\n")
    assert _err(load_yaml, bad).startswith(f"{bad}: invalid YAML")
    bad.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in _err(load_yaml, bad)
    bad.write_text("")
    assert load_yaml(bad) == {}


def test_yaml_file_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 3\nsample:\n  num_steps: 8\n  window: [0, 2]\nrewards:\n- name: a\n  weight: 2\n- name: b\n"
    )
    cfg = load_config(RunConfig, path, ["sample.num_steps=5", "rewards.1.weight=-1", "model.lora.rank=4"])
    assert cfg.seed == 3 and cfg.sample.num_steps == 5 and cfg.sample.window == (0, 2)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("a", 2.0), ("b", -1.0)]
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha == 64.0


# --------------------------------------------------------------------------------------------------
# round trip, train section, registry
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, toy_trainer):
    overrides = [
        "trainer=toy",
        "seed=7",
        "sample.window=[1,3]",
        "sample.negative_prompt=no",
        "rewards.0.name=a",
        "rewards.0.kwargs={scale: 1e-3, tags: [x]}",
        "rewards.1.name=pkg.mod:fn",
        "rewards.1.transform=rank",
        "model.lora.target_modules=[to_q, to_k]",
        "train.lr=3e-5",
        "checkpoint.resume_from=latest",
        "logging.wandb=true",
    ]
    cfg = load_config(RunConfig, None, overrides)
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    again = load_config(RunConfig, path)
    assert again == cfg
    assert again.train == {"lr": 3e-5, "clip_range": 0.2, "optimizer": "adamw", "min_group": 2}
    text = path.read_text()
    assert "window: [1, 3]" in text and "negative_prompt: 'no'" in text
    assert yaml.safe_load(text)["sample"]["window"] == [1, 3]
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind


def test_round_trip_defaults_and_typed(tmp_path):
    for cfg in (RunConfig(), Typed(opt_tup=(1, 2), d={"a": [1, {"b": None}]}, items=[Item("x", 2.0)])):
        path = tmp_path / "c.yaml"
        save_config(cfg, path)
        assert load_config(type(cfg), path) == cfg
        assert from_dict(type(cfg), to_dict(cfg)) == cfg


def test_train_section_errors_say_train_key(toy_trainer):
    assert (
        _override_err(RunConfig, "trainer=toy", "train.lr=abc") == "train.lr: expected float, got 'abc' (str)"
    )
    message = _override_err(RunConfig, "trainer=toy", "train.lrr=1")
    assert message.startswith("train.lrr: unknown key") and "did you mean 'lr'" in message
    assert "valid keys of 'train': lr, clip_range, optimizer, min_group" in message
    message = _override_err(RunConfig, "trainer=toy", "train.optimizer=adam")
    assert message.startswith("train.optimizer: invalid choice 'adam'") and "'adamw', 'sgd'" in message
    assert "train.lr: got -1.0; must be >= 0.0" in _override_err(RunConfig, "trainer=toy", "train.lr=-1")


def test_train_section_validate_run_hook(toy_trainer):
    message = _override_err(RunConfig, "trainer=toy", "sample.group_size=1")
    assert message == "sample.group_size: got 1; toy needs >= 2 images per prompt"


def test_resolve_train_section(toy_trainer):
    cfg = load_config(RunConfig, None, ["trainer=toy", "train.clip_range=0.1"])
    train = resolve_train_section(cfg)
    assert train == ToyTrainConfig(clip_range=0.1)
    # a dotted path works without registration
    cfg = load_config(RunConfig, None, [f"trainer={__name__}:ToyTrainConfig"])
    assert resolve_train_section(cfg) == ToyTrainConfig()


def test_train_without_trainer_is_an_error():
    assert _override_err(RunConfig, "train.lr=1").startswith("train: got keys ['lr'] but no trainer is set")
    assert _err(resolve_train_section, RunConfig()).startswith("trainer: not set")


def test_register_trainer_config(monkeypatch):
    monkeypatch.setattr(C, "TRAINER_CONFIGS", {})

    @C.register_trainer_config("mine")
    @dataclass
    class MineConfig:
        beta: float = 0.1

    assert C.TRAINER_CONFIGS == {"mine": MineConfig}
    assert C.trainer_config_class("mine") is MineConfig
    with pytest.raises(TypeError):
        C.register_trainer_config("bad")(int)


# --------------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------------


def test_describe_lists_keys_types_defaults_help():
    text = describe(RunConfig)
    lines = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith(" ")}
    assert "int" in lines["sample.num_steps"] and " 10 " in lines["sample.num_steps"]
    assert "sampler steps per rollout" in lines["sample.num_steps"]
    assert "builtin:shapes-flow" in lines["model.path"]
    assert "rewards.<i>.name" in lines and "(required)" in lines["rewards.<i>.name"]
    assert "choices: flow_sde, flow_cps, ddim, flow_euler" in " ".join(text.split())
    assert "model.lora.rank" in lines and "[int, int] or null" in lines["sample.window"]
    typed = describe(Typed)
    assert "a colour [choices: red, green]" in typed


def test_trainer_module_is_imported_on_first_use(tmp_path, monkeypatch):
    import trainers

    (tmp_path / "da_lazy_trainer.py").write_text(
        "from dataclasses import dataclass\n"
        "from diffalign.config import register_trainer_config\n\n\n"
        "@register_trainer_config('da_lazy_trainer')\n"
        "@dataclass\n"
        "class LazyConfig:\n"
        "    steps: int = 5\n"
    )
    monkeypatch.setattr(trainers, "__path__", [*trainers.__path__, str(tmp_path)])
    monkeypatch.setattr(C, "TRAINER_CONFIGS", {})
    monkeypatch.delitem(sys.modules, "trainers.da_lazy_trainer", raising=False)
    cfg = load_config(RunConfig, None, ["trainer=da_lazy_trainer", "train.steps=7"])
    assert cfg.train == {"steps": 7}
    assert "da_lazy_trainer" in C.TRAINER_CONFIGS
    sys.modules.pop("trainers.da_lazy_trainer", None)


def test_random_window_must_fit_the_steps():
    """A drawn window must fit: [0, 5) with windows of 3 over 4 steps used to fail mid-run in the sampler."""
    err = _override_err(RunConfig, "sample.num_steps=4", "sample.window=[0,3]", "sample.random_window=[0,5]")
    assert "sample.random_window: got [0, 5]; windows of length 3 are drawn inside it" in err
    assert "random_window" in _override_err(RunConfig, "sample.window=[0,3]", "sample.random_window=[1,3]")
    cfg = load_config(RunConfig, None, ["sample.num_steps=4", "sample.window=[0,3]", "sample.random_window=[0,4]"])
    assert tuple(cfg.sample.random_window) == (0, 4)


def test_reward_sections_accept_flow_grpo_weight_mapping(tmp_path):
    """``rewards: {name: weight}`` (Flow-GRPO's form, rewards/README.md) is read as the list form, in order, for
    rewards and eval_rewards, in a file, in an override, and before index overrides; other mappings say the fix."""
    path = tmp_path / "cfg.yaml"
    path.write_text("rewards: {shapes: 1.0, jpeg_compressibility: 0.1}\neval_rewards: {shapes: 2}\n")
    cfg = load_config(RunConfig, path, ["rewards.1.weight=0.5"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("shapes", 1.0), ("jpeg_compressibility", 0.5)]
    assert [(r.name, r.weight) for r in cfg.eval_rewards] == [("shapes", 2.0)]
    assert to_dict(cfg)["rewards"][0] == to_dict(from_dict(RunConfig, {"rewards": [{"name": "shapes"}]}))["rewards"][0]
    cfg = load_config(RunConfig, None, ["rewards={a: 1, b: -1}", "rewards.0.label=x"])
    assert [(r.name, r.weight, r.label) for r in cfg.rewards] == [("a", 1.0, "x"), ("b", -1.0, None)]
    assert [r.name for r in from_dict(RunConfig, {"rewards": {"c": 3}}).rewards] == ["c"]
    message = _override_err(RunConfig, "rewards={shapes: {weight: 1}}")
    assert message.startswith("rewards.shapes: expected a number") and "list form" in message
    assert _override_err(RunConfig, "rewards={name: shapes}").startswith("rewards: got a single spec")


@pytest.mark.parametrize("override,message", [
    ("train.max_grad_norm=nan", "train.max_grad_norm: got 'nan'; must be a finite number"),
    ("guidance.noise_level=inf", "guidance.noise_level: got 'inf'; must be a finite number"),
    ("train.learning_rate=nan", "train.learning_rate: got 'nan'; must be a finite number"),
    ("seed=-1", "seed: got -1; must be >= 0"),
    ("train.adam_beta1=1.5", "train.adam_beta1: got 1.5; must be <= 0.999999"),
    ("train.weight_decay=-1", "train.weight_decay: got -1.0; must be >= 0"),
    ("train.eval_num_steps=0", "train.eval_num_steps: got 0; must be >= 1"),
    ("train.eval_guidance_scale=0", "train.eval_guidance_scale: got 0.0; must be >= 1"),
    ("train.clip_range=-1", "train.clip_range: got -1.0; the PPO clip range must be > 0"),
    ("train.adv_clip_max=0", "train.adv_clip_max: got 0.0; 0 clips every advantage to 0"),
    ("train.timestep_fraction=0", "train.timestep_fraction: got 0.0; a fraction > 0"),
    ("output_dir=", "output_dir: got ''; a run needs a folder"),
    ("prompts.categories=[]", "prompts.categories: got []; name at least one of"),
    ("train.stop_after_epochs=0", "train.stop_after_epochs: got 0; must be >= 1"),
    ("train.max_minutes=-1", "train.max_minutes: got -1.0; must be >= 0"),
    ("rewards.0.weight=0", "rewards: every reward has weight 0"),
    ("guidance.window=[5,3]", "guidance.window: got [5, 3]; must be [start, end) with 0 <= start < end"),
    ("guidance.window=[0,100]", "guidance.window: got [0, 100]; end must be <= the guided sampler's 20 steps"),
    ("sample.step=ddim sample.noise_level=1.5", "sample.noise_level: got 1.5 with step ddim; DDIM's eta is at most 1"),
    ("guidance.step=ddim guidance.noise_level=2", "guidance.noise_level: got 2.0 with step ddim; DDIM's eta is at"),
    # crashed after the model loaded and the first evaluation ran
    ("prompts.split=held_out prompts.categories=[single_object]",
     "prompts.categories: ['single_object'] have no colours, so split=held_out"),
    # a prompt file named without source=file was silently not read
    ("prompts.path=/data/prompts.txt", "prompts.path: got '/data/prompts.txt' with source=shapes"),
    ("prompts.source=file prompts.path=p.txt prompts.categories=[counting]",
     "prompts.categories: got ['counting'] with source=file"),
    ("prompts.source=file prompts.path=p.txt prompts.eval_split=held_out",
     "prompts.eval_split: got 'held_out' with source=file; the splits are the built-in shapes prompts'"),
    ("trainer=not_a_pkg.mod:Cfg", "trainer: cannot import 'not_a_pkg.mod:Cfg': No module named 'not_a_pkg'; check "
     "the 'module:Class' path, and put the folder that holds not_a_pkg on PYTHONPATH"),
    # DOIT named in compare only: found after the model loaded and the earlier rows sampled
    ("guidance.method=fk guidance.compare=[doob] guidance.num_candidates=7",
     "guidance.num_candidates: got 7; antithetic DOIT needs an even number"),
    # raised by the sampler after the model loaded, naming no key
    ("guidance.method=svdd guidance.noise_level=0", "guidance.noise_level: got 0.0 with ['svdd']; their candidates"),
    ("guidance.method=fk guidance.compare=[doob] sample.noise_level=0",
     "guidance.noise_level: got 0.0 (from sample.noise_level) with ['doob']"),
    ("guidance.fk_lambda=-2", "guidance.fk_lambda: got -2.0; must be >= 0"),
])
def test_values_that_ran_silently_wrong_or_crashed_later_are_config_errors(override, message, capsys):
    """Found by fuzzing every key: NaN passed every bound check (each comparison with NaN is False), and these
    values ran a run that learned nothing, optimised another objective, wrote into the current folder, or
    crashed with a traceback after the model loaded."""
    from diffalign import cli

    flow = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "flow_grpo.yaml")
    assert cli.main(["config", flow, *override.split(" ")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err


def test_doob_without_guidance_takes_one_candidate(capsys):
    """gamma = 0 draws no candidates: neither the count nor the antithetic parity applies (the review found the
    parity check refusing the default antithetic setting)."""
    from diffalign import cli

    flow = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "flow_grpo.yaml")
    assert cli.main(["config", flow, "guidance.method=doob", "guidance.gamma=0", "guidance.num_candidates=1"]) == 0
    capsys.readouterr()


def test_doob_needs_two_candidates(capsys):
    from diffalign import cli

    flow = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "flow_grpo.yaml")
    assert cli.main(["config", flow, "guidance.method=doob", "guidance.num_candidates=1",
                     "guidance.antithetic=false"]) == 2
    assert capsys.readouterr().err.startswith("error: guidance.num_candidates: got 1; DOIT weighs its candidates")


def test_nft_full_fine_tune_with_a_kl_weight_is_refused_before_the_model_loads(capsys):
    from diffalign import cli

    nft = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "nft.yaml")
    assert cli.main(["config", nft, "model.lora.enabled=false"]) == 2
    assert capsys.readouterr().err.startswith("error: train.kl_weight: got 0.0001 with model.lora.enabled=false")
    assert cli.main(["config", nft, "model.lora.enabled=false", "train.kl_weight=0"]) == 0


def test_nft_refuses_an_sde_window_it_would_ignore(capsys):
    from diffalign import cli

    nft = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "nft.yaml")
    assert cli.main(["config", nft, "sample.window=[0,3]"]) == 2
    assert capsys.readouterr().err.startswith("error: sample.window: got window=(0, 3), random_window=None; "
                                              "DiffusionNFT samples with the deterministic ODE")

