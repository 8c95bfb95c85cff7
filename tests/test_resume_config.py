"""A checkpoint is only loaded into the model it was trained as; a resumed run says which settings changed; run
settings that cannot work together (KL without LoRA, a sharding backend) are refused before any work.

``model.lora`` rank / target modules / enabled decide whether the weights load at all, and alpha what they
compute: a resume, ``diffalign eval`` or ``diffalign sample`` with other values stops with one error naming
both values and the fix (it used to be a torch size-mismatch traceback, or for alpha a silently different
score). Other changed keys (learning rate, group size, ...) are allowed on resume and listed in a warning.
"""

from __future__ import annotations

import dataclasses

import pytest
from grpo_helpers import run_config, save_tiny, train_run

from diffalign.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def trained(tmp_path):
    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 1})
    train_run(cfg)
    return cfg


def _with_lora(cfg, **lora):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora,
                                                                                                  **lora)))


@pytest.mark.parametrize("lora, shown", [({"rank": 2}, "model.lora.rank: checkpoint 4, config 2"),
                                         ({"alpha": 4.0}, "model.lora.alpha: checkpoint 8.0, config 4.0")])
def test_resume_and_eval_refuse_other_lora_settings(trained, lora, shown):
    from trainers.run import eval_main

    cfg = _with_lora(trained, **lora)
    resumed = dataclasses.replace(cfg, train={**cfg.train, "num_epochs": 2})
    with pytest.raises(CheckpointError, match=f"cannot resume from .*{shown}.*checkpoint.resume_from=null"):
        train_run(resumed)
    with pytest.raises(CheckpointError, match=f"cannot load .*{shown}"):
        eval_main(cfg)


def test_resume_lists_changed_settings_and_continues(trained):
    cfg = dataclasses.replace(trained, train={**trained.train, "num_epochs": 2, "learning_rate": 1e-3},
                              sample=dataclasses.replace(trained.sample, noise_level=0.5))
    with pytest.warns(UserWarning, match="differs from the checkpoint") as record:
        trainer = train_run(cfg)
    text = "\n".join(str(w.message) for w in record)
    assert "train.learning_rate: checkpoint 0.01 -> now 0.001" in text
    assert "sample.noise_level: checkpoint 0.7 -> now 0.5" in text
    assert "num_epochs" not in text  # a longer run is what resuming is for
    assert trainer.epoch == 2
    # ... and the changed AdamW settings are the ones used (the checkpoint's optimizer and schedule restored the
    # old rate and weight decay, so the run went on at 0.01 while the warning said 0.001)
    from diffalign.logging import read_metrics

    assert [r["train/lr"] for r in read_metrics(cfg.output_dir) if "epoch" in r] == [1e-2, 1e-3]


def test_resumed_adamw_settings_apply_and_unchanged_ones_resume_exactly(trained, tmp_path):
    import shutil

    import torch

    from diffalign.checkpoint import load_checkpoint, resolve_resume

    copy = tmp_path / "copy"
    shutil.copytree(trained.output_dir, copy)
    same = dataclasses.replace(trained, output_dir=str(copy), train={**trained.train, "num_epochs": 2})
    changed = dataclasses.replace(trained, train={**trained.train, "num_epochs": 2, "learning_rate": 1e-3,
                                                  "weight_decay": 0.05, "adam_beta2": 0.99, "adam_eps": 1e-6})
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        trainer = train_run(changed)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-3, 0.05, (0.9, 0.99), 1e-6)
    assert trainer.lr_scheduler.base_lrs == [1e-3]
    train_run(same)
    a = load_checkpoint(resolve_resume(copy, "latest"))
    assert a.optimizer_state["optimizer"]["param_groups"][0]["lr"] == trained.train["learning_rate"]
    b = load_checkpoint(resolve_resume(trained.output_dir, "latest"))
    assert any(not torch.equal(a.trainable_state[k], b.trainable_state[k]) for k in a.trainable_state)


def test_a_resume_with_other_rewards_restarts_marble_coefficients(tmp_path):
    """NFT saves MARBLE's coefficients in every checkpoint; a resume with another number of rewards stopped with a
    traceback (they restart uniform, with a warning)."""
    from test_nft_trainer import nft_config

    model = save_tiny(tmp_path)
    train_run(nft_config(model, tmp_path / "run", {"num_epochs": 1}, rewards=[{"name": "jpeg_compressibility"}]),
              _nft())
    two = [{"name": "jpeg_compressibility"}, {"name": "jpeg_incompressibility", "weight": 0.5}]
    with pytest.warns(UserWarning, match="MARBLE coefficients are for 1 rewards, this run has 2"):
        trainer = train_run(nft_config(model, tmp_path / "run", {"num_epochs": 2}, rewards=two), _nft())
    assert trainer.epoch == 2


def _nft():
    from trainers.nft import NFTTrainer

    return NFTTrainer


def test_cli_prints_checkpoint_errors_as_one_line(tmp_path, capsys):
    from diffalign import cli
    from diffalign.config import save_config

    cfg = run_config(save_tiny(tmp_path), tmp_path / "never_trained")
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert cli.main(["eval", str(path), "checkpoint.resume_from=latest"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint.resume_from='latest': no checkpoint in") and "Traceback" not in err
    assert "checkpoint.resume_from=null" in last


def test_settings_a_checkpoint_does_not_record_or_cannot_matter_are_not_reported():
    from types import SimpleNamespace

    from diffalign.checkpoint import check_model_config, config_changes
    from diffalign.config import LoraConfig

    # a key added to diffalign after the checkpoint was written is not a change
    old = SimpleNamespace(config={"train": {"learning_rate": 0.1}}, path="ckpt")
    assert config_changes(old, {"train": {"learning_rate": 0.1, "on_nonfinite": "skip"}}) == []
    assert config_changes(old, {"train": {"learning_rate": 0.2}}) == ["train.learning_rate: checkpoint 0.1 -> now 0.2"]
    # full fine-tuning on both sides: LoRA settings are unused; target modules are a set
    full = SimpleNamespace(config={"model": {"lora": {"enabled": False, "rank": 32}}}, path="ckpt")
    check_model_config(full, SimpleNamespace(lora=LoraConfig(enabled=False, rank=8)), "load")
    lora = SimpleNamespace(config={"model": {"lora": {"enabled": True, "rank": 4, "alpha": 8.0,
                                                      "target_modules": ["to_q", "to_k"]}}}, path="ckpt")
    check_model_config(lora, SimpleNamespace(lora=LoraConfig(rank=4, alpha=8.0, target_modules=["to_k", "to_q"])),
                       "load")
    with pytest.raises(CheckpointError, match="model.lora.target_modules"):
        check_model_config(lora, SimpleNamespace(lora=LoraConfig(rank=4, alpha=8.0, target_modules=["to_q"])), "load")


def test_kl_without_lora_is_refused_when_the_config_is_read(tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="train.beta: got 0.04 with model.lora.enabled=false"):
        run_config(str(tmp_path), tmp_path / "run", train={"beta": 0.04},
                   model={"path": str(tmp_path), "lora": {"enabled": False}})


def test_sharding_backends_are_refused_not_bypassed(monkeypatch):
    """The trainers average gradients themselves over full model copies; an accelerate FSDP / DeepSpeed setup
    would be silently bypassed, so make_accelerator refuses it."""
    import accelerate
    from accelerate.utils import DistributedType

    from trainers.run import make_accelerator

    class FakeAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type, self.num_processes = DistributedType.FSDP, 1

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    with pytest.raises(RuntimeError, match="configured for FSDP, which diffalign's trainers do not support yet"):
        make_accelerator("cpu")


def test_a_fresh_start_in_a_used_folder_replaces_its_metrics(tmp_path):
    """checkpoint.resume_from=null (or 'latest' with no checkpoint yet) in a folder with an earlier run's logs:
    the new run gets its own metrics log (not steps 0, 1, 2, 0, 1, 2 appended); the old one is moved aside, and
    so are the earlier run's checkpoints (pruning and `latest` then see the new run's only)."""
    from diffalign.logging import read_metrics

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 2, "eval_every": 1},
                     checkpoint={"every": 1, "keep_last": 3, "resume_from": None})
    train_run(cfg)
    first = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    with pytest.warns(UserWarning) as record:
        train_run(cfg)
    messages = " ".join(str(w.message) for w in record)
    assert "moved the metrics log to metrics." in messages and "this run starts afresh" in messages
    second = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert second == first and sorted(set(first)) == [0, 1, 2]
    (moved,) = (tmp_path / "run").glob("metrics.*.jsonl")  # the first run's log, kept
    assert [r["step"] for r in read_metrics(moved)] == first

    (aside,) = (tmp_path / "run" / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000001", "step-00000002"]


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Resuming from step 2 of a 6-epoch run: steps 3-6 are the replaced timeline. Kept in superseded-*/, out of
    keep_last's reach (by step number it would delete the live run's checkpoints first) and of `latest`."""
    from diffalign.checkpoint import latest_checkpoint, list_checkpoints

    out = tmp_path / "run"
    model = save_tiny(tmp_path)
    train_run(run_config(model, out, train={"num_epochs": 6}, checkpoint={"every": 1, "keep_last": None}))
    older = out / "checkpoints" / "step-00000002"
    with pytest.warns(UserWarning, match="this run resumes from .*step-00000002: .*belong to the run it replaces"):
        train_run(run_config(model, out, train={"num_epochs": 4},
                             checkpoint={"every": 1, "keep_last": 2, "resume_from": str(older)}))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(out).name == "step-00000004"
    (aside,) = (out / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == [f"step-0000000{i}" for i in range(3, 7)]


def test_a_resume_from_another_folder_sets_all_of_this_folders_checkpoints_aside(tmp_path):
    from diffalign.checkpoint import list_checkpoints

    model = save_tiny(tmp_path)
    train_run(run_config(model, tmp_path / "a", train={"num_epochs": 1}))
    train_run(run_config(model, tmp_path / "b", train={"num_epochs": 2}))  # an unrelated run in b
    with pytest.warns(UserWarning, match=r"checkpoints \['step-00000001', 'step-00000002'\] belong to the run"):
        train_run(run_config(model, tmp_path / "b", train={"num_epochs": 2},
                             checkpoint={"every": 1, "keep_last": 3,
                                         "resume_from": str(tmp_path / "a" / "checkpoints" / "step-00000001")}))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000002"]  # this run's only


def test_a_resume_with_fewer_samples_per_epoch_draws_fresh_sample_ids(tmp_path, monkeypatch):
    """Sample ids (they key every sample's initial, SDE and training noise) were epoch x samples per epoch, so a
    resume with fewer samples per epoch reused earlier epochs' ids and repeated their noise; they now run on."""
    import diffalign.distributed as dist_mod

    seen, orig = [], dist_mod.repeat_assignment

    def record(*args, **kwargs):
        out = orig(*args, **kwargs)
        seen.append(out.global_ids.tolist())
        return out

    monkeypatch.setattr(dist_mod, "repeat_assignment", record)
    model = save_tiny(tmp_path)
    train_run(run_config(model, tmp_path / "run", train={"num_epochs": 2}))  # 8 samples per epoch
    first = [i for ids in seen for i in ids]
    seen.clear()
    fewer = run_config(model, tmp_path / "run", train={"num_epochs": 4, "gradient_accumulation_steps": 1},
                       sample={"num_batches_per_epoch": 1})  # 4 samples per epoch
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        train_run(fewer)
    assert first == list(range(16)) and seen == [list(range(16, 20)), list(range(20, 24))]


def test_a_resume_with_fewer_prompts_per_epoch_continues_the_prompt_stream(tmp_path, monkeypatch):
    """The shapes prompts of an epoch were the sampler's stream from epoch x prompts per epoch, so a resume with
    fewer prompts per epoch trained on earlier epochs' prompts again; the position now runs on (saved with the
    loop state), as the sample ids do. With an unchanged setting the prompts are those of an uninterrupted run."""
    from diffalign.prompts import PromptSource

    seen, orig = [], PromptSource.epoch_prompts

    def record(self, epoch, n, position=None):
        out = orig(self, epoch, n, position)
        seen.append(out)
        return out

    monkeypatch.setattr(PromptSource, "epoch_prompts", record)
    model = save_tiny(tmp_path)
    train_run(run_config(model, tmp_path / "run", train={"num_epochs": 2}))  # 8 samples, 2 prompts per epoch
    stream = orig(PromptSource("shapes", 3, eval_size=4), 0, 8)  # run_config's seed: positions 0..7
    assert [p for ps in seen for p in ps] == stream[:4]
    seen.clear()
    fewer = run_config(model, tmp_path / "run", train={"num_epochs": 4, "gradient_accumulation_steps": 1},
                       sample={"num_batches_per_epoch": 1})  # 4 samples, 1 prompt per epoch
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        train_run(fewer)
    assert seen == [stream[4:5], stream[5:6]]  # before: positions 2 and 3, the second epoch's prompts again


def test_shared_group_noise_ids_run_on_after_a_resume_with_fewer_samples(tmp_path, monkeypatch):
    """With sample.shared_group_noise a group's initial noise is keyed by the epoch's first sample id plus the group
    (it was epoch x samples per epoch + group, which a resume with fewer samples per epoch repeated)."""
    import trainers.common as common

    seen, orig = [], common.sample_batch

    def record(*args, noise_ids=None, **kwargs):
        seen.extend(list(noise_ids) if noise_ids is not None else [])  # (evaluation samples have none)
        return orig(*args, noise_ids=noise_ids, **kwargs)

    monkeypatch.setattr(common, "sample_batch", record)
    model = save_tiny(tmp_path)
    shared = {"shared_group_noise": True}
    train_run(run_config(model, tmp_path / "run", train={"num_epochs": 2}, sample=shared))  # 2 groups of 4
    first = set(seen)
    seen.clear()
    fewer = run_config(model, tmp_path / "run", train={"num_epochs": 4, "gradient_accumulation_steps": 1},
                       sample={"num_batches_per_epoch": 1, **shared})  # 1 group of 4 per epoch
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        train_run(fewer)
    assert first == {0, 1, 8, 9} and set(seen) == {16, 20}  # the epochs' first sample ids, + group 0


def test_eval_of_a_checkpoint_on_another_model_is_one_line_or_warned(tmp_path, capsys):
    """A checkpoint loaded onto a model of another architecture stops with one line naming the checkpoint and the
    model (it was a traceback); onto a copy of the model at another path it loads, with a warning that the run
    trained another model.path (it loaded silently)."""
    import shutil

    from diffalign import cli
    from diffalign.config import save_config

    model = save_tiny(tmp_path)
    cfg = run_config(model, tmp_path / "run", train={"num_epochs": 1}, checkpoint={"every": 1})
    train_run(cfg)
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    other = save_tiny(tmp_path, kind="sd15")
    args = ["eval", str(path), "checkpoint.resume_from=latest", "prompts.eval_size=2", "sample.step=ddim"]
    assert cli.main([*args, f"model.path={other}"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and f"is model.path='{other}' the model the run trained" in last
    assert "Traceback" not in err
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    with pytest.warns(UserWarning, match=f"was trained on model.path='{model}' and is loaded onto "
                                         f"model.path='{copy}'"):
        assert cli.main(["eval", str(path), "checkpoint.resume_from=latest", "prompts.eval_size=2",
                         f"model.path={copy}"]) == 0
