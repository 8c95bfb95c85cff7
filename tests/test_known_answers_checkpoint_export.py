"""Known answers for checkpoints, export, the distributed helpers, the launch checks and MARBLE's QP solvers.

Each test pins a behaviour that a realistic one-line slip would change while the broader tests still passed (found
by a mutation-testing pass): retention of incomplete folders, atomic and fsynced writes, per-rank RNG files, the
exact contents of ``state.json``, the ``latest`` fallbacks, export's key checks and float32 merge, the slicing and
gradient averaging of :mod:`diffalign.distributed`, and one-iteration values of the QP solvers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings

import pytest
import torch

import diffalign.checkpoint as ckpt_mod
from diffalign.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_model_config,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_training_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _state():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, 2.0])}


def _save(manager, step, **kw):
    kw.setdefault("config", {"model": {"path": "x"}})
    return manager.save(step, trainable_state=_state(), **kw)


def _names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ----------------------------------------------------------------------------------------------------
# checkpoint: retention, atomicity, durability
# ----------------------------------------------------------------------------------------------------


def test_retention_counts_and_deletes_incomplete_step_folders(tmp_path):
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)  # an incomplete folder (no state.json)
    manager = CheckpointManager(tmp_path, keep_last=2)
    _save(manager, 2)
    assert _names(tmp_path) == ["latest", "step-00000001", "step-00000002"]  # 2 folders: none pruned yet
    _save(manager, 3)
    assert _names(tmp_path) == ["latest", "step-00000002", "step-00000003"]


def test_a_crash_while_writing_latest_leaves_the_old_pointer_whole(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=None)
    _save(manager, 1)
    original = ckpt_mod._write_text

    def torn_write(path, text):
        if "latest" in path.name:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text[:6])  # killed halfway through the write
            raise OSError("killed while writing latest")
        return original(path, text)

    monkeypatch.setattr(ckpt_mod, "_write_text", torn_write)
    with pytest.raises(OSError, match="killed"):
        _save(manager, 2)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000001\n"
    assert _names(tmp_path) == ["latest", "step-00000001"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names fsynced descriptors through /proc")
def test_every_file_and_both_folders_are_fsynced_before_and_after_publishing(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path / "checkpoints"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = _save(CheckpointManager(tmp_path), 1, ema_state=_state(), optimizer=opt, lr_scheduler=sched,
                 grad_scaler=torch.amp.GradScaler("cpu"))
    tmp = ".tmp-step-00000001"
    files = sorted(p.name for p in path.iterdir())
    assert len(files) == 8
    # every file of the checkpoint, inside the hidden folder, then the folder itself, before it is renamed ...
    assert sorted(s for s in synced[:-4] if s.startswith(tmp + "/")) == sorted(f"{tmp}/{f}" for f in files)
    assert synced[-4] == tmp
    # ... then the rename, `latest` (written to a temporary name and renamed) and that rename are made durable
    assert synced[-3] == "." and synced[-2].startswith(".tmp-latest.") and synced[-1] == "."


def test_only_rank_zero_prunes_and_each_rank_file_holds_that_ranks_generators(tmp_path, monkeypatch):
    pruned_by = []
    original_prune = CheckpointManager._prune

    def recording_prune(self, keep):
        pruned_by.append(self.rank)
        return original_prune(self, keep)

    monkeypatch.setattr(CheckpointManager, "_prune", recording_prune)
    barrier = threading.Barrier(3, timeout=30)
    gens = {r: torch.Generator().manual_seed(100 + r) for r in range(3)}
    errors = []

    def worker(rank):
        try:
            manager = CheckpointManager(tmp_path, keep_last=1, rank=rank, world_size=3, barrier=barrier.wait)
            _save(manager, 4, generators={"sampler": gens[rank]})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert pruned_by == [0]
    path = tmp_path / "checkpoints" / "step-00000004"
    for rank in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the saved world size is 3: resuming on 3 processes does not warn
            state = load_checkpoint(path, rank=rank, world_size=3)
        assert state.world_size == 3 and state.rank == rank
        assert torch.equal(state.rng_state["generators"]["sampler"], gens[rank].get_state())


def test_state_json_lists_exactly_the_saved_keys_and_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = _save(CheckpointManager(tmp_path), 7, ema_state=_state(), optimizer=opt, counters={"step": 7},
                 sampler_state={"position": 3}, extra={"a": 1})
    meta = json.loads((path / "state.json").read_text())
    assert sorted(meta) == ["counters", "extra", "files", "format_version", "sampler_state", "step", "time",
                            "world_size"]
    assert (meta["format_version"], meta["step"], meta["world_size"]) == (1, 7, 1)
    assert meta["files"] == ["trainable.safetensors", "config.yaml", "ema.safetensors", "optimizer.pt",
                             "rng-rank0.pt"]
    assert (meta["counters"], meta["sampler_state"], meta["extra"]) == ({"step": 7}, {"position": 3}, {"a": 1})


def test_the_grad_scalers_state_is_restored(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    path = _save(CheckpointManager(tmp_path), 1, grad_scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2000)
    restore_training_state(load_checkpoint(path), grad_scaler=fresh)
    assert fresh.get_scale() == 64.0 and fresh.get_growth_interval() == 7


def test_a_generator_the_checkpoint_lacks_keeps_its_state_and_an_empty_state_is_refused(tmp_path):
    from diffalign.checkpoint import restore_rng

    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="trainable_state is empty"):
        manager.save(1, trainable_state={}, config={})
    assert manager.latest() is None
    path = _save(manager, 1, generators={"sampler": torch.Generator().manual_seed(1)})
    gen = torch.Generator().manual_seed(2)
    before = gen.get_state()
    with pytest.warns(UserWarning, match=r"no state for generator 'noise' \(saved: \['sampler'\]\)"):
        assert restore_rng(load_checkpoint(path), generators={"noise": gen}) is True
    assert torch.equal(gen.get_state(), before)


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        _save(manager, step)
    # `latest` names an incomplete folder (a file is missing): not trusted
    (tmp_path / "checkpoints" / "step-00000003" / "ema.safetensors").unlink(missing_ok=True)
    (tmp_path / "checkpoints" / "step-00000003" / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"
    # `latest` names a folder that is gone: the newest complete one, not the oldest
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_latest_one_behind_after_a_kill_between_publish_and_pointer(tmp_path):
    """A kill after step 3's folder is renamed into place but before ``latest`` is rewritten: the resume takes the
    complete step 3 (it used step 2, then set step 3 aside as another run's, and kept it on disk for good)."""
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        _save(manager, step)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step-00000002\n")  # as step 2's save left it ...
    state3 = tmp_path / "checkpoints" / "step-00000003" / "state.json"
    os.utime(pointer, (state3.stat().st_mtime - 5,) * 2)  # ... before step 3 was written
    with pytest.warns(UserWarning, match="names 'step-00000002', but the complete step-00000003 was written after"):
        assert latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.warns(UserWarning, match="was written after it"):
        assert resolve_resume(tmp_path, "latest").name == "step-00000003"
    # pointed back on purpose (a save of a lower step after step 3): the pointer wins
    os.utime(pointer, (state3.stat().st_mtime + 5,) * 2)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_a_full_disk_is_one_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    """``diffalign train`` on a full disk ended in three chained tracebacks; it is now one user error (the CLI
    prints it as one line) naming the checkpoint, the reason, the intact previous one and the fix."""
    import errno

    manager = CheckpointManager(tmp_path, keep_last=None)
    _save(manager, 1)
    original = ckpt_mod._save_safetensors

    def full_disk(tensors, path, metadata):
        original(tensors, path, metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_save_safetensors", full_disk)
    with pytest.raises(ckpt_mod.CheckpointWriteError) as info:
        _save(manager, 2)
    assert str(info.value) == (
        f"could not write checkpoint step-00000002 in {tmp_path / 'checkpoints'}: No space left on device; nothing "
        "was published and step-00000001 is intact: free disk space (or fix the folder's permissions), then run "
        "the same command to resume from it")
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)
    assert _names(tmp_path) == ["latest", "step-00000001"] and latest_checkpoint(tmp_path).name == "step-00000001"


def test_an_incomplete_old_copy_is_removed_not_restored(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=None)
    _save(manager, 1)
    old = tmp_path / "checkpoints" / ".old-step-00000002"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"files": ["trainable.safetensors"]}))  # its weights are gone
    _save(manager, 3)
    assert _names(tmp_path) == ["latest", "step-00000001", "step-00000003"]


def test_resaving_a_step_leaves_no_old_copy(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=None)
    _save(manager, 1)
    _save(manager, 2)
    _save(manager, 2)  # e.g. right after resuming from step 2
    assert _names(tmp_path) == ["latest", "step-00000001", "step-00000002"]


def test_tied_views_and_transposed_tensors_round_trip(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"row": base[1], "same": base[1], "t": base.T, "whole": base}  # shared storage, views, non-contiguous
    path = CheckpointManager(tmp_path).save(1, trainable_state=state, config={})
    loaded = load_checkpoint(path).trainable_state
    assert sorted(loaded) == ["row", "same", "t", "whole"]
    for k, v in state.items():
        assert torch.equal(loaded[k], v) and loaded[k].shape == v.shape


def test_a_failed_save_after_setting_aside_points_latest_at_the_newest_kept(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3, 4):
        _save(manager, step)
    live = CheckpointManager(tmp_path, keep_last=None)
    assert live.set_aside_after(2) == ["step-00000003", "step-00000004"]

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "_save_safetensors", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _save(live, 3)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002\n"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def test_a_full_finetune_checkpoint_is_not_loaded_into_a_lora_model():
    from types import SimpleNamespace

    from diffalign.config import LoraConfig

    full = SimpleNamespace(config={"model": {"lora": {"enabled": False, "rank": 4}}}, path="ckpt")
    with pytest.raises(CheckpointError, match="model.lora.enabled: checkpoint False, config True"):
        check_model_config(full, SimpleNamespace(lora=LoraConfig(enabled=True, rank=4)), "load")
    check_model_config(full, SimpleNamespace(lora=LoraConfig(enabled=False, rank=8)), "load")  # both full: fine


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------


def test_lora_keys_of_named_parameters_lose_the_adapter_name():
    from diffalign.export import _normalize_lora_keys

    a, b = torch.zeros(1), torch.ones(1)
    out = _normalize_lora_keys({"blk.to_q.lora_A.default.weight": a, "blk.to_q.lora_B.weight": b})
    assert list(out) == ["blk.to_q.lora_A.weight", "blk.to_q.lora_B.weight"]
    assert out["blk.to_q.lora_A.weight"] is a and out["blk.to_q.lora_B.weight"] is b


def test_lora_weights_with_a_full_finetune_config_are_refused_before_loading(tmp_path):
    from diffalign.export import export_checkpoint

    path = CheckpointManager(tmp_path).save(
        1, trainable_state={"blk.to_q.lora_A.weight": torch.zeros(2, 2)},
        config={"model": {"path": str(tmp_path / "no-such-model"), "lora": {"enabled": False}}})
    with pytest.raises(CheckpointError, match="holds LoRA weights but its config says model.lora.enabled=False"):
        export_checkpoint(path, tmp_path / "out")


def test_a_checkpoint_folder_as_run_dir_exports_to_the_runs_export_folder(tmp_path, monkeypatch):
    import diffalign.export as export_mod

    manager = CheckpointManager(tmp_path / "run")
    first = _save(manager, 1)
    _save(manager, 2)
    calls = []
    monkeypatch.setattr(export_mod, "export_checkpoint", lambda ckpt, out, **kw: calls.append((ckpt, out, kw)))
    assert export_mod.export_main([str(first)]) == 0
    assert calls == [(first, tmp_path / "run" / "export" / "step-00000001",
                      {"weights": None, "merged": False, "dtype": None, "device": "cpu"})]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from diffalign.testing.tiny import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny_base")
    tiny_sd3_pipeline(seed=0).save_pretrained(folder)
    return folder


def _lora_run(run_dir, base, drop_key=False, dtype="float32"):
    from diffalign.generators import load_generator

    gen = load_generator(str(base))
    gen.add_lora(rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(5)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in gen.lora_state_dict().items()}
    if drop_key:
        state.pop(sorted(state)[0])
    config = {"model": {"path": str(base), "dtype": dtype,
                        "lora": {"enabled": True, "rank": 4, "alpha": 8.0, "target_modules": None}}}
    return CheckpointManager(run_dir).save(1, trainable_state=state, config=config), gen


def test_the_merge_adds_scale_times_b_a_in_float32_to_the_base_as_trained_then_casts(tmp_path, tiny_base):
    """merged = (W + alpha / rank * B @ A) computed in float32 from the base as trained (in the run's dtype), then
    cast: a bfloat16 merge would round B @ A and the sum in bfloat16, and a base loaded in the export dtype would
    round W before the sum (bf16(bf16(W) + s B A) differed from bf16(W + s B A) in 2464 of 15360 elements)."""
    from safetensors.torch import load_file

    from diffalign.export import export_checkpoint

    path, _ = _lora_run(tmp_path / "run", tiny_base)
    base = load_file(str(tiny_base / "transformer" / "diffusion_pytorch_model.safetensors"))

    def lora_delta(ckpt):
        lora = load_checkpoint(ckpt).trainable_state
        delta = {k.replace(".lora_A.weight", ".weight"): (lora[k.replace("lora_A", "lora_B")] @ lora[k]) * (8.0 / 4)
                 for k in lora if ".lora_A." in k}
        assert len(delta) > 0 and set(delta) <= set(base)
        return delta

    bf16_run, _ = _lora_run(tmp_path / "run_bf16", tiny_base, dtype="bfloat16")
    # (run dtype, export dtype): the base enters the sum in the run's dtype, the sum is cast to the export's
    for run_dtype, dtype, ckpt in ((torch.float32, torch.float32, path), (torch.float32, torch.bfloat16, path),
                                   (torch.bfloat16, torch.float32, bf16_run)):
        name = f"{run_dtype}-{dtype}".replace("torch.", "")
        export_name = str(dtype).replace("torch.", "")
        written = export_checkpoint(ckpt, tmp_path / name, merged=True, dtype=export_name)
        merged = load_file(str(written["merged"] / "transformer" / "diffusion_pytorch_model.safetensors"))
        info = json.loads((tmp_path / name / "export.json").read_text())
        assert (info["weights"], info["merged_dtype"]) == ("trained", export_name)
        assert merged.keys() == base.keys()
        delta = lora_delta(ckpt)
        for k, w in base.items():
            as_trained = w.to(run_dtype).float()  # the whole denoiser is the one the run trained against
            expected = (as_trained + delta[k] if k in delta else as_trained).to(dtype)
            assert merged[k].dtype == dtype and torch.equal(merged[k], expected), (name, k)
        # the other components as diffusers loads them in the export dtype
        vae = load_file(str(written["merged"] / "vae" / "diffusion_pytorch_model.safetensors"))
        assert {t.dtype for t in vae.values()} == {dtype}


def test_a_lora_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_base):
    from diffalign.export import export_checkpoint

    path, _ = _lora_run(tmp_path / "run", tiny_base, drop_key=True)
    with pytest.raises(CheckpointError, match="do not match the adapter built from its config.yaml"):
        export_checkpoint(path, tmp_path / "out")


def test_a_full_finetune_checkpoint_missing_a_parameter_is_refused(tmp_path, tiny_base):
    from diffalign.export import export_checkpoint
    from diffalign.generators import load_generator

    state = dict(load_generator(str(tiny_base)).denoiser.state_dict())
    state.pop("proj_out.weight")
    path = CheckpointManager(tmp_path).save(1, trainable_state=state, config={
        "model": {"path": str(tiny_base), "dtype": "float32", "lora": {"enabled": False}}})
    with pytest.raises(CheckpointError, match=r"missing \['proj_out.weight'\]"):
        export_checkpoint(path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------------


def test_seed_for_known_values_and_the_epoch_shuffle_uses_the_salted_seed():
    import numpy as np

    from diffalign.distributed import repeat_assignment, seed_for

    # numpy's SeedSequence is stable across versions: these seeds, and so every run's draws, are too
    assert seed_for(0, 0, 17) == 3248099814054355155
    assert seed_for(5, 1, 17) == 202551494225547166
    assert seed_for(1, 2) != seed_for(2, 1)  # order matters
    order = np.random.default_rng(202551494225547166).permutation(6)
    a = repeat_assignment(list("abc"), 2, epoch=1, seed=5, rank=1, world_size=2)
    expected = [[0, 0, 1, 1, 2, 2][i] for i in order]  # sample j of the epoch is the order[j]-th repeated prompt
    assert a.global_groups.tolist() == expected
    assert a.global_prompts == ["abc"[g] for g in expected]
    assert (a.start, a.end, a.sample_ids) == (3, 6, [9, 10, 11])
    assert a.groups.tolist() == expected[3:] and a.prompts == ["abc"[g] for g in expected[3:]]
    a0 = repeat_assignment(list("abc"), 2, epoch=1, seed=5, rank=0, world_size=2)
    assert (a0.start, a0.end, a0.sample_ids) == (0, 3, [6, 7, 8])
    assert a0.groups.tolist() == expected[:3] and a0.prompts == ["abc"[g] for g in expected[:3]]


def test_dist_context_from_accelerator_uses_the_global_rank():
    from types import SimpleNamespace

    from diffalign.distributed import DistContext

    acc = SimpleNamespace(process_index=3, local_process_index=1, num_processes=4,
                          gather=lambda t: t, wait_for_everyone=lambda: None)
    ctx = DistContext.from_accelerator(acc)
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (3, 4, False)
    assert DistContext.from_accelerator(None) == DistContext()


def test_all_reduce_gradients_averages_in_parameter_order_with_zeros_for_missing_grads(monkeypatch):
    import torch.distributed as dist

    from diffalign.distributed import all_reduce_gradients

    p = torch.nn.Parameter(torch.zeros(2, 2))
    q = torch.nn.Parameter(torch.zeros(3))
    r = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r.grad = torch.tensor([5.0], dtype=torch.float64)
    seen = []

    def fake_all_reduce(flat, op=None):  # the other rank's flat gradient (its q has a gradient)
        seen.append(flat.clone())
        flat += torch.tensor([10.0, 20.0, 30.0, 40.0, 1.0, 1.0, 1.0, 7.0])

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    all_reduce_gradients([p, q, r], world_size=1)  # one process: nothing, not even a collective
    assert seen == [] and q.grad is None and torch.equal(p.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    all_reduce_gradients([p, q, r], world_size=2)
    assert torch.equal(seen[0], torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0]))
    assert torch.equal(p.grad, torch.tensor([[5.5, 11.0], [16.5, 22.0]]))
    assert torch.equal(q.grad, torch.tensor([0.5, 0.5, 0.5]))
    assert r.grad.dtype == torch.float64 and torch.equal(r.grad, torch.tensor([6.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# trainers.run: the launch checks
# ----------------------------------------------------------------------------------------------------


def _fake_accelerate(monkeypatch, kind="MULTI_GPU", num_processes=1, process_index=0):
    import accelerate
    from accelerate.utils import DistributedType

    made = []

    class FakeAccelerator:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.distributed_type, self.num_processes = getattr(DistributedType, kind), num_processes
            self.process_index = process_index
            self.is_main_process = process_index == 0

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    return made


@pytest.mark.parametrize("cuda, device, cpu", [(True, "cpu", True), (True, "auto", False), (True, "cuda", False),
                                               (False, "auto", True), (False, "cuda", True)])
def test_make_accelerator_runs_on_cpu_when_asked_or_without_cuda(monkeypatch, cuda, device, cpu):
    from trainers.run import make_accelerator

    made = _fake_accelerate(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    make_accelerator(device)
    assert made == [{"cpu": cpu, "mixed_precision": "no"}]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"])
def test_every_sharding_backend_is_refused(monkeypatch, kind):
    from trainers.run import LaunchError, make_accelerator

    _fake_accelerate(monkeypatch, kind)
    with pytest.raises(LaunchError, match=f"configured for {kind}"):
        make_accelerator("cpu")


@pytest.mark.parametrize("world_size, num_processes", [("2", 1), (None, 2), ("3", 2)])
def test_a_process_group_of_another_size_than_world_size_is_refused(monkeypatch, world_size, num_processes):
    from trainers.run import LaunchError, make_accelerator

    _fake_accelerate(monkeypatch, num_processes=num_processes)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(LaunchError, match=f"WORLD_SIZE={world_size or 1} but accelerate formed a group of "
                                          f"{num_processes}"):
        make_accelerator("cpu")
    monkeypatch.setenv("WORLD_SIZE", str(num_processes))
    make_accelerator("cpu")  # the sizes agree


@pytest.mark.parametrize("world_size", ["", " "])
def test_an_empty_world_size_counts_as_one_process(monkeypatch, world_size):
    from trainers.run import LaunchError, make_accelerator

    _fake_accelerate(monkeypatch, num_processes=1)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    make_accelerator("cpu")  # before: int("") raised a ValueError
    _fake_accelerate(monkeypatch, num_processes=2)
    with pytest.raises(LaunchError, match="WORLD_SIZE=1 but accelerate formed a group of 2"):
        make_accelerator("cpu")


def test_a_device_index_is_refused_on_several_processes(monkeypatch):
    """``model.device=cuda:0`` on 2 processes would put both on one GPU (the first collective then fails with an
    NCCL duplicate-GPU error); one process may pin its device."""
    from trainers.run import LaunchError, make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    _fake_accelerate(monkeypatch, num_processes=2)
    with pytest.raises(LaunchError, match="model.device=cuda:1 puts every one of the 2 processes on the same "
                                          "device; with several processes use model.device=auto"):
        make_accelerator("cuda:1")
    for device in ("auto", "cuda", "cpu"):
        make_accelerator(device)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _fake_accelerate(monkeypatch, num_processes=1)
    make_accelerator("cuda:1")


def test_a_process_other_than_the_main_one_is_quiet_and_names_its_rank_in_warnings(monkeypatch):
    """On rank 1 of 2, diffusers' and transformers' progress bars are off (before, every rank drew the
    pipeline-loading bars) and each warning starts with ``[rank 1/2]``; their logged warnings stay on (a reward
    failing, or a prompt truncated, on this rank's samples must still be seen); making the accelerator twice in
    one process does not prefix twice. The main process changes nothing."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    from trainers.run import make_accelerator

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = warnings.formatwarning("w", UserWarning, "f.py", 1, "")
    try:
        _fake_accelerate(monkeypatch, num_processes=2, process_index=0)
        make_accelerator("cpu")
        assert warnings.formatwarning("w", UserWarning, "f.py", 1, "") == before
        assert [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)] == saved
        _fake_accelerate(monkeypatch, num_processes=2, process_index=1)
        make_accelerator("cpu")
        make_accelerator("cpu")
        assert warnings.formatwarning("w", UserWarning, "f.py", 1, "") == "[rank 1/2] " + before
        assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
        assert [lib.get_verbosity() for lib in (dlog, tlog)] == [verbosity for _, verbosity, _ in saved]
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def test_train_main_cleans_up_after_a_failed_training(tmp_path, monkeypatch):
    import types

    from grpo_helpers import run_config

    import trainers.run as run

    events = []

    class Failing:
        def __init__(self, cfg, accelerator):
            events.append("init")

        def setup(self):
            events.append("setup")

        def train(self):
            raise RuntimeError("out of memory")

        def cleanup(self):
            events.append("cleanup")

    module = types.ModuleType("fake_trainer_module")
    module.Failing = Failing
    monkeypatch.setitem(sys.modules, "fake_trainer_module", module)
    monkeypatch.setitem(run.TRAINERS, "grpo", "fake_trainer_module:Failing")
    monkeypatch.setattr(run, "make_accelerator", lambda device: types.SimpleNamespace(is_main_process=True))
    with pytest.raises(RuntimeError, match="out of memory"):
        run.train_main(run_config(str(tmp_path), tmp_path / "run"))
    assert events == ["init", "setup", "cleanup"]


def test_eval_loads_the_ema_weights_and_refuses_a_missing_checkpoint(tmp_path, tiny_base):
    import dataclasses

    from grpo_helpers import run_config

    from trainers.run import _load_eval_adapter

    cfg = run_config(str(tiny_base), tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        _load_eval_adapter(cfg, "latest")
    path, gen = _lora_run(tmp_path / "run", tiny_base)
    trained = load_checkpoint(path).trainable_state
    ema = {k: v + 1.0 for k, v in trained.items()}
    config = {"model": dataclasses.asdict(cfg.model)}
    CheckpointManager(tmp_path / "run").save(2, trainable_state=trained, ema_state=ema, config=config)
    adapter = _load_eval_adapter(cfg, "latest")
    got = adapter.lora_state_dict()
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)


def test_load_hint_names_every_non_float32_dtype_and_the_absent_required_components(tmp_path):
    from diffalign.export import load_hint
    from diffalign.generators import _dtype_keyword

    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "image_encoder": [None, None]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    kw = _dtype_keyword()
    other = " (torch_dtype= before diffusers 0.36)" if kw == "dtype" else " (dtype= from diffusers 0.36)"
    head = f"DiffusionPipeline.from_pretrained({str(tmp_path)!r}, text_encoder_3=None, tokenizer_3=None"
    assert load_hint(tmp_path, torch.float32) == head + ")"  # image_encoder is optional: not named
    for dtype in ("float16", "bfloat16"):
        assert load_hint(tmp_path, getattr(torch, dtype)) == f"{head}, {kw}=torch.{dtype}){other}"
    assert load_hint(tmp_path / "missing", torch.float16) == ""


# ----------------------------------------------------------------------------------------------------
# balance: QP solvers and normalisation helpers
# ----------------------------------------------------------------------------------------------------


def _f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_k2_closed_form_interior_solution():
    from diffalign.balance import min_norm_closed_form, min_norm_coefficients

    # g1 = (2, 0), g2 = (-1, 1): a = (g22 - g12) / (g11 + g22 - 2 g12) = 4 / 10
    gram = _f64([[4.0, -2.0], [-2.0, 2.0]])
    torch.testing.assert_close(min_norm_closed_form(gram), _f64([0.4, 0.6]), rtol=0, atol=1e-15)
    # orthogonal vectors of norms 1 and 2: weights proportional to 1 / norm^2
    torch.testing.assert_close(min_norm_coefficients(_f64([[1.0, 0.0], [0.0, 4.0]])), _f64([0.8, 0.2]),
                               rtol=0, atol=1e-15)


def test_enumerate_known_answers_interior_and_on_a_face():
    from diffalign.balance import min_norm_coefficients, min_norm_enumerate

    # orthogonal vectors of norms 1, 2, 2: w proportional to (1, 1/4, 1/4), the full support
    diag = torch.diag(_f64([1.0, 4.0, 4.0]))
    torch.testing.assert_close(min_norm_enumerate(diag), _f64([2 / 3, 1 / 6, 1 / 6]), rtol=0, atol=1e-12)
    torch.testing.assert_close(min_norm_coefficients(diag), _f64([2 / 3, 1 / 6, 1 / 6]), rtol=0, atol=1e-12)
    # e0, e1 and (2, 2): the third is dominated, the optimum is the midpoint of the first two
    g = _f64([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(min_norm_enumerate(g @ g.T), _f64([0.5, 0.5, 0.0]), rtol=0, atol=1e-12)
    # two almost opposite vectors (1, 0) and (-1, 0.1): the K = 2 formula, a = (1.01 + 1) / (1 + 1.01 + 2)
    g = _f64([[1.0, 0.0], [-1.0, 0.1]])
    torch.testing.assert_close(min_norm_enumerate(g @ g.T), _f64([2.01 / 4.01, 2.0 / 4.01]), rtol=0, atol=1e-12)


def test_frank_wolfe_and_projected_gradient_first_iterates():
    from diffalign.balance import min_norm_frank_wolfe, min_norm_projected_gradient

    gram = torch.diag(_f64([1.0, 4.0]))
    # FW from (1/2, 1/2) towards vertex 0 with the exact line search: gamma = gap / denom = 0.75 / 1.25
    torch.testing.assert_close(min_norm_frank_wolfe(gram, max_iter=1), _f64([0.8, 0.2]), rtol=0, atol=1e-15)
    # one projected-gradient step of size 1 / (2 lambda_max) = 1/8: proj((0.375, 0)) = (0.6875, 0.3125)
    torch.testing.assert_close(min_norm_projected_gradient(gram, max_iter=1), _f64([0.6875, 0.3125]),
                               rtol=0, atol=1e-15)
    # second step from y1 = w1 (the first momentum weight (t0 - 1) / t1 is 0): proj((0.515625, 0))
    w1, w2 = _f64([0.6875, 0.3125]), _f64([0.7578125, 0.2421875])
    torch.testing.assert_close(min_norm_projected_gradient(gram, max_iter=2), w2, rtol=0, atol=1e-15)
    # third step from the FISTA point y2 = w2 + (t1 - 1) / t2 (w2 - w1), t0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2
    t1 = (1 + 5 ** 0.5) / 2
    t2 = (1 + (1 + 4 * t1 * t1) ** 0.5) / 2
    y2 = w2 + (t1 - 1) / t2 * (w2 - w1)
    v = _f64([0.75 * float(y2[0]), 0.0])  # y2 - (1/8) * 2 * diag(1, 4) y2
    torch.testing.assert_close(min_norm_projected_gradient(gram, max_iter=3), v - (v.sum() - 1) / 2, rtol=0,
                               atol=1e-15)


def test_cosines_gram_and_rescaling_known_answers():
    from diffalign.balance import RewardGradients, direction_cosines, gram_matrix, harmonize, pairwise_cosines

    grads = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(direction_cosines(grads, torch.tensor([3.0, 4.0])), _f64([0.6, 0.8, 0.0]))
    torch.testing.assert_close(pairwise_cosines(_f64([[4.0, 2.0], [2.0, 9.0]])), _f64([[1.0, 1 / 3], [1 / 3, 1.0]]))
    long = torch.arange(14.0).reshape(2, 7)
    assert torch.equal(gram_matrix(long, chunk=3), (long @ long.T).double())
    # (3, 0) and (0, 2): unit gradients e0, e1 -> d* = (1/2, 1/2), times the mean norm 2.5
    res = harmonize(grads[:2])
    torch.testing.assert_close(res.direction, torch.tensor([1.25, 1.25]))
    torch.testing.assert_close(harmonize(grads[:2], rescale=False).direction, torch.tensor([0.5, 0.5]))
    # a single reward: alpha = 1, the direction is the gradient itself
    one = harmonize(torch.tensor([[0.0, 5.0]]))
    torch.testing.assert_close(one.alpha, _f64([1.0]))
    torch.testing.assert_close(one.direction, torch.tensor([0.0, 5.0]))
    rg = RewardGradients([torch.nn.Parameter(torch.zeros(2))], 1)
    rg.buffer[0] = torch.tensor([8.0, -4.0])
    rg.all_reduce(1, loss_scale=4.0)  # one process, float16 loss scale 4: only the scale comes off
    assert torch.equal(rg.buffer[0], torch.tensor([2.0, -1.0]))


def test_solvers_use_the_symmetric_part_of_a_gram_with_round_off():
    from diffalign.balance import min_norm_closed_form, min_norm_enumerate

    # [[1, 0.2], [0, 4]] is solved as [[1, 0.1], [0.1, 4]]: a = (4 - 0.1) / (1 + 4 - 0.2) = 0.8125
    gram = _f64([[1.0, 0.2], [0.0, 4.0]])
    torch.testing.assert_close(min_norm_closed_form(gram), _f64([0.8125, 0.1875]), rtol=0, atol=1e-15)
    torch.testing.assert_close(min_norm_enumerate(gram), _f64([0.8125, 0.1875]), rtol=0, atol=1e-12)


def test_batched_frank_wolfe_runs_until_every_problem_has_converged():
    from diffalign.balance import min_norm_frank_wolfe

    # the first problem is solved at the start (uniform weights); the second needs many steps: 1/norm^2 weights
    grams = torch.stack([torch.eye(3, dtype=torch.float64), torch.diag(_f64([1.0, 4.0, 9.0]))])
    expected = _f64([[1 / 3, 1 / 3, 1 / 3], [36 / 49, 9 / 49, 4 / 49]])
    torch.testing.assert_close(min_norm_frank_wolfe(grams), expected, rtol=0, atol=1e-9)


def test_ema_coefficients_start_from_a_copy_and_refuse_rho_one():
    from diffalign.balance import ema_coefficients

    current = _f64([0.25, 0.75])
    start = ema_coefficients(None, current, 0.5)
    current[0] = 9.0  # the caller reuses its buffer: the average must not follow it
    assert torch.equal(start, _f64([0.25, 0.75]))
    torch.testing.assert_close(ema_coefficients(start, _f64([1.0, 0.0]), 0.5), _f64([0.625, 0.375]))
    for rho in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"rho must be in \[0, 1\)"):
            ema_coefficients(start, current, rho)


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks")
def test_a_run_folder_is_locked_by_one_run_at_a_time(tmp_path):
    """Two runs in one output_dir deleted each other's temporary checkpoints and set each other's checkpoints
    aside; the second is refused, naming the holder, until the first lets go (also on a kill: the OS drops it)."""
    import os
    import socket

    first = ckpt_mod.lock_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / ckpt_mod.LOCK_FILE).read_text().startswith(
        f"pid {os.getpid()} on {socket.gethostname()} since ")
    with pytest.raises(ckpt_mod.RunDirInUseError,
                       match=rf"run is in use by another training run \(pid {os.getpid()} on .* since .*: an earlier "
                             r"trainer in this process, whose cleanup\(\) was not called\); wait for"):
        ckpt_mod.lock_run_dir(tmp_path / "run")
    first.close()
    ckpt_mod.lock_run_dir(tmp_path / "run").close()


def test_a_trainer_holds_the_lock_from_setup_to_cleanup(tmp_path):
    from grpo_helpers import run_config, save_tiny

    from trainers.grpo import GRPOTrainer

    cfg = run_config(save_tiny(tmp_path), tmp_path / "run", train={"num_epochs": 1})
    first, second = GRPOTrainer(cfg), GRPOTrainer(cfg)
    first.setup()
    with pytest.raises(ckpt_mod.RunDirInUseError, match="is in use by another training run"):
        second.setup()
    first.train()
    first.cleanup()
    second.setup()  # free again
    second.cleanup()
    # a resume that fails in setup (a checkpoint of other LoRA settings) lets go of the folder
    other = run_config(cfg.model.path, tmp_path / "run", train={"num_epochs": 2},
                       model={"path": cfg.model.path, "lora": {"enabled": True, "rank": 2, "alpha": 8.0}})
    with pytest.raises(ckpt_mod.CheckpointError, match="rank") as failed:  # its traceback holds the frames alive
        GRPOTrainer(other).setup()
    third = GRPOTrainer(cfg)
    third.setup()
    third.cleanup()
    assert failed.traceback  # (kept alive up to here: the lock was let go explicitly, not by garbage collection)
