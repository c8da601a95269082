"""The demo world's scenes: its vocabulary (colours, shapes, sizes, relations,
backgrounds), scenes of two objects, what a caption asserts (`CaptionSpec`,
`parse_caption`), compositions and the split each belongs to (training,
validation, held-out evaluation).

Every image shows two coloured shapes on a muted background, and its caption
says what they are and where ("a small red circle to the left of a large blue
square"). Held-out compositions: ~10% of (colour, shape, relation, colour,
shape) arrangements never appear in training; validation compositions: another
~5%, in neither the crawl nor the evaluation set.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

# Saturated colours with well-separated hues, of middling brightness so that
# they also differ in luminance from every background (JPEG keeps luminance at
# full resolution but halves the resolution of colour).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 205, 20),
    "green": (30, 170, 50),
    "blue": (50, 100, 235),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
# side of an object's bounding box, as a fraction of min(width, height)
SIZES: dict[str, float] = {"small": 0.22, "large": 0.32}
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
# Nearly neutral, very light or very dark: far from every palette colour in
# hue (low chroma) and in luminance.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (222, 222, 222),
    "beige": (232, 228, 218),
    "dark slate": (54, 58, 64),
    "charcoal": (44, 44, 46),
}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str = "large"

    def phrase(self, with_size: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asserts: two objects and how they are placed (sizes optional)."""

    colour_a: str
    shape_a: str
    relation: str
    colour_b: str
    shape_b: str
    size_a: str | None = None
    size_b: str | None = None


@dataclass(frozen=True)
class Scene:
    a: SceneObject
    relation: str
    b: SceneObject
    background: str = "light grey"

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}")
        if self.a.colour == self.b.colour:
            raise ValueError(f"the two objects of a scene must differ in colour, both are {self.a.colour}")

    def caption(self, template: str = "{a} {rel} {b}", sizes: tuple[bool, bool] = (True, True)) -> str:
        return template.format(a=self.a.phrase(sizes[0]), rel=self.relation,
                               b=self.b.phrase(sizes[1]), bg=self.background)

    def spec(self) -> CaptionSpec:
        return CaptionSpec(self.a.colour, self.a.shape, self.relation, self.b.colour, self.b.shape,
                           self.a.size, self.b.size)


_OBJ = r"(?:an? )?(?:(small|large) )?({colours}) ({shapes})".format(
    colours="|".join(COLOURS), shapes="|".join(SHAPES))
_CAPTION_RE = re.compile(
    _OBJ + r" (?:is )?(?:placed )?(" + "|".join(RELATIONS) + r") " + _OBJ)


def parse_caption(caption: str) -> CaptionSpec | None:
    """The two objects and the relation a caption describes, or None if it says none."""
    text = " ".join(re.sub(r"[^a-z ]+", " ", caption.lower()).split())
    m = _CAPTION_RE.search(text)
    if m is None:
        return None
    size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = m.groups()
    return CaptionSpec(colour_a, shape_a, relation, colour_b, shape_b, size_a, size_b)


def spec_of(x: Scene | CaptionSpec | str) -> CaptionSpec | None:
    if isinstance(x, Scene):
        return x.spec()
    if isinstance(x, CaptionSpec):
        return x
    return parse_caption(x)


def composition(x: Scene | CaptionSpec | str) -> tuple[str, str, str, str, str]:
    """(colour, shape, relation, colour, shape) in canonical form: "b right of a" is
    "a left of b" and "b below a" is "a above b", since they look the same."""
    s = spec_of(x)
    if s is None:
        raise ValueError(f"not a caption of the demo world: {x!r}")
    if s.relation in ("to the right of", "below"):
        return (s.colour_b, s.shape_b, OPPOSITE[s.relation], s.colour_a, s.shape_a)
    return (s.colour_a, s.shape_a, s.relation, s.colour_b, s.shape_b)


# Shares of compositions (percent of the hash buckets below): evaluation first,
# validation next; the rest is training.
HELD_OUT_PERCENT = 10
VALIDATION_PERCENT = 5
SPLITS = ("train", "validation", "eval")


def _bucket(x: Scene | CaptionSpec | str) -> int:
    """0..99 from a stable hash of the canonical composition, independent of the seed."""
    digest = hashlib.sha256("|".join(composition(x)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def is_held_out(x: Scene | CaptionSpec | str) -> bool:
    """True for the ~10% of compositions reserved for zero-shot evaluation.

    A stable hash of the canonical composition, independent of the seed, so the
    same arrangements are held out in every world and every run.
    """
    return _bucket(x) < HELD_OUT_PERCENT


def is_validation(x: Scene | CaptionSpec | str) -> bool:
    """True for the ~5% of compositions kept for tuning: in neither the crawl nor
    the evaluation set (the next hash buckets after the held-out ones)."""
    return HELD_OUT_PERCENT <= _bucket(x) < HELD_OUT_PERCENT + VALIDATION_PERCENT


def split_of(x: Scene | CaptionSpec | str) -> str:
    """"eval", "validation" or "train": which part of the world a composition belongs to."""
    return "eval" if is_held_out(x) else "validation" if is_validation(x) else "train"


def random_scene(rng: np.random.Generator, held_out: bool | None = False, split: str | None = None) -> Scene:
    """A uniformly random scene of one split ("train", "validation", "eval").

    Without `split`, `held_out` True means "eval", False "train" (neither
    evaluation nor validation compositions) and None any composition.
    """
    if split is None:
        split = None if held_out is None else "eval" if held_out else "train"
    elif split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    while True:
        ca, cb = rng.choice(len(COLOURS), size=2, replace=False)
        colours = list(COLOURS)
        scene = Scene(
            SceneObject(colours[ca], SHAPES[rng.integers(3)], list(SIZES)[rng.integers(2)]),
            RELATIONS[rng.integers(4)],
            SceneObject(colours[cb], SHAPES[rng.integers(3)], list(SIZES)[rng.integers(2)]),
            list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        )
        if split is None or split_of(scene) == split:
            return scene
