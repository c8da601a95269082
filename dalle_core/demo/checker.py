"""The checker: does an image show what a caption says?

A programmatic judge for the demo world, used to score dVAE reconstructions and
generated samples: colour blobs, their shapes, and where they sit relative to
each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS, SIZES, CaptionSpec, Scene, spec_of

ANALYSIS_SIZE = 96
_MIN_CHROMA = 40.0  # below this a pixel is background (the backgrounds' chroma is < 20)
_MAX_HUE_ERROR = math.radians(25)
_MIN_AREA = 0.006  # of the analysed image; a small triangle covers ~2.4%
# an object is "large" when its box's side is above the midpoint of the two sizes (0.27 of
# the square): rendered small objects measure 0.19-0.24, large ones 0.30-0.34, at 32-128 px
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2


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
    side: float = 0.0  # side of its bounding box, as a fraction of the analysed square (every shape fills its box)


@dataclass(frozen=True)
class CheckResult:
    """`match`: colours, shapes and relation all right (sizes are not part of it).
    `sizes`: None when the caption states no size; else whether every object whose
    size it states has that size (False when the colours were not found)."""

    match: bool
    colours: bool
    shapes: bool
    relation: bool
    detail: str
    sizes: bool | None = None


def size_of(blob: Blob) -> str:
    """"small" or "large", from the side of the blob's bounding box."""
    return "large" if blob.side > _SIZE_SPLIT else "small"


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
                            float(corners), _classify_shape(fill, top, corners),
                            float(max(bh, bw)) / ANALYSIS_SIZE))
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
        stated = [(blob, size) for blob, size in ((a, spec.size_a), (b, spec.size_b)) if size is not None]
        sizes = None if not stated else bool(colours and all(size_of(blob) == size for blob, size in stated))
        detail = "; ".join(
            [_describe(blob, colour, shape, size) for blob, colour, shape, size in
             ((a, spec.colour_a, spec.shape_a, spec.size_a), (b, spec.colour_b, spec.shape_b, spec.size_b))]
            + [f"relation {spec.relation!r}: {'holds' if relation else 'fails' if colours else 'unknown'}"])
        return CheckResult(bool(colours and shapes and relation), bool(colours), bool(shapes),
                           bool(relation), detail, sizes)


def _relation_holds(ca, relation, cb) -> bool:
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]  # from a to b; y grows downwards
    if relation in ("to the left of", "to the right of"):
        return abs(dx) >= abs(dy) and (dx > 0) == (relation == "to the left of")
    return abs(dy) >= abs(dx) and (dy > 0) == (relation == "above")


def _describe(blob: Blob | None, colour: str, shape: str, size: str | None = None) -> str:
    if blob is None:
        return f"{colour} {shape}: no {colour} region"
    verdict = "ok" if blob.shape == shape else f"looks like a {blob.shape}"
    if size is not None:
        verdict += f", {size} " + ("ok" if size_of(blob) == size else f"looks {size_of(blob)}")
    return (f"{colour} {shape}: {verdict} (fill {blob.fill:.2f}, top {blob.top:.2f}, "
            f"corners {blob.corners:.2f}, side {blob.side:.2f}, at {blob.centroid[0]:.2f},{blob.centroid[1]:.2f})")


def check_image(image: Image.Image, caption_or_scene: str | Scene | CaptionSpec) -> CheckResult:
    """Whether `image` shows the two objects of the caption, with their colours,
    shapes and relative position (`match`), and, where the caption states them,
    their sizes (`sizes`). Works on any image of at least 32x32."""
    spec = spec_of(caption_or_scene)
    if spec is None:
        return CheckResult(False, False, False, False, f"caption not understood: {caption_or_scene!r}")
    return ImageAnalysis(image).check(spec)
