"""Plausible user mistakes on the shipped configs stop with one line naming the key, the value and the fix
(exit status 2, no traceback), before any training starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffalign import cli

REPO = Path(__file__).resolve().parents[1]
FLOW = str(REPO / "configs" / "shapes" / "flow_grpo.yaml")
NFT = str(REPO / "configs" / "shapes" / "nft.yaml")


def _error(capsys, argv, status=2):
    """The one ``error:`` line of a command that must exit with ``status`` (2: a config error; 1: another user
    error) and no traceback."""
    with pytest.raises(SystemExit) as info:
        code = cli.main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err  # model loading may have drawn progress bars before the error
    assert info.value.code == status, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0] + "\n"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model (the checks under test must stop it before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr("trainers.common.build_adapter", refuse)


@pytest.fixture
def safe(tmp_path):
    """Overrides that keep a run short and out of the repo should a check ever let it start."""
    return [f"output_dir={tmp_path / 'run'}", "train.num_epochs=1", "checkpoint.resume_from=null",
            "prompts.eval_size=2"]


def test_group_size_that_does_not_divide_the_epoch(capsys, safe, no_model):
    err = _error(capsys, ["train", FLOW, "sample.group_size=5", *safe])
    assert err.startswith("error: sample.group_size: got 5, but processes x sample.batch_size x "
                          "sample.num_batches_per_epoch = 1 x 16 x 4 = 64 samples per epoch is not a multiple")


@pytest.mark.parametrize("config", [FLOW, NFT])
def test_a_busy_run_folder_and_a_misspelt_resume_stop_before_the_model_loads(capsys, safe, no_model, config):
    """Both were found after the model loaded: on a shared GPU a second run on a busy folder loaded a full
    model copy before it was refused. The lock is let go when setup fails."""
    from diffalign.checkpoint import lock_run_dir

    out = safe[0].split("=", 1)[1]
    err = _error(capsys, ["train", config, *safe[:-2], "checkpoint.resume_from=lates"], status=1)
    assert err.startswith("error: resume_from='lates': no such folder (") and "one of those names" not in err
    held = lock_run_dir(out)  # the failed setup let go of the folder: it can be taken
    try:
        err = _error(capsys, ["train", config, *safe], status=1)
    finally:
        held.close()
    assert "in use" in err or "lock" in err, err


@pytest.mark.parametrize("config", [FLOW, NFT])
def test_a_sampling_batch_that_does_not_split_into_training_minibatches(capsys, safe, no_model, monkeypatch,
                                                                        config):
    """Training stops before the model loads, with an error naming both sample keys and a train.batch_size that
    fits; ``diffalign eval`` / ``sample`` do not train and take the smaller sampling batch (they were refused by
    this training rule, with no fix in the message)."""
    import trainers.common as common

    small = ["sample.batch_size=2", "sample.num_batches_per_epoch=4", *safe]
    err = _error(capsys, ["train", config, *small])
    assert err.startswith("error: train.batch_size: 8 samples per process per epoch (sample.batch_size=2 x "
                          "sample.num_batches_per_epoch=4) are not a multiple of train.batch_size=16; use a divisor "
                          "of 8, e.g. train.batch_size=8"), err

    calls = []

    def reached(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt  # the model would load now: the config was accepted (the CLI exits 130)

    monkeypatch.setattr(common, "build_adapter", reached)
    for command in ("eval", "sample"):
        assert cli.main([command, config, *small]) == 130
    assert len(calls) == 2


@pytest.mark.parametrize("overrides, message", [
    (["guidance.method=best_of_n", "rewards.0.transform=rank"],
     "error: rewards.0.transform: got 'rank' on 'shapes', with guidance.method='best_of_n' and compare=[]; guided "
     "sampling scores candidates and particles of several prompts in one batch"),
    (["guidance.compare=[fk]", "rewards.0.transform=[clip,rank]"],
     "error: rewards.0.transform: got ['clip', 'rank'] on 'shapes', with guidance.method='none' and "
     "compare=['fk']"),
])
def test_guided_sampling_refuses_a_reward_ranked_within_its_batch(capsys, safe, no_model, overrides, message):
    """A rank within a batch of mixed prompts and candidates scores a batch of noise like one of clean images, so
    ``diffalign sample`` refuses it on a guiding reward before the model loads; training with the same config
    (which may rank a reward and keep guidance settings for later sampling) is not affected."""
    err = _error(capsys, ["sample", FLOW, *overrides, *safe])
    assert err.startswith(message), err
    assert cli.main(["config", FLOW, *overrides, *safe]) == 0
    capsys.readouterr()


def test_misspelt_builtin_model(capsys, safe):
    err = _error(capsys, ["train", FLOW, "model.path=builtin:shapes-flo", *safe])
    assert err.startswith("error: model.path: got 'builtin:shapes-flo': unknown built-in model; valid: "
                          "['builtin:shapes-ddpm', 'builtin:shapes-flow']")


@pytest.mark.parametrize("kind", ["folder", "empty", "missing"])
def test_bad_prompt_file(kind, tmp_path, capsys, safe):
    path = tmp_path / "prompts.txt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n  \n")
    err = _error(capsys, ["eval", FLOW, "prompts.source=file", f"prompts.path={path}", *safe])
    expected = {"folder": "is a folder", "empty": "has no prompts", "missing": "does not exist"}[kind]
    assert err.startswith(f"error: prompts.path: prompt file '{path}' {expected}")


def test_jsonl_metadata_given_as_prompt_file(tmp_path, capsys, safe):
    """Flow-GRPO's GenEval metadata .jsonl read as a plain-text prompt file would train on JSON lines as prompts."""
    path = tmp_path / "geneval.jsonl"
    path.write_text('{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of '
                    'a bench"}\n')
    err = _error(capsys, ["eval", FLOW, "prompts.source=file", f"prompts.path={path}", *safe])
    assert err.startswith(f"error: prompts.path: prompt file '{path}' starts with a JSON object ")
    assert "jq -r .prompt FILE.jsonl > prompts.txt" in err
    path.write_text("{curly} braces in a prompt\na red circle\n")  # not JSON: a prompt
    from diffalign.prompts import _read_lines

    assert _read_lines(str(path)) == ["{curly} braces in a prompt", "a red circle"]


def test_image_size_the_model_cannot_patch(capsys, safe):
    # the shapes flow model: VAE downsampling 2 x patch 2 = 4 (30 failed deep in the sampler's step math)
    err = _error(capsys, ["sample", FLOW, "sample.height=30", *safe])
    assert err.startswith("error: sample.height: got 30; this model needs a multiple of 4 (VAE downsampling x "
                          "patch size), e.g. 28, or null for the model's native size 32x32")


def test_flow_step_on_a_diffusion_model(capsys, safe):
    err = _error(capsys, ["train", FLOW, "model.path=builtin:shapes-ddpm", *safe])
    assert err.startswith("error: sample.step: got 'flow_sde', a flow-matching step, but 'builtin:shapes-ddpm' "
                          "is a 'vp' diffusion model; use sample.step=ddim")


def test_nft_on_a_diffusion_model(capsys, safe):
    err = _error(capsys, ["train", NFT, "model.path=builtin:shapes-ddpm", *safe])
    assert err.startswith("error: model.path: DiffusionNFT trains flow-matching models")


def test_run_without_a_reward(capsys, safe):
    err = _error(capsys, ["train", FLOW, "rewards=[]", *safe])
    assert err == "error: rewards: the run has no reward; add at least one, e.g. rewards: [{name: shapes}]\n"


def test_eval_reward_that_repeats_a_training_reward(capsys, safe):
    err = _error(capsys, ["train", FLOW, "eval_rewards=[{name: shapes}]", *safe])
    assert err.startswith("error: eval_rewards: columns ['shapes'] are already training rewards")


def test_pretrain_stage_without_its_vae(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_shapes", REPO / "scripts" / "pretrain_shapes.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    with pytest.raises(SystemExit, match=r"--stage flow needs the VAE of --stage vae, and .*_vae does not exist"):
        pretrain.main(["--stage", "flow", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written


def test_serve_reward_unknown_name():
    with pytest.raises(SystemExit, match="error: serve-reward NAME: .*shapez"):
        cli.main(["serve-reward", "shapez", "--port", "0"])


@pytest.mark.parametrize("command,config", [("train", FLOW), ("train", NFT), ("eval", FLOW), ("sample", FLOW)])
def test_reward_option_the_reward_does_not_take(capsys, safe, no_model, command, config):
    """An unknown reward option stops when the rewards are built (it failed on the first scored batch, after
    sampling, with a traceback), before the model is loaded (minutes for a real checkpoint); a UserError: exit
    status 1, one line."""
    err = _error(capsys, [command, config, "rewards=[{name: shapes, kwargs: {foo: 1}}]", *safe], status=1)
    assert err == ("error: reward 'shapes': unknown verifier option(s) ['foo']; valid: ['chroma_threshold', "
                   "'min_area_frac', 'relation_margin_frac'] (and batch_size, device)\n")
    assert not (Path(safe[0].split("=", 1)[1]) / "metrics.jsonl").exists()  # no epoch ran


def test_plain_function_reward_options_are_checked_when_built(monkeypatch):
    import torch

    from rewards.base import RewardBuildError, check_bound_kwargs
    from rewards.registry import REWARDS, build_reward, reward_factory

    with pytest.raises(RewardBuildError, match=r"unknown option \['sgn'\] \(did you mean 'sgn' -> 'sign'\?\); its "
                       r"options are \['sign'\]$"):
        build_reward({"name": "plugins.reward_plugins:red_minus_blue", "kwargs": {"sgn": -1}})
    # what the call accepts is accepted: *args before a keyword-only option, **kwargs (a review found *args refused)
    for fn, ok in ((lambda *args, sign=1.0: None, {"sign": -1}), (lambda images, *rest, sign=1: None, {"sign": 2}),
                   (lambda images, prompts, metadata, **kw: None, {"anything": 1})):
        check_bound_kwargs(fn, ok, "plugin")
    with pytest.raises(RewardBuildError, match=r"unknown option \['sgn'\]"):
        check_bound_kwargs(lambda *args, sign=1.0: None, {"sgn": 1}, "plugin")
    plugin = build_reward({"name": "plugins.reward_plugins:red_minus_blue", "kwargs": {"sign": -1}})
    assert plugin.kwargs == {"sign": -1}
    # a TypeError inside a reward's factory is a bug, not the user's config: it keeps its type and traceback
    monkeypatch.setitem(REWARDS, "buggy_factory", reward_factory(lambda **kwargs: torch.zeros("3")))
    with pytest.raises(TypeError, match="could not build reward 'buggy_factory'") as info:
        build_reward({"name": "buggy_factory"})
    assert not isinstance(info.value, RewardBuildError)
    soft = build_reward({"name": "shapes_soft", "kwargs": {"temperature": 0.5}})  # the shaped verifier's own option
    assert soft.verifier_kwargs == {"temperature": 0.5}
    with pytest.raises(RewardBuildError, match=r"unknown verifier option\(s\) \['temperature'\]"):
        build_reward({"name": "shapes", "kwargs": {"temperature": 0.5}})


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes need os.mkfifo")
def test_a_pipe_is_read_as_a_prompt_file(tmp_path):
    """Only folders and missing paths are refused: a pipe (``prompts.path=<(grep red prompts.txt)``) is a file."""
    import os
    import threading

    from diffalign.prompts import _read_lines

    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a red circle\n\na blue square\n"), daemon=True)
    writer.start()
    try:
        assert _read_lines(str(fifo)) == ["a red circle", "a blue square"]
    finally:
        if writer.is_alive():  # the read never opened the pipe: open it once so that the writer returns
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)


@pytest.mark.parametrize("name, expected", [
    ("plugins.reward_plugins:brightnes", "error: rewards.0.name: module 'plugins.reward_plugins' has no attribute "
     "'brightnes' (reward 'plugins.reward_plugins:brightnes'); did you mean plugins.reward_plugins:brightness? "),
    ("da_no_such_module:x", "error: rewards.0.name: cannot import module 'da_no_such_module' for reward "
     "'da_no_such_module:x': No module named 'da_no_such_module'; put the folder that holds da_no_such_module.py"),
    ("da_broken_plugin:fn", "error: rewards.0.name: importing module 'da_broken_plugin' for reward "
     "'da_broken_plugin:fn' failed inside the module: ModuleNotFoundError: No module named 'da_missing_dep'; "
     "install what it imports"),
])
@pytest.mark.parametrize("section", ["rewards", "eval_rewards"])
def test_plugin_reward_path_typo_stops_before_the_model(name, expected, section, capsys, safe, monkeypatch, tmp_path,
                                                         no_model):
    """A dotted reward path whose module or attribute does not exist is a one-line config error on its key before
    any model loads (it was a traceback after the model load); an import failing inside the user's module keeps
    its message."""
    (tmp_path / "da_broken_plugin.py").write_text("import da_missing_dep\n\ndef fn(images, prompts, metadata):\n"
                                                  "    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    monkeypatch.delitem(__import__("sys").modules, "da_broken_plugin", raising=False)

    spec = f"[{{name: '{name}'}}]" if section == "rewards" else f"[{{name: '{name}', label: judge}}]"
    err = _error(capsys, ["train", FLOW, f"{section}={spec}", *safe])
    assert err.startswith(expected.replace("rewards.0", f"{section}.0")), err


def test_a_logger_that_is_not_installed_stops_before_the_model(capsys, safe, monkeypatch, no_model):
    """logging.wandb=true without wandb was an ImportError traceback after the model loaded."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))

    err = _error(capsys, ["train", FLOW, "logging.wandb=true", *safe])
    assert err == ("error: logging.wandb: got true, but the wandb package is not installed; pip install wandb, or "
                   "set logging.wandb=false\n")


def test_two_reward_columns_of_one_name_stop_before_the_model(capsys, safe, no_model):
    err = _error(capsys, ["train", FLOW, "rewards=[{name: shapes}, {name: shapes}]", *safe])
    assert err == ("error: rewards: reward columns ['shapes'] appear more than once; give each a distinct 'label' "
                   "in its spec\n")


def test_a_lora_target_that_names_no_module(capsys, safe):
    """One misspelt target among valid ones was skipped silently by peft (fewer layers trained than asked), and a
    list of only misspelt ones was a long peft traceback."""
    err = _error(capsys, ["train", FLOW, "model.lora.target_modules=[attn.to_q,attn.to_kk]", *safe])
    assert err.startswith("error: model.lora.target_modules: ['attn.to_kk'] name no module of the "
                          "SD3Transformer2DModel; targets are module names or their ends, e.g. [")
    assert "'attn.to_k'" in err


def test_pretrain_snapshot_loads_like_the_final_model_and_equals_a_run_of_its_length(tmp_path):
    """A snapshot (``--snapshot-every``) records the call arguments the shipped folder does (``diffalign.json``:
    without it the flow model's prompts got 256 extra T5 positions, another model in effect), so it loads with
    them, and its weights (denoiser and both text encoders, EMA) equal the final model of a run of ``step + 1``
    steps, the length its ``diffalign_pretrain.json`` names."""
    import json
    import shutil

    from safetensors.torch import load_file

    from diffalign.generators import load_generator
    from diffalign.shapes.models import MODELS_DIR

    spec = importlib.util.spec_from_file_location("pretrain_shapes", REPO / "scripts" / "pretrain_shapes.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    shutil.copytree(MODELS_DIR / "shapes-flow" / "vae", tmp_path / "_vae")  # _vae itself is not in git
    pretrain.main(["--stage", "flow", "--out", str(tmp_path), "--flow-steps", "3", "--snapshot-every", "2",
                   "--batch-size", "2"])
    snap, final = tmp_path / ".shapes-flow.step2", tmp_path / "shapes-flow"
    for folder in (snap, final):
        assert load_generator(str(folder)).call_kwargs == {"max_sequence_length": 0}
    assert json.loads((snap / "diffalign_pretrain.json").read_text())["steps"] == 3
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                    "text_encoder_2/model.safetensors"):
        a, b = load_file(snap / weights), load_file(final / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


def test_sample_loads_the_model_on_the_device_eval_and_the_trainer_use(tmp_path, monkeypatch):
    """``model.device=auto`` resolves through the accelerator in ``diffalign sample`` as in ``eval`` and the
    trainer (CUDA when present), not to the CPU."""
    import trainers.common as common
    import trainers.run as run
    from grpo_helpers import run_config

    monkeypatch.setenv("WORLD_SIZE", "")
    sentinel, seen = object(), []

    def resolve(name, accelerator=None):
        seen.append((name, accelerator))
        raise KeyboardInterrupt  # stop before the model loads

    monkeypatch.setattr(run, "make_accelerator", lambda device, collective_timeout=None: sentinel)
    monkeypatch.setattr(common, "resolve_device", resolve)
    cfg = run_config(str(tmp_path / "no-such-model"), tmp_path / "run", checkpoint={"resume_from": None})
    with pytest.raises(KeyboardInterrupt):
        run.sample_main(cfg)
    assert seen == [("auto", sentinel)]


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_eval_and_sample_build_their_rewards_after_the_accelerator(tmp_path, monkeypatch, command):
    """The accelerator makes each rank's GPU the current device; reward models without a device of their own load
    on ``cuda``, the current one. Built before it (as they were), every rank's reward models went to cuda:0 and
    ranks >= 1 then scored images on their own GPU against weights on GPU 0. The trainer's order is the same."""
    import trainers.common as common
    import trainers.run as run
    from grpo_helpers import run_config

    calls = []

    def accelerator(device, collective_timeout=None):
        calls.append("accelerator")
        return object()

    def rewards(cfg):
        calls.append("rewards")
        raise KeyboardInterrupt  # stop before the model loads

    monkeypatch.setattr(run, "make_accelerator", accelerator)
    monkeypatch.setattr(common, "build_run_rewards", rewards)
    cfg = run_config(str(tmp_path / "no-such-model"), tmp_path / "run", checkpoint={"resume_from": None})
    with pytest.raises(KeyboardInterrupt):
        getattr(run, f"{command}_main")(cfg)
    assert calls == ["accelerator", "rewards"]


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_an_output_dir_that_is_a_file_stops_before_the_model(tmp_path, capsys, no_model, command):
    """Found before the model loads (eval found it when writing eval.json, after all the sampling)."""
    target = tmp_path / "p.txt"
    target.write_text("")
    err = _error(capsys, [command, FLOW, f"output_dir={target}", "checkpoint.resume_from=null"])
    assert err.startswith(f"error: output_dir: got '{target}', which is a file"), err


def test_config_options_may_follow_the_overrides(tmp_path, capsys):
    """``diffalign config CONFIG seed=3 --out PATH`` and ``--help-keys trainer=nft`` after an override work (they
    failed with "unrecognized arguments"); a folder as --out is one line naming the fix (it was a traceback)."""
    out = tmp_path / "resolved.yaml"
    assert cli.main(["config", FLOW, "seed=3", "--out", str(out)]) == 0
    assert "seed: 3" in out.read_text()
    capsys.readouterr()
    assert cli.main(["config", FLOW, "trainer=nft", "--help-keys"]) == 0
    assert "train section of trainer 'nft'" in capsys.readouterr().out
    assert cli.main(["config", FLOW, f"--out={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out '{tmp_path}' is a folder")
    assert cli.main(["config", FLOW, f"--out={tmp_path / 'new'}/"]) == 2  # a folder that does not exist yet
    assert capsys.readouterr().err.startswith(f"error: --out '{tmp_path / 'new'}/' is a folder")
    # the training-only batch rule: diffalign config warns (train refuses, eval and sample accept)
    assert cli.main(["config", FLOW, "sample.batch_size=2", "sample.num_batches_per_epoch=4"]) == 0
    assert "warning: diffalign train would stop with: train.batch_size: 8 samples" in capsys.readouterr().err


@pytest.mark.parametrize("spec,key,message", [
    # every transform swallows extra keywords: a misspelt option was ignored and the run trained untransformed
    ({"name": "shapes", "transform": {"name": "affine", "scal": 2}}, "rewards.0.transform",
     "transform 'affine': unknown option ['scal'] (did you mean 'scal' -> 'scale'?); its options are ['scale', "
     "'shift']"),
    ({"name": "shapes", "transform": ["rank", {"name": "clip", "mn": 0}]}, "rewards.0.transform",
     "transform 'clip': unknown option ['mn'] (did you mean 'mn' -> 'min'?); its options are ['min', 'max']"),
    # built-in and class rewards raised a TypeError with a traceback when the run built them, after the model loaded
    ({"name": "plugins.reward_plugins:Redness", "kwargs": {"scal": 2}}, "rewards.0.kwargs",
     "reward 'plugins.reward_plugins:Redness': unknown option ['scal'] (did you mean 'scal' -> 'scale'?); its "
     "options are ['scale']"),
    ({"name": "plugins.reward_plugins:red_minus_blue", "kwargs": {"sgn": -1}}, "rewards.0.kwargs",
     "reward 'plugins.reward_plugins:red_minus_blue': unknown option ['sgn'] (did you mean 'sgn' -> 'sign'?); its "
     "options are ['sign']"),
])
def test_misspelt_reward_and_transform_options_stop_before_the_model_loads(spec, key, message):
    from diffalign.config import ConfigError, RunConfig, from_dict
    from rewards.registry import check_reward_config

    with pytest.raises(ConfigError) as info:
        check_reward_config(from_dict(RunConfig, {"rewards": [spec]}))
    assert info.value.key == key and str(info.value).startswith(f"{key}: {message}"), str(info.value)


def test_correct_options_pass_the_check_and_a_class_plugin_column_is_named_after_its_class():
    from diffalign.config import RunConfig, from_dict
    from rewards.registry import build_reward, check_reward_config

    check_reward_config(from_dict(RunConfig, {"rewards": [
        {"name": "shapes", "kwargs": {"min_area_frac": 0.01}, "transform": [{"name": "affine", "scale": 2}, "rank"]},
        {"name": "jpeg_compressibility", "kwargs": {"quality": 50}},
        {"name": "plugins.reward_plugins:Redness", "kwargs": {"scale": 2}},
        {"name": "plugins.reward_plugins:red_minus_blue", "kwargs": {"sign": -1}}]}))
    assert build_reward({"name": "plugins.reward_plugins:Redness"}).name == "Redness"  # was "reward"
    assert build_reward({"name": "plugins.reward_plugins:Redness", "label": "red"}).name == "red"


def test_options_a_built_in_factory_passes_on_and_missing_weights_are_one_line_errors(tmp_path):
    """Built-in factories pass their options on (``**kwargs``), so a misspelt one is found when the reward is built
    (before the model loads): it raised a TypeError, and missing weights a FileNotFoundError, both printed with
    a traceback, which the CLI keeps for bugs."""
    from diffalign.config import UserError
    from rewards.registry import build_reward

    with pytest.raises(UserError, match=r"^reward 'jpeg_compressibility': unknown option 'qualty' in its kwargs"):
        build_reward({"name": "jpeg_compressibility", "kwargs": {"qualty": 50}})
    missing = tmp_path / "PickScore_v1"
    with pytest.raises(UserError, match=rf"^reward 'pickscore': .*{missing.name}' is not a folder"):
        build_reward({"name": "pickscore", "kwargs": {"weights": str(missing), "backend": "transformers"}})
