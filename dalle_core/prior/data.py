"""Batches of (text tokens, image codes) for the prior, from image-code shards.

The shards are WebDataset tars written by `dalle_core.data.codes` (one sample
per pair: text.npy int32 [text_len], codes.npy int16 [grid, grid], the caption
txt), read here with `iter_code_shard`. A batch is ``(text LongTensor[B, L],
image LongTensor[B, grid * grid])``, the codes flattened row-major (the prior's
image order).

Text and BPE dropout (paper section 2.2 / appendix B.2: 10% in training)
-----------------------------------------------------------------------
The text ids stored in a shard are the deterministic encoding (no dropout) made
when the shard was written. With ``tokenizer`` and ``bpe_dropout > 0`` the
stored *caption* is encoded again for every batch with seeded BPE dropout
(`DalleTokenizer.encode(dropout=True, rng=..., rate=...)`), so the same caption
gets another segmentation each time it comes round. The generator of a sample
is seeded from ``(seed, global step, its position in the global batch)``
(`dropout_rng`): the same seed, rank and step give the same batch, a resumed
run the batches it would have seen, and in ``split="sample"`` the rank slices
still make up the single-process batch whatever the world size. With
``bpe_dropout == 0`` (or no tokenizer) the stored ids are used as they are.
`prior_tokenizer` finds the tokenizer the codes were encoded with.

Order is a pure function of (seed, epoch): each epoch shuffles the shard order
and then the samples through a seeded shuffle buffer, and yields
``n_samples // batch_size`` full global batches (the remainder is dropped, so
every epoch has the same length). ``start_step=k`` yields global batch k first,
so a resumed run sees exactly the batches it would have seen.

Data parallelism: `batch_size` is the *global* batch; rank r of `world_size`
yields its ``batch_size / world_size`` slice of each global batch.

- ``split="sample"``: every rank reads the same shuffled stream and keeps the
  samples whose index in the global batch is r modulo world_size. The union of
  the ranks' slices is exactly the single-process batch (what the equivalence
  tests need); each rank decodes the whole stream, fine for code shards (a few
  KB a sample) up to moderate scale.
- ``split="shard"``: each epoch's shuffled shard list is dealt out to the ranks
  (shard i to rank i mod world_size), each rank streams only its shards through
  its own shuffle buffer; the epoch length is set by the rank with the fewest
  samples. What to use when there are many more shards than ranks.
- ``split="auto"``: "shard" when there are at least 4 shards per rank, else "sample".
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from dalle_core.data.codes import CodedPair, iter_code_shard

log = logging.getLogger(__name__)

# Where `prior_tokenizer` looks for the tokenizer, relative to the storage root
# that holds the code prefix: next to the codes, then the pipeline's tokenizer
# key (assets.text.TOKENIZER_KEY; dalle_core cannot import assets).
TOKENIZER_KEYS = ("{prefix}/tokenizer.json", "tokenizer/bpe.json")


def code_shards(storage, prefix: str = "image_codes", cache_dir: str | Path | None = None
                ) -> tuple[list[Path], list[int]]:
    """Verified local paths of the image-code shards under `prefix` and their
    sample counts (from the manifest)."""
    from dalle_core.data.loader import local_shard_paths
    from dalle_core.data.shards import Manifest

    manifest = Manifest.load(storage, prefix)
    paths = local_shard_paths(storage, prefix, cache_dir)
    return paths, [s.count for s in manifest.shards]


def _counts(paths: Sequence[Path], counts: Sequence[int] | None) -> list[int]:
    if counts is not None:
        if len(counts) != len(paths):
            raise ValueError(f"{len(counts)} counts for {len(paths)} shards")
        return [int(c) for c in counts]
    from dalle_core.data.shards import count_samples

    return [count_samples(p) for p in paths]


def _shuffled(stream: Iterator[CodedPair], rng: random.Random, buffer: int) -> Iterator[CodedPair]:
    """A seeded shuffle buffer (the same order for the same rng state)."""
    if buffer <= 1:
        yield from stream
        return
    buf: list[CodedPair] = []
    for item in stream:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _stream(paths: Sequence[Path], order: Sequence[int], rng: random.Random, buffer: int) -> Iterator[CodedPair]:
    def raw():
        for i in order:
            yield from iter_code_shard(paths[i])

    return _shuffled(raw(), rng, buffer)


def dropout_rng(seed: int, step: int, position: int) -> random.Random:
    """The BPE-dropout generator of the sample at `position` of global batch
    `step`. Seeded from a string, which `random.Random` hashes with SHA-512:
    the same in every process (unlike ``hash()``) and on every platform."""
    return random.Random(f"dalle-prior-bpe-dropout/{int(seed)}/{int(step)}/{int(position)}")


def _dropout_text(items: list[CodedPair], tokenizer, rate: float, seed: int, step: int,
                  positions: Sequence[int]) -> np.ndarray:
    out = []
    for it, pos in zip(items, positions):
        if tokenizer.text_len != it.text.shape[0]:
            raise ValueError(f"sample {it.key}: {it.text.shape[0]} stored text ids, but the tokenizer writes "
                             f"{tokenizer.text_len}: not the tokenizer these codes were encoded with")
        try:
            out.append(tokenizer.encode(it.caption, dropout=True, rng=dropout_rng(seed, step, pos), rate=rate))
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample {it.key}: its caption does not encode: {e}") from None
    return np.asarray(out, dtype=np.int64)


def caption_dropped(seed: int, step: int, position: int, rate: float) -> bool:
    """Whether the sample at `position` of global batch `step` trains with the empty
    caption (`PriorTrainingConfig.caption_dropout`): the same draw on every rank and
    after a resume, from its own string-seeded generator (as `dropout_rng`)."""
    return rate > 0.0 and random.Random(f"dalle-prior-caption-dropout/{int(seed)}/{int(step)}/{int(position)}").random() < rate


def empty_captions(n: int, text_len: int, text_vocab_size: int) -> torch.Tensor:
    """n empty captions [n, text_len]: every position holds its own pad token
    (`DalleTokenizer.pad_id`: text_vocab_size + position), the padding the tokenizer
    writes after every caption with no caption before it (the tokenizer refuses ""):
    what the prior sees for the unconditional stream."""
    return (text_vocab_size + torch.arange(text_len, dtype=torch.long)).expand(n, text_len).clone()


def _to_batch(items: list[CodedPair], tokenizer=None, bpe_dropout: float = 0.0, seed: int = 0,
              step: int = 0, positions: Sequence[int] | None = None, caption_dropout: float = 0.0,
              text_vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {(it.text.shape, it.codes.shape) for it in items}
    if len(shapes) != 1:
        keys = ", ".join(it.key for it in items[:4])
        raise ValueError(f"samples {keys}... have different text / code shapes {sorted(map(str, shapes))}")
    if tokenizer is not None and bpe_dropout > 0.0:
        positions = range(len(items)) if positions is None else positions
        text = torch.from_numpy(_dropout_text(items, tokenizer, bpe_dropout, seed, step, positions))
    else:
        text = torch.from_numpy(np.stack([it.text for it in items]).astype(np.int64))
    if caption_dropout > 0.0:
        positions = range(len(items)) if positions is None else positions
        drop = torch.tensor([caption_dropped(seed, step, p, caption_dropout) for p in positions])
        if drop.any():
            text[drop] = empty_captions(int(drop.sum()), text.shape[1], int(text_vocab_size))
    image = torch.from_numpy(np.stack([it.codes.reshape(-1) for it in items]).astype(np.int64))
    return text, image


def code_batches(paths: Sequence[str | Path], batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, *, split: str = "sample",
                 shuffle_buffer: int = 1000, counts: Sequence[int] | None = None,
                 epochs: int | None = None, tokenizer=None,
                 bpe_dropout: float = 0.0, caption_dropout: float = 0.0,
                 text_vocab_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (or `epochs`) stream of this rank's slice of each global batch:
    ``(text LongTensor[B / world_size, L], image LongTensor[B / world_size, N])``,
    starting at global batch `start_step`. `counts`: samples per shard (from
    the manifest; counted from the tars when None). `tokenizer` (a
    `DalleTokenizer`) and `bpe_dropout` (`PriorTrainingConfig.bpe_dropout`): encode the
    stored captions again with seeded BPE dropout (module docstring). `caption_dropout`
    (`PriorTrainingConfig.caption_dropout`, needs `text_vocab_size`, the BPE ids before
    the pads): that share of samples gets the empty caption (`caption_dropped`)."""
    if not 0.0 <= float(caption_dropout) < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout!r}")
    if caption_dropout > 0.0 and text_vocab_size is None:
        raise ValueError("caption_dropout > 0 needs text_vocab_size (the empty caption is the pad ids after it)")
    if not 0.0 <= float(bpe_dropout) < 1.0:
        raise ValueError(f"bpe_dropout must be in [0, 1), got {bpe_dropout!r}")
    if bpe_dropout > 0.0 and tokenizer is None:
        raise ValueError("bpe_dropout > 0 needs the tokenizer (the stored text ids have no dropout)")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no image-code shards")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"the global batch {batch_size} must be a positive multiple of the "
                         f"world size {world_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if split == "auto":
        split = "shard" if world_size > 1 and len(paths) >= 4 * world_size else "sample"
    if split not in ("sample", "shard"):
        raise ValueError(f"split must be 'sample', 'shard' or 'auto', got {split!r}")
    counts = _counts(paths, counts)
    local_b = batch_size // world_size

    if split == "sample":
        steps_per_epoch = sum(counts) // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{sum(counts)} samples in {len(paths)} shards: fewer than one batch of {batch_size}")
    else:
        def rank_shards(epoch: int) -> list[list[int]]:
            order = list(range(len(paths)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            return [order[r::world_size] for r in range(world_size)]

        # The epoch length depends on which shards each rank gets; compute per epoch.
        def spe(epoch: int) -> int:
            return min(sum(counts[i] for i in sh) for sh in rank_shards(epoch)) // local_b

        if len(paths) < world_size:
            raise ValueError(f"split='shard' needs at least one shard per rank: {len(paths)} shards, "
                             f"{world_size} ranks")

    # Find the epoch holding global batch `start_step`.
    epoch, skip, global_step = 0, start_step, start_step
    while True:
        n = steps_per_epoch if split == "sample" else spe(epoch)
        if n < 1:
            raise ValueError(f"epoch {epoch}: a rank has fewer than {local_b} samples")
        if skip < n:
            break
        skip -= n
        epoch += 1
        if epochs is not None and epoch >= epochs:
            return

    while epochs is None or epoch < epochs:
        if split == "sample":
            n_steps = steps_per_epoch
            order = list(range(len(paths)))
            rng = random.Random(seed * 1_000_003 + epoch)
            rng.shuffle(order)
            stream = _stream(paths, order, rng, shuffle_buffer)
            per_step = batch_size  # samples of the stream per global batch
        else:
            n_steps = spe(epoch)
            mine = rank_shards(epoch)[rank]
            rng = random.Random((seed * 1_000_003 + epoch) * 65_537 + rank)
            stream = _stream(paths, mine, rng, shuffle_buffer)
            per_step = local_b
        step, j, batch, positions = 0, 0, [], []
        first_sample = skip * per_step
        for item in stream:
            if j >= first_sample and (split == "shard" or (j % batch_size) % world_size == rank):
                batch.append(item)
                # the sample's position in the global batch (seeds its BPE dropout)
                positions.append(j % batch_size if split == "sample" else rank * local_b + len(positions))
            j += 1
            if j % per_step == 0 and j > first_sample:
                if len(batch) != local_b:  # cannot happen: per_step samples hold exactly local_b of ours
                    raise RuntimeError(f"internal error: rank batch of {len(batch)}, expected {local_b}")
                yield _to_batch(batch, tokenizer, float(bpe_dropout), seed, global_step, positions,
                                float(caption_dropout), text_vocab_size)
                batch, positions = [], []
                global_step += 1
                step += 1
                if step + skip >= n_steps:
                    break
        else:
            if step + skip < n_steps:
                raise RuntimeError(f"the shards held fewer samples than their counts say "
                                   f"(epoch {epoch}: {j} samples read)")
        epoch += 1
        skip = 0


def prior_tokenizer(storage, prefix: str, text_len: int, text_vocab_size: int, path: str | Path | None = None):
    """The tokenizer to encode the prior's captions with at batch time, or None.

    `path`: an explicit tokenizer file; it must fit the prior (text_len, BPE
    vocabulary) and, when the code manifest names one (``tokenizer_sha256``), be
    that tokenizer - else ValueError. Without `path` the keys `TOKENIZER_KEYS`
    of `storage` are tried: one that is not the manifest's tokenizer (retrained
    since the codes were made) is skipped with a warning, one that is but does
    not fit the prior raises; None (train on the stored ids, without BPE
    dropout) is returned with a warning when none is found."""
    from dalle_core.data.shards import Manifest
    from dalle_core.text.bpe import DalleTokenizer

    try:
        expected = (Manifest.load(storage, prefix).extra or {}).get("tokenizer_sha256")
    except Exception:  # noqa: BLE001 - no manifest: nothing to compare with
        expected = None

    def stale(text: str, source: str) -> str | None:
        sha = hashlib.sha256(text.encode()).hexdigest()
        if expected and sha != expected:
            return (f"{source} is not the tokenizer the image codes were encoded with "
                    f"(sha256 {sha[:12]}, the code manifest says {str(expected)[:12]})")
        return None

    def check(text: str, source: str) -> DalleTokenizer:
        if (why := stale(text, source)) is not None:
            raise ValueError(why)
        tok = DalleTokenizer.from_json(text, source=source)
        if tok.text_len != text_len or tok.vocab_size != text_vocab_size:
            raise ValueError(f"{source} writes {tok.text_len} text positions of {tok.vocab_size} BPE ids; "
                             f"the prior reads {text_len} of {text_vocab_size}")
        return tok

    if path is not None:
        return check(Path(path).read_text(encoding="utf-8"), str(path))
    for key in (k.format(prefix=prefix.strip("/")) for k in TOKENIZER_KEYS):
        if storage.exists(key):
            text = storage.get_text(key)
            if (why := stale(text, storage.uri(key))) is not None:
                log.warning("skipping %s", why)
                continue
            return check(text, storage.uri(key))
    log.warning("no tokenizer for the image codes at %s (tried %s): the prior trains on the stored caption ids, "
                "WITHOUT BPE dropout (pass --tokenizer)", storage.uri(prefix), ", ".join(TOKENIZER_KEYS))
    return None


def write_synthetic_code_shards(storage, prefix: str, config, n_shards: int = 3, per_shard: int = 40,
                                n_templates: int = 8, noise: float = 0.1, seed: int = 0):
    """A small learnable code set for tests and benchmarks: each sample's codes
    are one of `n_templates` random grids with a fraction `noise` of the codes
    replaced, its caption tokens name the template, and tokens 3-4 hold a unique
    sample id (so tests can tell samples apart). Written as real code shards
    with a manifest (`dalle_core.data.codes`). Returns the manifest."""
    from dalle_core.data.codes import save_code_manifest, write_code_shard

    L, V, g = config.text_len, config.text_vocab_size, config.image_grid
    if L < 5 or V < 64:
        raise ValueError("the synthetic code set needs text_len >= 5 and text_vocab_size >= 64")
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, config.image_vocab_size, size=(n_templates, g, g))
    id_base = V - 40  # tokens [V - 40, V): 32 values for the id's low digit, 8 for the high one
    pads = empty_captions(1, L, V)[0].numpy().astype(np.int32)  # every position's pad token
    infos, k = [], 0
    for s in range(n_shards):
        pairs = []
        for _ in range(per_shard):
            t = int(rng.integers(0, n_templates))
            text = pads.copy()  # then the caption's 5 tokens
            text[:5] = [1 + t % (V // 4), V // 4 + t % (V // 4), V // 2, id_base + k % 32, id_base + 32 + (k // 32) % 8]
            codes = templates[t].copy()
            mask = rng.random(codes.shape) < noise
            codes[mask] = rng.integers(0, config.image_vocab_size, size=int(mask.sum()))
            pairs.append(CodedPair(key=f"sample{k:06d}", caption=f"template {t}", text=text,
                                   codes=codes.astype(np.int16), meta={"template": t, "id": k}))
            k += 1
        infos.append(write_code_shard(pairs, storage, f"{prefix.strip('/')}/shard-{s:05d}.tar"))
    # the sizes a real code manifest records (assets/dvae.py), so launchers check them the same way
    sizes = {"grid": g, "image_vocab": config.image_vocab_size, "text_len": L, "text_vocab": V + L}
    return save_code_manifest(storage, prefix, infos, {"synthetic": True, "n_templates": n_templates, **sizes})


__all__ = ["caption_dropped", "code_batches", "code_shards", "dropout_rng", "empty_captions", "prior_tokenizer",
           "write_synthetic_code_shards"]
