"""OCR reward: does the image show the text quoted in the prompt? (Flow-GRPO's ``ocr`` reward.)

Definition (Flow-GRPO ``flow_grpo/ocr.py``, re-described in research/grpo_family.md section 1.5):

* target = the text between the first pair of double quotes of the prompt, spaces removed, lower-cased;
* read = all text the OCR engine finds in the image, concatenated in reading order, spaces removed,
  lower-cased;
* reward = 1 if target is a substring of read, else ``1 - min(lev(read, target), len(target)) / len(target)``
  with ``lev`` the Levenshtein distance. Range [0, 1].

A prompt without a (non-empty) quoted text gets NaN: the reward is not applicable to it.

Backends: ``"rapidocr"`` (default; rapidocr-onnxruntime, PP-OCRv4 ONNX weights inside the wheel, one engine
per process shared by every instance) and ``"tesseract"`` (pytesseract + the ``tesseract`` binary, e.g.
Debian's ``tesseract-ocr``). Not differentiable.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from diffalign.types import RewardOutput
from rewards.base import check_inputs, score_in_batches
from rewards.jpeg import to_uint8_hwc
from rewards.registry import register_reward

__all__ = ["OcrReward", "levenshtein", "quoted_target", "ocr_score", "BACKENDS"]

BACKENDS = ("rapidocr", "tesseract")
_QUOTED = re.compile(r'"([^"]*)"')
_ENGINE_LOCK = threading.Lock()
_RAPIDOCR_ENGINE: Any = None


def quoted_target(prompt: str) -> Optional[str]:
    """Text between the first pair of double quotes, or None when there is none (or it is empty)."""
    m = _QUOTED.search(prompt)
    if m is None or not m.group(1).strip():
        return None
    return m.group(1)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalise(text: str) -> str:
    """Lower case without any whitespace: Flow-GRPO removes spaces; the line breaks tesseract puts between and
    after lines are layout, not text, and would otherwise count as edits."""
    return "".join(text.split()).lower()


def ocr_score(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward of text ``read`` against ``target`` (both normalised here)."""
    t, r = _normalise(target), _normalise(read)
    if not t:
        return float("nan")
    if t in r:
        return 1.0
    return 1.0 - min(levenshtein(r, t), len(t)) / len(t)


def _rapidocr_engine() -> Any:
    global _RAPIDOCR_ENGINE
    with _ENGINE_LOCK:
        if _RAPIDOCR_ENGINE is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:  # pragma: no cover - it is a hard dependency
                raise ImportError(
                    "the ocr reward needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime"
                ) from exc
            _RAPIDOCR_ENGINE = RapidOCR()
        return _RAPIDOCR_ENGINE


def _make_rapidocr_reader(use_det: bool, use_cls: bool, min_confidence: float) -> Callable[[np.ndarray], str]:
    engine = _rapidocr_engine()

    def read(image_rgb: np.ndarray) -> str:
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])  # rapidocr takes ndarrays as BGR (OpenCV order)
        with _ENGINE_LOCK:
            result, _ = engine(bgr, use_det=use_det, use_cls=use_cls, use_rec=True)
        if not result:
            return ""
        # With detection each item is [box, text, score]; without it, [text, score].
        texts = [(item[-2], float(item[-1])) for item in result]
        return "".join(t for t, s in texts if s > min_confidence)

    return read


def _make_tesseract_reader(config: str, lang: str) -> Callable[[np.ndarray], str]:
    try:
        import pytesseract

        pytesseract.get_tesseract_version()
    except ImportError as exc:
        raise ImportError(
            "ocr backend='tesseract' needs pytesseract and the tesseract binary: "
            "pip install pytesseract && apt-get install tesseract-ocr"
        ) from exc
    except Exception as exc:  # pytesseract.TesseractNotFoundError and friends
        raise RuntimeError(
            f"ocr backend='tesseract': the tesseract binary is not usable ({exc}); "
            "apt-get install tesseract-ocr"
        ) from exc
    from PIL import Image

    def read(image_rgb: np.ndarray) -> str:
        return pytesseract.image_to_string(Image.fromarray(image_rgb), lang=lang, config=config)

    return read


class OcrReward:
    """Normalised edit-distance OCR reward (see the module docstring). Range [0, 1]; NaN when no quotes.

    Args:
        backend: ``"rapidocr"`` or ``"tesseract"``.
        use_det: rapidocr only; False skips text detection and recognises the whole image as one line
            (about 20x faster, fine for images holding one short line of text).
        use_cls: rapidocr only; run the text-direction classifier.
        min_confidence: rapidocr only; ignore text read with confidence <= this (Flow-GRPO keeps > 0).
        tesseract_config / tesseract_lang: passed to ``pytesseract.image_to_string``.
    """

    differentiable = False
    trainable = False
    allows_nan = True
    range = (0.0, 1.0)

    def __init__(
        self,
        *,
        backend: str = "rapidocr",
        use_det: bool = True,
        use_cls: bool = False,
        min_confidence: float = 0.0,
        tesseract_config: str = "",
        tesseract_lang: str = "eng",
        batch_size: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        name: str = "ocr",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"ocr: backend={backend!r} is not valid; use one of {list(BACKENDS)}")
        self.name = name
        self.backend = backend
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        if backend == "rapidocr":
            self._read = _make_rapidocr_reader(bool(use_det), bool(use_cls), float(min_confidence))
        else:
            self._read = _make_tesseract_reader(tesseract_config, tesseract_lang)

    def read_text(self, image_rgb: np.ndarray) -> str:
        """Raw text the backend reads from one ``[H, W, 3]`` uint8 RGB image."""
        return self._read(image_rgb)

    def _score(
        self, images: torch.Tensor, prompts: List[str], metadata: List[Dict[str, Any]]
    ) -> RewardOutput:
        targets = [quoted_target(p) for p in prompts]
        arrays = to_uint8_hwc(images) if any(t is not None for t in targets) else [None] * len(prompts)
        scores, details = [], []
        for target, array in zip(targets, arrays):
            if target is None:
                scores.append(float("nan"))
                details.append({"target": None, "read": None})
                continue
            read = self._read(array)
            scores.append(ocr_score(read, target))
            details.append({"target": target, "read": read})
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), details=details)

    def __call__(
        self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[Dict[str, Any]]] = None
    ) -> RewardOutput:
        metadata = check_inputs(self.name, images, prompts, metadata)
        return score_in_batches(
            self._score, images, list(prompts), metadata, batch_size=self.batch_size, name=self.name
        )


@register_reward("ocr")
def ocr(**kwargs: Any) -> OcrReward:
    """OCR of the quoted prompt text, Flow-GRPO definition. Range [0, 1], NaN without quotes."""
    return OcrReward(**kwargs)
