"""Checkpoints: every component round-trips (resume equality of RNG draws and of the next optimizer step),
a save that fails midway leaves the last good checkpoint and ``latest`` untouched, ranks never hang,
retention, resume resolution, and export of a LoRA / full fine-tune to formats diffusers loads."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import torch

import diffalign.checkpoint as ckpt_mod
from diffalign.checkpoint import (
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    restore_training_state,
)
from diffalign.export import export_main

PROMPTS = ["a red circle left of a blue square", "two green triangles"]
SEQ_LEN = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# a tiny training state
# ----------------------------------------------------------------------------------------------------


def _make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


_X = torch.linspace(-1, 1, 24).reshape(6, 4)
_Y = torch.linspace(0, 1, 12).reshape(6, 2)


def _train_step(model, opt, sched):
    opt.zero_grad()
    (model(_X) - _Y).square().mean().backward()
    opt.step()
    sched.step()


def _draws(gen):
    # numpy's randn and python's gauss come from a cached second Gaussian first (one was drawn before the save)
    return (torch.rand(3), np.concatenate([np.random.randn(2), np.random.rand(3)]),
            [random.gauss(0.0, 1.0)] + [random.random() for _ in range(3)], torch.rand(3, generator=gen))


def _save(manager, step, model, opt, sched, scaler=None, gen=None, **kw):
    return manager.save(
        step, trainable_state=model.state_dict(), ema_state={k: 0.5 * v for k, v in model.state_dict().items()},
        optimizer=opt, lr_scheduler=sched, grad_scaler=scaler, counters={"step": step, "epoch": step // 2},
        sampler_state={"position": 17, "order": [3, 1, 2]}, config={"seed": 0, "model": {"path": "x"}},
        extra={"note": "hi"}, generators={"sampler": gen} if gen is not None else None, **kw,
    )


def test_round_trip_every_component(tmp_path):
    model, opt, sched, scaler = _make()
    for _ in range(2):
        _train_step(model, opt, sched)
    gen = torch.Generator().manual_seed(7)
    torch.rand(5, generator=gen)
    np.random.randn(1), random.gauss(0.0, 1.0)  # each leaves its second Gaussian cached: part of the state
    manager = CheckpointManager(tmp_path, keep_last=3)
    path = _save(manager, 2, model, opt, sched, scaler, gen)

    expected = _draws(gen)
    _train_step(model, opt, sched)  # the uninterrupted run continues
    expected_params = [p.detach().clone() for p in model.parameters()]

    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["trainable.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng-rank0.pt",
         "state.json", "config.yaml"])
    meta = json.loads((path / "state.json").read_text())
    assert meta["world_size"] == 1 and meta["counters"] == {"step": 2, "epoch": 1}

    # A fresh process: other seeds, other RNG positions, untrained objects.
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    model2, opt2, sched2, scaler2 = _make(seed=99)
    gen2 = torch.Generator().manual_seed(0)
    state = load_checkpoint(path)
    assert state.step == 2 and state.counters == {"step": 2, "epoch": 1}
    assert state.sampler_state == {"position": 17, "order": [3, 1, 2]}
    assert state.extra == {"note": "hi"} and state.config == {"seed": 0, "model": {"path": "x"}}
    assert all(torch.equal(state.ema_state[k], 0.5 * v) for k, v in state.trainable_state.items())
    model2.load_state_dict(state.trainable_state)
    restore_training_state(state, opt2, sched2, scaler2)
    assert restore_rng(state, generators={"sampler": gen2})
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.81)
    assert scaler2.get_scale() == scaler.get_scale() == 1024.0

    got = _draws(gen2)
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    _train_step(model2, opt2, sched2)
    for a, b in zip(model2.parameters(), expected_params):
        assert torch.equal(a, b)  # resume equality: the step after resume is the uninterrupted one


def test_rng_files_load_with_weights_only(tmp_path):
    model, opt, sched, _ = _make()
    path = _save(CheckpointManager(tmp_path), 1, model, opt, sched)
    for name in ("rng-rank0.pt", "optimizer.pt", "scheduler.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything needs unpickling


@pytest.mark.parametrize("failing", ["trainable.safetensors", "scheduler.pt", "rng-rank0.pt", "config.yaml",
                                     "state.json", "latest"])
def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, failing):
    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path, keep_last=1)
    good = _save(manager, 1, model, opt, sched)
    good_bytes = {p.name: p.read_bytes() for p in good.iterdir()}

    def fail_on(original):
        def wrapper(*args):
            target = next(a for a in args if isinstance(a, ckpt_mod.Path))
            if target.name == failing or target.name.startswith(f".tmp-{failing}"):
                raise OSError(f"disk full while writing {target.name}")
            return original(*args)
        return wrapper

    for fn in ("_save_torch", "_save_safetensors", "_write_text"):
        monkeypatch.setattr(ckpt_mod, fn, fail_on(getattr(ckpt_mod, fn)))
    _train_step(model, opt, sched)
    for step in (2, 1):  # a new step, and re-saving the existing one
        with pytest.raises(OSError, match="disk full"):
            _save(manager, step, model, opt, sched)
        ckpts = tmp_path / "checkpoints"
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
        assert (ckpts / "latest").read_text().strip() == "step-00000001"
        assert {p.name: p.read_bytes() for p in good.iterdir()} == good_bytes
        assert resolve_resume(tmp_path, "latest") == good
        assert load_checkpoint(good).step == 1
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()


def test_retention_never_deletes_latest(tmp_path):
    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(manager, step, model, opt, sched)
    assert [p.name for p in manager.checkpoints()] == ["step-00000003", "step-00000004"]

    # Resumed from an older checkpoint while a newer one of the abandoned run exists.
    manager1 = CheckpointManager(tmp_path, keep_last=1)
    path = _save(manager1, 3, model, opt, sched)
    assert manager1.latest() == path
    assert [p.name for p in manager1.checkpoints()] == ["step-00000003", "step-00000004"]
    keep_all = CheckpointManager(tmp_path, keep_last=None)
    for step in (5, 6, 7, 8):
        _save(keep_all, step, model, opt, sched)
    assert len(keep_all.checkpoints()) == 6


def test_set_aside_moves_the_replaced_timeline_at_the_first_save(tmp_path):
    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3, 4):
        _save(manager, step, model, opt, sched)
    (tmp_path / "checkpoints" / ".old-step-00000004").mkdir()  # leftover of an interrupted same-step save
    live = CheckpointManager(tmp_path, keep_last=2)  # a new run resuming from step 2
    assert live.set_aside_after(2) == [".old-step-00000004", "step-00000003", "step-00000004"]
    # nothing moves before the new run's first save: a run failing before it leaves the folder as it was
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000004"
    assert resolve_resume(tmp_path, "latest").name == "step-00000004"
    _save(live, 3, model, opt, sched)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert resolve_resume(tmp_path, "latest").name == "step-00000003"
    (aside,) = (tmp_path / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == [".old-step-00000004", "step-00000003", "step-00000004"]
    _save(live, 4, model, opt, sched)  # once only: later saves move nothing
    assert len(list((tmp_path / "checkpoints").glob("superseded-*"))) == 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "latest") is None  # fresh start
    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path)
    first = _save(manager, 10, model, opt, sched)
    second = _save(manager, 20, model, opt, sched)
    assert resolve_resume(tmp_path, "latest") == second
    assert resolve_resume(tmp_path, str(first)) == first
    assert resolve_resume(tmp_path, "step-00000010") == first
    # the run's pointer file given as a path (export --checkpoint RUN/checkpoints/latest) is followed, from anywhere
    # (it was diagnosed as an interrupted save)
    assert resolve_resume("/elsewhere", str(tmp_path / "checkpoints" / "latest"), key="--checkpoint") == second
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="run folder"):
        resolve_resume(tmp_path, str(tmp_path))
    (first / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint: missing \['optimizer.pt'\]"):
        resolve_resume(tmp_path, str(first))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(first)
    # `latest` naming a vanished folder: fall back to the newest complete one, with a warning.
    (tmp_path / "checkpoints" / "latest").write_text("step-00000030\n")
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert resolve_resume(tmp_path, "latest") == second


def test_world_size_change_warns(tmp_path):
    model, opt, sched, _ = _make()
    path = _save(CheckpointManager(tmp_path), 1, model, opt, sched)
    with pytest.warns(UserWarning) as record:
        state = load_checkpoint(path, rank=1, world_size=2)
    text = " ".join(str(w.message) for w in record)
    assert "saved by 1 process(es), resuming with 2" in text and "no RNG state for rank 1" in text
    assert state.rng_state is None
    with pytest.warns(UserWarning, match="RNG not restored"):
        assert restore_rng(state) is False


def _run_ranks(tmp_path, world_size, step, model, opt, sched):
    barrier = threading.Barrier(world_size, timeout=30)  # a hang fails the test instead of blocking it
    results = {}

    def worker(rank):
        manager = CheckpointManager(tmp_path, rank=rank, world_size=world_size, barrier=barrier.wait)
        try:
            results[rank] = _save(manager, step, model, opt, sched)
        except Exception as exc:  # noqa: BLE001
            results[rank] = exc

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_every_rank_saves_and_no_rank_hangs_on_failure(tmp_path, monkeypatch):
    model, opt, sched, _ = _make()
    results = _run_ranks(tmp_path, 3, 5, model, opt, sched)
    path = tmp_path / "checkpoints" / "step-00000005"
    assert all(results[r] == path for r in range(3))
    assert {f"rng-rank{r}.pt" for r in range(3)} <= {p.name for p in path.iterdir()}
    assert load_checkpoint(path, rank=2, world_size=3).rng_state is not None
    with pytest.raises(ValueError, match="needs a barrier"):
        CheckpointManager(tmp_path, rank=0, world_size=2)

    original = ckpt_mod._save_torch

    def fail_rank2(obj, target):
        if target.name == "rng-rank2.pt":
            raise OSError("rank 2 lost its disk")
        return original(obj, target)

    monkeypatch.setattr(ckpt_mod, "_save_torch", fail_rank2)
    results = _run_ranks(tmp_path, 3, 6, model, opt, sched)
    assert isinstance(results[2], OSError)
    assert isinstance(results[0], CheckpointError) and "rng-rank2.pt" in str(results[0])
    assert isinstance(results[1], CheckpointError)
    assert not (tmp_path / "checkpoints" / "step-00000006").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000005"


@pytest.mark.parametrize("step", [3, 4])  # 4: the replaced timeline's copy of that step is where `latest` points
def test_failed_set_aside_raises_on_every_rank_without_a_hang(tmp_path, monkeypatch, step):
    """Rank 0's move of a replaced timeline's checkpoints fails (a full disk): it raised out of save() past its
    barriers, and the other ranks waited at the next one for ever. Now nothing is written, rank 0 raises the
    CheckpointWriteError that says what to do, the other ranks a CheckpointError, and `latest` is untouched. Also
    when the save is of the step `latest` names: the other ranks took the old copy of that step for this save's."""
    model, opt, sched, _ = _make()
    for step in (2, 4):
        _save(CheckpointManager(tmp_path), step, model, opt, sched)
    real_mkdir = ckpt_mod.Path.mkdir

    def full_disk(self, *args, **kwargs):
        if self.name.startswith("superseded-"):
            raise OSError(28, "No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.Path, "mkdir", full_disk)
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def worker(rank):
        manager = CheckpointManager(tmp_path, rank=rank, world_size=2, barrier=barrier.wait)
        manager.set_aside_after(2)  # resumed from step 2: step 4 belongs to a replaced timeline
        try:
            results[rank] = _save(manager, step, model, opt, sched)
        except Exception as exc:  # noqa: BLE001
            results[rank] = exc

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert isinstance(results[0], ckpt_mod.CheckpointWriteError) and "No space left" in str(results[0])
    assert isinstance(results[1], CheckpointError) and "not published by rank 0" in str(results[1])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny SD3 pipeline (with T5, so plain ``DiffusionPipeline.from_pretrained`` loads it) on disk."""
    from diffalign.testing.tiny import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("base")
    tiny_sd3_pipeline(with_t5=True).save_pretrained(folder)
    return folder


def _inputs(gen):
    cond = gen.encode_prompts(PROMPTS, max_sequence_length=SEQ_LEN)
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = gen.make_schedule(4, 32, 32).timesteps[1].expand(2)
    return cond, x, t


def _perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _run_with_checkpoint(tmp_path, base_model, lora: bool):
    from diffalign.generators import load_generator

    gen = load_generator(str(base_model))
    config = {"model": {"path": str(base_model), "dtype": "float32",
                        "lora": {"enabled": lora, "rank": 4, "alpha": 8.0, "target_modules": None}}}
    if lora:
        gen.add_lora(rank=4, alpha=8.0)
        state = gen.lora_state_dict()
    else:
        state = {k: v.clone() for k, v in gen.denoiser.state_dict().items()}
    trained, ema = _perturbed(state, 1), _perturbed(state, 2)
    opt = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-4)
    CheckpointManager(tmp_path / "run").save(3, trainable_state=trained, ema_state=ema, optimizer=opt,
                                             counters={"step": 3}, sampler_state={}, config=config)
    return gen, trained, ema


def _predict(gen, cond, x, t):
    with torch.no_grad():
        return gen.predict(x, t, cond)


def test_export_lora_to_diffusers_lora_and_merged_pipeline(tmp_path, base_model, capsys):
    from diffusers import DiffusionPipeline

    from diffalign.generators import adapter_for_pipeline

    gen, trained, ema = _run_with_checkpoint(tmp_path, base_model, lora=True)
    cond, x, t = _inputs(gen)
    base = _predict(gen, cond, x, t)
    gen.load_lora_state_dict(ema)  # the default export is the EMA weights
    expected = _predict(gen, cond, x, t)
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters

    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--merged"]) == 0
    assert "[export]" in capsys.readouterr().out
    assert json.loads((out / "export.json").read_text())["weights"] == "ema"

    pipe = DiffusionPipeline.from_pretrained(str(base_model))
    pipe.load_lora_weights(str(out / "lora"))
    assert torch.allclose(_predict(adapter_for_pipeline(pipe), cond, x, t), expected, atol=1e-5)

    merged = adapter_for_pipeline(DiffusionPipeline.from_pretrained(str(out / "merged")))
    assert not merged.has_lora and not any("lora" in n for n, _ in merged.denoiser.named_parameters())
    assert torch.allclose(_predict(merged, cond, x, t), expected, atol=1e-5)

    # --weights trained, default output folder
    assert export_main([str(tmp_path / "run"), "--weights", "trained"]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(base_model))
    pipe.load_lora_weights(str(tmp_path / "run" / "export" / "step-00000003" / "lora"))
    gen.load_lora_state_dict(trained)
    assert torch.allclose(_predict(adapter_for_pipeline(pipe), cond, x, t), _predict(gen, cond, x, t), atol=1e-5)
    assert not (tmp_path / "run" / "export" / "step-00000003" / "merged").exists()


def test_export_full_finetune_writes_merged(tmp_path, base_model):
    from diffusers import DiffusionPipeline

    from diffalign.generators import adapter_for_pipeline

    gen, trained, _ = _run_with_checkpoint(tmp_path, base_model, lora=False)
    gen.denoiser.load_state_dict(trained)
    cond, x, t = _inputs(gen)
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--weights", "trained"]) == 0
    assert not (out / "lora").exists()
    merged = adapter_for_pipeline(DiffusionPipeline.from_pretrained(str(out / "merged")))
    assert torch.allclose(_predict(merged, cond, x, t), _predict(gen, cond, x, t), atol=1e-5)


def test_export_says_how_to_load_a_half_precision_merged_folder(tmp_path, base_model, capsys):
    from diffusers import DiffusionPipeline

    from diffalign.export import load_hint
    from diffalign.generators import _dtype_keyword
    from diffalign.testing.tiny import tiny_sd3_pipeline

    _run_with_checkpoint(tmp_path, base_model, lora=True)
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--merged", "--dtype", "bfloat16"]) == 0
    said = capsys.readouterr().out
    kw = _dtype_keyword()  # diffusers' name: dtype (torch_dtype before 0.36)
    assert f"DiffusionPipeline.from_pretrained({str(out / 'merged')!r}, {kw}=torch.bfloat16) (" in said
    assert "diffusers 0.36)" in said  # the other versions' keyword
    assert json.loads((out / "export.json").read_text())["merged_dtype"] == "bfloat16"
    pipe = DiffusionPipeline.from_pretrained(str(out / "merged"), **{kw: torch.bfloat16})  # as the hint says
    latents = pipe(PROMPTS[0], num_inference_steps=1, height=32, width=32, max_sequence_length=SEQ_LEN,
                   output_type="latent").images
    assert latents.dtype == torch.bfloat16 and bool(torch.isfinite(latents.float()).all())
    # a pipeline without a required component (the shapes model's T5) names it; optional ones are not named
    no_t5 = tmp_path / "no_t5"
    tiny_sd3_pipeline().save_pretrained(no_t5)
    hint = load_hint(no_t5, torch.float32)
    assert hint == f"DiffusionPipeline.from_pretrained({str(no_t5)!r}, text_encoder_3=None, tokenizer_3=None)"


def test_export_of_the_shapes_model_keeps_its_call_kwargs_and_replaces_an_earlier_export(tmp_path, capsys):
    """The merged folder of a model whose diffalign.json says how to call it (the shapes flow model: no T5 tokens)
    keeps that file, so diffalign samples the merged folder as it sampled the run (it appended 256 T5 tokens);
    the printed load call says it too. Re-exporting into the folder drops the outputs it does not rewrite."""
    from diffalign.generators import load_generator
    from diffalign.shapes.models import FLOW_CALL_KWARGS, resolve_model_path

    base = resolve_model_path("builtin:shapes-flow")
    gen = load_generator(base)
    gen.add_lora(rank=2, alpha=4.0)
    trained = _perturbed(gen.lora_state_dict(), 1)
    config = {"model": {"path": "builtin:shapes-flow", "dtype": "float32",
                        "lora": {"enabled": True, "rank": 2, "alpha": 4.0, "target_modules": None}}}
    CheckpointManager(tmp_path / "run").save(1, trainable_state=trained, counters={"step": 1}, config=config)
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--merged"]) == 0
    assert json.loads((out / "merged" / "diffalign.json").read_text()) == {"call_kwargs": FLOW_CALL_KWARGS}
    assert "; call it with max_sequence_length=0" in capsys.readouterr().out
    merged = load_generator(str(out / "merged"))
    assert merged.call_kwargs == FLOW_CALL_KWARGS
    gen.load_lora_state_dict(trained)
    prompts = ["a red circle", "two blue squares"]
    x = gen.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    t = gen.make_schedule(4, 32, 32).timesteps[1].expand(2)
    with torch.no_grad():
        want = gen.predict(x, t, gen.encode_prompts(prompts))
        got = merged.predict(x, t, merged.encode_prompts(prompts))
        with_t5_tokens = merged.predict(x, t, merged.encode_prompts(prompts, max_sequence_length=256))
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)  # float32 merge of a large random LoRA
    assert (with_t5_tokens - want).abs().max() > 1e-2  # what the folder gave without its diffalign.json

    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 0  # LoRA only, into the same folder
    assert "removed the earlier export's" in capsys.readouterr().out
    assert not (out / "merged").exists() and (out / "lora").is_dir()
    (tmp_path / "a_file").write_text("")
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "a_file")]) == 2
    assert "--out " in capsys.readouterr().err


def test_an_export_over_an_earlier_sharded_one_replaces_it_whole(tmp_path, base_model, monkeypatch):
    """Re-exporting into a used folder swaps in a freshly written one: written over in place, a sharded earlier
    export left its shard index beside the new single file and from_pretrained looked for the missing shards. An
    export that fails midway leaves the earlier one as it was."""
    from diffusers import DiffusionPipeline

    import diffalign.export as export_mod

    _run_with_checkpoint(tmp_path, base_model, lora=True)
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--merged"]) == 0
    transformer = out / "merged" / "transformer"
    DiffusionPipeline.from_pretrained(str(out / "merged")).transformer.save_pretrained(
        str(transformer), max_shard_size="20KB")  # an earlier export in shards
    assert (transformer / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--merged"]) == 0
    assert not (transformer / "diffusion_pytorch_model.safetensors.index.json").exists()
    DiffusionPipeline.from_pretrained(str(out / "merged"))  # loads
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    folders = {name: (out / name).stat().st_ino for name in ("lora", "merged")}
    (out / ".merged.tmp-99999").mkdir()  # a killed export's leftover

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "_fuse_lora", failing)  # fails after the LoRA is staged, before the merged one
    with pytest.raises(OSError, match="disk full"):
        export_mod.export_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003", out, merged=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no new LoRA beside the old merged one
    assert {name: (out / name).stat().st_ino for name in ("lora", "merged")} == folders
    DiffusionPipeline.from_pretrained(str(out / "merged"))


def test_export_errors(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export_main([str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    model, opt, _, _ = _make()
    CheckpointManager(tmp_path).save(1, trainable_state=model.state_dict(), optimizer=opt,
                                     config={"model": {"path": "x"}})
    assert export_main([str(tmp_path), "--weights", "ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert export_main([str(tmp_path), "--checkpoint", str(tmp_path / "checkpoints" / "step-00000009")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint=" in err and "no such folder" in err and "has step-00000001" in err  # the valid names
    assert "null to start fresh" not in err  # resume wording, not export's
    # a checkpoint folder given as RUN_DIR is exported itself (here: found, and refused for its missing EMA)
    assert export_main([str(tmp_path / "checkpoints" / "step-00000001"), "--weights", "ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    (tmp_path / "a_file.yaml").write_text("x: 1\n")
    assert export_main([str(tmp_path / "a_file.yaml")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_leftovers_of_a_killed_save_are_cleaned_or_restored(tmp_path):
    import shutil

    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path, keep_last=5)
    first = _save(manager, 1, model, opt, sched)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-step-00000002").mkdir()  # killed while writing step 2
    (ckpts / ".tmp-step-00000002" / "trainable.safetensors").write_bytes(b"partial")
    (ckpts / ".tmp-latest.123").write_text("step-0000")
    shutil.move(str(first), str(ckpts / ".old-step-00000001"))  # killed while re-saving step 1
    _save(manager, 3, model, opt, sched)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001", "step-00000003"]
    assert load_checkpoint(first).step == 1


def test_bad_values_are_clear_errors(tmp_path):
    model, opt, _, _ = _make()
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        manager.save(1, trainable_state=model.state_dict(), optimizer=opt, counters={"step": torch.tensor(1)})
    with pytest.raises(CheckpointError, match="not a tensor"):
        manager.save(1, trainable_state={"w": [1.0]}, optimizer=opt)
    assert manager.latest() is None and not [p for p in (tmp_path / "checkpoints").iterdir()]


def test_the_cuda_rng_state_of_this_process_device_is_saved_and_restored_into_its_device(monkeypatch):
    """Each process saves its own (current) device's CUDA RNG state and restores it into its current device,
    whatever devices the resumed process sees (before: every visible device's state, restored by index, which
    gave rank r rank 0's state when a resume saw one GPU per process). Old checkpoints (a list) still load.
    CUDA is faked: these machines have none."""
    from diffalign.checkpoint import _set_rng_state, capture_rng_state

    mine = torch.arange(8, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("saved every device's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device,
                                                                                                  state.tolist())))
    rng = capture_rng_state()
    assert torch.equal(rng["cuda_device"], mine) and "cuda" not in rng
    _set_rng_state(rng, None)
    assert restored == [("cuda", mine.tolist())]  # the current device
    restored.clear()
    old = {**{k: v for k, v in rng.items() if k != "cuda_device"}, "cuda": [mine, mine + 1]}
    _set_rng_state(old, None)
    assert restored == [(0, mine.tolist()), (1, (mine + 1).tolist())]


@pytest.mark.parametrize("damage", ["trainable.safetensors", "optimizer.pt", "config.yaml", "rng-rank0.pt",
                                    "ema-nan"])
def test_a_damaged_file_is_one_error_naming_it_and_the_checkpoint_before(tmp_path, damage):
    """A checkpoint file truncated or changed on disk after a complete save (found by an audit): safetensors,
    torch.load and yaml raised their own errors with a traceback, and NaN weights loaded silently (an evaluation
    scored the NaN images; a resume trained on them)."""
    from safetensors.torch import load_file, save_file

    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path)
    _save(manager, 1, model, opt, sched)
    path = _save(manager, 2, model, opt, sched)
    if damage == "ema-nan":
        state = load_file(str(path / "ema.safetensors"))
        state["0.weight"][0, 0] = float("nan")
        save_file(state, str(path / "ema.safetensors"))
        name = "ema.safetensors"
    else:
        name = damage
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2] + (b"\x00{: [" if name.endswith(".yaml") else b""))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path / name} cannot be read (") and "the checkpoint is damaged" in message
    assert message.endswith(f"use the checkpoint before it, {tmp_path / 'checkpoints' / 'step-00000001'} "
                            "(checkpoint.resume_from=PATH; export: --checkpoint PATH)")
    if damage == "ema-nan":
        assert "tensors are not finite (first: 0.weight)" in message
    load_checkpoint(tmp_path / "checkpoints" / "step-00000001")  # the one it names loads


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_behind_a_library_error_is_the_one_line_write_error(tmp_path, monkeypatch, writer):
    """On a real full disk torch.save's zip writer raises a RuntimeError while handling the OSError, and safetensors
    a SafetensorError "I/O error: ... (os error 28)" (an audit on a small tmpfs): both ended in a traceback, not the
    documented CheckpointWriteError."""
    from diffalign.checkpoint import CheckpointWriteError, write_os_error

    model, opt, sched, _ = _make()
    manager = CheckpointManager(tmp_path)
    _save(manager, 1, model, opt, sched)

    def torch_full(obj, path):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14656 vs 14548")

    def safetensors_full(tensors, path, metadata):
        raise type("SafetensorError", (Exception,), {})(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    if writer == "torch":
        monkeypatch.setattr(ckpt_mod, "_save_torch", torch_full)
    else:
        monkeypatch.setattr(ckpt_mod, "_save_safetensors", safetensors_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint step-00000002 .*: No space left on "
                                                   r"device; nothing was published and step-00000001 is intact"):
        _save(manager, 2, model, opt, sched)
    assert resolve_resume(tmp_path, "latest").name == "step-00000001"
    assert write_os_error(ValueError("a bug")) is None  # other errors keep their type and traceback


def test_too_little_memory_to_load_a_checkpoint_is_not_called_damage(tmp_path, monkeypatch):
    """A review found MemoryError reported as "the checkpoint is damaged: use the one before it" (as large)."""
    model, opt, sched, _ = _make()
    path = _save(CheckpointManager(tmp_path), 1, model, opt, sched)

    def no_memory(*args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr("safetensors.torch.load_file", no_memory)
    with pytest.raises(MemoryError):
        load_checkpoint(path)
