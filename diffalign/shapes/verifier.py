"""Verifier of the built-in shapes world: a GenEval-like scorer of an image against its prompt.

Image analysis: a pixel is *foreground* when its chroma (max - min channel) is at least
``chroma_threshold``, and takes the palette colour nearest in hue (the six colours are 60 degrees
apart, and blending with a grey background keeps a pixel's hue, so blurry edges keep their colour).
Connected components of one colour (8-connectivity) smaller than ``min_area_frac`` of the image are
ignored as specks. Each component's shape comes from its soft coverage (chroma, lightly smoothed,
normalised by the component's own peak, so blur and desaturation matter little): the fill ratio of
its sub-pixel extent (square ~1, circle ~pi/4, upright triangle ~1/2-0.7) and how low its mass sits
in that extent (an upright triangle's 2/3 down, other shapes 1/2).

Criteria (booleans in ``details["criteria"]``), for each object group ``i`` of the prompt:
``object_i`` a component of the shape exists (any colour), ``color_i`` (coloured groups) one exists
in the requested colour, ``count_i`` exactly ``count`` components match the group; ``relation``
every matching centroid of group 0 stands in the relation to every one of group 1 along the dominant
axis (|primary offset| >= |secondary offset| and >= ``relation_margin_frac`` of the side); and
``no_extra`` every component matches a group. The score is the fraction of criteria met (dense
signal for RL); ``strict`` (all met) is GenEval's binary per-prompt correctness.

:func:`soft_score_images` is a *shaped* verifier for training: each boolean criterion becomes a number in
[0, 1] that moves smoothly with the image features the boolean thresholds (a component's shape
probability is a product of sigmoids of its ``fill`` / ``low`` margins to the classifier's boundaries;
counts use the sum of those probabilities; relations the sigmoid of the position margins). As its
``temperature`` goes to 0 it becomes :func:`score_images`. Its use is reward shaping (Ng et al. 1999 in
spirit, not their potential form): a base model whose blobs sit far from a boundary gets a gradient toward
it from every sample, where the boolean criterion is flat.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage, special

from diffalign.shapes.prompts import COLORS, SHAPES, PromptSpec, parse_prompt
from diffalign.shapes.render import PALETTE

__all__ = ["analyse", "classify_shape", "shape_probabilities", "check", "soft_check", "verify", "score_images",
           "soft_score_images", "DEFAULTS", "SOFT_SCALES", "SHAPE_PROTOTYPES"]

DEFAULTS = {"chroma_threshold": 0.3, "min_area_frac": 0.008, "relation_margin_frac": 0.04}
# Shape boundaries, tuned on clean, blurred and noisy renders at 32 and 64 px (see classify_shape).
_SQUARE_FILL = 0.875
_TRIANGLE_FILL = 0.7
_TRIANGLE_LOW = 0.55
_FEATURE_SIGMA = 0.6  # pixels
_ALPHA_FLOOR = 0.15  # chroma counted as background when measuring coverage (noise floor)
# Sigmoid scales of the soft verifier at temperature 1: fill and lowness (fractions of the extent) and the
# relation margin (fraction of the image side). Roughly the spread of a blob's features between samples.
SOFT_SCALES = {"fill": 0.05, "low": 0.02, "relation": 0.02}


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, np.mod((g - b) / c, 6.0), np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


_PALETTE_HUES = _hue_degrees(np.asarray([PALETTE[c] for c in COLORS], np.float32) / 255.0)


def analyse(images: np.ndarray, chroma_threshold: float = DEFAULTS["chroma_threshold"],
            min_area_frac: float = DEFAULTS["min_area_frac"]) -> Dict[str, np.ndarray]:
    """Find coloured shape components in a batch.

    Args:
        images: float ``[B, H, W, 3]`` in ``[0, 1]``.

    Returns:
        dict of 1-D arrays over all kept components, sorted by ``image``: ``image`` (batch index),
        ``color`` (index into ``COLORS``), ``shape`` (index into ``SHAPES``), ``cx``, ``cy``
        (centroid in pixels, continuous coordinates), ``area`` (pixels), and the shape features
        ``fill`` and ``low``.
    """
    images = np.asarray(images, dtype=np.float32)
    B, H, W, _ = images.shape
    chroma = images.max(-1) - images.min(-1)
    fg = chroma >= chroma_threshold
    color = np.full((B, H, W), -1, np.int64)
    d = np.abs(_hue_degrees(images[fg])[:, None] - _PALETTE_HUES)
    color[fg] = np.argmin(np.minimum(d, 360.0 - d), axis=-1)
    # One stacked labelling: axis 0 is the colour, axis 1 the image; neither connects components.
    masks = color[None] == np.arange(len(COLORS))[:, None, None, None]
    structure = np.zeros((3, 3, 3, 3), bool)
    structure[1, 1] = True
    labels, n = ndimage.label(masks, structure=structure)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(area >= max(3.0, min_area_frac * H * W))
    keep = keep[keep > 0]
    # Features are read from lightly smoothed chroma: denoises, and renders look like generations.
    smooth = ndimage.gaussian_filter(chroma, sigma=(0, _FEATURE_SIGMA, _FEATURE_SIGMA))
    slices = ndimage.find_objects(labels)
    rows = []
    for lab in keep:
        k_sl, b_sl, y_sl, x_sl = slices[lab - 1]
        k, b = k_sl.start, b_sl.start
        y0, y1 = max(y_sl.start - 1, 0), min(y_sl.stop + 1, H)
        x0, x1 = max(x_sl.start - 1, 0), min(x_sl.stop + 1, W)
        own = labels[k, b, y0:y1, x0:x1] == lab
        c = smooth[b, y0:y1, x0:x1]
        inside = np.sort(c[own])
        peak = max(float(inside[int(0.9 * (len(inside) - 1))]), chroma_threshold)
        # Soft coverage in [0, 1] so sizes are sub-pixel and survive blur (mass is conserved);
        # pixels of other components are not this one's.
        alpha = np.clip((c - _ALPHA_FLOOR) / (peak - _ALPHA_FLOOR), 0.0, 1.0) * (own | ~fg[b, y0:y1, x0:x1])
        mass = alpha.sum()
        if mass < 1.0:
            continue  # a faint speck that only passed the threshold through noise
        row_profile, col_profile = alpha.max(axis=1), alpha.max(axis=0)
        width, height = col_profile.sum(), row_profile.sum()
        ys = np.arange(y0, y1) + 0.5
        xs = np.arange(x0, x1) + 0.5
        cy = float(alpha.sum(axis=1) @ ys / mass)
        cx = float(alpha.sum(axis=0) @ xs / mass)
        fill = mass / (width * height)
        # An upright triangle's mass sits low in its extent (2/3 down); symmetric shapes at 1/2.
        low = (cy - float(row_profile @ ys / height)) / height + 0.5
        rows.append((b, k, cx, cy, area[lab], fill, low))
    if not rows:
        return {"image": np.zeros(0, np.int64), "color": np.zeros(0, np.int64), "shape": np.zeros(0, np.int64),
                "cx": np.zeros(0), "cy": np.zeros(0), "area": np.zeros(0, np.int64),
                "fill": np.zeros(0), "low": np.zeros(0)}
    arr = np.asarray(rows, dtype=np.float64)
    order = np.argsort(arr[:, 0], kind="stable")
    arr = arr[order]
    fill, low = arr[:, 5], arr[:, 6]
    return {
        "image": arr[:, 0].astype(np.int64),
        "color": arr[:, 1].astype(np.int64),
        "shape": classify_shape(fill, low),
        "cx": arr[:, 2],
        "cy": arr[:, 3],
        "area": arr[:, 4].astype(np.int64),
        "fill": fill,
        "low": low,
    }


def classify_shape(fill: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Shape index (into ``SHAPES``) from bounding-box fill and centroid lowness.

    Clean fills: square ~1.0, circle ~0.79, triangle ~0.55-0.7 (small triangles lose their apex);
    lowness: triangle ~0.6-0.65, others 0.5. Boundaries were set on clean, blurred and noisy renders. Aspect ratio
    is not read (the renderer draws shapes as wide as tall): a solid bar is a "square", a flat ellipse a "circle".
    """
    triangle = (low > _TRIANGLE_LOW) | (fill < _TRIANGLE_FILL)
    return np.where(triangle, 2, np.where(fill >= _SQUARE_FILL, 1, 0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(np.asarray(x, dtype=np.float64))


#: ``(fill, low)`` of each shape drawn exactly, in ``SHAPES`` order: a disc fills pi/4 of its box, a square all of
#: it, an upright triangle half, with its mass 2/3 down (clean renders: circle 0.79-0.80 / 0.50, square 1.00 / 0.50,
#: triangle 0.57-0.67 / 0.62-0.65 at 64 and 32 pixels)
SHAPE_PROTOTYPES = ((np.pi / 4, 0.5), (1.0, 0.5), (0.5, 2.0 / 3.0))


def _raw_shape_probabilities(fill: np.ndarray, low: np.ndarray, temperature: float) -> np.ndarray:
    tf, tl = temperature * SOFT_SCALES["fill"], temperature * SOFT_SCALES["low"]
    not_tri = (1.0 - _sigmoid((low - _TRIANGLE_LOW) / tl)) * (1.0 - _sigmoid((_TRIANGLE_FILL - fill) / tf))
    sq = _sigmoid((fill - _SQUARE_FILL) / tf)
    # Columns in SHAPES order: circle, square, triangle (the indices classify_shape returns).
    return np.stack([not_tri * (1.0 - sq), not_tri * sq, 1.0 - not_tri], axis=-1)


def shape_probabilities(fill: np.ndarray, low: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Soft :func:`classify_shape`: ``[N, 3]`` shape memberships in ``[0, 1]`` over ``SHAPES``.

    The hard rule is "triangle if ``low > 0.55`` or ``fill < 0.7``, else square if ``fill >= 0.875``, else
    circle"; each comparison becomes a sigmoid of its margin over ``temperature * SOFT_SCALES``, and the
    "or" the probabilistic union. Each column is then divided by its value at the shape's exact
    :data:`SHAPE_PROTOTYPES` and capped at 1, so that a clean shape has membership 1 in its class. Uncalibrated,
    a clean circle (its fill between two boundaries 0.09 apart from it, at sigmoid scale 0.05) had 0.66 and a
    clean square 0.85, so the soft count of four clean circles was 2.7, and the shaped verifier scored "four
    circles" highest with one circle and "three circles" with four. Rows no longer sum to 1 near a boundary. At
    ``temperature -> 0`` the calibration tends to 1 and the argmax is :func:`classify_shape`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use score_images for the hard verifier")
    fill, low = np.asarray(fill, np.float64), np.asarray(low, np.float64)
    raw = _raw_shape_probabilities(fill, low, temperature)
    proto = np.asarray(SHAPE_PROTOTYPES, np.float64)
    at_prototype = np.diagonal(_raw_shape_probabilities(proto[:, 0], proto[:, 1], temperature))
    return np.minimum(raw / at_prototype, 1.0)


def _relation_holds(a: List[Tuple[float, float]], b: List[Tuple[float, float]], relation: str,
                    margin: float) -> bool:
    if not a or not b:
        return False
    for ax, ay in a:
        for bx, by in b:
            primary, secondary = {
                "left of": (bx - ax, by - ay),
                "right of": (ax - bx, by - ay),
                "above": (by - ay, bx - ax),
                "below": (ay - by, bx - ax),
            }[relation]
            if primary < margin or primary < abs(secondary):
                return False
    return True


def check(spec: PromptSpec, found: Sequence[Tuple[str, str, float, float]], side: float,
          relation_margin_frac: float = DEFAULTS["relation_margin_frac"]) -> Tuple[float, Dict]:
    """Score detected objects ``(color, shape, cx, cy)`` against a spec; returns ``(score, details)``."""
    criteria: Dict[str, bool] = {}
    matched = [False] * len(found)
    members: List[List[Tuple[float, float]]] = []
    for i, o in enumerate(spec.objects):
        same_shape = [j for j, f in enumerate(found) if f[1] == o.shape]
        group = [j for j in same_shape if o.color is None or found[j][0] == o.color]
        for j in group:
            matched[j] = True
        members.append([(found[j][2], found[j][3]) for j in group])
        criteria[f"object_{i}"] = bool(same_shape)
        if o.color is not None:
            criteria[f"color_{i}"] = bool(group)
        criteria[f"count_{i}"] = len(group) == o.count
    if spec.relation is not None:
        criteria["relation"] = _relation_holds(members[0], members[1], spec.relation[1],
                                               relation_margin_frac * side)
    criteria["no_extra"] = all(matched)
    n_groups = len(spec.objects)
    colored = [i for i, o in enumerate(spec.objects) if o.color is not None]
    score = float(np.mean(list(criteria.values())))
    details = {
        "category": spec.category,
        "score": score,
        "strict": all(criteria.values()),
        "criteria": criteria,
        # GenEval-style summaries; None where the prompt does not ask for it.
        "objects": all(criteria[f"object_{i}"] for i in range(n_groups)),
        "colors": all(criteria[f"color_{i}"] for i in colored) if colored else None,
        "counts": all(criteria[f"count_{i}"] for i in range(n_groups)),
        "position": criteria.get("relation"),
        "no_extra": criteria["no_extra"],
        "detected": [{"color": c, "shape": s, "cx": round(x, 2), "cy": round(y, 2)} for c, s, x, y in found],
    }
    return score, details


def _analysed(images_bhwc: np.ndarray, prompts: Sequence[str], kw: Dict, extra: Sequence[str] = ()):
    """Checks the arguments, parses the prompts and finds the components; returns ``(specs, comps, bounds)``."""
    unknown = set(kw) - set(DEFAULTS) - set(extra)
    if unknown:
        raise ValueError(f"unknown verifier thresholds {sorted(unknown)}; valid: {sorted(DEFAULTS) + list(extra)}")
    if len(images_bhwc) != len(prompts):
        raise ValueError(f"got {len(images_bhwc)} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [parse_prompt(p) for p in prompts]
    comps = analyse(images_bhwc, kw.get("chroma_threshold", DEFAULTS["chroma_threshold"]),
                    kw.get("min_area_frac", DEFAULTS["min_area_frac"]))
    bounds = np.searchsorted(comps["image"], np.arange(len(specs) + 1))
    return specs, comps, bounds


def _score_array(images_bhwc: np.ndarray, prompts: Sequence[str], **kw) -> Tuple[List[float], List[Dict]]:
    specs, comps, bounds = _analysed(images_bhwc, prompts, kw)
    H, W = images_bhwc.shape[1:3]
    scores, details = [], []
    for b, spec in enumerate(specs):
        s, e = bounds[b], bounds[b + 1]
        found = [(COLORS[c], SHAPES[k], float(x), float(y)) for c, k, x, y in
                 zip(comps["color"][s:e], comps["shape"][s:e], comps["cx"][s:e], comps["cy"][s:e])]
        score, det = check(spec, found, min(H, W),
                           kw.get("relation_margin_frac", DEFAULTS["relation_margin_frac"]))
        det["prompt"] = prompts[b]
        scores.append(score)
        details.append(det)
    return scores, details


def soft_check(spec: PromptSpec, color: np.ndarray, shape_probs: np.ndarray, cx: np.ndarray, cy: np.ndarray,
               side: float, temperature: float = 1.0,
               relation_margin_frac: float = DEFAULTS["relation_margin_frac"]) -> Tuple[float, Dict[str, float]]:
    """Soft :func:`check` of one image's components; returns ``(score, criteria as floats in [0, 1])``.

    ``m[i, j]`` = P(component ``j`` belongs to object group ``i``) = colour match (hard, from hue) x the
    component's probability of the group's shape. Criteria: ``object_i`` = max_j P(shape_i); ``color_i`` =
    max_j m[i, j]; ``count_i`` = max(0, 1 - |sum_j m[i, j] - count|); ``relation`` = max_{a != b} m[0, a] m[1, b] x
    prod_{a != b} (sigmoid(primary - margin) sigmoid(primary - |secondary|))^(e[a, b]) over pairs of distinct
    components, with exponent ``e[a, b] = m[0, a] m[1, b] (1 - m[1, a]) (1 - m[0, b])``: a pair counts as far as
    each component belongs to its own group only. When the groups share a colour (about 1 in 6 position prompts)
    every component has some membership in both (a clean circle about 0.2 of a square), and without the
    exclusivity factors the pairs circle-circle and square-as-group-0 weighed in, so a correct image scored about
    as low as its mirror image; with groups of different colours ``e = m[0, a] m[1, b]``. Margins are over
    ``temperature * SOFT_SCALES["relation"] * side`` (computed in log space, so a far-off pair of tiny weight costs
    little);
    ``no_extra`` = prod_j min(1, sum_i m[i, j]) (the groups are exclusive). With memberships in {0, 1} and margins
    far from 0 each criterion equals :func:`check`'s boolean.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use check for the hard verifier")
    n = len(color)
    groups = spec.objects
    member = np.zeros((len(groups), n))
    criteria: Dict[str, float] = {}
    for i, o in enumerate(groups):
        p_shape = shape_probs[:, SHAPES.index(o.shape)] if n else np.zeros(0)
        colour_ok = np.ones(n) if o.color is None else (color == COLORS.index(o.color)).astype(np.float64)
        member[i] = p_shape * colour_ok
        criteria[f"object_{i}"] = float(p_shape.max()) if n else 0.0
        if o.color is not None:
            criteria[f"color_{i}"] = float(member[i].max()) if n else 0.0
        criteria[f"count_{i}"] = max(0.0, 1.0 - abs(float(member[i].sum()) - o.count))
    if spec.relation is not None:
        if n == 0:
            criteria["relation"] = 0.0
        else:
            scale = temperature * SOFT_SCALES["relation"] * side
            primary, secondary = {
                "left of": (cx[None, :] - cx[:, None], cy[None, :] - cy[:, None]),
                "right of": (cx[:, None] - cx[None, :], cy[:, None] - cy[None, :]),
                "above": (cy[None, :] - cy[:, None], cx[None, :] - cx[:, None]),
                "below": (cy[:, None] - cy[None, :], cx[:, None] - cx[None, :]),
            }[spec.relation[1]]  # [a (group 0 candidate), b (group 1 candidate)]
            log_holds = (special.log_expit((primary - relation_margin_frac * side) / scale)
                         + special.log_expit((primary - np.abs(secondary)) / scale))
            weight = member[0][:, None] * member[1][None, :]
            np.fill_diagonal(weight, 0.0)  # a component is not paired with itself
            exclusive = weight * (1 - member[1])[:, None] * (1 - member[0])[None, :]
            criteria["relation"] = float(weight.max() * np.exp((exclusive * log_holds).sum()))
    criteria["no_extra"] = float(np.prod(np.minimum(member.sum(axis=0), 1.0))) if n else 1.0
    return float(np.mean(list(criteria.values()))), criteria


def _soft_score_array(images_bhwc: np.ndarray, prompts: Sequence[str], **kw) -> Tuple[List[float], List[Dict]]:
    temperature = float(kw.get("temperature", 1.0))
    specs, comps, bounds = _analysed(images_bhwc, prompts, kw, extra=("temperature",))
    probs = shape_probabilities(comps["fill"], comps["low"], temperature)
    side = float(min(images_bhwc.shape[1:3]))
    scores, details = [], []
    for b, spec in enumerate(specs):
        s, e = bounds[b], bounds[b + 1]
        score, criteria = soft_check(spec, comps["color"][s:e], probs[s:e], comps["cx"][s:e], comps["cy"][s:e],
                                     side, temperature,
                                     kw.get("relation_margin_frac", DEFAULTS["relation_margin_frac"]))
        scores.append(score)
        details.append({"prompt": prompts[b], "category": spec.category, "score": score, "criteria": criteria})
    return scores, details


def verify(image, prompt: str, **thresholds) -> Tuple[float, Dict]:
    """Score one ``uint8 [H, W, 3]`` image (a float image in [0, 1] is accepted too) against a prompt.

    Returns ``(score in [0, 1], details)``; see the module docstring for the criteria.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    scores, details = _score_array(img[None], [prompt], **thresholds)
    return scores[0], details[0]


def _to_bhwc(images: torch.Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"images must be at least 16x16, got {tuple(images.shape[-2:])}")
    return images.detach().to("cpu", torch.float32).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def score_images(images: torch.Tensor, prompts: Sequence[str], **thresholds) -> Tuple[torch.Tensor, List[Dict]]:
    """Score a batch: ``images`` float ``[B, 3, H, W]`` in ``[0, 1]`` (H, W >= 16), one prompt each.

    Returns ``(scores [B] float32, details)`` with one details dict per image (criteria booleans,
    ``strict``, GenEval-style summaries, the detected objects).
    """
    scores, details = _score_array(_to_bhwc(images), list(prompts), **thresholds)
    return torch.tensor(scores, dtype=torch.float32), details


def soft_score_images(images: torch.Tensor, prompts: Sequence[str], temperature: float = 1.0,
                      **thresholds) -> Tuple[torch.Tensor, List[Dict]]:
    """The shaped verifier (module docstring, :func:`soft_check`) on a batch, like :func:`score_images`.

    Returns ``(scores [B] float32 in [0, 1], details)``; each details dict holds the soft ``criteria``.
    ``temperature`` scales every sigmoid (``SOFT_SCALES``); toward 0 the scores become the verifier's.
    """
    scores, details = _soft_score_array(_to_bhwc(images), list(prompts), temperature=temperature, **thresholds)
    return torch.tensor(scores, dtype=torch.float32), details
