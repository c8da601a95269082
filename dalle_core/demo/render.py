"""Rendering the demo world: a scene as an RGB image, and image files."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLOURS, SIZES, Scene

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
    freq = np.pi * np.arange(8)[:, None]
    # pattern[h, w] = sum over v, u of signs[v, u] cos(v pi y_h) cos(u pi x_w), as two matmuls:
    # the same sum as einsum("vu,vhw,uhw->hw"), which numpy ran as a 64 x H x W loop (14 of
    # the ~16 ms a 128 x 256 image took to render, and rendering is what bounds the demo's crawl)
    cos_y = np.cos(freq * (yy[:, 0] / height))  # (8, H)
    cos_x = np.cos(freq * (xx[0] / width))  # (8, W)
    pattern = cos_y.T @ signs @ cos_x / 4.0
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
