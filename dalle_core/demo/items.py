"""One URL of the demo world: what it serves (under each fault) and what a
correct crawler and filter chain must do with it; the evaluation and validation
images."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .render import encode, render
from .scenes import Scene

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
DUPLICATE_FAULTS = ("exact_duplicate", "near_duplicate")


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
