"""Image sets as the metrics see them: PIL images in, uint8 RGB batches out.

Every metric takes a sequence of PIL images (any size, any mode) and converts
them losslessly to uint8 RGB; nothing is JPEG-compressed or resized here (each
feature extractor resizes to its own input size, which the report names).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

Progress = Optional[Callable[[int, int], None]]  # progress(done, total)


def to_uint8(image: Image.Image) -> np.ndarray:
    """[3, H, W] uint8 RGB array of one image."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def uint8_batches(images: Sequence[Image.Image], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 tensors [n, 3, H, W] of at most batch_size consecutive images of one size
    (a new batch starts where the size changes, so mixed-size sets need no resizing)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[np.ndarray] = []
    for im in images:
        a = to_uint8(im)
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch))
            batch = []
        batch.append(a)
    if batch:
        yield torch.from_numpy(np.stack(batch))


def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: Sequence[Image.Image], batch_size: int,
                progress: Progress = None) -> np.ndarray:
    """Concatenate fn(uint8 batch) over the set, reporting progress(done, total) after each batch."""
    out, done, total = [], 0, len(images)
    for batch in uint8_batches(images, batch_size):
        out.append(np.asarray(fn(batch).detach().cpu().numpy()))
        done += len(batch)
        if progress is not None:
            progress(done, total)
    if not out:
        raise ValueError("empty image set")
    return np.concatenate(out)


def image_set_digest(images: Sequence[Image.Image]) -> str:
    """sha256 over the ordered RGB pixels and sizes of an image set."""
    h = hashlib.sha256(f"n={len(images)};".encode())
    for im in images:
        a = to_uint8(im)
        h.update(f"{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()
