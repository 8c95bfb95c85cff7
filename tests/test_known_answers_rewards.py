"""Known answers for the reward code and the shapes world, each computed by hand (or with PIL / numpy directly).

Every test here pins a behaviour that a small, realistic bug (a mutant) broke without any other test noticing
(see the mutation log of the test-strengthening pass). What is pinned:

* ``weighted_sum`` with negative weights (``rewards/multi.py`` docstring: the renormalised row keeps the total
  *absolute* weight, ``s_i = sum_V w_r x_ir * sum_r |w_r| / sum_V |w_r|``; Flow-GRPO's ``avg`` is the plain
  weighted sum, research/grpo_family.md section 1.5) and a negative spec weight reaching the matrix unchanged.
* ``MultiReward`` failure accounting under ``on_error="skip"``: every NaN / +inf / -inf entry is counted, a
  wrong number of detail dicts is a failure, and a spec's ``allow_nan: false`` overrides a reward's
  ``allows_nan=True``.
* transforms: a chain is applied in list order, nested ``kwargs`` are honoured, ``clip`` with one bound,
  ``lsc`` with ``[B, M]`` references uses the mean reference.
* registry / base: a factory receives the spec's ``batch_size``; ``FunctionReward`` chunks slice the metadata
  and pad missing details per chunk; pixel statistics clamp images to [0, 1]; a flat image's statistic is
  exactly 0.
* JPEG (DDPO, research/grpo_family.md section 1.5: quality-95 JPEG size in kB, 1 kB = 1000 bytes; ddpo-pytorch
  ``-size``): the kB unit, 8-bit quantisation by rounding, the declared range.
* colourfulness (Hasler & Suesstrunk 2003, M^(3)): ``sqrt(std_rg^2 + std_yb^2)``, not ``std_rg + std_yb``;
  contrast: ITU-R BT.601 luma weights (0.299, 0.587, 0.114).
* OCR (Flow-GRPO, research/grpo_family.md section 1.5): rapidocr receives BGR and only text read with
  confidence > ``min_confidence`` counts; a whitespace-only quoted target is "not applicable".
* remote: a declared-NaN score travels as ``null`` and comes back NaN; the server refuses inf; the client refuses
  an answer with the wrong number of scores.
* shapes verifier (``diffalign/shapes/verifier.py`` docstrings): inclusive thresholds (chroma >= 0.3, area >=
  0.008 H W, relation offset >= margin and >= |secondary|, square fill >= 0.875; triangle only for low > 0.55 or
  fill < 0.7), 8-connected components, centroids at pixel centres, the margin taken of the shorter side,
  "above" = smaller y, exact counts, float images accepted by ``verify``.
* shapes prompts / renderer: ``prompt_set`` quotas for n not a multiple of the categories, sampler state checked
  against categories and weights, both held-out rules, counts 1..4, the triangle centroid (a third up from the
  base) and area (half its box), per-index seeding of ``render_batch``, the 3% border of layouts.
"""

import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.types import RewardOutput
from rewards import MultiReward, RewardError, build_reward, build_transform, register_reward, weighted_sum
from rewards.registry import REWARDS

NAN = float("nan")
INF = float("inf")


class _Fixed:
    """A reward returning fixed scores (and optionally detail dicts) whatever the images."""

    differentiable = False
    trainable = False
    range = (-INF, INF)

    def __init__(self, values, name="fixed", allows_nan=False, details=None):
        self.values, self.name, self.allows_nan, self.details = list(values), name, allows_nan, details

    def __call__(self, images, prompts, metadata):
        return RewardOutput(scores=torch.tensor(self.values, dtype=torch.float32), details=self.details)


def _images(b=4, size=8):
    return torch.zeros(b, 3, size, size), [f"p{i}" for i in range(b)]


# ------------------------------------------------------------------------------------------- weighted_sum


def test_weighted_sum_with_negative_weights():
    w = [1.0, -2.0, 1.0]  # sum |w| = 4, sum w = 0
    m = torch.tensor([[2.0, 3.0, 1.0], [2.0, 3.0, NAN], [NAN, 3.0, NAN]])
    r = weighted_sum(m, w)
    # row 0: 2 - 6 + 1 = -3 (no NaN: the plain weighted sum)
    # row 1: (2 - 6) * 4 / (1 + 2) = -16/3;   row 2: -6 * 4 / 2 = -12
    assert r.tolist() == pytest.approx([-3.0, -16.0 / 3.0, -12.0])


def test_negative_spec_weight_reaches_the_matrix():
    images, prompts = _images(2)
    reg = "_ka_fixed_weight"
    register_reward(reg)(lambda **kw: _Fixed([0.5, 0.25], name=reg))
    try:
        out = MultiReward([{"name": reg, "weight": -0.5}, {"name": reg, "label": "b", "weight": 2.0}])(
            images, prompts
        )
    finally:
        REWARDS.pop(reg, None)
    assert out.weights.tolist() == [-0.5, 2.0]
    # -0.5 * x + 2 * x = 1.5 x
    assert out.weighted_sum().tolist() == pytest.approx([0.75, 0.375])


# ------------------------------------------------------------------------------------------- MultiReward failures


def test_skip_counts_every_bad_entry_including_negative_inf():
    images, prompts = _images(4)
    multi = MultiReward([_Fixed([1.0, NAN, -INF, INF], name="bad")])
    multi.specs[0].on_error = "skip"
    with pytest.warns(RuntimeWarning, match="failed on 3 of 4 samples"):
        out = multi(images, prompts)
    col = out.rewards[:, 0]
    assert col[0].item() == 1.0 and torch.isnan(col[1:]).all()
    assert out.failures["bad"] == 3 and multi.total_failures["bad"] == 3
    # -inf alone is a failure too (raise policy names it)
    with pytest.raises(RewardError, match=r"returned inf at indices \[1\]"):
        MultiReward([_Fixed([1.0, -INF, 0.0, 0.0], name="neg")])(images, prompts)


def test_wrong_number_of_detail_dicts_is_a_failure():
    images, prompts = _images(3)
    bad = _Fixed([1.0, 2.0, 3.0], name="det", details=[{}, {}])
    with pytest.raises(RewardError, match="returned 2 detail dicts for 3 samples"):
        MultiReward([bad])(images, prompts)
    multi = MultiReward([bad])
    multi.specs[0].on_error = "skip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = multi(images, prompts)
    assert torch.isnan(out.rewards).all() and out.failures["det"] == 3


def test_spec_allow_nan_false_overrides_a_reward_that_allows_nan():
    reg = "_ka_allows_nan"
    register_reward(reg)(lambda **kw: _Fixed([1.0, NAN, 2.0], name=reg, allows_nan=True))
    images, prompts = _images(3)
    try:
        declared = MultiReward([{"name": reg, "on_error": "skip"}])(images, prompts)
        assert declared.failures[reg] == 0  # the reward declares NaN legal: "not applicable"
        strict = MultiReward([{"name": reg, "on_error": "skip", "allow_nan": False}])
        with pytest.warns(RuntimeWarning, match="failed on 1 of 3"):
            out = strict(images, prompts)
        assert out.failures[reg] == 1
        with pytest.raises(RewardError, match="NaN at indices"):
            MultiReward([{"name": reg, "allow_nan": False}])(images, prompts)
    finally:
        REWARDS.pop(reg, None)


# ------------------------------------------------------------------------------------------- transforms


def test_transform_chain_is_applied_in_list_order():
    chain = build_transform([{"name": "affine", "scale": 2.0}, {"name": "clip", "max": 1.0}])
    # 0.8 -> 1.6 -> 1.0   (the reverse order would give 0.8 -> 0.8 -> 1.6)
    assert chain(torch.tensor([0.8, -0.3])).tolist() == pytest.approx([1.0, -0.6])


def test_transform_nested_kwargs_and_single_bound_clip():
    t = build_transform({"name": "affine", "kwargs": {"scale": 3.0, "shift": 1.0}})
    assert t(torch.tensor([2.0])).tolist() == [7.0]
    only_max = build_transform({"name": "clip", "max": 1.0})
    assert only_max(torch.tensor([2.0, -5.0])).tolist() == [1.0, -5.0]
    only_min = build_transform({"name": "clip", "min": 0.0})
    assert only_min(torch.tensor([2.0, -5.0])).tolist() == [2.0, 0.0]


def test_lsc_with_several_references_uses_their_mean():
    from rewards.transforms import lsc

    # mean reference 1 -> log sigmoid(1 - 1) = log 1/2;  mean 0.5 -> log sigmoid(0.5)
    out = lsc(torch.tensor([1.0, 1.0]), reference=torch.tensor([[0.0, 2.0], [0.0, 1.0]]))
    assert out.tolist() == pytest.approx([math.log(0.5), math.log(1 / (1 + math.exp(-0.5)))])


# ------------------------------------------------------------------------------------------- registry and base


def test_factory_receives_the_spec_batch_size():
    for name in ("jpeg_incompressibility", "contrast", "colorfulness"):
        assert build_reward({"name": name, "batch_size": 2}).batch_size == 2, name


def test_function_reward_chunks_slice_metadata_and_pad_details():
    from rewards.base import FunctionReward

    calls = []

    def fn(images, prompts, metadata):
        calls.append(len(metadata))
        details = [{"p": p} for p in prompts] if prompts[0] != "p4" else None  # the last chunk: no details
        return RewardOutput(scores=torch.tensor([float(m["v"]) for m in metadata]), details=details)

    images, prompts = _images(5)
    out = FunctionReward(fn, name="md", batch_size=2)(images, prompts, [{"v": i} for i in range(5)])
    assert calls == [2, 2, 1]
    assert out.scores.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out.details == [{"p": "p0"}, {"p": "p1"}, {"p": "p2"}, {"p": "p3"}, {}]


def test_pixel_statistics_clamp_images_and_are_exactly_zero_when_flat():
    over = torch.zeros(1, 3, 4, 4)
    over[:, 0] = 2.0  # clamped to a flat pure red: 0.3 * sqrt(1 + 1/4)
    assert build_reward("colorfulness")(over, ["a"]).scores.item() == pytest.approx(0.3 * 1.25**0.5, rel=1e-6)
    from rewards.colorfulness import colorfulness_score
    from rewards.contrast import rms_contrast

    flat = torch.full((1, 3, 4, 4), 0.25)
    assert rms_contrast(flat).item() == 0.0 and colorfulness_score(torch.zeros(1, 3, 4, 4)).item() == 0.0


# ------------------------------------------------------------------------------------------- JPEG


def test_jpeg_size_is_in_kilobytes_of_1000_bytes():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    expected_kb = len(buf.getvalue()) / 1000.0
    images = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    out = build_reward("jpeg_compressibility")(images, ["a"])
    assert out.scores.item() == pytest.approx(-expected_kb, rel=1e-6)
    assert build_reward("jpeg_incompressibility").range == (0.0, math.inf)


def test_to_uint8_rounds_to_nearest():
    from rewards.jpeg import to_uint8_hwc

    x = torch.tensor([200.7, 10.2, 0.6]).div(255.0).view(1, 3, 1, 1)
    assert to_uint8_hwc(x)[0, 0, 0].tolist() == [201, 10, 1]
    assert to_uint8_hwc(torch.tensor([1.5, -0.5, 0.5]).view(1, 3, 1, 1))[0, 0, 0].tolist()[:2] == [255, 0]


# ------------------------------------------------------------------------------------------- colourfulness, contrast


def test_colorfulness_both_opponent_channels_vary():
    from rewards.colorfulness import colorfulness_score

    # half pure red, half pure blue: rg = 1 | 0 (mean 1/2, std 1/2); yb = 1/2 | -1 (mean -1/4, std 3/4)
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0, :, :2] = 1.0
    x[:, 2, :, 2:] = 1.0
    expected = math.sqrt(0.25 + 0.5625) + 0.3 * math.sqrt(0.25 + 0.0625)  # 1.0690935...
    assert colorfulness_score(x).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("channel, weight", [(0, 0.299), (1, 0.587), (2, 0.114)])
def test_contrast_uses_bt601_luma(channel, weight):
    from rewards.contrast import rms_contrast

    x = torch.zeros(1, 3, 4, 4)
    x[:, channel, :2, :2] = 1.0  # a quarter of the pixels: std = w * sqrt(1/4 * 3/4)
    assert rms_contrast(x).item() == pytest.approx(weight * math.sqrt(3 / 16), rel=1e-6)


# ------------------------------------------------------------------------------------------- OCR


class _FakeRapidOCR:
    def __init__(self, result):
        self.result, self.seen = result, []

    def __call__(self, image, use_det=True, use_cls=False, use_rec=True):
        self.seen.append(np.array(image))
        return self.result, None


def test_ocr_rapidocr_gets_bgr_and_keeps_only_confident_text(monkeypatch):
    import rewards.ocr as ocr

    fake = _FakeRapidOCR([[None, "HEL", 0.9], [None, "junk", 0.0], [None, "LO", 0.5]])
    monkeypatch.setattr(ocr, "_RAPIDOCR_ENGINE", fake)
    reward = ocr.OcrReward()
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 255  # pure red in RGB
    assert reward.read_text(image) == "HELLO"  # confidence 0.0 is not > min_confidence = 0
    assert fake.seen[-1][0, 0].tolist() == [0, 0, 255]  # OpenCV order
    strict = ocr.OcrReward(min_confidence=0.5)
    assert strict.read_text(image) == "HEL"  # 0.5 is not > 0.5


def test_ocr_whitespace_only_quote_is_not_applicable(monkeypatch):
    import rewards.ocr as ocr

    assert ocr.quoted_target('a sign that says "   "') is None
    monkeypatch.setattr(ocr, "_RAPIDOCR_ENGINE", _FakeRapidOCR([[None, "x", 0.9]]))
    out = ocr.OcrReward()(torch.zeros(2, 3, 8, 8), ['says "   "', 'says "x"'])
    assert math.isnan(out.scores[0].item()) and out.scores[1].item() == 1.0
    assert out.details[0] == {"target": None, "read": None}


# ------------------------------------------------------------------------------------------- remote


def test_remote_not_applicable_nan_travels_as_null_and_inf_is_refused_by_the_server():
    from rewards import serve_reward
    from rewards.remote import RemoteReward

    images, prompts = _images(3)
    with serve_reward(_Fixed([1.0, NAN, 2.0], name="judge", allows_nan=True), port=0, block=False) as server:
        out = RemoteReward(url=server.url, retries=0, timeout=10.0)(images, prompts)
    assert out.scores[0].item() == 1.0 and math.isnan(out.scores[1].item()) and out.scores[2].item() == 2.0
    with serve_reward(_Fixed([1.0, INF, 2.0], name="judge"), port=0, block=False) as server:
        with pytest.raises(RewardError, match=r"HTTP 422: reward 'judge' returned NaN/inf at indices \[1\]"):
            RemoteReward(url=server.url, retries=0, timeout=10.0)(images, prompts)


def test_remote_answer_with_too_few_scores_is_an_error():
    import http.server
    import threading

    from rewards.remote import RemoteReward

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"scores": [0.5]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(RewardError, match="answered 1 scores for 2 samples"):
            RemoteReward(url=url, retries=0, timeout=5.0)(*_images(2))
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------------- shapes verifier


def _canvas(h=32, w=32):
    return np.zeros((h, w, 3), np.float32)


def test_shape_classifier_boundaries():
    from diffalign.shapes.verifier import classify_shape

    # The rule (classify_shape / shape_probabilities docstrings): triangle if low > 0.55 or fill < 0.7, else
    # square if fill >= 0.875, else circle. SHAPES = (circle, square, triangle).
    fill = np.array([0.875, 0.8749, 0.7, 0.6999, 0.8, 0.8])
    low = np.array([0.5, 0.5, 0.5, 0.5, 0.55, 0.5501])
    assert classify_shape(fill, low).tolist() == [1, 0, 0, 2, 0, 2]


def test_chroma_and_area_thresholds_are_inclusive():
    from diffalign.shapes.verifier import verify

    # foreground is chroma >= 0.3: a block of chroma exactly 0.3 (float32) is a shape
    img = _canvas()
    img[10:20, 10:20, 0] = np.float32(0.3)
    assert verify(img, "a red square")[0] == 1.0
    # components of area >= 0.008 * H * W are kept: at 50 x 50 that is exactly 20 pixels (a 4 x 5 block)
    img = _canvas(50, 50)
    img[20:24, 20:25] = (1.0, 0.0, 0.0)
    score, det = verify(img, "a red square")
    assert [d["color"] for d in det["detected"]] == ["red"]
    img[20:24, 24] = 0.0  # 16 pixels: a speck
    assert verify(img, "a red square")[1]["detected"] == []


def test_components_are_eight_connected_and_centroids_use_pixel_centres():
    from diffalign.shapes.verifier import analyse

    img = _canvas()
    img[10:20, 4:14] = (1.0, 0.0, 0.0)  # columns 4..13, rows 10..19: centre (9.0, 15.0) in continuous coords
    img[4:8, 20:24] = (0.0, 0.0, 1.0)
    img[8:12, 24:28] = (0.0, 0.0, 1.0)  # touches the block above only at a corner: one component
    comps = analyse(img[None])
    assert comps["color"].tolist() == [0, 4]  # red, blue (COLORS order)
    assert comps["cx"][0] == pytest.approx(9.0, abs=1e-6) and comps["cy"][0] == pytest.approx(15.0, abs=1e-6)
    assert comps["area"].tolist() == [100, 32]


@pytest.mark.parametrize("bx, by, holds", [
    (18.0, 10.0, True),   # primary exactly the margin (8 px), no secondary offset
    (17.9, 10.0, False),  # just inside the margin
    (18.0, 18.0, True),   # |primary| == |secondary|: still the dominant axis
    (18.0, 18.5, False),  # secondary dominates
    (18.0, 1.5, False),   # negative secondary offset counts by its size
])
def test_relation_margin_and_dominance_are_inclusive(bx, by, holds):
    from diffalign.shapes.prompts import parse_prompt
    from diffalign.shapes.verifier import check

    spec = parse_prompt("a red circle left of a blue square")
    found = [("red", "circle", 10.0, 10.0), ("blue", "square", bx, by)]
    # side 32, margin fraction 1/4 -> margin 8 px
    _, det = check(spec, found, 32.0, relation_margin_frac=0.25)
    assert det["criteria"]["relation"] is holds


def test_above_and_below_in_image_coordinates():
    from diffalign.shapes.prompts import parse_prompt
    from diffalign.shapes.verifier import check

    found = [("red", "circle", 10.0, 4.0), ("blue", "square", 10.0, 20.0)]  # red higher up (smaller y)
    assert check(parse_prompt("a red circle above a blue square"), found, 32.0)[1]["criteria"]["relation"]
    assert not check(parse_prompt("a red circle below a blue square"), found, 32.0)[1]["criteria"]["relation"]
    assert check(parse_prompt("a blue square below a red circle"), found[::-1], 32.0)[1]["criteria"]["relation"]


def test_counts_are_exact_and_objects_ignore_colour():
    from diffalign.shapes.prompts import parse_prompt
    from diffalign.shapes.verifier import check

    three = [("red", "circle", 5.0, 5.0), ("red", "circle", 15.0, 5.0), ("red", "circle", 25.0, 5.0)]
    score, det = check(parse_prompt("two red circles"), three, 32.0)
    # object_0, color_0 met; count_0 (3 != 2) missed; no_extra met -> 3/4
    assert det["criteria"] == {"object_0": True, "color_0": True, "count_0": False, "no_extra": True}
    assert score == pytest.approx(0.75) and not det["strict"]
    score, det = check(parse_prompt("a red circle"), [("blue", "circle", 5.0, 5.0)], 32.0)
    assert det["criteria"] == {"object_0": True, "color_0": False, "count_0": False, "no_extra": False}
    assert score == pytest.approx(0.25)


def test_relation_margin_uses_the_shorter_side():
    from diffalign.shapes.verifier import score_images

    # H = 32, W = 64, margin fraction 1/2: margin 16 px (of the shorter side), not 32
    img = torch.zeros(1, 3, 32, 64)
    img[0, 0, 12:20, 6:14] = 1.0  # red square centred at x = 10
    img[0, 2, 12:20, 30:38] = 1.0  # blue square centred at x = 34: 24 px to the right
    _, det = score_images(img, ["a red square left of a blue square"], relation_margin_frac=0.5)
    assert det[0]["criteria"]["relation"] is True


def test_verify_accepts_float_images_in_unit_range():
    from diffalign.shapes.verifier import verify

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:18, 8:18] = (230, 30, 30)
    assert verify(img, "a red square")[0] == 1.0
    assert verify(img.astype(np.float32) / 255.0, "a red square")[0] == 1.0


# ------------------------------------------------------------------------------------------- shapes prompts, renderer


def test_prompt_set_quotas_when_n_is_not_a_multiple_of_the_categories():
    from diffalign.shapes.prompts import CATEGORIES, parse_prompt, prompt_set

    ps = prompt_set("held_in", 8, seed=0)
    cats = [parse_prompt(p).category for p in ps]
    # 8 over 6 categories: the first two get 2, the others 1; interleaved, so the first six are one of each
    assert len(ps) == 8 and cats[:6] == list(CATEGORIES) and cats[6:] == list(CATEGORIES[:2])


def test_sampler_state_must_match_categories_and_weights():
    from diffalign.shapes.prompts import PromptSampler

    state = PromptSampler(3, categories=["counting", "colors"], weights=[1, 3]).state_dict()
    with pytest.raises(ValueError, match="weights"):
        PromptSampler(3, categories=["counting", "colors"], weights=[1, 1]).load_state_dict(state)
    with pytest.raises(ValueError, match="categories"):
        PromptSampler(3, categories=["colors", "counting"], weights=[3, 1]).load_state_dict(state)


def test_held_out_rules_known_answers():
    from diffalign.shapes.prompts import is_held_out, parse_prompt

    assert is_held_out(parse_prompt("a yellow circle and a cyan square"))  # colour pair {yellow, cyan}
    assert is_held_out(parse_prompt("a blue square left of two red circles"))  # colour pair {red, blue}
    assert is_held_out(parse_prompt("three green squares"))  # pair (green, square)
    assert not is_held_out(parse_prompt("a red circle and a yellow square"))
    assert not is_held_out(parse_prompt("a circle and a square"))


def test_triangle_centroid_is_a_third_up_from_the_base():
    from diffalign.shapes.render import PlacedObject

    # apex at cy - size/2, base at cy + size/2; the centroid is 2/3 of the way down from the apex
    assert PlacedObject(0, "triangle", "red", 10.0, 10.0, 6.0).centroid == pytest.approx((10.0, 11.0))
    assert PlacedObject(0, "square", "red", 10.0, 10.0, 6.0).centroid == (10.0, 10.0)


def test_render_batch_seeds_each_image_by_its_index():
    from diffalign.shapes.render import render, render_batch

    batch = render_batch(["a circle", "a circle"], size=32, seed=5)
    assert not torch.equal(batch[0], batch[1])  # same prompt, different layouts
    want = render("a circle", 32, rng=np.random.default_rng([5, 1]))
    assert torch.equal(batch[1], torch.from_numpy(want).permute(2, 0, 1).float() / 255.0)


def test_prompt_counts_stay_in_one_to_four():
    from diffalign.shapes.prompts import PromptSpec, parse_prompt, perturb_spec

    with pytest.raises(ValueError, match="count=0"):
        PromptSpec(((0, "red", "circle"),), None, "counting")
    spec = parse_prompt("three red circles")
    counts = {perturb_spec(spec, np.random.default_rng(i), "count").objects[0].count for i in range(40)}
    assert counts == {2, 4}


def test_triangle_raster_has_half_the_box_area_and_boxes_keep_the_border():
    from diffalign.shapes.render import PlacedObject, draw, layout

    # an upright triangle of side 16 covers 16 * 16 / 2 = 128 pixels, its base row is 16 pixels wide
    hard = draw([PlacedObject(0, "triangle", "red", 16.0, 16.0, 16.0)], 32, antialias=False)[..., 0] > 0
    assert abs(int(hard.sum()) - 128) <= 4 and hard[23].sum() == 16
    soft = draw([PlacedObject(0, "triangle", "red", 16.0, 16.0, 16.0)], 32)[..., 0].astype(np.float64) / 230.0
    assert soft.sum() == pytest.approx(128.0, abs=2.0)
    border = 0.03 * 32  # boxes stay at least 3% of the side away from the edges
    for i in range(40):
        for p in layout("four red circles", 32, np.random.default_rng(i)):
            assert border - 1e-9 <= p.cx - p.size / 2 and p.cx + p.size / 2 <= 32 - border + 1e-9
            assert border - 1e-9 <= p.cy - p.size / 2 and p.cy + p.size / 2 <= 32 - border + 1e-9
