"""One image-text pair as it moves through the data stage.

A pair is stored as a WebDataset sample: `__key__` (e.g. "b000-000123", no
dots: WebDataset splits a tar member name at its first dot), the image bytes
under "png" or "jpg" (already resized and centre-cropped to the profile's
square `image_size` by the crawler), "txt" (the caption, utf-8) and "json"
(metadata: at least url, caption, original_width, original_height and the
sha256 of the downloaded original bytes; the filter stage adds "phash").
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
REQUIRED_META = ("url", "caption", "original_width", "original_height", "sha256")


class InvalidSampleError(ValueError):
    """A record that is not a valid image-text pair; the message names its key."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"sample {key!r}: {reason}")


class UndecodableImageError(InvalidSampleError):
    """The image bytes of a sample do not decode."""


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected bytes, got {type(value).__name__}")


@dataclass
class Pair:
    key: str
    caption: str
    image_bytes: bytes
    image_ext: str
    meta: dict
    # per-object cache (decoded image, pHash, ...); not part of equality or repr
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key:
            raise InvalidSampleError(
                str(self.key), "key must be non-empty and contain neither '.' nor '/'"
            )
        ext = self.image_ext.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise InvalidSampleError(
                self.key, f"image extension {self.image_ext!r} is not one of {IMAGE_EXTENSIONS}"
            )
        self.image_ext = ext

    @property
    def image(self):
        """The decoded image (PIL, RGB); decoded once and cached."""
        img = self._cache.get("image")
        if img is None:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(self.image_bytes)) as im:
                    img = im.convert("RGB")
            except Exception as e:  # PIL raises several types for bad bytes
                raise UndecodableImageError(self.key, f"image bytes do not decode: {e}") from e
            self._cache["image"] = img
        return img

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the stored image, read from its header only."""
        if "image" in self._cache:
            return self._cache["image"].size
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.image_bytes)) as im:
                return im.size
        except Exception as e:
            raise UndecodableImageError(self.key, f"image bytes do not decode: {e}") from e

    def to_sample(self) -> dict:
        """A dict for `webdataset.TarWriter` (every value already bytes)."""
        meta = dict(self.meta)
        meta.setdefault("caption", self.caption)
        return {
            "__key__": self.key,
            self.image_ext: self.image_bytes,
            "txt": self.caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        }

    @classmethod
    def from_sample(cls, sample: Mapping[str, Any]) -> "Pair":
        """From a WebDataset sample (raw bytes, or already decoded str/dict values)."""
        key = sample.get("__key__")
        if not key:
            url = sample.get("__url__", "?")
            raise InvalidSampleError("?", f"sample without __key__ (from {url})")
        key = str(key)
        exts = [e for e in IMAGE_EXTENSIONS if e in sample]
        missing = []
        if not exts:
            missing.append("image (" + "/".join(IMAGE_EXTENSIONS) + ")")
        if "txt" not in sample:
            missing.append("txt")
        if "json" not in sample:
            missing.append("json")
        if missing:
            present = sorted(k for k in sample if not k.startswith("__"))
            raise InvalidSampleError(key, f"missing {', '.join(missing)} (has {present})")
        ext = exts[0]
        try:
            image_bytes = _as_bytes(sample[ext])
        except TypeError as e:
            raise InvalidSampleError(key, f"image {ext!r}: {e}") from None
        txt = sample["txt"]
        try:
            caption = txt if isinstance(txt, str) else _as_bytes(txt).decode("utf-8")
        except (UnicodeDecodeError, TypeError) as e:
            raise InvalidSampleError(key, f"caption is not utf-8 text: {e}") from None
        meta = sample["json"]
        if not isinstance(meta, dict):
            try:
                meta = json.loads(_as_bytes(meta).decode("utf-8"))
            except (ValueError, TypeError) as e:
                raise InvalidSampleError(key, f"json metadata does not parse: {e}") from None
            if not isinstance(meta, dict):
                raise InvalidSampleError(key, "json metadata is not an object")
        return cls(key=key, caption=caption, image_bytes=image_bytes, image_ext=ext, meta=dict(meta))

    def require_meta(self, *names: str) -> None:
        missing = [n for n in names if n not in self.meta]
        if missing:
            raise InvalidSampleError(self.key, f"metadata lacks {', '.join(missing)}")

    def meta_int(self, name: str) -> int:
        if name not in self.meta:
            raise InvalidSampleError(self.key, f"metadata lacks {name!r}")
        try:
            return int(self.meta[name])
        except (TypeError, ValueError):
            raise InvalidSampleError(
                self.key, f"metadata {name!r} is not an integer: {self.meta[name]!r}"
            ) from None
