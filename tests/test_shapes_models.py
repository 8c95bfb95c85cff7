"""The shipped shapes models load offline, through the adapters and through plain diffusers."""

import json

import pytest
import torch

from diffalign.shapes.models import BUILTIN_MODELS, resolve_model_path


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_model_loads_and_samples(name):
    from diffalign.generators import load_generator
    from diffalign.testing import netguard
    from trainers.common import sample_batch

    before = len(netguard.attempts)
    adapter = load_generator(f"builtin:{name}")
    assert adapter.kind == ("flow" if name == "shapes-flow" else "vp")
    det = "flow_euler" if adapter.kind == "flow" else "ddim"
    traj, _, images, _ = sample_batch(adapter, ["a red circle", "two blue squares"], [0, 1], seed=0, num_steps=4,
                                      guidance_scale=3.0, negative_prompt="", height=32, width=32, step=det,
                                      noise_level=0.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert len(netguard.attempts) == before


def test_builtin_models_are_plain_diffusers_folders():
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    flow = DiffusionPipeline.from_pretrained(resolve_model_path("builtin:shapes-flow"), text_encoder_3=None,
                                             tokenizer_3=None)
    assert isinstance(flow, StableDiffusion3Pipeline)
    ddpm = DiffusionPipeline.from_pretrained(resolve_model_path("builtin:shapes-ddpm"))
    assert isinstance(ddpm, StableDiffusionPipeline)
    out = flow("a red circle", num_inference_steps=2, max_sequence_length=0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)
    meta = json.loads((BUILTIN_MODELS["shapes-flow"] / "diffalign.json").read_text())
    assert meta["call_kwargs"] == {"max_sequence_length": 0}


def test_builtin_weights_fit_the_size_budget():
    total = sum(f.stat().st_size for folder in BUILTIN_MODELS.values() for f in folder.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, f"shipped models take {total / 2**20:.1f} MB (budget 25 MB)"


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="valid"):
        resolve_model_path("builtin:shapes-gan")


def test_a_missing_model_path_names_the_key_and_the_fix(tmp_path, monkeypatch):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.path: got '.*nowhere': no such folder; give a local pipeline"):
        resolve_model_path(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="with HF_HUB_OFFLINE=1 a hub id must already be in the local cache"):
        resolve_model_path("some-org/some-model")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # an existing folder passes unchanged
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pipe").mkdir()
    assert resolve_model_path("~/pipe") == str(tmp_path / "pipe")  # expanded, so diffusers sees a folder
