"""Known-answer tests for the generator adapters, the parametrisation, the config system, prompts, logging,
the CLI and the distributed helpers.

Each test pins values computed by hand or read off diffusers' own pipeline code, never by calling the code
under test a second time. What they pin:

* parametrisation (samplers/parametrization.py): ``sample`` prediction ``eps = (x_t - alpha x0) / sigma``;
  the inverse map for ``v_prediction`` (``v = alpha eps - sigma x0``, Salimans & Ho 2022) and ``sample``.
* Conditioning: ``repeat_interleave`` gives ``[p0, p0, p1, p1]``; ``cat`` keeps the shared FLUX ``text_ids``.
* prompt encoding: SD3's default T5 length 256 (77 CLIP + 256 T5 tokens), FLUX's 512, a model folder's
  ``call_kwargs`` max_sequence_length as the default, a mismatched negative-prompt count is an error.
* FLUX packing: the latent grid is rounded down to an even size as ``FluxPipeline.prepare_latents`` does.
* VAE encode: ``(mode(E(2 x - 1)) - shift) * scaling`` (diffusers' SD3 training scripts).
* SDXL: ``add_time_ids = [h, w, 0, 0, h, w]`` (``_get_add_time_ids``); DDIM's unit ``init_noise_sigma`` also
  when the pipeline ships an Euler scheduler (sigma_max ~ 14.6).
* default image size with a ``(h, w)`` ``sample_size`` (as ``StableDiffusionPipeline.__call__``).
* LoRA: ``alpha`` defaults to ``rank`` (scale 1); rank 0 is refused; unexpected LoRA keys are an error;
  ``is_lora_parameter`` filters by adapter name.
* config (coercion, inclusive bounds, suggestions, tuples, YAML exponents, overrides, section rules), prompt
  sources, metrics logging (flattening, JSON values, resume truncation), CLI exit statuses, distributed
  slicing and seeds, trainers.run's unknown-trainer error: see the section headers below.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from generators_helpers import no_network, single_thread  # noqa: F401

from diffalign.generators import Conditioning, adapter_for_pipeline
from diffalign.generators.lora import is_lora_parameter
from diffalign.testing.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline
from samplers.parametrization import to_x0_eps, x0_eps_to_model_output

# ----------------------------------------------------------------------------- parametrisation


def test_sample_prediction_eps_divides_the_residual_by_sigma():
    # x_t = 2, x0_hat = 1, alpha = 0.6, sigma = 0.8: eps = (2 - 0.6 * 1) / 0.8 = 1.75
    x0, eps = to_x0_eps(torch.tensor([[1.0]]), torch.tensor([[2.0]]), 0.6, 0.8, "sample")
    torch.testing.assert_close(x0, torch.tensor([[1.0]]))
    torch.testing.assert_close(eps, torch.tensor([[1.75]]))


def test_model_output_from_x0_eps_v_prediction_and_sample():
    # alpha = 0.6, sigma = 0.8, x0 = 1, eps = 2: v = alpha eps - sigma x0 = 1.2 - 0.8 = 0.4; sample -> x0 = 1
    x0, eps = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    torch.testing.assert_close(x0_eps_to_model_output(x0, eps, 0.6, 0.8, "v_prediction"), torch.tensor([[0.4]]))
    torch.testing.assert_close(x0_eps_to_model_output(x0, eps, 0.6, 0.8, "sample"), torch.tensor([[1.0]]))
    torch.testing.assert_close(x0_eps_to_model_output(x0, eps, 0.6, 0.8, "flow"), torch.tensor([[1.0]]))


# ----------------------------------------------------------------------------- Conditioning


def test_conditioning_repeat_interleave_and_cat_keep_layout():
    pe = torch.tensor([[[0.0]], [[1.0]]])  # [B=2, S=1, D=1]
    text_ids = torch.zeros(3, 3)
    cond = Conditioning(prompt_embeds=pe, pooled_prompt_embeds=torch.tensor([[0.0], [1.0]]), text_ids=text_ids)
    rep = cond.repeat_interleave(2)
    assert rep.prompt_embeds.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # [p0, p0, p1, p1]
    assert rep.pooled_prompt_embeds.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    both = Conditioning.cat([cond, cond])
    assert both.prompt_embeds.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert both.text_ids.shape == (3, 3)  # shared by every sample, not batched


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def sd3():
    return adapter_for_pipeline(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux():
    return adapter_for_pipeline(tiny_flux_pipeline())


@pytest.fixture(scope="module")
def sd15():
    return adapter_for_pipeline(tiny_sd15_pipeline())


def test_sd3_default_t5_length_is_256_and_folder_call_kwargs_win(sd3):
    # SD3 without T5: CLIP's 77 tokens concatenated with max_sequence_length zero T5 tokens
    assert sd3.pipeline.tokenizer_max_length == 77
    assert sd3.encode_prompts(["a red circle"]).prompt_embeds.shape[1] == 77 + 256
    sd3.call_kwargs = {"max_sequence_length": 8}
    try:
        assert sd3.encode_prompts(["a red circle"]).prompt_embeds.shape[1] == 77 + 8
    finally:
        sd3.call_kwargs = {}


def test_flux_default_t5_length_is_512(flux):
    cond = flux.encode_prompts(["a red circle"])
    assert cond.prompt_embeds.shape[1] == 512 and cond.text_ids.shape == (512, 3)
    assert flux.encode_prompts(["a red circle"], max_sequence_length=7).prompt_embeds.shape[1] == 7
    for bad in (0, 513):  # 0 was read as unset (512 tokens); FLUX has no prompt without T5 tokens
        with pytest.raises(ValueError, match=f"max_sequence_length={bad}: FLUX .* 1..512"):
            flux.encode_prompts(["a red circle"], max_sequence_length=bad)


def test_negative_prompt_count_must_match(sd3):
    with pytest.raises(ValueError, match="negative prompts"):
        sd3.encode_prompts(["a", "b", "c"], negative_prompt=["x", "y"], guidance_scale=2.0, max_sequence_length=4)
    cond = sd3.encode_prompts(["a", "b"], negative_prompt="x", guidance_scale=2.0, max_sequence_length=4)
    assert cond.negative_prompt_embeds.shape[0] == 2
    torch.testing.assert_close(cond.negative_prompt_embeds[0], cond.negative_prompt_embeds[1])


def test_flux_latent_grid_rounds_down_to_even(flux):
    # FluxPipeline.prepare_latents: h = 2 * (34 // (2 * 2)) = 16 -> (16/2)^2 = 64 tokens of 4 * 4 channels
    assert flux.vae_scale_factor == 2 and flux.denoiser.config.in_channels == 16
    assert flux.latent_shape(34, 34) == (64, 16)
    assert flux.prepare_latents(1, 34, 38, torch.Generator().manual_seed(0)).shape == (1, 8 * 9, 16)


def test_encode_images_scales_and_shifts_like_the_training_scripts(sd3):
    # diffusers' SD3 training scripts: z = (E(2 x - 1).mode() - shift_factor) * scaling_factor
    vae = sd3.pipeline.vae
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5035)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mode = vae.encode(images * 2 - 1).latent_dist.mode()
        latents = sd3.encode_images(images)
    torch.testing.assert_close(latents, (mode - 0.0609) * 1.5035)


def test_default_image_size_reads_a_height_width_sample_size(sd15):
    # StableDiffusionPipeline.__call__: sample_size (h, w) -> (h * f, w * f)
    unet = sd15.denoiser
    before = unet.config.sample_size
    unet.register_to_config(sample_size=(8, 12))
    try:
        assert getattr(sd15.pipeline, "default_sample_size", None) is None
        assert sd15.default_image_size() == (16, 24)
    finally:
        unet.register_to_config(sample_size=before)


def test_sdxl_time_ids_and_unit_noise_with_an_euler_scheduler():
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.init_noise_sigma > 2  # the Euler pipeline scales its noise; DDIM does not
    gen = adapter_for_pipeline(pipe)
    # _get_add_time_ids: original_size + crops_coords_top_left + target_size
    cond = gen.encode_prompts(["a", "b"], height=32, width=48)
    assert cond.add_time_ids.tolist() == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2
    noise = gen.prepare_latents(1, 32, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)))


def test_lora_alpha_defaults_to_rank_and_rank_zero_is_refused(sd15):
    with pytest.raises(ValueError, match="LoRA rank must be >= 1"):
        sd15.add_lora(rank=0, adapter_name="zero")
    sd15.add_lora(rank=4, adapter_name="ka")
    assert sd15.denoiser.peft_config["ka"].lora_alpha == 4
    layer = sd15.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["ka"] == 1.0
    state = sd15.lora_state_dict("ka")
    bad = {**state, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_zz.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="does not"):
        sd15.load_lora_state_dict(bad, "ka")


def test_is_lora_parameter_filters_by_adapter_name():
    assert is_lora_parameter("blocks.0.to_q.lora_A.default.weight", "default")
    assert not is_lora_parameter("blocks.0.to_q.lora_A.other.weight", "default")
    assert is_lora_parameter("blocks.0.to_q.lora_A.other.weight")
    assert not is_lora_parameter("blocks.0.to_q.base_layer.weight")


# ----------------------------------------------------------------------------- config: coercion and bounds
# Every value below is the documented rule of diffalign/config.py (module and param docstrings).

from diffalign import config as C  # noqa: E402


def test_bool_int_float_str_coercion_rules():
    assert C.from_dict(C.LoggingConfig, {"tensorboard": "off", "wandb": "yes"}).tensorboard is False
    assert C.from_dict(C.LoggingConfig, {"wandb": 1}).wandb is True
    with pytest.raises(C.ConfigError, match="logging.tensorboard: expected bool"):
        C.from_dict(C.LoggingConfig, {"tensorboard": 2}, prefix="logging")  # only 0 / 1 are booleans
    assert C.from_dict(C.SampleConfig, {"num_steps": "4.0"}).num_steps == 4
    assert C.from_dict(C.SampleConfig, {"num_steps": "1e1"}).num_steps == 10
    for bad in ("2.5", 2.5, True):
        with pytest.raises(C.ConfigError, match="num_steps: expected int"):
            C.from_dict(C.SampleConfig, {"num_steps": bad})
    with pytest.raises(C.ConfigError, match="noise_level: expected float"):
        C.from_dict(C.SampleConfig, {"noise_level": True})
    assert C.from_dict(C.SampleConfig, {"negative_prompt": 5}).negative_prompt == "5"


def test_min_max_bounds_are_inclusive():
    assert C.from_dict(C.SampleConfig, {"guidance_scale": 1.0}).guidance_scale == 1.0  # min=1.0
    assert C.from_dict(C.TrainLoopConfig, {"ema_decay": 1.0}).ema_decay == 1.0  # max=1.0
    with pytest.raises(C.ConfigError, match="must be <= 1.0"):
        C.from_dict(C.TrainLoopConfig, {"ema_decay": 1.01})
    with pytest.raises(C.ConfigError, match="must be >= 1.0"):
        C.from_dict(C.SampleConfig, {"guidance_scale": 0.99})


def test_unknown_key_suggests_the_close_name_and_missing_key_is_an_error():
    with pytest.raises(C.ConfigError, match="did you mean 'num_steps'"):
        C.from_dict(C.SampleConfig, {"num_step": 3}, prefix="sample")
    with pytest.raises(C.ConfigError, match="name: missing required key"):
        C.from_dict(C.RewardSpec, {}, prefix="rewards.0")


def test_tuple_fields_and_yaml_round_trip():
    cfg = C.from_dict(C.SampleConfig, {"window": [0, 3]})
    assert cfg.window == (0, 3) and isinstance(cfg.window, tuple)
    with pytest.raises(C.ConfigError, match="exactly 2 items"):
        C.from_dict(C.SampleConfig, {"window": [0, 1, 2]})
    text = C.dump_yaml(cfg)
    assert "window: [0, 3]\n" in text
    assert C.from_dict(C.SampleConfig, C.to_dict(cfg)) == cfg


def test_yaml_exponent_without_sign_is_float_and_duplicate_keys_fail(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e4\nb: 1e-4\nc: 2.5E+2\n")
    assert C.load_yaml(path) == {"a": 10000.0, "b": 1e-4, "c": 250.0}
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(C.ConfigError, match="duplicate key 'a'"):
        C.load_yaml(path)


def test_overrides_null_append_and_empty_key_part():
    data = C.apply_overrides({}, ["checkpoint.resume_from=null", "rewards.0.name=shapes", "rewards.1.name=x"],
                             C.RunConfig)
    assert data["checkpoint"]["resume_from"] is None
    assert [r["name"] for r in data["rewards"]] == ["shapes", "x"]
    with pytest.raises(C.ConfigError, match="index 3 is out of range"):
        C.apply_overrides(data, ["rewards.3.name=y"], C.RunConfig)
    with pytest.raises(C.ConfigError, match="empty key part"):
        C.apply_overrides({}, ["sample..num_steps=3"], C.RunConfig)


def test_section_rules():
    assert C.from_dict(C.SampleConfig, {"num_steps": 4, "window": [0, 4]}).window == (0, 4)  # end == num_steps
    with pytest.raises(C.ConfigError, match="sample.window"):
        C.from_dict(C.SampleConfig, {"num_steps": 4, "window": [2, 2]}, prefix="sample")  # empty window
    # random windows of length 2 drawn inside [1, 3): exactly one fits
    cfg = C.from_dict(C.SampleConfig, {"num_steps": 4, "window": [0, 2], "random_window": [1, 3]})
    assert cfg.random_window == (1, 3)
    with pytest.raises(C.ConfigError, match="num_candidates"):
        C.from_dict(C.GuidanceConfig, {"method": "doob", "num_candidates": 3})
    with pytest.raises(C.ConfigError, match="lr_decay_steps"):
        C.from_dict(C.TrainLoopConfig, {"lr_schedule": "cosine"}).validate_loop()
    with pytest.raises(C.ConfigError, match="no trainer is set"):
        C.from_dict(C.RunConfig, {"train": {"learning_rate": 1e-4}})
    with pytest.raises(C.ConfigError, match="alpha"):
        C.from_dict(C.LoraConfig, {"alpha": 0})
    assert C.from_dict(C.ModelConfig, {"device": "cuda:10"}).device == "cuda:10"
    with pytest.raises(C.ConfigError, match="prompts.path"):
        C.from_dict(C.PromptsConfig, {"source": "file"}, prefix="prompts")


def test_reward_spec_folds_transform_kwargs():
    spec = C.from_dict(C.RewardSpec, {"name": "shapes", "transform": "affine", "transform_kwargs": {"scale": 2}})
    assert spec.registry_kwargs()["transform"] == {"name": "affine", "scale": 2}


# ----------------------------------------------------------------------------- prompts

from diffalign.prompts import PromptSource, build_prompt_source  # noqa: E402


def test_file_prompts_distinct_per_epoch_and_eval_file(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("p0\n\n  p1 \np2\np3\np4\np5\np6\np7\n")
    evals = tmp_path / "eval.txt"
    evals.write_text("e0\ne1\ne2\n")
    src = build_prompt_source(C.from_dict(C.PromptsConfig, {"source": "file", "path": str(train),
                                                             "eval_path": str(evals), "eval_size": 2}), seed=0)
    assert sorted(src.lines) == [f"p{i}" for i in range(8)]  # blank line dropped, whitespace stripped
    assert src.eval_prompts() == ["e0", "e1"]
    e0, e1 = src.epoch_prompts(0, 8), src.epoch_prompts(1, 8)
    assert sorted(e0) == sorted(e1) == sorted(src.lines)  # 8 of 8 lines: each once, no replacement
    assert e0 != e1  # a new draw every epoch (P(equal) = 1/8!)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        build_prompt_source(C.from_dict(C.PromptsConfig, {"source": "file", "path": str(empty)}), seed=0)


def test_shapes_prompts_continue_the_sampler_stream_and_use_eval_split():
    from diffalign.shapes.prompts import PromptSampler, prompt_set

    src = PromptSource("shapes", 3, split="held_in", eval_size=4, eval_split="held_out")
    stream = PromptSampler(seed=3, split="held_in").sample_batch(6)
    assert src.epoch_prompts(1, 3) == stream[3:]  # epoch e starts at position e * n
    assert src.eval_prompts() == prompt_set("held_out", 4, seed=12345)


# ----------------------------------------------------------------------------- logging

from diffalign.logging import MetricsLogger, read_metrics  # noqa: E402


def _steps(path):
    return [r["step"] for r in read_metrics(path)]


def test_metrics_record_flattening_and_json_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(3, {"reward": {"shapes": torch.tensor([0.5])}, "flag": True, "bad": float("nan"),
                    "n": np.int64(2)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(4, {"train": 1.0, "step": 2})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line)
    assert record["reward/shapes"] == 0.5 and record["flag"] is True and record["bad"] is None
    assert record["n"] == 2 and "NaN" not in line and len(line.splitlines()) == 1


def test_resume_keeps_rows_up_to_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "x": \n{"step": 2}\n{"step": 3}\n')
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'  # the cut-short line goes too
    MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()  # step 0 is a resume, not a fresh start
    assert _steps(path) == [0]
    with pytest.warns(UserWarning, match="moved"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=-1).close()
    assert not path.read_text()
    path.write_text('{"step": 5}\n[1, 2]\n7\n')  # JSON that is not an object is not a record
    assert read_metrics(path) == [{"step": 5}]


# ----------------------------------------------------------------------------- distributed

from diffalign.distributed import DistContext, repeat_assignment, seed_for  # noqa: E402


def test_repeat_assignment_slices_ids_and_unshuffled_layout():
    a = repeat_assignment(["a", "b", "c"], 2, epoch=2, seed=0, rank=1, world_size=3, shuffle=False)
    assert a.global_groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert a.global_ids.tolist() == [12, 13, 14, 15, 16, 17]  # epoch * N + position
    assert (a.start, a.end, a.prompts, a.sample_ids) == (2, 4, ["b", "b"], [14, 15])
    with pytest.raises(ValueError, match="cannot be split evenly"):
        repeat_assignment(["a", "b", "c"], 1, epoch=0, seed=0, rank=0, world_size=2)
    e0 = repeat_assignment(list("abcdefgh"), 2, epoch=0, seed=0, rank=0, world_size=1)
    e1 = repeat_assignment(list("abcdefgh"), 2, epoch=1, seed=0, rank=0, world_size=1)
    assert e0.global_groups.tolist() != e1.global_groups.tolist()  # reshuffled every epoch


def test_seed_for_fits_63_bits_and_single_process_gather_is_identity():
    seeds = [seed_for(s, e, 17) for s in range(20) for e in range(5)]
    assert all(0 <= s < 2**63 for s in seeds)
    ctx = DistContext(rank=0, world_size=1, gather_fn=lambda t: torch.cat([t, t]))
    assert ctx.gather(torch.ones(2)).shape == (2,)


# ----------------------------------------------------------------------------- CLI exit codes and arguments

from diffalign import cli  # noqa: E402

def test_cli_config_out_writes_the_resolved_yaml(tmp_path, capsys):
    out = tmp_path / "resolved.yaml"
    assert cli.main(["config", "sample.num_steps=7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and C.load_yaml(out)["sample"]["num_steps"] == 7



# ----------------------------------------------------------------------------- trainers.run


def test_run_refuses_an_unknown_trainer_with_the_valid_names():
    from trainers.run import _trainer_class

    with pytest.raises(C.ConfigError, match=r"^trainer: invalid choice 'nope'; valid choices: 'grpo', 'nft'"):
        _trainer_class("nope")


def test_image_sizes_must_fit_the_latent_packing(flux, sd3):
    """FLUX packs 2x2 latents (transformer patch_size 1): VAE factor x 2; SD3: VAE factor x patch_size."""
    from diffalign.config import ConfigError, SampleConfig
    from trainers.common import image_size

    assert flux.size_multiple == flux.vae_scale_factor * 2 and flux.denoiser.config.patch_size == 1
    assert sd3.size_multiple == sd3.vae_scale_factor * sd3.denoiser.config.patch_size
    m = flux.size_multiple
    assert image_size(flux, SampleConfig(height=2 * m, width=3 * m)) == (2 * m, 3 * m)
    # half a packing step used to pass and be rounded down silently
    with pytest.raises(ConfigError, match=f"sample.width: got {3 * m + m // 2}; this model needs a multiple of {m}"):
        image_size(flux, SampleConfig(height=2 * m, width=3 * m + m // 2))
