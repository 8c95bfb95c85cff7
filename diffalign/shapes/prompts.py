"""Prompt grammar of the built-in shapes world: a GenEval-like small world.

A prompt names one or two *object groups*, each ``count`` (1-4) shapes (circle, square, triangle),
optionally of one colour (red, yellow, green, cyan, blue, purple), and for two groups optionally a
relation between them (left of, right of, above, below). Six categories mirror GenEval's tasks::

    single_object  "a circle"                         is the shape there (any colour)?
    two_object     "a circle and a square"            are both shapes there (any colours)?
    counting       "three green triangles"            exactly that many (count 1 is written "one")
    colors         "a yellow square"                  is the shape there in that colour?
    position       "a red circle left of a blue square"    (groups of 1-2 objects, 3 objects at most)
    color_attr     "a red circle and a blue square"   both colours bound to the right shapes

As in GenEval, ``single_object`` and ``two_object`` carry no colour: that is what makes each
category test one thing, and it lets a verifier that receives only the prompt string tell the
categories apart (``parse_prompt(spec.to_text()) == spec`` for every valid spec).

Held-out split (compositional generalization): a prompt is *held out* iff one of its coloured groups
is a pair in ``HELD_OUT_PAIRS`` (red triangle, green square, blue circle, purple triangle) or two of
its groups use a colour pair in ``HELD_OUT_COLOR_PAIRS`` ({yellow, cyan}, {red, blue}). The held-in
split never produces such a prompt and the held-out split produces only such prompts, so a model
pretrained on held-in prompts has never been asked for these combinations (every colour and every
shape still appears in held-in prompts). Colourless categories cannot be held out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "CATEGORIES",
    "COLORED_CATEGORIES",
    "ATTRIBUTES",
    "MAX_COUNT",
    "SPLITS",
    "HELD_OUT_PAIRS",
    "HELD_OUT_COLOR_PAIRS",
    "ObjectSpec",
    "PromptSpec",
    "allowed_categories",
    "parse_prompt",
    "is_held_out",
    "sample_spec",
    "perturb_spec",
    "PromptSampler",
    "prompt_set",
]

# Hue order (0, 60, ..., 300 degrees): evenly spaced so the verifier can separate them by hue alone.
COLORS: Tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: Tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS: Tuple[str, ...] = ("held_in", "held_out")
MAX_COUNT = 4

HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle"), ("purple", "triangle")})
HELD_OUT_COLOR_PAIRS = frozenset({frozenset({"yellow", "cyan"}), frozenset({"red", "blue"})})
# Categories whose prompts carry colours, hence the only ones that can be held out.
COLORED_CATEGORIES: Tuple[str, ...] = ("counting", "colors", "position", "color_attr")

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_WORD_NUMBERS = {"a": 1, "an": 1, **{w: n for n, w in _NUMBER_WORDS.items()}}


class ObjectSpec(NamedTuple):
    """One object group: ``count`` shapes of one ``color`` (``None``: any colour)."""

    count: int
    color: Optional[str]
    shape: str


def _check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


@dataclass(frozen=True)
class PromptSpec:
    """Structured prompt: ``objects`` (1-2 groups), optional ``relation`` and its ``category``.

    Attributes:
        objects: tuple of ``ObjectSpec(count, color, shape)``; plain ``(count, color, shape)``
            tuples are accepted and converted.
        relation: ``None`` or ``(0, rel, 1)``: group 0 is ``rel`` group 1 (the text order).
        category: one of ``CATEGORIES``; must match the form (see ``allowed_categories``).
    """

    objects: Tuple[ObjectSpec, ...]
    relation: Optional[Tuple[int, str, int]] = None
    category: str = ""

    def __post_init__(self):
        objects = tuple(ObjectSpec(*o) for o in self.objects)
        object.__setattr__(self, "objects", objects)
        if self.relation is not None:
            object.__setattr__(self, "relation", tuple(self.relation))
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"a prompt has 1 or 2 object groups, got {len(objects)}: {objects}")
        for o in objects:
            if not (isinstance(o.count, (int, np.integer)) and 1 <= o.count <= MAX_COUNT):
                raise ValueError(f"count={o.count!r} must be an int in 1..{MAX_COUNT}")
            if o.color is not None:
                _check_choice("color", o.color, COLORS)
            _check_choice("shape", o.shape, SHAPES)
        if len(objects) == 2:
            a, b = objects
            if (a.color, a.shape) == (b.color, b.shape):
                raise ValueError(f"the two groups must differ in colour or shape, got {objects}")
            if (a.color is None or b.color is None) and a.shape == b.shape:
                # "a circle and a red circle" could not be verified unambiguously.
                raise ValueError(f"groups without a colour need distinct shapes, got {objects}")
        if self.relation is not None:
            if len(objects) != 2 or len(self.relation) != 3 or self.relation[0] != 0 or self.relation[2] != 1:
                raise ValueError(
                    f"relation must be (0, rel, 1) over two groups (text order), got {self.relation}"
                )
            _check_choice("relation", self.relation[1], RELATIONS)
        allowed = allowed_categories(objects, self.relation)
        if not self.category and len(allowed) == 1:
            object.__setattr__(self, "category", allowed[0])
        if self.category not in allowed:
            raise ValueError(
                f"category={self.category!r} does not fit objects={objects}, relation={self.relation}; "
                f"valid categories for this form: {list(allowed)}"
            )

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)

    def to_text(self) -> str:
        """Canonical prompt text; ``parse_prompt`` inverts it exactly."""
        parts = [_group_text(o, self.category == "counting") for o in self.objects]
        if self.relation is not None:
            return f"{parts[0]} {self.relation[1]} {parts[1]}"
        return " and ".join(parts)

    def __str__(self) -> str:
        return self.to_text()


def allowed_categories(objects: Sequence[ObjectSpec], relation) -> Tuple[str, ...]:
    """Categories whose form matches these groups (only single coloured/colourless count-1 groups
    have two: written "a ..." for colors/single_object, "one ..." for counting)."""
    if len(objects) == 2:
        if relation is not None:
            return ("position",)
        if all(o.count == 1 for o in objects):
            return ("color_attr",) if all(o.color is not None for o in objects) else ("two_object",)
        return ()
    (o,) = objects
    if o.count > 1:
        return ("counting",)
    return ("colors", "counting") if o.color is not None else ("single_object", "counting")


def _group_text(o: ObjectSpec, counting: bool) -> str:
    word = _NUMBER_WORDS[o.count] if (o.count > 1 or counting) else "a"
    noun = o.shape + ("s" if o.count > 1 else "")
    return " ".join(w for w in (word, o.color, noun) if w)


_GROUP_RE = r"(a|an|one|two|three|four) (?:({colors}) )?({shapes})s?".format(
    colors="|".join(COLORS), shapes="|".join(SHAPES)
)
_PROMPT_RE = re.compile(
    r"^{g}(?:(?: and | ({rels}) ){g})?$".format(g=_GROUP_RE, rels="|".join(RELATIONS))
)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of this world back into a ``PromptSpec``.

    Case, surrounding spaces, a trailing period and a leading "a photo of" are ignored.
    Raises ``ValueError`` (with the grammar) for text outside the grammar.
    """
    t = " ".join(str(text).lower().strip().rstrip(".").split())
    t = t.removeprefix("a photo of ")
    m = _PROMPT_RE.match(t)
    if m is None:
        raise ValueError(
            f"prompt {text!r} is outside the shapes grammar: '<group>', '<group> and <group>' or "
            f"'<group> <relation> <group>', where <group> = (a|one|two|three|four) [colour] shape[s], "
            f"colours {list(COLORS)}, shapes {list(SHAPES)}, relations {list(RELATIONS)}"
        )
    w1, c1, s1, rel, w2, c2, s2 = m.groups()
    objects = [ObjectSpec(_WORD_NUMBERS[w1], c1, s1)]
    if w2 is not None:
        objects.append(ObjectSpec(_WORD_NUMBERS[w2], c2, s2))
    relation = (0, rel, 1) if rel else None
    category = ""
    if len(objects) == 1 and objects[0].count == 1:
        category = "counting" if w1 == "one" else ("colors" if c1 else "single_object")
    try:
        return PromptSpec(tuple(objects), relation, category)
    except ValueError as e:
        raise ValueError(f"prompt {text!r} parses but is not a valid prompt of this world: {e}") from None


def is_held_out(spec: PromptSpec) -> bool:
    """True iff the spec uses a held-out (colour, shape) pair or a held-out colour pair."""
    colored = [o for o in spec.objects if o.color is not None]
    if any((o.color, o.shape) in HELD_OUT_PAIRS for o in colored):
        return True
    return len(colored) == 2 and frozenset({colored[0].color, colored[1].color}) in HELD_OUT_COLOR_PAIRS


def _pairs(split: str) -> List[Tuple[str, str]]:
    held_out = split == "held_out"
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELD_OUT_PAIRS) == held_out]


def _draw_candidate(category: str, rng: np.random.Generator, split: str) -> PromptSpec:
    def shapes2():
        return [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]

    if category == "single_object":
        return PromptSpec((ObjectSpec(1, None, SHAPES[rng.integers(len(SHAPES))]),), None, category)
    if category == "two_object":
        s1, s2 = shapes2()
        return PromptSpec(((1, None, s1), (1, None, s2)), None, category)
    if category in ("colors", "counting"):
        # Single groups: draw directly from the split's pairs (no rejection needed).
        pairs = _pairs(split)
        c, s = pairs[rng.integers(len(pairs))]
        count = int(rng.integers(1, MAX_COUNT + 1)) if category == "counting" else 1
        return PromptSpec(((count, c, s),), None, category)
    if category == "color_attr":
        s1, s2 = shapes2()
        c1, c2 = (COLORS[i] for i in rng.permutation(len(COLORS))[:2])
        return PromptSpec(((1, c1, s1), (1, c2, s2)), None, category)
    if category == "position":
        # At most 3 objects so a dominant-axis layout with clear margins fits at 32 px.
        counts = [(1, 1), (2, 1), (1, 2)][rng.choice(3, p=[0.6, 0.2, 0.2])]
        while True:
            g = [(n, COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]) for n in counts]
            if g[0][1:] != g[1][1:]:
                break
        return PromptSpec(tuple(g), (0, RELATIONS[rng.integers(len(RELATIONS))], 1), category)
    raise ValueError(f"category={category!r} is not valid; choose one of {list(CATEGORIES)}")


def sample_spec(category: str, rng: np.random.Generator, split: str = "held_in") -> PromptSpec:
    """Draw one spec of ``category`` belonging to ``split`` (rejection on the held-out rule)."""
    _check_choice("split", split, SPLITS)
    _check_choice("category", category, CATEGORIES)
    if split == "held_out" and category not in COLORED_CATEGORIES:
        raise ValueError(
            f"category {category!r} has no colours, so it has no held-out prompts; "
            f"held-out categories: {list(COLORED_CATEGORIES)}"
        )
    want = split == "held_out"
    for _ in range(10_000):
        spec = _draw_candidate(category, rng, split)
        if is_held_out(spec) == want:
            return spec
    raise RuntimeError(f"could not draw a {split} prompt of category {category!r}")  # pragma: no cover


ATTRIBUTES: Tuple[str, ...] = ("color", "shape", "count", "relation")


def perturb_spec(spec: PromptSpec, rng: np.random.Generator, attribute: Optional[str] = None) -> Optional[PromptSpec]:
    """A valid spec that differs from ``spec`` in exactly one attribute (a hard negative).

    ``attribute`` is one of ``ATTRIBUTES`` or ``None`` (any that applies). Changing a count may
    change the category (``"a circle"`` -> ``"two circles"``, counting). Returns ``None`` when no
    such change exists (e.g. a relation change on a prompt without relation).
    """
    if attribute is not None:
        _check_choice("attribute", attribute, ATTRIBUTES)
    candidates: List[PromptSpec] = []
    for attr in ATTRIBUTES if attribute is None else (attribute,):
        variants = []
        for i, o in enumerate(spec.objects):
            if attr == "color" and o.color is not None:
                variants += [(i, o._replace(color=c)) for c in COLORS if c != o.color]
            elif attr == "shape":
                variants += [(i, o._replace(shape=s)) for s in SHAPES if s != o.shape]
            elif attr == "count":
                variants += [(i, o._replace(count=n)) for n in (o.count - 1, o.count + 1) if 1 <= n <= MAX_COUNT]
        relations = []
        if attr == "relation" and spec.relation is not None:
            relations = [(0, r, 1) for r in RELATIONS if r != spec.relation[1]]
        options = [(tuple(v if j == i else p for j, p in enumerate(spec.objects)), spec.relation)
                   for i, v in variants] + [(spec.objects, r) for r in relations]
        for objects, relation in options:
            try:
                allowed = allowed_categories([ObjectSpec(*o) for o in objects], relation)
                category = spec.category if spec.category in allowed else (allowed[0] if allowed else "")
                candidates.append(PromptSpec(objects, relation, category))
            except ValueError:
                continue  # the change would leave the grammar (e.g. two equal colourless shapes)
    if not candidates:
        return None
    return candidates[rng.integers(len(candidates))]


class PromptSampler:
    """Seeded, resumable stream of prompts of one split.

    Prompt ``i`` is drawn from its own generator seeded by ``(seed, split, i)``, so the stream is a
    pure function of ``(seed, split, categories, weights)`` and restoring ``position`` from
    ``state_dict()`` continues it exactly.

    Args:
        seed: stream seed.
        split: ``"held_in"`` (pretraining / training prompts) or ``"held_out"`` (novel combinations).
        categories: categories to draw from; default all of the split's categories.
        weights: relative category weights (default uniform), same length as ``categories``.
    """

    def __init__(self, seed: int = 0, split: str = "held_in", categories: Optional[Sequence[str]] = None,
                 weights: Optional[Sequence[float]] = None):
        _check_choice("split", split, SPLITS)
        if categories is None:
            categories = CATEGORIES if split == "held_in" else COLORED_CATEGORIES
        categories = tuple(categories)
        if not categories:
            raise ValueError("categories must not be empty")
        for c in categories:
            _check_choice("category", c, CATEGORIES)
            if split == "held_out" and c not in COLORED_CATEGORIES:
                raise ValueError(
                    f"category {c!r} has no held-out prompts (no colours); use {list(COLORED_CATEGORIES)}"
                )
        if weights is None:
            weights = [1.0] * len(categories)
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(categories),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"weights={weights.tolist()} must be {len(categories)} non-negative numbers with a "
                f"positive sum (one per category {list(categories)})"
            )
        self.seed = int(seed)
        self.split = split
        self.categories = categories
        self.weights = tuple(float(w) for w in weights / weights.sum())
        self.position = 0

    def spec_at(self, index: int) -> PromptSpec:
        """The spec at stream position ``index`` (does not move the stream)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        category = self.categories[rng.choice(len(self.categories), p=self.weights)]
        return sample_spec(category, rng, self.split)

    def sample_spec(self) -> PromptSpec:
        spec = self.spec_at(self.position)
        self.position += 1
        return spec

    def sample(self) -> str:
        return self.sample_spec().to_text()

    def sample_batch(self, n: int) -> List[str]:
        return [self.sample() for _ in range(n)]

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return self.sample()

    def state_dict(self) -> Dict:
        return {
            "seed": self.seed,
            "split": self.split,
            "categories": list(self.categories),
            "weights": list(self.weights),
            "position": self.position,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore ``position``; the stream definition must match the saved one."""
        mine = self.state_dict()
        for key in ("seed", "split", "categories", "weights"):
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(mine[key])):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {mine[key]!r}; "
                    f"build the sampler with the saved arguments before loading"
                )
        self.position = int(state["position"])


def prompt_set(split: str = "held_in", n: int = 60, seed: int = 0,
               categories: Optional[Sequence[str]] = None) -> List[str]:
    """A fixed evaluation list of ``n`` prompts balanced over categories.

    Categories are interleaved (every prefix is balanced) and prompts are distinct within a category
    until the category runs out of distinct prompts (``single_object`` has 3), then they repeat.
    """
    sampler = PromptSampler(seed, split, categories)
    cats = sampler.categories
    quotas = [n // len(cats) + (i < n % len(cats)) for i in range(len(cats))]
    per_cat: List[List[str]] = []
    for cat, quota in zip(cats, quotas):
        sub = PromptSampler(seed, split, [cat])
        seen: Dict[str, None] = {}
        for _ in range(50 * quota):
            if len(seen) >= quota:
                break
            seen.setdefault(sub.sample(), None)
        unique = list(seen)
        per_cat.append([unique[i % len(unique)] for i in range(quota)] if unique else [])
    out: List[str] = []
    for i in range(max(quotas, default=0)):
        out.extend(p[i] for p in per_cat if i < len(p))
    return out
