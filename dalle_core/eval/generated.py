"""The zero-shot images, generated in resumable chunks.

Generating N candidates for each of 30,000 captions is the long part of an
evaluation. Each chunk of captions is written to disk (one .npz of uint8 images)
as soon as it is done, keyed by everything that determines its pixels: the
weights of the prior, the dVAE decoder and the reranker, the chunk's captions,
the number of candidates and the chunk's seed. A killed evaluation that is rerun
loads the finished chunks and generates only the rest, with the same images as
an uninterrupted run; a change of any model starts afresh (new keys).

Besides the reranker's pick, a chunk keeps the first draw's pixels (the prior
without reranking), the index of the reranker's pick among the N candidates and,
when a `judge` (image, caption) -> CheckResult-like is given, the judgements of
all N candidates as small bool arrays (`dalle_core.eval.caption_match`): what
first-draw, any-of-N and reranked caption match need, without ever keeping N
candidates' pixels. The judge's identity is part of the key, so a chunk written
without judgements (or by another judge) is never read as one with them.
"""

from __future__ import annotations

import hashlib
import json
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dalle_core.eval.caption_match import Judgements
from dalle_core.eval.features import read_npz, write_npz_atomic
from dalle_core.prior.config import SamplingConfig

ChunkProgress = Callable[[int, int, bool], None]  # (captions done, total, chunk came from disk)
Judge = Callable[[Image.Image, str], object]  # (image, caption) -> CheckResult-like
CHUNK_FORMAT = "best+first+picked/1"  # what a chunk holds; part of its key


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


@dataclass
class GeneratedSet:
    """What `generate_judged` returns, one entry per caption: the reranker's pick (`best`),
    the first draw (`first`, the prior without reranking), the pick's index among the N
    candidates (`picked`, int [C]; 0 without a reranker) and, with a judge, the judgements
    of all N candidates."""

    best: list[Image.Image]
    first: list[Image.Image]
    picked: np.ndarray
    judgements: Judgements | None = None


def judge_id(judge: Judge) -> str:
    """The judge's name and the sha256 of its module's source: a change to the judge's
    code gives its chunks new keys (their judgements would be stale)."""
    name = f"{getattr(judge, '__module__', '?')}.{getattr(judge, '__qualname__', type(judge).__qualname__)}"
    try:
        source = Path(inspect.getfile(inspect.getmodule(judge))).read_bytes()
    except (TypeError, OSError):  # built in, or defined where no file is
        return name
    return f"{name}@{hashlib.sha256(source).hexdigest()[:16]}"


def generate_best_images(chain, captions: Sequence[str], candidates: int, chunk_size: int, seed: int,
                         cache_dir: str | os.PathLike | None = None,
                         progress: ChunkProgress | None = None) -> list[Image.Image]:
    """For each caption, the reranker's best of `candidates` samples (the paper's
    protocol), chunk by chunk; chunk `start` is drawn with seed `seed + start`.
    With `cache_dir`, finished chunks are stored there and reused."""
    return generate_judged(chain, captions, candidates, chunk_size, seed, cache_dir, progress).best


def generate_judged(chain, captions: Sequence[str], candidates: int, chunk_size: int, seed: int,
                    cache_dir: str | os.PathLike | None = None, progress: ChunkProgress | None = None,
                    judge: Judge | None = None, judge_name: str | None = None,
                    sampling: SamplingConfig | None = None) -> GeneratedSet:
    """`generate_best_images`, keeping per caption the first draw, the index of the
    reranker's pick and, with `judge`, the judgements of every candidate. The same seeds
    draw the same images with or without a judge. `judge_name` (default `judge_id(judge)`)
    goes into the chunk keys: name another one when the judge's behaviour changes.
    `sampling` (default: the paper's, temperature 1) is how the prior is drawn; its
    departures from the paper's go into the chunk keys too."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    root = Path(cache_dir) if cache_dir is not None else None
    digest = chain_digest(chain) if root is not None else ""
    judged_by = "" if judge is None else (judge_name or judge_id(judge))
    best: list[Image.Image] = []
    first: list[Image.Image] = []
    picked, judgements = [], []
    for start in range(0, len(captions), chunk_size):
        chunk = list(captions[start:start + chunk_size])
        path = (root / _chunk_key(digest, chunk, candidates, seed + start, judged_by, sampling)
                if root is not None else None)
        arrays = _read(path, len(chunk), candidates, judge is not None) if path is not None else None
        from_disk = arrays is not None
        if arrays is None:
            arrays = _generate_chunk(chain, chunk, candidates, seed + start, judge, sampling)
            if path is not None:
                write_npz_atomic(path, **arrays)
        best += [Image.fromarray(p, "RGB") for p in arrays["images"]]
        first += [Image.fromarray(p, "RGB") for p in arrays["first"]]
        picked.append(arrays["picked"])
        if judge is not None:
            judgements.append(Judgements.from_arrays(arrays))
        if progress is not None:
            progress(len(best), len(captions), from_disk)
    return GeneratedSet(best, first, np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64),
                        Judgements.concat(judgements) if judgements else None)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def picked_indices(out) -> np.ndarray:
    """int [B]: the index among the candidates (draw order) of the reranker's best image, for
    a `Generated` with candidates (``return_candidates=True``); 0 without reranking."""
    if out.candidates is None:
        raise ValueError("the reranker's pick needs the candidates: generate with return_candidates=True")
    if not out.reranked:
        return np.zeros(out.candidates.shape[0], dtype=np.int64)
    same = (out.candidates == out.images[:, :1]).flatten(2).all(-1)  # the first candidate equal to the kept image
    if not bool(same.any(1).all()):
        raise RuntimeError("the reranker's pick is none of the candidates")
    return same.to(torch.uint8).argmax(1).to(torch.int64).numpy()


def judge_candidates(out, judge: Judge, picked: np.ndarray | None = None) -> Judgements:
    """Every candidate of a `Generated` (``return_candidates=True``) judged against its
    caption, as the uint8 image a chunk keeps, with the reranker's pick."""
    picked = picked_indices(out) if picked is None else picked
    checks = [[judge(Image.fromarray(p, "RGB"), caption) for p in _to_uint8(out.candidates[i])]
              for i, caption in enumerate(out.captions)]
    return Judgements.from_checks(checks, picked)


def _generate_chunk(chain, chunk: list[str], candidates: int, seed: int, judge: Judge | None,
                    sampling: SamplingConfig | None = None) -> dict[str, np.ndarray]:
    sampling = sampling or SamplingConfig()
    # batch_size None: rows sized from the KV cache per row and free GPU memory (512 on CPU)
    out = chain.generate(chunk, n=candidates, keep=1, seed=seed, batch_size=None, return_candidates=True,
                         temperature=sampling.temperature, top_k=sampling.top_k,
                         guidance_scale=sampling.guidance_scale)
    picked = picked_indices(out)
    arrays = {"images": _to_uint8(out.images[:, 0]), "first": _to_uint8(out.candidates[:, 0]), "picked": picked}
    if judge is not None:
        arrays.update(judge_candidates(out, judge, picked).arrays())
    return arrays


def _chunk_key(digest: str, captions: list[str], candidates: int, seed: int, judged_by: str = "",
               sampling: SamplingConfig | None = None) -> str:
    # the paper's sampling adds nothing: chunks written before SamplingConfig keep their keys
    changed = sorted((sampling or SamplingConfig()).key().items())
    extra = [f"sampling={json.dumps(changed)}"] if changed else []
    key = hashlib.sha256("\n".join([digest, str(candidates), str(seed), CHUNK_FORMAT, f"judge={judged_by}",
                                    *extra, *captions]).encode()).hexdigest()
    return f"chunk-{key[:24]}.npz"


def _read(path: Path, n: int, candidates: int, judged: bool) -> dict[str, np.ndarray] | None:
    """The chunk's arrays, or None if missing, unreadable, of the wrong size or without
    the judgements asked for (regenerate)."""
    arrays = read_npz(path) or {}
    pixels, first, picked = arrays.get("images"), arrays.get("first"), arrays.get("picked")
    for p in (pixels, first):
        if p is None or p.dtype != np.uint8 or p.ndim != 4 or p.shape[0] != n:
            return None
    if picked is None or picked.shape != (n,) or not np.issubdtype(picked.dtype, np.integer):
        return None
    if judged:
        try:
            j = Judgements.from_arrays(arrays)
        except (KeyError, ValueError):
            return None
        if (j.captions, j.candidates) != (n, candidates) or not np.array_equal(j.picked, picked):
            return None
    return arrays
