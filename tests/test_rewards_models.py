"""CLIP-family and DINO rewards on tiny random weights: determinism, batch-size invariance, gradients, loading
weights from local files, and the no-download rule."""

import pytest
import torch

from rewards import build_reward
from rewards.aesthetic import AestheticMLP
from rewards.clip_backbone import build_clip_backbone

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_HF_CLIP = {
    "text_config": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 998,
        "eos_token_id": 999,
        "pad_token_id": 999,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 16,
}
TINY_DINO = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 28,
    "patch_size": 14,
}
RANDOM = {"model_config": TINY_OPEN_CLIP, "allow_random_weights": True}
SPECS = {
    "clip_score": RANDOM,
    "hps": RANDOM,
    "aesthetic": {**RANDOM, "hidden_dims": [16, 8], "dropouts": [0.2]},
    "imagereward_style": {**RANDOM, "hidden_dims": [16, 8]},
    "pickscore": {"model_config": TINY_HF_CLIP, "allow_random_weights": True},
}
PROMPTS = ["a cat", "a dog", "a cat", "two red circles", 'a sign that says "HI"']


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def built():
    return {name: build_reward({"name": name, "kwargs": kw, "device": "cpu"}) for name, kw in SPECS.items()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_clip_family_deterministic_and_batch_size_invariant(name, built, images):
    reward = built[name]
    assert reward.differentiable and not reward.trainable and reward.name == name
    full = reward(images, PROMPTS, None).scores
    assert full.shape == (5,) and full.dtype == torch.float32 and torch.isfinite(full).all()
    old = reward.batch_size
    try:
        reward.batch_size = 2
        chunked = reward(images, PROMPTS, None).scores
    finally:
        reward.batch_size = old
    assert torch.allclose(full, chunked, atol=1e-5, rtol=0)
    # Same seed -> same random weights -> same scores, in a fresh (uncached) build.
    from rewards import clip_backbone

    saved = dict(clip_backbone._CACHE)
    clip_backbone._CACHE.clear()
    try:
        again = build_reward({"name": name, "kwargs": SPECS[name], "device": "cpu"})(
            images, PROMPTS, None
        ).scores
    finally:
        clip_backbone._CACHE.update(saved)
    assert torch.allclose(full, again, atol=1e-6, rtol=0)


def test_clip_scores_depend_on_the_prompt_and_follow_the_definition(built, images):
    reward = built["clip_score"]
    bb = reward.backbone
    with torch.no_grad():
        img = torch.nn.functional.normalize(bb.encode_images(images), dim=-1)
        txt = torch.nn.functional.normalize(bb.encode_text(PROMPTS), dim=-1)
    assert torch.allclose(reward(images, PROMPTS, None).scores, (img * txt).sum(-1), atol=1e-6)
    other = reward(images, ["a red square"] * 5, None).scores
    assert not torch.allclose(reward(images, PROMPTS, None).scores, other)
    pick = built["pickscore"]
    assert pick.scale == pytest.approx(pick.backbone.logit_scale / 26.0)


@pytest.mark.parametrize("name", ["clip_score", "aesthetic", "pickscore"])
def test_clip_family_is_differentiable_wrt_images(name, built, images):
    x = images.clone().requires_grad_(True)
    built[name](x, PROMPTS, None).scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in built[name].backbone.model.parameters())


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hps", "aesthetic", "imagereward_style"])
def test_missing_weights_is_a_clear_error(name):
    with pytest.raises(ValueError, match="never downloads model weights.*local path.*allow_random_weights"):
        build_reward({"name": name, "device": "cpu"})


def test_open_clip_and_head_weights_load_from_local_files(tmp_path, built, images):
    from safetensors.torch import save_file

    ref = built["aesthetic"]
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in ref.backbone.model.state_dict().items()}, str(ckpt))
    head_pth = tmp_path / "head.pth"
    torch.save(ref.head.state_dict(), head_pth)
    loaded = build_reward(
        {
            "name": "aesthetic",
            "device": "cpu",
            "kwargs": {
                "model_config": TINY_OPEN_CLIP,
                "weights": str(ckpt),
                "head_weights": str(head_pth),
                "hidden_dims": [16, 8],
                "dropouts": [0.2],
            },
        }
    )
    assert torch.allclose(loaded(images, PROMPTS, None).scores, ref(images, PROMPTS, None).scores, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward(
            {
                "name": "clip_score",
                "device": "cpu",
                "kwargs": {"model_config": TINY_OPEN_CLIP, "weights": str(tmp_path / "nope.pt")},
            }
        )
    with pytest.raises(ValueError, match="do not match the head architecture"):
        build_reward(
            {
                "name": "aesthetic",
                "device": "cpu",
                "kwargs": {
                    "model_config": TINY_OPEN_CLIP,
                    "weights": str(ckpt),
                    "head_weights": str(head_pth),
                    "hidden_dims": [4],
                },
            }
        )


def test_aesthetic_mlp_has_laion_state_dict_layout():
    keys = set(AestheticMLP().state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert AestheticMLP().layers[0].in_features == 768


def test_transformers_backend_loads_a_local_clipmodel_folder(tmp_path, built, images):
    ref = built["pickscore"]
    folder = tmp_path / "pickscore"
    ref.backbone.model.save_pretrained(folder)
    from rewards.clip_backbone import _clip_bpe_tokenizer

    _clip_bpe_tokenizer(1000, 77).save_pretrained(folder)
    loaded = build_reward({"name": "pickscore", "device": "cpu", "kwargs": {"weights": str(folder)}})
    assert torch.allclose(loaded(images, PROMPTS, None).scores, ref(images, PROMPTS, None).scores, atol=1e-5)


def test_backbones_are_shared_between_rewards(built):
    a = build_clip_backbone(reward="x", model_config=TINY_OPEN_CLIP, allow_random_weights=True, device="cpu")
    assert a is built["clip_score"].backbone is built["hps"].backbone


def test_openai_weights_get_quick_gelu_and_a_tag_its_normalisation():
    """open_clip's plain config builds GELU; OpenAI's weights need QuickGELU, which open_clip applies only when it
    loads them itself (``pretrained=None`` skipped it: every layer of aesthetic / clip_score / imagereward_style
    on OpenAI ViT-L/14 ran the wrong activation). ``pretrained`` names the weights' tag (no download); those
    rewards default to ``openai``, and SigLIP's tag gives its 0.5 / 0.5 normalisation."""
    import open_clip

    from rewards.clip_backbone import _pretrained_settings, openai_vit_l14

    def activations(backbone):
        return {type(m).__name__ for m in backbone.model.modules() if "GELU" in type(m).__name__}

    quick = build_clip_backbone(reward="x", model_name="ViT-B-32", pretrained="openai", allow_random_weights=True,
                                device="cpu", cache=False)
    plain = build_clip_backbone(reward="x", model_name="ViT-B-32", allow_random_weights=True, device="cpu",
                                cache=False)
    assert activations(quick) == {"QuickGELU"} and activations(plain) == {"GELU"}
    assert _pretrained_settings("x", "ViT-B-16-SigLIP", "webli")["mean"] == (0.5, 0.5, 0.5)
    assert _pretrained_settings("x", "ViT-B-32", None) == {}
    with pytest.raises(ValueError, match="pretrained='openai' is not an open_clip tag of 'ViT-B-16-SigLIP'"):
        _pretrained_settings("x", "ViT-B-16-SigLIP", "openai")
    with pytest.raises(ValueError, match="does not apply with backend='transformers' or model_config"):
        build_clip_backbone(reward="x", model_config=TINY_OPEN_CLIP, pretrained="openai", allow_random_weights=True)
    assert openai_vit_l14({}) == {"model_name": "ViT-L-14", "pretrained": "openai"}
    assert openai_vit_l14({"model_config": {}}) == {"model_name": "ViT-L-14", "model_config": {}}
    assert openai_vit_l14({"model_name": "ViT-H-14"}) == {"model_name": "ViT-H-14"}
    # naming the default model keeps the default tag (it dropped it: OpenAI weights ran with GELU)
    assert openai_vit_l14({"model_name": "ViT-L-14", "weights": "w.pt"})["pretrained"] == "openai"
    assert openai_vit_l14({"pretrained": None}) == {"model_name": "ViT-L-14", "pretrained": None}
    assert "pretrained" not in openai_vit_l14({"backend": "transformers"})
    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai")["quick_gelu"]  # what the default relies on


# ------------------------------------------------------------------------------------------- DINO


def test_dino_similarity_known_answers_and_batch_invariance(images):
    refs = images[:2].clone()
    reward = build_reward(
        {
            "name": "dino_similarity",
            "device": "cpu",
            "kwargs": {
                "model_config": TINY_DINO,
                "allow_random_weights": True,
                "references": refs,
                "reduce": "max",
            },
        }
    )
    out = reward(images, PROMPTS, None).scores
    # An image that is one of the references has max similarity 1.
    assert out[0].item() == pytest.approx(1.0, abs=1e-5) and out[1].item() == pytest.approx(1.0, abs=1e-5)
    assert (out[2:] < 1.0 - 1e-4).all()
    reward.batch_size = 2
    assert torch.allclose(reward(images, PROMPTS, None).scores, out, atol=1e-5, rtol=0)
    mean_reward = build_reward(
        {
            "name": "dino_similarity",
            "device": "cpu",
            "kwargs": {"model_config": TINY_DINO, "allow_random_weights": True, "references": refs},
        }
    )
    feats = torch.nn.functional.normalize(mean_reward.features(images), dim=-1)
    want = (feats @ mean_reward.reference_features.T).mean(1)
    assert torch.allclose(mean_reward(images, PROMPTS, None).scores, want, atol=1e-6)
    # Same seed -> same random model -> same scores.
    assert torch.allclose(
        mean_reward(images, PROMPTS, None).scores,
        build_reward(
            {
                "name": "dino_similarity",
                "device": "cpu",
                "kwargs": {"model_config": TINY_DINO, "allow_random_weights": True, "references": refs},
            }
        )(images, PROMPTS, None).scores,
        atol=1e-6,
    )


def test_dino_references_from_files_and_missing_weights(tmp_path, images):
    from PIL import Image

    for i in range(2):
        arr = (images[i].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(arr).save(tmp_path / f"ref{i}.png")
    reward = build_reward(
        {
            "name": "dino_similarity",
            "device": "cpu",
            "kwargs": {"model_config": TINY_DINO, "allow_random_weights": True, "references": str(tmp_path)},
        }
    )
    assert reward.reference_features.shape == (2, 32)
    # a non-square image scores 1 against itself whether the reference is its file or its tensor
    wide = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(4))
    arr = (wide[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(tmp_path / "wide.png")
    wide = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    kw = {"model_config": TINY_DINO, "allow_random_weights": True}
    from_file = build_reward({"name": "dino_similarity", "device": "cpu",
                              "kwargs": {**kw, "references": [str(tmp_path / "wide.png")]}})
    assert float(from_file(wide, ["x"], None).scores[0]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="never downloads"):
        build_reward({"name": "dino_similarity", "kwargs": {"references": str(tmp_path)}})


def test_random_transformers_clip_without_special_ids_reads_the_prompt():
    """A CLIP config without bos / eos ids (CLIPTextConfig's defaults point outside a small vocab) must still pool
    the text at the offline tokenizer's end-of-text token: different prompts, different scores."""
    text = {k: v for k, v in TINY_HF_CLIP["text_config"].items() if not k.endswith("token_id")}
    reward = build_reward({"name": "pickscore", "device": "cpu", "kwargs": {
        "backend": "transformers", "model_config": {**TINY_HF_CLIP, "text_config": text},
        "allow_random_weights": True}})
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 1, 1)
    scores = reward(image, ["a red circle", "two blue squares", "a cat"], None).scores
    assert len(set(scores.tolist())) == 3, scores
