"""The zero-shot images, generated in resumable chunks.

Generating N candidates for each of 30,000 captions is the long part of an
evaluation. Each chunk of captions is written to disk (one .npz of uint8 images)
as soon as it is done, keyed by everything that determines its pixels: the
weights of the prior, the dVAE decoder and the reranker, the chunk's captions,
the number of candidates and the chunk's seed. A killed evaluation that is rerun
loads the finished chunks and generates only the rest, with the same images as
an uninterrupted run; a change of any model starts afresh (new keys).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dalle_core.eval.features import read_npz, write_npz_atomic

ChunkProgress = Callable[[int, int, bool], None]  # (captions done, total, chunk came from disk)


def weights_digest(*modules: Optional[torch.nn.Module]) -> str:
    """sha256 over the parameters and buffers of the given modules (None: skipped)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(b"none" if m is None else b"module")
        if m is None:
            continue
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def chain_digest(chain) -> str:
    """What a generated image depends on, besides its caption and seed: the three
    models and the tokenizer's vocabulary."""
    tok = chain.tokenizer
    return hashlib.sha256((weights_digest(chain.prior, chain.decoder, chain.reranker)
                           + f"|{tok.text_len}|{tok.vocab_size}").encode()).hexdigest()


def generate_best_images(chain, captions: Sequence[str], candidates: int, chunk_size: int, seed: int,
                         cache_dir: str | os.PathLike | None = None,
                         progress: ChunkProgress | None = None) -> list[Image.Image]:
    """For each caption, the reranker's best of `candidates` samples (the paper's
    protocol), chunk by chunk; chunk `start` is drawn with seed `seed + start`.
    With `cache_dir`, finished chunks are stored there and reused."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    root = Path(cache_dir) if cache_dir is not None else None
    digest = chain_digest(chain) if root is not None else ""
    images: list[Image.Image] = []
    for start in range(0, len(captions), chunk_size):
        chunk = list(captions[start:start + chunk_size])
        path = root / _chunk_key(digest, chunk, candidates, seed + start) if root is not None else None
        pixels = _read(path, len(chunk)) if path is not None else None
        from_disk = pixels is not None
        if pixels is None:
            # batch_size None: rows sized from the KV cache per row and free GPU memory (256 on CPU)
            out = chain.generate(chunk, n=candidates, keep=1, seed=seed + start, batch_size=None)
            pixels = (out.images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            if path is not None:
                write_npz_atomic(path, images=pixels)
        images += [Image.fromarray(p, "RGB") for p in pixels]
        if progress is not None:
            progress(len(images), len(captions), from_disk)
    return images


def _chunk_key(digest: str, captions: list[str], candidates: int, seed: int) -> str:
    key = hashlib.sha256("\n".join([digest, str(candidates), str(seed), *captions]).encode()).hexdigest()
    return f"chunk-{key[:24]}.npz"


def _read(path: Path, n: int) -> np.ndarray | None:
    """The chunk's images, or None if missing, unreadable or of the wrong size (regenerate)."""
    pixels = (read_npz(path) or {}).get("images")
    if pixels is None or pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[0] != n:
        return None
    return pixels
