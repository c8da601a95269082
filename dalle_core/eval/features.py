"""A disk cache of an image set's features, one .npz per (extractor, image set, blur radius).

Extracting Inception features of 30k images takes long, and the reference set is
the same in every evaluation: its features are computed once per extractor
version and reused. The key holds the extractor's id (which must change when its
weights or resize change), the sha256 of the *unblurred* image set's pixels and
the blur radius, so a cached entry is found without blurring anything. An entry
that is missing, unreadable or of the wrong length is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from dalle_core.eval.images import image_set_digest
from dalle_core.io import atomic_open

Features = dict[str, np.ndarray]  # feature name -> [N, D]


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, extractor_id: str, set_digest: str, radius: float) -> Path:
        key = hashlib.sha256(f"{extractor_id}|{set_digest}|{float(radius)!r}".encode()).hexdigest()[:20]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_id)[:60]
        return self.root / f"{safe}-r{float(radius):g}-{key}.npz"

    def get_or_compute(self, extractor_id: str, images: Sequence[Image.Image], radius: float,
                       compute: Callable[[], Mapping[str, np.ndarray]],
                       set_digest: Optional[str] = None) -> Features:
        """Features of `images` at blur `radius`: read from the cache, or `compute()` (which
        blurs and extracts) and stored. Pass `set_digest` to skip re-hashing a known set."""
        p = self.path(extractor_id, set_digest or image_set_digest(images), radius)
        cached = self._read(p, len(images))
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        feats = {k: np.asarray(v) for k, v in compute().items()}
        write_npz_atomic(p, **feats)
        return feats

    @staticmethod
    def _read(p: Path, n: int) -> Optional[Features]:
        feats = read_npz(p)
        if not feats or any(v.ndim < 1 or v.shape[0] != n for v in feats.values()):
            return None
        return feats


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, atomically (dalle_core.io): a crash never leaves a half-written
    file under the real name."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def read_npz(path: Path) -> Optional[dict[str, np.ndarray]]:
    """The arrays of an .npz file, or None if it is missing or unreadable (recompute)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
