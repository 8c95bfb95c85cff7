"""diffalign.cli: subcommands, lazy dispatch, config printing, one-line errors, no heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from diffalign import cli
from diffalign import config as C

REPO = Path(__file__).resolve().parents[1]


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def run_yaml(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nsample:\n  num_steps: 8\nrewards:\n- name: shapes\n  weight: 1.0\n")
    return path


# --------------------------------------------------------------------------------------------------
# subprocess: python -m diffalign
# --------------------------------------------------------------------------------------------------


def test_module_config_prints_resolved_value(run_yaml, tmp_path):
    result = _python("-m", "diffalign", "config", str(run_yaml), "sample.num_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sample"]["num_steps"] == 5
    assert resolved["seed"] == 3 and resolved["rewards"][0]["name"] == "shapes"
    assert resolved["model"]["lora"]["rank"] == 32  # defaults filled in
    assert "  num_steps: 5\n" in result.stdout


def test_module_help_lists_subcommands(tmp_path):
    result = _python("-m", "diffalign", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("train", "sample", "eval", "export", "serve-reward", "config"):
        assert command in result.stdout


def test_module_config_error_is_one_line_exit_2(run_yaml, tmp_path):
    result = _python("-m", "diffalign", "config", str(run_yaml), "sample.num_stepz=5", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: sample.num_stepz: unknown key") and "num_steps" in lines[0]
    assert result.stdout == ""


def test_help_and_config_do_not_import_heavy_modules(run_yaml, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from diffalign.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        assert main(["config", {str(run_yaml)!r}, "sample.num_steps=5"]) == 0
        assert main(["config", "--help-keys"]) == 0
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    result = _python("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    # the built-in trainers are named without importing them (it printed "see trainers/" before)
    assert "add trainer=NAME to list a trainer's keys (trainers: grpo, nft)" in result.stdout


def test_builtin_trainer_paths_resolve_to_the_registered_classes():
    from trainers.grpo import GRPOConfig
    from trainers.nft import NFTConfig

    classes = {name: C._import_object(path, "trainer") for name, path in C.BUILTIN_TRAINERS.items()}
    assert classes == {"grpo": GRPOConfig, "nft": NFTConfig}
    assert C.trainer_config_class("grpo") is GRPOConfig and C.trainer_config_class("nft") is NFTConfig


# --------------------------------------------------------------------------------------------------
# in process: config command
# --------------------------------------------------------------------------------------------------


def test_config_command_in_process(run_yaml, tmp_path, capsys):
    out = tmp_path / "resolved" / "config.yaml"
    assert cli.main(["config", str(run_yaml), "sample.window=[0,2]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "window: [0, 2]" in printed
    assert out.read_text() == printed
    assert C.load_config(C.RunConfig, out).sample.window == (0, 2)


def test_config_without_file_takes_overrides(capsys):
    assert cli.main(["config", "seed=11", "model.dtype=bfloat16"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 11 and resolved["model"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["seed=abc"], "error: seed: expected int, got 'abc' (str)"),
        (["model.dtype=fp8"], "error: model.dtype: invalid choice 'fp8'"),
        (["rewards.0.name=r", "rewards.0.wieght=1"], "error: rewards.0.wieght: unknown key"),
        (["/no/such/file.yaml"], "error: config file not found"),
        (["seed=1", "seed"], "error: override 'seed' is not key=value"),
    ],
)
def test_config_errors_exit_2(args, expected, capsys):
    assert cli.main(["config", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1


@dataclass
class CliToyConfig:
    beta: float = C.param(0.5, help="toy beta")


def test_config_help_keys(monkeypatch, capsys):
    assert cli.main(["config", "--help-keys"]) == 0
    text = capsys.readouterr().out
    assert "sample.num_steps" in text and "model.lora.rank" in text and "train.*" in text
    monkeypatch.setitem(C.TRAINER_CONFIGS, "clitoy", CliToyConfig)
    assert cli.main(["config", "--help-keys", "trainer=clitoy"]) == 0
    text = capsys.readouterr().out
    assert "train section of trainer 'clitoy'" in text and "train.beta" in text and "toy beta" in text


# --------------------------------------------------------------------------------------------------
# in process: lazy dispatch
# --------------------------------------------------------------------------------------------------

PLUGIN = """
CALLS = []

def train_main(cfg):
    CALLS.append(cfg)
    return 3

def export_main(argv):
    CALLS.append(argv)

def user_error(cfg):
    from diffalign.checkpoint import CheckpointError
    raise CheckpointError("no usable checkpoint; train first")

def interrupted(cfg):
    raise KeyboardInterrupt("second interrupt: stopped at once")
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "da_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "da_test_broken.py").write_text("import da_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("da_test_plugin", None)
    yield
    sys.modules.pop("da_test_plugin", None)


def test_config_style_command_gets_validated_run_config(plugin, run_yaml, monkeypatch):
    monkeypatch.setitem(
        cli.COMMANDS, "train", cli.COMMANDS["train"]._replace(target="da_test_plugin:train_main")
    )
    assert cli.main(["train", str(run_yaml), "sample.num_steps=4"]) == 3
    import da_test_plugin

    (cfg,) = da_test_plugin.CALLS
    assert isinstance(cfg, C.RunConfig) and cfg.sample.num_steps == 4 and cfg.seed == 3


def test_exit_status_is_the_return_value_or_the_error_kind(plugin, run_yaml, monkeypatch, capsys):
    run = str(run_yaml)
    for name, target in (("train", "train_main"), ("sample", "train_main"), ("eval", "user_error")):
        monkeypatch.setitem(cli.COMMANDS, name, cli.COMMANDS[name]._replace(target=f"da_test_plugin:{target}"))
    assert cli.main(["train", run]) == 3  # the function's return value is the exit status
    assert cli.main(["sample", run, "--guidance=fk"]) == 3  # the --flag=value form
    import da_test_plugin

    assert da_test_plugin.CALLS[-1].guidance.method == "fk"
    assert cli.main(["eval", run]) == 1  # a UserError that is not a config error: status 1, one line
    assert capsys.readouterr().err == "error: no usable checkpoint; train first\n"
    assert cli.main(["train", run, "sample.num_steps=0"]) == 2  # config errors: status 2
    assert capsys.readouterr().err.startswith("error: sample.num_steps: got 0; must be >= 1")
    monkeypatch.setitem(cli.COMMANDS, "eval", cli.COMMANDS["eval"]._replace(target="da_test_plugin:interrupted"))
    assert cli.main(["eval", run]) == 130  # Ctrl-C: the shell's status for SIGINT, one line, no traceback
    assert capsys.readouterr().err == "\ninterrupted: second interrupt: stopped at once\n"


def test_sample_guidance_flag_sets_the_method(plugin, run_yaml, monkeypatch):
    monkeypatch.setitem(
        cli.COMMANDS, "sample", cli.COMMANDS["sample"]._replace(target="da_test_plugin:train_main")
    )
    assert cli.main(["sample", str(run_yaml), "--guidance", "doob", "guidance.num_candidates=4"]) == 3
    import da_test_plugin

    cfg = da_test_plugin.CALLS[0]
    assert cfg.guidance.method == "doob" and cfg.guidance.num_candidates == 4
    # also as --guidance=METHOD, after the overrides
    assert cli.main(["sample", str(run_yaml), "guidance.num_candidates=2", "--guidance=fk"]) == 3
    assert da_test_plugin.CALLS[-1].guidance.method == "fk" and da_test_plugin.CALLS[-1].guidance.num_candidates == 2
    with pytest.raises(SystemExit):
        cli.main(["sample", str(run_yaml), "--guidance", "dob"])


def test_config_style_command_with_bad_config_exits_2(plugin, run_yaml, monkeypatch, capsys):
    monkeypatch.setitem(
        cli.COMMANDS, "sample", cli.COMMANDS["sample"]._replace(target="da_test_plugin:train_main")
    )
    assert cli.main(["sample", str(run_yaml), "sample.step=euler"]) == 2
    assert capsys.readouterr().err.startswith("error: sample.step: invalid choice 'euler'")


def test_argv_style_command_gets_remaining_args(plugin, monkeypatch):
    monkeypatch.setitem(
        cli.COMMANDS, "export", cli.COMMANDS["export"]._replace(target="da_test_plugin:export_main")
    )
    assert cli.main(["export", "ckpt/", "--format", "peft", "--help"]) == 0
    assert cli.main(["export", "--help"]) == 0  # a leading option belongs to the command too
    assert cli.main(["export"]) == 0
    import da_test_plugin

    assert da_test_plugin.CALLS == [["ckpt/", "--format", "peft", "--help"], ["--help"], []]


@pytest.mark.parametrize(
    "target",
    ["da_missing_module_xyz:train_main", "diffalign.config:no_such_function", "diffalign.no_such_module:fn"],
)
def test_missing_target_is_not_implemented(target, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "eval", cli.COMMANDS["eval"]._replace(target=target))
    assert cli.main(["eval", "whatever.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "not implemented yet: eval"


def test_missing_dependency_inside_target_is_not_hidden(plugin, monkeypatch):
    monkeypatch.setitem(
        cli.COMMANDS,
        "serve-reward",
        cli.COMMANDS["serve-reward"]._replace(target="da_test_broken:serve_main"),
    )
    with pytest.raises(ModuleNotFoundError, match="da_no_such_dependency_xyz"):
        cli.main(["serve-reward"])


def test_serve_reward_points_at_remote_module():
    assert cli.COMMANDS["serve-reward"].target == "rewards.remote:serve_main"
    assert {name for name, c in cli.COMMANDS.items() if c.style == "config"} == {"train", "sample", "eval"}


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------------
# in process: a trainer plugged in from outside the trainers package
# --------------------------------------------------------------------------------------------------

FLOW = str(REPO / "configs" / "shapes" / "flow_grpo.yaml")
TINY_RUN = ["sample.batch_size=4", "sample.group_size=2", "sample.num_steps=2", "sample.eval_num_steps=2",
            "sample.window=null", "sample.random_window=null", "train.batch_size=4",
            "train.gradient_accumulation_steps=1", "train.num_epochs=1", "train.eval_every=0", "prompts.eval_size=2",
            "checkpoint.resume_from=null",
            "logging.image_every=0"]


def test_trainer_plugged_in_by_its_config_class_trains(tmp_path, monkeypatch, capsys):
    """``trainer: module:ConfigClass`` (the documented plug-in) runs ``diffalign train`` with the trainer its config
    names in ``trainer_class`` (it failed with 'unknown trainer'), and its own train keys are parsed."""
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    from plugins import trainer_plugins

    monkeypatch.setattr(trainer_plugins, "INSTANCES", [])
    out = tmp_path / "run"
    argv = ["train", FLOW, "trainer=plugins.trainer_plugins:MyGRPOConfig", "train.tag=mine", f"output_dir={out}",
            *TINY_RUN]
    assert cli.main(argv) == 0, capsys.readouterr().err
    (trainer,) = trainer_plugins.INSTANCES
    assert type(trainer).__name__ == "MyGRPOTrainer" and trainer.epoch == 1
    assert type(trainer.cfg) is trainer_plugins.MyGRPOConfig and trainer.cfg.tag == "mine"
    assert "final eval: eval/reward/shapes=" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["tag"] == "mine"


@pytest.mark.parametrize("config_class, expected", [
    ("NoTrainerConfig", "error: trainer: 'plugins.trainer_plugins:NoTrainerConfig' resolves to the config class "
     "plugins.trainer_plugins.NoTrainerConfig, which names no trainer; give it a class attribute trainer_class = "),
    ("BadTrainerConfig", "error: trainer: BadTrainerConfig.trainer_class: cannot import "
     "'plugins.trainer_plugins:MyGRPOTrainr'"),
])
def test_trainer_config_class_without_a_usable_trainer_is_one_line(config_class, expected, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.syspath_prepend(str(REPO / "tests"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the trainer was resolved")

    monkeypatch.setattr("trainers.common.build_adapter", no_model)
    argv = ["train", FLOW, f"trainer=plugins.trainer_plugins:{config_class}", f"output_dir={tmp_path}", *TINY_RUN]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_trainer_registered_in_an_unimported_module_names_the_path_form(capsys):
    assert cli.main(["config", FLOW, "trainer=mygrpo"]) == 2
    assert "so name it as my_module:MyConfig" in capsys.readouterr().err


def test_a_run_that_stops_before_evaluating_again_labels_its_last_evaluation(tmp_path, capsys):
    """train.stop_after_epochs ends a run without a final evaluation: the printed result is labelled with the
    epoch it was measured at (it was printed as the "final eval", though it was the untrained model's)."""
    out = tmp_path / "run"
    argv = ["train", FLOW, f"output_dir={out}", *TINY_RUN, "train.num_epochs=5", "train.eval_every=10",
            "train.stop_after_epochs=1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "last eval (epoch 0; the run stopped at epoch 1 without evaluating again): eval/reward/shapes=" \
        in captured.out
    assert "final eval" not in captured.out
    import re

    assert re.findall(r"(\d+)/5 \[", captured.err)[-1] == "1"  # the bar counts the epoch it stopped after (was 0)
