"""Real-architecture benchmarks on random weights: the config-folder builder, training an in-memory pipeline, and
the ``--arch`` paths of ``scripts/bench_grpo.py`` and ``scripts/check_sampler_parity.py`` (run on a GPU at
SD3.5-Medium size; here on a tiny folder of the same layout)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from grpo_helpers import run_config, save_tiny, train_run

from diffalign.testing.arch import parameter_counts, random_pipeline
from diffalign.testing.tiny import tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """An SD3.5-Medium-layout folder (dual attention, RMS q/k norm, T5) holding only its JSON files."""
    folder = tmp_path_factory.mktemp("arch") / "sd35m-like"
    pipe = tiny_sd3_pipeline(with_t5=True, sd35_medium=True)
    pipe.save_pretrained(folder)
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            path.unlink()
    for sub in folder.iterdir():  # tokenizer folders keep no weights but their vocab: drop them, as the shared configs
        if sub.name.startswith("tokenizer"):
            for path in sub.rglob("*"):
                path.unlink()
    return folder, pipe


def test_random_pipeline_rebuilds_the_architecture_of_a_config_folder(config_folder):
    folder, original = config_folder
    assert not any(p.suffix == ".safetensors" for p in folder.rglob("*"))
    built = random_pipeline(folder, dtype=torch.bfloat16, seed=1)
    assert type(built) is type(original)
    assert parameter_counts(built) == parameter_counts(original)
    for name, module in original.components.items():
        if isinstance(module, torch.nn.Module):
            want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in built.components[name].state_dict().items()}
            assert got == want, name
            assert all(p.dtype == torch.bfloat16 for p in built.components[name].parameters()), name
            assert not built.components[name].training
    layers = [list(p.transformer.config.dual_attention_layers) for p in (built, original)]
    assert layers[0] == layers[1] == [0]
    # the CLIP tokenizers get the real BPE at the text encoder's vocabulary; T5 a local Unigram model
    assert len(built.tokenizer) == built.text_encoder.config.vocab_size
    assert built.tokenizer_3("a red circle")["input_ids"][-1] == 1
    # seeded: the same folder and seed give the same weights, another seed other weights
    again = random_pipeline(folder, dtype=torch.bfloat16, seed=1)
    other = random_pipeline(folder, dtype=torch.bfloat16, seed=2)
    w = built.transformer.state_dict()
    assert all(torch.equal(w[k], v) for k, v in again.transformer.state_dict().items())
    assert not all(torch.equal(w[k], v) for k, v in other.transformer.state_dict().items())
    # overrides change a component's config
    small = random_pipeline(folder, overrides={"transformer": {"num_layers": 1, "dual_attention_layers": [0]}})
    assert len(small.transformer.transformer_blocks) == 1


def test_random_pipeline_errors_name_the_fix(config_folder, tmp_path):
    folder, _ = config_folder
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        random_pipeline(tmp_path)
    with pytest.raises(ValueError, match=r"overrides for \['unet'\].*components: "):
        random_pipeline(folder, overrides={"unet": {"num_layers": 1}})


def test_trainer_trains_an_in_memory_pipeline_as_its_saved_folder(tmp_path):
    """``GRPOTrainer(cfg, pipeline=pipe)`` trains the object it is given, and exactly as loading the same weights
    from a folder (what ``scripts/bench_grpo.py --arch`` relies on)."""
    folder = save_tiny(tmp_path)
    from_folder = train_run(run_config(folder, tmp_path / "a", train={"num_epochs": 1}))
    from trainers.grpo import GRPOTrainer

    pipe = tiny_sd3_pipeline(seed=0)  # the weights save_tiny saved
    trainer = GRPOTrainer(run_config(folder, tmp_path / "b", train={"num_epochs": 1}), pipeline=pipe)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.adapter.pipeline is pipe
    a, b = from_folder.adapter.lora_state_dict(), trainer.adapter.lora_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (tmp_path / "a", tmp_path / "b")]
    assert [r.get("reward/combined") for r in rows[0]] == [r.get("reward/combined") for r in rows[1]]


def test_nft_trainer_takes_an_in_memory_pipeline(tmp_path):
    from trainers.nft import NFTTrainer

    pipe = tiny_sd3_pipeline(seed=0)
    cfg = run_config(save_tiny(tmp_path), tmp_path / "nft", trainer="nft", train={"num_epochs": 1},
                     sample={"step": "flow_euler", "noise_level": 0.0})
    trainer = NFTTrainer(cfg, pipeline=pipe)
    trainer.setup()
    try:
        assert trainer.adapter.pipeline is pipe and trainer.adapter.has_lora
    finally:
        trainer.cleanup()


def _run_script(monkeypatch, capsys, name, argv):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [name] + argv)
    module = __import__(name)
    assert module.main(argv) == 0
    return capsys.readouterr().out


def test_bench_grpo_arch_path_trains_the_built_pipeline_and_times_the_trained_policy(config_folder, tmp_path,
                                                                                      monkeypatch, capsys):
    folder, _ = config_folder
    out = _run_script(monkeypatch, capsys, "bench_grpo", [
        "--arch", str(folder), "--shrink", "--gpu-recipe", "--size", "32", "--epochs", "2", "--reps", "1",
        "--json", str(tmp_path / "bench.json"), "--out", str(tmp_path / "run"),
        "sample.num_steps=2", "sample.eval_num_steps=2", "sample.num_batches_per_epoch=1",
        "train.gradient_accumulation_steps=1"])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["dtype"] == "bfloat16" and set(result["parameters"]) >= {"transformer", "text_encoder_3"}
    assert len(result["time_split"]) == 2 and {"2"} <= set(result["memory"])
    methods = [r["method"] for r in result["rollout"]]
    assert methods[0].startswith("diffusers pipe") and len(methods) == 3
    assert all(r["ratio_median_paired"] > 0 for r in result["rollout"])
    assert "the trained policy (LoRA r32)" in out and "1 optimizer steps per epoch" in out
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "dtype: bfloat16" in config and "gradient_checkpointing: true" in config


@pytest.mark.parametrize("kind", ["sd3", "sd15"])  # SD1.5's pipeline refused the script's negative prompt
def test_check_sampler_parity_float32_is_exact(tmp_path, monkeypatch, capsys, kind):
    out = _run_script(monkeypatch, capsys, "check_sampler_parity", [
        "--model", save_tiny(tmp_path, kind), "--size", "32", "--steps", "3", "--batch", "2", "--threads", "1"])
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.e+-]+) \|", out, flags=re.M))
    assert float(rows["pipeline float32"]) == 0.0
    assert float(rows["diffalign float32"]) == 0.0  # the same latents as the pipeline, bit for bit
    assert float(rows["pipeline bfloat16"]) > 0 and float(rows["diffalign bfloat16"]) > 0


def test_in_memory_pipeline_keeps_its_folders_call_arguments_and_is_cast_whole(tmp_path):
    """``pipeline=`` with ``model.path`` naming a folder (here the shipped shapes-flow model, trained without T5
    tokens) applies that folder's ``diffalign.json`` call arguments, as loading it would; ``wrap_pipeline`` casts
    every component, not only when the first one differs."""
    from diffalign.config import ModelConfig, from_dict
    from diffalign.generators import load_generator, wrap_pipeline
    from trainers.common import build_adapter

    loaded = load_generator("builtin:shapes-flow")
    assert loaded.call_kwargs == {"max_sequence_length": 0}
    cfg = from_dict(ModelConfig, {"path": "builtin:shapes-flow", "lora": {"enabled": False}})
    adapter = build_adapter(cfg, torch.device("cpu"), pipeline=loaded.pipeline)
    assert adapter.call_kwargs == loaded.call_kwargs
    label = from_dict(ModelConfig, {"path": "not-a-folder-just-a-label", "lora": {"enabled": False}})
    assert build_adapter(label, torch.device("cpu"), pipeline=tiny_sd3_pipeline()).call_kwargs == {}

    pipe = tiny_sd3_pipeline()
    pipe.text_encoder.to(torch.bfloat16)  # the first component already in the target dtype
    wrap_pipeline(pipe, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in (pipe.transformer, pipe.vae, pipe.text_encoder_2)
               for p in m.parameters())


@pytest.mark.parametrize("builder", ["tiny_flux_pipeline", "tiny_sd15_pipeline", "tiny_sdxl_pipeline"])
def test_random_pipeline_builds_the_other_families(builder, tmp_path):
    """FLUX, SD1.5 and SDXL folders rebuild with their layouts and their model_index.json options (SDXL's
    force_zeros_for_empty_prompt); no safety checker is built."""
    import json

    import diffalign.testing.tiny as tiny

    original = getattr(tiny, builder)()
    original.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    if builder == "tiny_sdxl_pipeline":
        index["force_zeros_for_empty_prompt"] = False  # a saved option that differs from the default
        (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    built = random_pipeline(tmp_path / "m")
    assert type(built) is type(original) and parameter_counts(built) == parameter_counts(original)
    if builder == "tiny_sdxl_pipeline":
        assert built.config.force_zeros_for_empty_prompt is False
    if builder == "tiny_sd15_pipeline":
        assert built.safety_checker is None and built.config.requires_safety_checker is False
    state = torch.random.get_rng_state()
    random_pipeline(tmp_path / "m", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched


def test_wrap_pipeline_keeps_layers_held_in_float32_and_random_pipeline_leaves_cuda_seeds(monkeypatch, config_folder):
    from diffalign.generators import wrap_pipeline

    pipe = tiny_sd3_pipeline(with_t5=True)
    pipe.to(dtype=torch.float16)
    for block in pipe.text_encoder_3.encoder.block:  # as from_pretrained(float16) keeps T5's `wo` in float32
        block.layer[-1].DenseReluDense.wo.float()
    wrap_pipeline(pipe, dtype=torch.float16)
    assert all(b.layer[-1].DenseReluDense.wo.weight.dtype == torch.float32 for b in pipe.text_encoder_3.encoder.block)
    assert pipe.transformer.dtype == torch.float16
    wrap_pipeline(pipe, dtype=torch.bfloat16)  # a module in another dtype is cast whole
    assert pipe.text_encoder_3.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.bfloat16

    folder, _ = config_folder
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("reseeded every GPU"))
    random_pipeline(folder, seed=3)


def test_bench_marble_runs_on_the_tiny_model(monkeypatch, capsys):
    """The benchmark times K-reward trainers on samples scored by the single-reward one: since the NFT loss weights
    each reward by its column's finiteness it crashed at its first step (no test ran it)."""
    out = _run_script(monkeypatch, capsys, "bench_marble", ["--tiny", "--threads", "1", "--k", "3", "--every", "2"])
    rows = dict(re.findall(r"^\| (MARBLE [a-z]+ step)[^|]*\| ([0-9.]+) ms \|", out, flags=re.M))
    assert set(rows) == {"MARBLE amortised step", "MARBLE full step"} and all(float(v) > 0 for v in rows.values())
    assert "QP solve K=3" in out and "cvxpy reference solve" in out
