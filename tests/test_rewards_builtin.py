"""Known answers for the non-neural built-in rewards: JPEG size, OCR, shapes verifier."""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards import MultiReward, build_reward
from rewards.jpeg import jpeg_size_kb, to_uint8_hwc
from rewards.ocr import levenshtein, ocr_score, quoted_target


def render_text(word: str, size=(256, 96), font_size=48) -> torch.Tensor:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((16, 20), word, fill="black", font=ImageFont.load_default(size=font_size))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------- JPEG


def test_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    comp = build_reward("jpeg_compressibility")(images, ["a", "b"], None)
    incomp = build_reward("jpeg_incompressibility")(images, ["a", "b"], None)
    assert comp.scores[0] > comp.scores[1] and incomp.scores[1] > incomp.scores[0]
    assert torch.equal(comp.scores, -incomp.scores)
    # The score is the q95 JPEG size in kB (ddpo-pytorch).
    assert incomp.scores[1].item() == pytest.approx(jpeg_size_kb(to_uint8_hwc(noise)[0], 95))
    assert incomp.details[0]["jpeg_kb"] == pytest.approx(incomp.scores[0].item())
    assert build_reward("jpeg_compressibility").range == (-math.inf, 0.0)


def test_jpeg_batch_size_invariant():
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = build_reward("jpeg_incompressibility")(images, list("abcde"), None).scores
    b = build_reward({"name": "jpeg_incompressibility", "batch_size": 2})(images, list("abcde"), None).scores
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- OCR


def test_ocr_definition_known_answers():
    assert quoted_target('a sign that says "Hello World" and "x"') == "Hello World"
    assert quoted_target("no quotes here") is None and quoted_target('empty ""') is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_score("HELLO", "hello") == 1.0
    assert ocr_score("xx Hello World!", "helloworld") == 1.0  # substring, spaces removed, lower-cased
    assert ocr_score("HELO", "hello") == pytest.approx(0.8)
    # tesseract separates and ends lines with newlines: layout, not text
    assert ocr_score("hello\nworld\n", "hello world") == 1.0 and ocr_score("helo\n", "hello") == pytest.approx(0.8)
    assert ocr_score("", "hello") == 0.0 and ocr_score("completely different text", "ab") == 0.0


def test_ocr_rapidocr_reads_rendered_word():
    images = torch.stack([render_text("HELLO"), render_text("HELLO"), render_text("HELLO")])
    prompts = ['a sign that says "HELLO"', 'a sign that says "WORLD"', "a sign without quoted text"]
    reward = build_reward("ocr")
    out = reward(images, prompts, None)
    assert out.scores[0].item() == 1.0
    assert out.scores[1].item() < 0.5
    assert math.isnan(out.scores[2].item()) and out.details[2]["target"] is None
    assert out.details[0]["read"].upper().replace(" ", "") == "HELLO"
    # NaN is "not applicable", not a failure, inside a MultiReward.
    m = MultiReward([reward])(images[2:], prompts[2:], None)
    assert math.isnan(m.rewards[0, 0].item()) and m.failures["ocr"] == 0


@pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract binary not installed (apt-get install tesseract-ocr)"
)
def test_ocr_tesseract_backend():
    pytest.importorskip("pytesseract")
    images = torch.stack([render_text("HELLO"), render_text("HELLO")])
    out = build_reward({"name": "ocr", "kwargs": {"backend": "tesseract"}})(
        images, ['"HELLO"', '"WORLD"'], None
    )
    assert out.scores[0].item() == 1.0 and out.scores[1].item() < 0.5


def test_ocr_unknown_backend():
    with pytest.raises(ValueError, match="backend='paddle'.*'rapidocr', 'tesseract'"):
        build_reward({"name": "ocr", "kwargs": {"backend": "paddle"}})


# ------------------------------------------------------------------------------------------- shapes


def test_shapes_reward_scores_clean_renders_one():
    pytest.importorskip("diffalign.shapes.verifier")
    from diffalign.shapes.prompts import prompt_set
    from diffalign.shapes.render import render_batch

    prompts = prompt_set("held_in", n=4, seed=0)
    images = render_batch(prompts, size=64, seed=0)
    out = build_reward("shapes")(images, prompts, None)
    assert out.scores.tolist() == [1.0] * 4 and len(out.details) == 4
    # A render of another caption does not score 1 against a mismatching prompt.
    wrong = build_reward("shapes")(render_batch(["two red circles"], size=64), ["a blue square"], None)
    assert wrong.scores.item() < 1.0


def test_shapes_soft_reward_is_the_shaped_verifier():
    from diffalign.shapes.prompts import prompt_set
    from diffalign.shapes.render import render_batch
    from diffalign.shapes.verifier import soft_score_images

    prompts = prompt_set("held_in", n=6, seed=1)
    images = (render_batch(prompts, size=32, seed=1) * 0.7 + 0.15).clamp(0, 1)  # desaturated: criteria move
    reward = build_reward({"name": "shapes_soft", "kwargs": {"temperature": 2.0}})
    out = reward(images, prompts, None)
    assert reward.name == "shapes_soft" and reward.range == (0.0, 1.0)
    assert torch.equal(out.scores, soft_score_images(images, prompts, temperature=2.0)[0])
    assert "criteria" in out.details[0]
    # Toward temperature 0 it is the verifier.
    cold = build_reward({"name": "shapes_soft", "kwargs": {"temperature": 1e-4}})(images, prompts, None).scores
    assert torch.equal(cold, build_reward("shapes")(images, prompts, None).scores)
