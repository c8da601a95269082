"""Training readers over the shards: a `webdataset` pipeline yielding tensors.

Shards are verified against their manifest (a corrupt shard is reported by name,
never silently truncated) and, for remote storage, cached locally once. The
order is a pure function of (seed, epoch), so a resumed run sees the same
batches: `image_batches(..., start_step=k)` yields the k-th batch first.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from dalle_core.data.shards import CorruptShardError, Manifest, file_sha256
from dalle_core.storage import LocalStorage, Storage


class BadImageError(ValueError):
    """An image that a model cannot take: names the item and the reason."""


def image_to_tensor(image: Image.Image, image_size: int, name: str = "image") -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]; refuses grayscale/alpha and wrong sizes with the item's name."""
    if image.mode != "RGB":
        raise BadImageError(f"{name}: expected an RGB image, got mode {image.mode!r} (grayscale or alpha)")
    if image.size != (image_size, image_size):
        raise BadImageError(f"{name}: expected {image_size}x{image_size} pixels, got {image.size[0]}x{image.size[1]}")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def local_shard_paths(storage: Storage, prefix: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Verified local paths of every shard in the manifest (downloaded once for S3)."""
    manifest = Manifest.load(storage, prefix)
    paths = []
    for info in manifest.shards:
        key = f"{prefix.rstrip('/')}/{info.name}"
        if isinstance(storage, LocalStorage):
            path = storage.path(key)
        else:
            if cache_dir is None:
                raise ValueError("cache_dir is required to read shards from remote storage")
            path = Path(cache_dir) / info.name
            if not (path.exists() and file_sha256(path) == info.sha256):
                storage.get_file(key, path)
        if not path.exists():
            raise CorruptShardError(info.name, f"missing: {path}")
        if file_sha256(path) != info.sha256:
            raise CorruptShardError(info.name, "sha256 does not match the manifest")
        paths.append(path)
    return paths


def _epoch_samples(paths: list[Path], seed: int, epoch: int, shuffle_buffer: int):
    import webdataset as wds

    rng = random.Random(seed * 1_000_003 + epoch)
    order = [str(p) for p in paths]
    rng.shuffle(order)  # shard-level shuffle
    ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    if shuffle_buffer > 1:  # sample-level shuffle, seeded
        ds = ds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)
    return ds.decode("pil")


def iter_samples(paths: list[Path], seed: int = 0, shuffle_buffer: int = 1000, epochs: int | None = None):
    """(key, PIL image, caption) forever (or for `epochs`), reshuffled each epoch."""
    epoch = 0
    while epochs is None or epoch < epochs:
        n = 0
        for sample in _epoch_samples(paths, seed, epoch, shuffle_buffer):
            image = sample.get("png", sample.get("jpg"))
            if image is None:
                raise CorruptShardError(sample.get("__url__", "?"), f"sample {sample['__key__']} has no image")
            n += 1
            yield sample["__key__"], image, sample.get("txt", "")
        if n == 0:
            raise ValueError("the shards hold no samples")
        epoch += 1


def image_batches(
    paths: list[Path],
    batch_size: int,
    image_size: int,
    seed: int = 0,
    start_step: int = 0,
    shuffle_buffer: int = 1000,
) -> Iterator[torch.Tensor]:
    """Endless [B, 3, S, S] float batches; the first one yielded is batch number `start_step`."""
    for images, _ in image_caption_batches(paths, batch_size, image_size, seed, start_step, shuffle_buffer):
        yield images


def image_caption_batches(
    paths: list[Path],
    batch_size: int,
    image_size: int,
    seed: int = 0,
    start_step: int = 0,
    shuffle_buffer: int = 1000,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (images [B, 3, S, S], their B captions); the first one yielded is
    batch number `start_step` (a resumed run sees the data it would have seen)."""
    images, captions, step = [], [], 0
    for key, image, caption in iter_samples(paths, seed, shuffle_buffer):
        if step >= start_step:  # skipped batches are not decoded into tensors
            images.append(image_to_tensor(image, image_size, name=f"sample {key}"))
        captions.append(caption)
        if len(captions) == batch_size:
            if step >= start_step:
                yield torch.stack(images), captions
            images, captions, step = [], [], step + 1
