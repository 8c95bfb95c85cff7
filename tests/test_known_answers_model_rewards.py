"""Known answers for the model-based rewards and the gradient / table statistics, computed by hand or with
torchvision directly (no real weights: stub backbones, hand-set heads, tiny random models).

Pinned here:

* ``rewards.clip_backbone.preprocess_images``: the OpenAI CLIP mean / std constants and ``(x - mean) / std``
  on a flat image; short-side resize + *centre* crop geometry (a 32x64 image at size 32 is its middle 32
  columns, no squashing); bicubic antialiased resize equal to torchvision's
  ``Resize(bicubic, antialias) -> CenterCrop -> Normalize``; a transformers folder's
  ``preprocessor_config.json`` mean / std reach the backbone; ``logit_scale`` is the exponentiated temperature
  (random init: ``1 / 0.07``).
* ``rewards.clip``: ``scale * cos`` on a stub backbone (both embeddings L2-normalised), the per-reward scale /
  range (clip_score and hps: 1, pickscore: ``logit_scale / 26``) and each factory's default model / backend.
* ``rewards.aesthetic``: the MLP (linear layers, dropout only, eval mode) applied to the L2-normalised embedding,
  by hand.
* ``rewards.imagereward``: ``(MLP([img, txt, img * txt]) - mean) / std`` on normalised embeddings, by hand.
* ``rewards.dino``: ImageNet mean / std, the CLS ``pooler_output`` as the feature, mean / max over references of
  the cosine with hand-known features, and the 224 input size for real (folder) weights.
* ``scripts/grad_snr.py``: the jackknife cosine and standard error of three 2-d gradients (both sqrt(2)/3) and
  the ``resolved = cos > 2 se`` rule at and just off its boundary.
* ``scripts/marble_experiment.py``: ``summarise`` (change from base, mean worst cosine, share of strictly
  negative worst cosines, amortised time per step) and the table cells.
"""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rewards.clip_backbone import OPENAI_MEAN, OPENAI_STD, build_clip_backbone, preprocess_images

ROOT = Path(__file__).resolve().parents[1]
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CLIP's published values
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_HF_CLIP = {
    "text_config": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 998,
                    "eos_token_id": 999, "pad_token_id": 999},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "projection_dim": 16,
}
TINY_DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "image_size": 28, "patch_size": 14}


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StubBackbone:
    """A ClipBackbone stand-in with fixed features (one row per image / prompt)."""

    def __init__(self, img, txt=None, logit_scale=100.0):
        self.img, self.txt, self.logit_scale = img, txt, logit_scale
        self.device = torch.device("cpu")

    def encode_images(self, images):
        return self.img[: images.shape[0]] * (1 + 0 * images.sum())

    def encode_unique_text(self, prompts):
        return self.txt[: len(prompts)]


# ------------------------------------------------------------------------------------------- preprocessing


def test_flat_image_is_normalised_with_the_openai_constants():
    assert tuple(OPENAI_MEAN) == OPENAI[0] and tuple(OPENAI_STD) == OPENAI[1]
    img = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    out = preprocess_images(img, 32, OPENAI_MEAN, OPENAI_STD)
    want = torch.tensor([(v - m) / s for v, m, s in zip((0.2, 0.5, 0.9), *OPENAI)]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want.expand(1, 3, 32, 32), atol=1e-6, rtol=0)


def test_wide_image_at_its_short_side_is_centre_cropped_not_squashed():
    img = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    out = preprocess_images(img, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, img[..., 16:48], atol=0, rtol=0)
    tall = preprocess_images(img.transpose(2, 3), (32, 32), (0.0,) * 3, (1.0,) * 3)
    torch.testing.assert_close(tall, img.transpose(2, 3)[..., 16:48, :], atol=0, rtol=0)


def test_resize_matches_torchvision_clip_pipeline():
    tv = pytest.importorskip("torchvision.transforms")
    pipe = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC, antialias=True),
                       tv.CenterCrop(32), tv.Normalize(OPENAI[0], OPENAI[1])])
    # long side 100 * 32 / 72 = 44.4 -> 44; 100 * 32 / 70 = 45.7 -> 45 (truncated, as torchvision; rounding gives 46);
    # and the transposed image (the width binds)
    for h, w in ((72, 100), (70, 100), (100, 70)):
        img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
        out = preprocess_images(img, 32, OPENAI_MEAN, OPENAI_STD)
        torch.testing.assert_close(out, pipe(img), atol=1e-5, rtol=0, msg=f"{h}x{w}")


def test_transformers_folder_mean_std_and_logit_scale(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from rewards.clip_backbone import _clip_bpe_tokenizer

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**TINY_HF_CLIP)).save_pretrained(tmp_path)
    _clip_bpe_tokenizer(1000, 77).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.125]}))
    bb = build_clip_backbone(backend="transformers", weights=str(tmp_path), device="cpu", cache=False)
    assert bb.mean == (0.5, 0.4, 0.3) and bb.std == (0.2, 0.25, 0.125)
    # CLIP's logit scale is initialised at log(1 / 0.07); the property is its exponential
    assert bb.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_open_clip_random_backbone_logit_scale_and_constants():
    oc = build_clip_backbone(model_config=TINY_OPEN_CLIP, allow_random_weights=True, device="cpu")
    assert oc.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert oc.mean == OPENAI[0] and oc.std == OPENAI[1]


# ------------------------------------------------------------------------------------------- CLIP similarity


def test_clip_similarity_is_scaled_cosine_of_normalised_features():
    from rewards.clip import ClipSimilarityReward

    img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    txt = torch.tensor([[0.0, 2.0], [-5.0, 0.0]])
    images = torch.zeros(2, 3, 8, 8)
    plain = ClipSimilarityReward(StubBackbone(img, txt), name="clip_score")
    torch.testing.assert_close(plain._score(images, ["a", "b"], [{}, {}]), torch.tensor([0.8, -1.0]))
    assert plain.scale == 1.0 and plain.range == (-1.0, 1.0)
    pick = ClipSimilarityReward(StubBackbone(img, txt, 100.0), name="pickscore", use_logit_scale=True,
                                normaliser=26.0)
    torch.testing.assert_close(pick._score(images, ["a", "b"], [{}, {}]),
                               torch.tensor([0.8 * 100 / 26, -100 / 26]))
    assert pick.range == pytest.approx((-100 / 26, 100 / 26))


def test_clip_factories_defaults(monkeypatch):
    import rewards.clip as clip

    seen = {}

    def fake_build(**kw):
        seen[kw["reward"]] = kw
        return StubBackbone(torch.ones(1, 2), torch.ones(1, 2), logit_scale=100.0)

    monkeypatch.setattr(clip, "build_clip_backbone", fake_build)
    cs, hps, pick = clip.clip_score(), clip.hps(), clip.pickscore()
    for name, model in (("clip_score", "ViT-L-14"), ("hps", "ViT-H-14")):
        assert seen[name]["model_name"] == model and seen[name].get("backend", "open_clip") == "open_clip"
    assert seen["pickscore"]["backend"] == "transformers"
    assert cs.scale == 1.0 and hps.scale == 1.0 and hps.range == (-1.0, 1.0)
    assert pick.scale == pytest.approx(100 / 26)


# ------------------------------------------------------------------------------------------- aesthetic / ImageReward


def test_aesthetic_mlp_on_the_normalised_embedding_by_hand():
    from rewards.aesthetic import AestheticMLP, AestheticReward

    head = AestheticMLP(2, hidden_dims=(2,), dropouts=(0.9,))
    with torch.no_grad():
        head.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        head.layers[0].bias.copy_(torch.tensor([0.0, 0.1]))
        head.layers[2].weight.copy_(torch.tensor([[2.0, 3.0]]))
        head.layers[2].bias.copy_(torch.tensor([0.5]))
    head.eval().requires_grad_(False)
    reward = AestheticReward(StubBackbone(torch.tensor([[3.0, 4.0], [0.0, -10.0]])), head)
    # [0.6, 0.8] -> hidden [0.6, -0.7] (no activation) -> 2 * 0.6 + 3 * -0.7 + 0.5 = -0.4
    # [0, -1]   -> hidden [0, 1.1] -> 3.3 + 0.5 = 3.8
    torch.testing.assert_close(reward._score(torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}]),
                               torch.tensor([-0.4, 3.8]))


def test_random_head_is_built_in_eval_mode():
    from rewards.aesthetic import AestheticMLP, load_head

    head = load_head(AestheticMLP(4, (8,), (0.9,)), None, reward="a", allow_random_weights=True, seed=0)
    assert not head.training
    x = torch.ones(64, 4)
    torch.testing.assert_close(head(x), head(x).detach()[0].expand(64))  # no dropout noise


def test_imagereward_style_score_by_hand():
    from rewards.imagereward import ImageRewardStyleHead, ImageRewardStyleReward

    head = ImageRewardStyleHead(2, hidden_dims=(), dropouts=())
    with torch.no_grad():
        head.mlp.layers[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]))
        head.mlp.layers[0].bias.zero_()
    backbone = StubBackbone(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]]))
    reward = ImageRewardStyleReward(backbone, head.eval(), mean=1.0, std=2.0)
    # img [0.6, 0.8], txt [0, 1], img*txt [0, 0.8]: raw = 0.6 + 1.6 + 0 + 4 + 0 + 4.8 = 11; (11 - 1) / 2 = 5
    torch.testing.assert_close(reward._score(torch.zeros(1, 3, 4, 4), ["a"], [{}]), torch.tensor([5.0]))


# ------------------------------------------------------------------------------------------- DINO


class StubDino(torch.nn.Module):
    """pooler_output = the per-channel mean of the normalised input; last_hidden_state is something else."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, pixel_values):
        self.seen.append(pixel_values)
        pooled = pixel_values.mean(dim=(2, 3))
        return SimpleNamespace(pooler_output=pooled, last_hidden_state=-pooled[:, None].repeat(1, 2, 1))


def _flat(*rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, 28, 28).contiguous()


def test_dino_imagenet_normalisation_and_cls_cosines_by_hand():
    from rewards.dino import DinoSimilarityReward

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # colours whose ImageNet-normalised values are exactly e_r, e_g: c = mean + std * e
    ref = _flat([mean[0] + std[0], mean[1], mean[2]], [mean[0], mean[1] + std[1], mean[2]])
    model = StubDino()
    for reduce, pick in (("mean", lambda c: c.mean(1)), ("max", lambda c: c.max(1).values)):
        reward = DinoSimilarityReward(model, ref, reduce=reduce, image_size=28)
        torch.testing.assert_close(reward.reference_features, torch.eye(3)[:2], atol=1e-5, rtol=0)
        feats = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 4.0], [0.0, -2.0, 0.0]])
        images = _flat(*[[m + s * f for m, s, f in zip(mean, std, row)] for row in feats.tolist()])
        cos = torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.6, 0.0], [0.0, -1.0]])
        torch.testing.assert_close(reward._score(images, ["x"] * 3, [{}] * 3), pick(cos), atol=1e-5, rtol=0)


def test_dino_real_weights_default_to_224(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from rewards import build_reward

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_DINO)).save_pretrained(tmp_path / "dino")
    refs = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    reward = build_reward({"name": "dino_similarity", "device": "cpu",
                           "kwargs": {"weights": str(tmp_path / "dino"), "references": refs}})
    assert reward.image_size == 224


# ------------------------------------------------------------------------------------------- statistics


def test_grad_snr_jackknife_of_three_hand_vectors():
    """Cosines of [1,0], [0,1], [1,1]: 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3. Leave-one-out means 1/sqrt2, 1/sqrt2,
    0; squared deviations 1/18, 1/18, 4/18; se = sqrt(2/3 * 1/3) = sqrt2/3."""
    snr = _script("grad_snr")
    res = snr.jackknife_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert res["cos"] == pytest.approx(math.sqrt(2) / 3, abs=1e-12)
    assert res["se"] == pytest.approx(math.sqrt(2) / 3, abs=1e-12)


def test_grad_snr_resolved_is_strictly_more_than_two_standard_errors():
    snr = _script("grad_snr")
    at = snr.summarise(cos=0.2, se=0.1, samples=64, seconds=1.0)
    assert not at["resolved"] and at["samples_for_half_signal"] == pytest.approx(64 * 0.6 / 0.4)
    between = snr.summarise(cos=0.15, se=0.1, samples=64, seconds=1.0)
    assert not between["resolved"] and between["samples_for_half_signal"] == pytest.approx(64 * 0.65 / 0.35)
    above = snr.summarise(cos=0.21, se=0.1, samples=64, seconds=1.0)
    assert above["resolved"] and above["samples_for_half_signal"] == pytest.approx(64 * 0.79 / 0.21)


def _marble_rows():
    base = {"epoch": 0, "step": 0, "eval/reward/a": 1.0, "eval/reward/b": 0.5}
    # epochs 1-3: a plain step (timed) and a diagnosed step (the cosine); epoch 4: a QP step
    train = [{"epoch": i, "step": i, "reward/a": 0.1 * i, "marble/worst_cos": w, "cpu_time/step_plain": 2.0,
              "steps/plain": 1, "cpu_time/step_diagnose": 5.0, "steps/diagnose": 1, "cpu_time/step_refresh": 0.0,
              "steps/refresh": 0}
             for i, w in enumerate([-0.5, 0.0, 0.3, -0.2], start=1)]
    train[-1].update({"cpu_time/step_refresh": 7.0, "steps/refresh": 1, "cpu_time/step_plain": 0.0, "steps/plain": 0,
                      "cpu_time/step_diagnose": 0.0, "steps/diagnose": 0, "marble/alpha_bar/a": 0.25})
    mid = {"step": 2, "eval/reward/a": 9.0, "eval/reward/b": 9.0}
    final = {"step": 4, "eval/reward/a": 1.5, "eval/reward/b": 0.25}
    return base, [base, train[0], train[1], mid, train[2], train[3], final]


def test_marble_summary_and_table_by_hand():
    exp = _script("marble_experiment")
    base, rows = _marble_rows()
    cfg = SimpleNamespace(aggregation="marble", marble_mode="amortized", marble_every=5)
    res = exp.summarise("marble", rows, ["a", "b"], cfg, base)
    assert res["delta"] == pytest.approx({"a": 0.5, "b": -0.25})
    # the QP step (-0.2) weighs 1/5, the diagnosed plain steps (-0.5, 0.0, 0.3) 4/5; 0.0 is not negative
    assert res["worst_cos_mean"] == pytest.approx(0.2 * -0.2 + 0.8 * (-0.2 / 3))
    assert res["worst_cos_negative_fraction"] == pytest.approx(0.2 * 1 + 0.8 * (1 / 3))
    assert res["num_cos_steps"] == 4
    # plain steps 2 s (3 of them), QP steps 7 s (1): amortised share 1/5 -> 0.8 * 2 + 0.2 * 7 = 3.0
    assert res["time_per_step"] == pytest.approx(3.0)
    assert res["alpha_bar_final"] == {"a": 0.25}
    full = exp.summarise("marble_full", rows, ["a"], SimpleNamespace(aggregation="marble", marble_mode="full",
                                                                     marble_every=5), base)
    assert full["time_per_step"] == pytest.approx(7.0)
    ws = exp.summarise("weighted_sum", rows, ["a"], SimpleNamespace(aggregation="weighted_sum"), base)
    assert ws["time_per_step"] == pytest.approx(2.0)
    line = exp.table([res], ["a", "b"]).splitlines()[2]
    assert line == "| marble | +0.5000 | -0.2500 | -0.093 | 47% (1 + 3) | 3.00 s |"
