"""The demo world: a small synthetic web that stands in for the paper's crawl.

Every image shows two coloured shapes on a muted background, and its caption
says what they are and where ("a small red circle to the left of a large blue
square"). Because the world is known, three things the real web cannot give
come for free:

- `expected`: for every crawled item, what a correct crawler and filter chain
  must do with it (keep it, or which stage drops it);
- held-out compositions: ~10% of (colour, shape, relation, colour, shape)
  arrangements never appear in training; the evaluation set (MS-COCO captions
  format) uses only them, so sampling from its captions is truly zero-shot;
- validation compositions: another ~5%, in neither the crawl nor the
  evaluation set, for tuning presets (`validation_items`, `write_validation_set`)
  without looking at the figures that reports and promotion use;
- `check_image`: a programmatic judge of whether an image shows what a caption
  says, used to score dVAE reconstructions and generated samples.

Everything is a pure function of the seed; image bytes are rendered on demand.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- #
# Vocabulary of the world
# --------------------------------------------------------------------------- #

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

# The order in which a filter chain names the reason it drops an item; each
# faulty item is built so that exactly one check fails, except date captions,
# which a language identifier also rejects: the (cheaper) date check must come
# first. Items that survive are "keep".
EXPECTED_ORDER = ("fetch_error", "too_short", "boilerplate_date", "not_english",
                  "aspect_ratio", "too_small", "exact_duplicate", "eval_overlap",
                  "near_duplicate")

FAULTS = ("http_404", "http_500", "slow", "flaky_500", "truncated", "corrupt", "not_image",
          "non_english", "date_caption", "short_caption", "extreme_aspect", "tiny_image",
          "exact_duplicate", "near_duplicate", "eval_plant")
FAULT_EXPECTED = {
    "http_404": "fetch_error", "http_500": "fetch_error", "slow": "fetch_error",
    "flaky_500": "keep", "truncated": "fetch_error", "corrupt": "fetch_error",
    "not_image": "fetch_error", "non_english": "not_english",
    "date_caption": "boilerplate_date", "short_caption": "too_short",
    "extreme_aspect": "aspect_ratio", "tiny_image": "too_small",
    "exact_duplicate": "exact_duplicate", "near_duplicate": "near_duplicate",
    "eval_plant": "eval_overlap",
}
_DUPLICATES = ("exact_duplicate", "near_duplicate")


# --------------------------------------------------------------------------- #
# Scenes and captions
# --------------------------------------------------------------------------- #

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


# Caption templates for crawled items. Each one is identified as English by
# langid with probability > 0.6 for every composition; the bare form used by
# `Scene.caption()` is not (e.g. "a purple circle above a blue circle").
TEMPLATES = (
    "there is {a} {rel} {b}",
    "a picture of {a} {rel} {b}",
    "{a} is {rel} {b}",
    "{a} {rel} {b} on a {bg} background",
    "a simple drawing of {a} {rel} {b}",
    "an image of {a} {rel} {b}",
    "we can see {a} {rel} {b}",
)


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


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return scene.caption(template, sizes=tuple(bool(x) for x in rng.integers(0, 2, size=2)))


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


def _as_spec(x: Scene | CaptionSpec | str) -> CaptionSpec | None:
    if isinstance(x, Scene):
        return x.spec()
    if isinstance(x, CaptionSpec):
        return x
    return parse_caption(x)


def composition(x: Scene | CaptionSpec | str) -> tuple[str, str, str, str, str]:
    """(colour, shape, relation, colour, shape) in canonical form: "b right of a" is
    "a left of b" and "b below a" is "a above b", since they look the same."""
    s = _as_spec(x)
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


# Fault captions ----------------------------------------------------------------

_FR = {"colours": {"red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert",
                   "blue": "bleu", "purple": "violet"},
       "shapes": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
       "sizes": {"small": "petit ", "large": "grand "},
       "relations": {"to the left of": "à gauche d'", "to the right of": "à droite d'",
                     "above": "au-dessus d'", "below": "en dessous d'"},
       "templates": ("{a} {rel}{b}", "il y a {a} {rel}{b}", "une image d'{a} {rel}{b}")}
_ES = {"colours": {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde",
                   "blue": "azul", "purple": "morado"},
       "shapes": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
       "sizes": {"small": "pequeño ", "large": "gran "},
       "relations": {"to the left of": "a la izquierda de", "to the right of": "a la derecha de",
                     "above": "encima de", "below": "debajo de"},
       "templates": ("{a} {rel} {b}", "hay {a} {rel} {b}", "una imagen de {a} {rel} {b}")}
# German adjectives decline: nominative masculine / neuter, and the dative after the relation.
_DE_COLOURS = {"red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün",
               "blue": "blau", "purple": "violett"}
_DE_SHAPES = {"circle": ("Kreis", "er"), "square": ("Quadrat", "es"), "triangle": ("Dreieck", "es")}
_DE_SIZES = {"small": "klein", "large": "groß"}
_DE_RELATIONS = {"to the left of": "links von", "to the right of": "rechts von",
                 "above": "über", "below": "unter"}


def _romance(lang: dict, obj: SceneObject, with_size: bool) -> str:
    size = lang["sizes"][obj.size] if with_size else ""
    return f"un {size}{lang['shapes'][obj.shape]} {lang['colours'][obj.colour]}"


def _german(obj: SceneObject, with_size: bool, dative: bool) -> str:
    noun, ending = _DE_SHAPES[obj.shape]
    ending = "en" if dative else ending
    adjectives = ([_DE_SIZES[obj.size] + ending] if with_size else []) + [_DE_COLOURS[obj.colour] + ending]
    return " ".join(["einem" if dative else "ein", *adjectives, noun])


def foreign_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene described in French, Spanish or German."""
    sa, sb = (bool(x) for x in rng.integers(0, 2, size=2))
    lang = rng.integers(3)
    if lang == 2:
        template = ("{a} {rel} {b}", "auf dem Bild ist {a} {rel} {b}")[rng.integers(2)]
        return template.format(a=_german(scene.a, sa, False), rel=_DE_RELATIONS[scene.relation],
                               b=_german(scene.b, sb, True))
    table = (_FR, _ES)[lang]
    template = table["templates"][rng.integers(len(table["templates"]))]
    return template.format(a=_romance(table, scene.a, sa), rel=table["relations"][scene.relation],
                           b=_romance(table, scene.b, sb))


_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_DATE_TEMPLATES = (
    "photo taken on {d} {month} {y} {hh}:{mi}",
    "uploaded {y}-{mm}-{dd} {hh}:{mi}:{ss}",
    "IMG_{y}{mm}{dd}_{hh}{mi}.jpg {y}-{mm}-{dd} {hh}:{mi}:{ss}",
    "{Month} {d}, {y} at {hh}:{mi}",
    "DSC_{n}.JPG {dd}/{mm}/{y} {hh}:{mi}",
    "{y}-{mm}-{dd} {hh}:{mi}:{ss} {y}{mm}{dd}_{hh}{mi}{ss}.jpg",
)
# one or two words: fewer than any sensible minimum caption length
_SHORT_CAPTIONS = ("shapes", "untitled", "image", "photo", "img", "red circle", "two shapes",
                   "my picture", "blue", "geometry")


def date_caption(rng: np.random.Generator) -> str:
    """Boilerplate made of a date (and time or a camera file name), at least three words."""
    m, d = int(rng.integers(12)), int(rng.integers(1, 29))
    return _DATE_TEMPLATES[rng.integers(len(_DATE_TEMPLATES))].format(
        d=d, dd=f"{d:02d}", mm=f"{m + 1:02d}", month=_MONTHS[m], Month=_MONTHS[m].capitalize(),
        y=int(rng.integers(1998, 2016)), hh=f"{rng.integers(24):02d}", mi=f"{rng.integers(60):02d}",
        ss=f"{rng.integers(60):02d}", n=f"{rng.integers(10000):04d}")


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #

def _object_boxes(scene: Scene, side: float, rng: np.random.Generator):
    """Bounding boxes (x0, y0, size) of a and b inside a side x side square.

    The pair sits along the relation's axis with a clear gap between the boxes;
    across that axis the two centres differ by little, so the relation is
    unambiguous from the centroids.
    """
    sa, sb = SIZES[scene.a.size] * side, SIZES[scene.b.size] * side
    margin, gap = 0.04 * side, rng.uniform(0.10, 0.16) * side
    first, second = (sa, sb) if scene.relation in ("to the left of", "above") else (sb, sa)
    span = first + gap + second
    along0 = rng.uniform(margin, side - margin - span)
    along = (along0, along0 + first + gap)  # leading edges along the axis
    big = max(sa, sb)
    centre = rng.uniform(margin + big / 2 + 0.03 * side, side - margin - big / 2 - 0.03 * side)
    across = [centre + rng.uniform(-0.03, 0.03) * side for _ in range(2)]
    boxes = []
    for lead, mid, size in zip(along, across, (first, second)):
        boxes.append((lead, mid - size / 2, size))  # (along, across, size)
    if scene.relation in ("to the right of", "below"):
        boxes.reverse()  # a is the second one along the axis
    if scene.relation in ("above", "below"):
        boxes = [(x, y, s) for (y, x, s) in boxes]
    return boxes


def _background(colour, width, height, boxes, rng):
    """A muted backdrop, evenly lit around the objects and softly patterned away
    from them, with slight noise.

    The pattern is a random-sign sum of the 8x8 lowest cosine frequencies, the
    ones a perceptual hash (pHash) reads: it gives every image its own hash, so
    that distinct scenes of similar layout are never near-duplicates of each
    other. Around the objects the backdrop is lifted away from the palette's
    luminance (lighter or darker) so their outlines stay sharp in luminance.
    """
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    signs = rng.choice([-1.0, 1.0], size=(8, 8))
    signs[0, 0] = 0.0
    freq = np.pi * np.arange(8)[:, None, None]
    pattern = np.einsum("vu,vhw,uhw->hw", signs, np.cos(freq * (yy / height)),
                        np.cos(freq * (xx / width))) / 4.0
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    dist = np.full((height, width), np.inf)  # to the nearest object box, in units of side
    for x0, y0, s in boxes:
        dx = np.maximum(np.maximum(ox + x0 - xx, xx - (ox + x0 + s)), 0)
        dy = np.maximum(np.maximum(oy + y0 - yy, yy - (oy + y0 + s)), 0)
        dist = np.minimum(dist, np.hypot(dx, dy) / side)
    far = np.clip((dist - 0.05) / 0.15, 0.0, 1.0)
    base = np.asarray(colour, dtype=np.float64)
    lift = (1.0 if base.mean() > 128 else -1.0) * 12.0
    lum = (1 - far) * lift + far * 30.0 * pattern
    return base + lum[..., None] + rng.normal(0.0, 2.0, size=(height, width, 3))


def render(scene: Scene, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image; both objects lie in the central square.

    Objects are drawn as antialiased coverage masks (supersampled) so they stay
    recognisable when downscaled to 32x32.
    """
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    ss = max(2, math.ceil(256 / side))  # supersampling factor
    boxes = _object_boxes(scene, side, rng)
    img = _background(BACKGROUNDS[scene.background], width, height, boxes, rng)
    for obj, (x0, y0, s) in zip((scene.a, scene.b), boxes):
        mask = Image.new("L", (width * ss, height * ss), 0)
        draw = ImageDraw.Draw(mask)
        x0, y0, x1, y1 = [(v * ss) for v in (ox + x0, oy + y0, ox + x0 + s, oy + y0 + s)]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=255)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=255)
        else:  # an upright isosceles triangle filling its box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
        alpha = np.asarray(mask.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0
        img = img * (1 - alpha[..., None]) + np.asarray(COLOURS[obj.colour], dtype=np.float64) * alpha[..., None]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


# --------------------------------------------------------------------------- #
# The checker: does an image show what a caption says?
# --------------------------------------------------------------------------- #

ANALYSIS_SIZE = 96
_MIN_CHROMA = 40.0  # below this a pixel is background (the backgrounds' chroma is < 20)
_MAX_HUE_ERROR = math.radians(25)
_MIN_AREA = 0.006  # of the analysed image; a small triangle covers ~2.4%


def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chroma and hue angle in an opponent-colour plane. Mixing a colour with
    grey (antialiasing, blur) keeps its hue and scales its chroma."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    u, v = r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)
    return np.hypot(u, v), np.arctan2(v, u)


_PALETTE_CHROMA, _PALETTE_HUES = _opponent(np.array(list(COLOURS.values()), dtype=np.float64))


@dataclass(frozen=True)
class Blob:
    colour: str
    area: float  # fraction of the image
    centroid: tuple[float, float]  # (x, y) in [0, 1]
    fill: float  # area / bounding-box area: square ~1, circle ~0.785, triangle ~0.5
    top: float  # share of the area in the upper half of the box: triangle ~0.25, else 0.5
    corners: float  # share of the box's corners covered: square ~0.8, circle 0, triangle ~0.3
    shape: str


@dataclass(frozen=True)
class CheckResult:
    match: bool
    colours: bool
    shapes: bool
    relation: bool
    detail: str


def _classify_shape(fill: float, top: float, corners: float) -> str:
    """Triangles (apex up) have a quarter of their area in the upper half of
    their box; squares, unlike circles, reach into the box's corners."""
    if top < 0.44:
        return "triangle"
    return "square" if corners >= 0.22 else "circle"


class ImageAnalysis:
    """Colour blobs of one image, analysed once and queried per caption."""

    def __init__(self, image: Image.Image):
        from scipy import ndimage  # imported here: only the checker needs it

        self._nd = ndimage
        image = image.convert("RGB")
        w, h = image.size
        side = min(w, h)  # the objects live in the central square
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BILINEAR)
        rgb = np.asarray(image, dtype=np.float64)
        self.luma = rgb @ np.array([0.299, 0.587, 0.114])
        self.chroma, hue = _opponent(rgb)
        err = np.abs((hue[..., None] - _PALETTE_HUES + np.pi) % (2 * np.pi) - np.pi)  # angular distance
        self.label = np.where((self.chroma >= _MIN_CHROMA) & (err.min(-1) <= _MAX_HUE_ERROR),
                              err.argmin(-1), -1)
        self._blobs: dict[str, list[Blob]] = {}

    def blobs(self, colour: str) -> list[Blob]:
        """Connected regions of `colour`, largest first."""
        if colour not in self._blobs:
            self._blobs[colour] = self._find(list(COLOURS).index(colour), colour)
        return self._blobs[colour]

    def _find(self, index: int, colour: str) -> list[Blob]:
        min_area = _MIN_AREA * ANALYSIS_SIZE**2
        core = self.label == index
        if core.sum() < min_area:
            return []
        # Threshold at half the object's own chroma: the 50% coverage contour,
        # which is where the true edge lies under antialiasing or blur.
        full = np.percentile(self.chroma[core], 90)
        coarse = core & (self.chroma >= 0.5 * full)
        labels, n = self._nd.label(coarse, structure=np.ones((3, 3)))
        out = []
        for lab in range(1, n + 1):
            region = labels == lab
            # a real object is large and, somewhere, about as vivid as its colour;
            # JPEG ringing and colour fringes are neither
            if region.sum() < min_area or self.chroma[region].max() < 0.5 * _PALETTE_CHROMA[index]:
                continue
            region = self._sharpen(region, index, full)
            ys, xs = np.nonzero(region)
            area = len(ys)
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            mid = ys.min() + (bh - 1) / 2
            top = (np.sum(ys < mid) + 0.5 * np.sum(ys == mid)) / area
            fill = area / (bh * bw)
            # corners: the share of the box's four corner triangles (|u| + |v| > 1.5
            # with the box mapped to [-1, 1]^2) covered, which no inscribed circle reaches
            u, v = np.linspace(-1, 1, bw), np.linspace(-1, 1, bh)
            zone = np.abs(v)[:, None] + np.abs(u)[None, :] > 1.5
            corners = zone[ys - ys.min(), xs - xs.min()].sum() / max(1, zone.sum())
            centroid = (float(xs.mean() + 0.5) / ANALYSIS_SIZE, float(ys.mean() + 0.5) / ANALYSIS_SIZE)
            out.append(Blob(colour, area / ANALYSIS_SIZE**2, centroid, float(fill), float(top),
                            float(corners), _classify_shape(fill, top, corners)))
        return sorted(out, key=lambda b: -b.area)

    def _sharpen(self, region: np.ndarray, index: int, full_chroma: float) -> np.ndarray:
        """The region's outline redrawn from luminance where the object and its
        surroundings differ in brightness: JPEG (and most image models) keep
        luminance sharp but blur colour."""
        nd = self._nd
        inner = region & (self.chroma >= 0.8 * full_chroma)
        # the surroundings: a ring a little way out (colour bleeds further than
        # luminance), not counting other objects
        mine = np.isin(self.label, (index, -1))
        ring = nd.binary_dilation(region, iterations=7) & ~nd.binary_dilation(region, iterations=4) & mine
        if inner.sum() < 4 or ring.sum() < 8:
            return region
        y_obj, y_bg = np.median(self.luma[inner]), np.median(self.luma[ring])
        if abs(y_obj - y_bg) < 20:
            return region
        coverage = (self.luma - y_bg) / (y_obj - y_bg)
        near = nd.binary_dilation(region, iterations=6) & mine
        labels, n = nd.label(near & (coverage >= 0.5), structure=np.ones((3, 3)))
        if n == 0:
            return region
        overlap = np.bincount(labels[region], minlength=n + 1)
        overlap[0] = 0
        best = labels == overlap.argmax()
        return best if best.sum() >= 0.5 * region.sum() else region

    def check(self, spec: CaptionSpec) -> CheckResult:
        """Judge the caption by the largest blob of each of its two colours."""
        blobs_a, blobs_b = self.blobs(spec.colour_a), self.blobs(spec.colour_b)
        if spec.colour_a == spec.colour_b:  # two objects of one colour: the two largest blobs
            blobs_a, blobs_b = blobs_a[:1], blobs_a[1:2]
        a, b = (blobs_a[0] if blobs_a else None), (blobs_b[0] if blobs_b else None)
        colours = a is not None and b is not None
        shapes = colours and a.shape == spec.shape_a and b.shape == spec.shape_b
        relation = colours and _relation_holds(a.centroid, spec.relation, b.centroid)
        detail = "; ".join(
            [_describe(blob, colour, shape) for blob, colour, shape in
             ((a, spec.colour_a, spec.shape_a), (b, spec.colour_b, spec.shape_b))]
            + [f"relation {spec.relation!r}: {'holds' if relation else 'fails' if colours else 'unknown'}"])
        return CheckResult(bool(colours and shapes and relation), bool(colours), bool(shapes),
                           bool(relation), detail)


def _relation_holds(ca, relation, cb) -> bool:
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]  # from a to b; y grows downwards
    if relation in ("to the left of", "to the right of"):
        return abs(dx) >= abs(dy) and (dx > 0) == (relation == "to the left of")
    return abs(dy) >= abs(dx) and (dy > 0) == (relation == "above")


def _describe(blob: Blob | None, colour: str, shape: str) -> str:
    if blob is None:
        return f"{colour} {shape}: no {colour} region"
    verdict = "ok" if blob.shape == shape else f"looks like a {blob.shape}"
    return (f"{colour} {shape}: {verdict} (fill {blob.fill:.2f}, top {blob.top:.2f}, "
            f"corners {blob.corners:.2f}, at {blob.centroid[0]:.2f},{blob.centroid[1]:.2f})")


def check_image(image: Image.Image, caption_or_scene: str | Scene | CaptionSpec) -> CheckResult:
    """Whether `image` shows the two objects of the caption, with their colours,
    shapes and relative position. Works on any image of at least 32x32."""
    spec = _as_spec(caption_or_scene)
    if spec is None:
        return CheckResult(False, False, False, False, f"caption not understood: {caption_or_scene!r}")
    return ImageAnalysis(image).check(spec)


# --------------------------------------------------------------------------- #
# The world: crawlable items and the evaluation set
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class HttpResponse:
    status: int
    content_type: str
    body: bytes
    delay_s: float = 0.0


@dataclass(frozen=True)
class EvalItem:
    """One image of the zero-shot evaluation set (a held-out composition), or of
    the validation set (a validation composition)."""

    image_id: int
    key: str
    scene: Scene
    caption: str
    seed: int
    width: int = 128
    height: int = 128

    @property
    def file_name(self) -> str:
        return f"{self.key}.png"

    def image(self) -> Image.Image:
        return render(self.scene, self.width, self.height, np.random.default_rng(self.seed))

    def image_bytes(self) -> bytes:
        return encode(self.image(), "png")


@dataclass(frozen=True)
class WorldItem:
    """One URL of the crawl: what it serves, and what the pipeline must do with it."""

    key: str
    caption: str
    fault: str | None
    expected: str  # "keep" or the name of the stage / filter that must drop it
    scene: Scene
    seed: int
    width: int
    height: int
    image_format: str  # "png" or "jpeg"
    source: "WorldItem | EvalItem | None" = field(default=None, repr=False)  # what a copy copies

    @property
    def content_type(self) -> str:
        return "image/png" if self.image_format == "png" else "image/jpeg"

    def image_bytes(self) -> bytes:
        """The image file this item serves when it serves one (before any damage)."""
        rng = np.random.default_rng(self.seed)
        if self.fault == "exact_duplicate":
            return self.source.image_bytes()
        if self.fault in ("near_duplicate", "eval_plant"):
            return _alter(self.source.image_bytes(), rng, crop=self.fault == "eval_plant")
        return encode(render(self.scene, self.width, self.height, rng), self.image_format)

    def response(self, attempt: int = 0, slow_delay_s: float = 3.0) -> HttpResponse:
        """The HTTP answer to the `attempt`-th request (0 = first) for this URL."""
        text = "text/plain; charset=utf-8"
        if self.fault == "http_404":
            return HttpResponse(404, text, b"not found\n")
        if self.fault == "http_500" or (self.fault == "flaky_500" and attempt == 0):
            return HttpResponse(500, text, b"internal server error\n")
        if self.fault == "corrupt":
            rng = np.random.default_rng(self.seed)
            return HttpResponse(200, self.content_type, rng.bytes(int(rng.integers(2000, 8000))))
        if self.fault == "not_image":
            body = f"<!doctype html><html><body><h1>Gallery</h1><p>{self.caption}</p></body></html>\n"
            return HttpResponse(200, "text/html; charset=utf-8", body.encode())
        body = self.image_bytes()
        if self.fault == "truncated":
            return HttpResponse(200, self.content_type, body[: len(body) // 2])
        delay = slow_delay_s if self.fault == "slow" else 0.0
        return HttpResponse(200, self.content_type, body, delay)


# A copy's pHash stays within this many bits of its original's, safely inside
# the near-duplicate filters' threshold (6 in every profile).
COPY_MAX_PHASH_DISTANCE = 4


def _alter(data: bytes, rng: np.random.Generator, crop: bool) -> bytes:
    """What re-posting does: a resize by a few percent, a re-encode as JPEG at
    another quality and, for `crop`, a crop of 1-4% of each side.

    About a third of such crops move the pHash by more than a filter should be
    expected to forgive, so alterations are drawn until one stays within
    COPY_MAX_PHASH_DISTANCE (the last try does not crop).
    """
    import imagehash

    def phash(image):  # as the filters see it: the centre square (what shards keep)
        side = min(image.size)
        return imagehash.phash(image.crop(((image.width - side) // 2, (image.height - side) // 2,
                                           (image.width + side) // 2, (image.height + side) // 2)))

    original = Image.open(io.BytesIO(data)).convert("RGB")
    target = phash(original)
    for attempt in range(12):
        image = original
        w, h = image.size
        if crop and attempt < 11:
            cw, ch = (int(round(rng.uniform(0.01, 0.04) * v)) for v in (w, h))
            left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
            image = image.crop((left, top, w - (cw - left), h - (ch - top)))
        scale = 1 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.08)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        out = encode(image, "jpeg", quality=int(rng.integers(65, 85)))
        if phash(Image.open(io.BytesIO(out)).convert("RGB")) - target <= COPY_MAX_PHASH_DISTANCE:
            break
    return out


class DemoWorld:
    """A deterministic synthetic crawl: `n_batches` URL lists of `items_per_batch`
    items each, with faults mixed in, plus `n_eval` held-out evaluation images."""

    def __init__(self, seed: int = 0, items_per_batch: int = 120, n_batches: int = 2,
                 n_eval: int = 16, fault_rate: float = 0.015):
        self.seed, self.items_per_batch, self.n_batches, self.n_eval = seed, items_per_batch, n_batches, n_eval
        self.fault_rate = fault_rate
        self._batches: dict[int, list[WorldItem]] = {}
        self._eval: list[EvalItem] | None = None

    @classmethod
    def from_data_config(cls, data) -> "DemoWorld":
        """The world a profile's `DataConfig` describes (demo_* fields)."""
        return cls(data.demo_seed, data.demo_items_per_batch, data.demo_batches, data.demo_eval_items)

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    # -- faults -------------------------------------------------------------

    def fault_count(self, fault: str) -> int:
        """Items with `fault` in each batch: a few percent, at least 2 when the
        batch has room for every fault (>= 60 items)."""
        n = self.items_per_batch
        count = max(2, round(self.fault_rate * n))
        count = min(count, (n // 2) // len(FAULTS))  # at least half of a batch is clean
        if fault == "eval_plant":  # each evaluation image is planted at most once
            count = min(count, self.n_eval // max(1, self.n_batches))
        return count

    def _fault_plan(self, batch: int) -> list[str | None]:
        n = self.items_per_batch
        rng = self._rng(1, batch)
        plan: list[str | None] = [None] * n
        # duplicates go in the second half, so that their originals come first
        late = [int(p) for p in rng.permutation(np.arange(n // 2, n))]
        for p, fault in zip(late, [f for f in _DUPLICATES for _ in range(self.fault_count(f))]):
            plan[p] = fault
        free = [int(p) for p in rng.permutation(n) if plan[p] is None]
        others = [f for f in FAULTS if f not in _DUPLICATES for _ in range(self.fault_count(f))]
        for p, fault in zip(free, others):
            plan[p] = fault
        return plan

    # -- items --------------------------------------------------------------

    def batch_items(self, batch: int) -> list[WorldItem]:
        if not 0 <= batch < self.n_batches:
            raise IndexError(f"batch {batch} out of range (the world has {self.n_batches})")
        if batch not in self._batches:
            self._batches[batch] = self._make_batch(batch)
        return self._batches[batch]

    def _make_batch(self, batch: int) -> list[WorldItem]:
        plan = self._fault_plan(batch)
        plants = iter(range(batch * self.fault_count("eval_plant"), self.n_eval))
        items: list[WorldItem] = []
        for index, fault in enumerate(plan):
            rng = self._rng(2, batch, index)
            scene = random_scene(rng, held_out=False)
            w = int(rng.integers(96, 193))
            h = int(np.clip(round(w / rng.uniform(0.88, 1.12)), 96, 192))
            item = dict(key=f"b{batch:03d}-{index:06d}", caption=random_caption(scene, rng), fault=fault,
                        expected=FAULT_EXPECTED.get(fault, "keep"), scene=scene,
                        seed=int(rng.integers(2**63)), width=w, height=h,
                        image_format=("png", "jpeg")[rng.integers(2)])
            if fault == "non_english":
                item["caption"] = foreign_caption(scene, rng)
            elif fault == "date_caption":
                item["caption"] = date_caption(rng)
            elif fault == "short_caption":
                item["caption"] = _SHORT_CAPTIONS[rng.integers(len(_SHORT_CAPTIONS))]
            elif fault == "extreme_aspect":  # ratio 2.5..4, shorter side >= 64
                short, ratio = int(rng.integers(64, 97)), rng.uniform(2.5, 4.0)
                long = int(round(short * ratio))
                item["width"], item["height"] = (long, short) if rng.integers(2) else (short, long)
            elif fault == "tiny_image":
                item["width"] = item["height"] = int(rng.integers(12, 21))
            elif fault in _DUPLICATES:
                originals = [i for i in items if i.fault is None]
                if not originals:  # only in batches too small to have faults of every kind
                    item.update(fault=None, expected="keep")
                    items.append(WorldItem(**item))
                    continue
                source = originals[rng.integers(len(originals))]
                item.update(caption=source.caption, scene=source.scene, source=source,
                            width=source.width, height=source.height,
                            image_format=source.image_format if fault == "exact_duplicate" else "jpeg")
            elif fault == "eval_plant":
                source = self.eval_items()[next(plants)]
                item.update(caption=source.caption, scene=source.scene, source=source,
                            width=source.width, height=source.height, image_format="jpeg")
            items.append(WorldItem(**item))
        return items

    def item(self, key: str) -> WorldItem:
        """The item behind a URL key; KeyError for a key the world does not have."""
        m = re.fullmatch(r"b(\d{3})-(\d{6})", key)
        if m is None:
            raise KeyError(key)
        batch, index = int(m.group(1)), int(m.group(2))
        if batch >= self.n_batches or index >= self.items_per_batch:
            raise KeyError(key)
        return self.batch_items(batch)[index]

    def all_items(self) -> Iterator[WorldItem]:
        for batch in range(self.n_batches):
            yield from self.batch_items(batch)

    def expected_counts(self) -> Counter:
        """How many items a correct pipeline keeps, and drops at each stage."""
        return Counter(item.expected for item in self.all_items())

    def eval_items(self) -> list[EvalItem]:
        if self._eval is None:
            self._eval = []
            for i in range(self.n_eval):
                rng = self._rng(3, i)
                scene = random_scene(rng, held_out=True)
                self._eval.append(EvalItem(i + 1, f"eval-{i + 1:06d}", scene, random_caption(scene, rng),
                                           int(rng.integers(2**63))))
        return self._eval

    def validation_items(self, n: int | None = None) -> list[EvalItem]:
        """`n` images (default: as many as the evaluation set) of validation
        compositions, for tuning: disjoint from the crawl and from `eval_items`."""
        items = []
        for i in range(self.n_eval if n is None else n):
            rng = self._rng(4, i)
            scene = random_scene(rng, split="validation")
            items.append(EvalItem(i + 1, f"val-{i + 1:06d}", scene, random_caption(scene, rng),
                                  int(rng.integers(2**63))))
        return items

    # -- files --------------------------------------------------------------

    def write_eval_set(self, out_dir: str | Path) -> Path:
        """The evaluation set as MS-COCO captions: out_dir/captions.json and
        out_dir/images/<file_name>. Returns the JSON's path."""
        return self._write_coco(self.eval_items(), out_dir,
                                "demo world zero-shot evaluation set (held-out compositions)")

    def write_validation_set(self, out_dir: str | Path, n: int | None = None) -> Path:
        """`validation_items(n)` as MS-COCO captions, laid out as `write_eval_set`
        lays out the evaluation set. Returns the JSON's path."""
        return self._write_coco(self.validation_items(n), out_dir,
                                "demo world validation set (compositions in neither training nor evaluation)")

    def _write_coco(self, items: list[EvalItem], out_dir: str | Path, description: str) -> Path:
        from ..data.coco import CocoImage, write_coco_captions

        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        images = []
        for item in items:
            (out_dir / "images" / item.file_name).write_bytes(item.image_bytes())
            images.append(CocoImage(item.image_id, item.file_name, item.width, item.height, [item.caption]))
        info = {"description": description, "seed": self.seed, "n_images": len(items)}
        return write_coco_captions(images, out_dir / "captions.json", info=info)

    def write_url_lists(self, out_dir: str | Path, base_url: str) -> list[Path]:
        """One img2dataset-style URL list per batch (columns url, caption), in
        turn parquet, csv and tsv."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        base_url = base_url.rstrip("/")
        paths = []
        for batch in range(self.n_batches):
            items = self.batch_items(batch)
            frame = pd.DataFrame({"url": [f"{base_url}/img/{i.key}" for i in items],
                                  "caption": [i.caption for i in items]})
            fmt = ("parquet", "csv", "tsv")[batch % 3]
            path = out_dir / f"batch-{batch:03d}.{fmt}"
            if fmt == "parquet":
                frame.to_parquet(path, index=False)
            else:
                frame.to_csv(path, index=False, sep="," if fmt == "csv" else "\t")
            paths.append(path)
        return paths

    def write_broken_url_list(self, out_dir: str | Path, base_url: str, name: str = "broken-links.csv",
                              dead_fraction: float = 0.8) -> Path:
        """Bad *data* of the kind a real inbox receives: a URL list whose links are mostly dead
        (an expired list: 404 for `dead_fraction` of the rows; the rest re-list batch 0's images).
        Every row is a valid URL with an English caption, so no filter rejects it; only the
        crawl-batch quality suite (failure-rate bound) holds it back from the shards."""
        import pandas as pd

        n = max(20, self.items_per_batch // 4)
        rng = self._rng(5)
        live = [i for i in self.batch_items(0) if i.expected == "keep"]
        base_url = base_url.rstrip("/")
        urls, captions = [], []
        for row in range(n):
            if rng.random() < dead_fraction:  # a key the world does not have: the server answers 404
                urls.append(f"{base_url}/img/b999-{row:06d}")
                captions.append(random_caption(random_scene(rng), rng))
            else:
                item = live[int(rng.integers(len(live)))]
                urls.append(f"{base_url}/img/{item.key}")
                captions.append(item.caption)
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"url": urls, "caption": captions}).to_csv(path, index=False)
        return path
