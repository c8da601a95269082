"""Image-code shards: what the prior trains on.

One WebDataset sample per pair: the dVAE's token grid of the image ("codes.npy",
int16 [grid, grid], argmax of the encoder logits), the tokenized caption
("text.npy", int32 [text_len], with per-position padding ids; the deterministic
encoding, no BPE dropout), the caption ("txt": the prior's data path encodes it
again with seeded BPE dropout for every batch, dalle_core.prior.data) and the
source metadata. One code shard per image shard, same name, each encoded
on its own (a Dagster partition) and marked done with what it was encoded from
and with (`mark_done`), so encoding resumes shard by shard; once every shard is
coded, `assemble_code_manifest` writes the manifest of counts and checksums the
prior reads, refusing shards that are missing or stale.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from dalle_core.data.shards import TAR_MTIME, Manifest, ShardInfo, file_sha256
from dalle_core.storage import Storage


@dataclass
class CodedPair:
    key: str
    caption: str
    text: np.ndarray  # int32 [text_len]
    codes: np.ndarray  # int16 [grid, grid]
    meta: dict


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def write_code_shard(pairs: Iterable[CodedPair], storage: Storage, key: str) -> ShardInfo:
    """Write one code shard (locally, then through storage); returns its manifest entry."""
    import webdataset as wds

    with tempfile.TemporaryDirectory(prefix="dalle-codes-") as tmp:
        path = Path(tmp) / Path(key).name
        n = 0
        with wds.TarWriter(str(path), mtime=TAR_MTIME) as sink:
            for p in pairs:
                sink.write({
                    "__key__": p.key,
                    "codes.npy": _npy(p.codes.astype(np.int16)),
                    "text.npy": _npy(p.text.astype(np.int32)),
                    "txt": p.caption.encode("utf-8"),
                    "json": json.dumps(p.meta).encode("utf-8"),
                })
                n += 1
        info = ShardInfo(name=Path(key).name, count=n, sha256=file_sha256(path), bytes=path.stat().st_size)
        storage.put_file(key, path)
    return info


def iter_code_shard(path: str | Path) -> Iterator[CodedPair]:
    """The pairs of one code shard. Every sample must hold codes.npy, text.npy,
    txt (the caption: the prior re-encodes it with BPE dropout at batch time)
    and json; a sample without one names the shard and the member missing."""
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for s in ds:
        missing = [m for m in ("codes.npy", "text.npy", "txt", "json") if m not in s]
        if missing:
            raise ValueError(f"code shard {Path(path).name}: sample {s.get('__key__')!r} has no "
                             f"{', '.join(missing)} (written by another version of the code-shard writer; "
                             f"the prior needs the caption text to apply BPE dropout): re-materialize "
                             f"image_codes for {Path(path).name}")
        yield CodedPair(
            key=s["__key__"],
            caption=s["txt"].decode("utf-8"),
            text=_from_npy(s["text.npy"]),
            codes=_from_npy(s["codes.npy"]),
            meta=json.loads(s["json"]),
        )


def save_code_manifest(storage: Storage, prefix: str, infos: list[ShardInfo], extra: dict) -> Manifest:
    from datetime import datetime, timezone

    manifest = Manifest(
        shards=infos,
        total=sum(i.count for i in infos),
        created=datetime.now(timezone.utc).isoformat(),
        format="dalle-image-codes/1",
        extra=extra,
    )
    manifest.save(storage, prefix)
    return manifest


# --------------------------------------------------------------------------- per-shard markers


def done_key(prefix: str, shard_name: str) -> str:
    return f"{prefix.rstrip('/')}/{shard_name}.done.json"


def mark_done(storage: Storage, prefix: str, info: ShardInfo, source_sha256: str,
              encoded_with: Mapping[str, str], extra: Mapping) -> None:
    """Written after the code shard: the shard is done for this source and these models
    (`encoded_with`: e.g. dvae_sha256, tokenizer_sha256); `extra` goes into the manifest."""
    marker = {"info": info.__dict__, "source_sha256": source_sha256, **encoded_with, "extra": dict(extra)}
    storage.put_text(done_key(prefix, info.name), json.dumps(marker))


def read_done(storage: Storage, prefix: str, shard_name: str) -> dict | None:
    try:
        return json.loads(storage.get_text(done_key(prefix, shard_name)))
    except FileNotFoundError:
        return None


def stale_reason(done: dict | None, source_sha256: str, encoded_with: Mapping[str, str]) -> str | None:
    """Why a shard's codes cannot be used (None: done from this source with these models)."""
    if done is None:
        return "not encoded"
    if done.get("source_sha256") != source_sha256:
        return "encoded from another version of the shard"
    for name, sha in encoded_with.items():
        if done.get(name) != sha:
            model = name.removesuffix("_sha256")
            return f"encoded with another {model} ({str(done.get(name))[:12]}, not {sha[:12]})"
    return None


class CodeManifestError(ValueError):
    """Some shards have no usable codes; the message names each and why."""


def assemble_code_manifest(storage: Storage, prefix: str, source: Manifest,
                           encoded_with: Mapping[str, str]) -> Manifest:
    """The code manifest for every shard of `source`, once each is coded by these models."""
    dones = {s.name: read_done(storage, prefix, s.name) for s in source.shards}
    problems = [(s.name, why) for s in source.shards
                if (why := stale_reason(dones[s.name], s.sha256, encoded_with)) is not None]
    if problems:
        raise CodeManifestError(
            f"image codes for {len(problems)} of {len(source.shards)} shards are missing or stale: "
            + "; ".join(f"{name}: {why}" for name, why in problems)
            + " (materialize image_codes for these partitions)")
    infos = [ShardInfo(**dones[s.name]["info"]) for s in source.shards]
    extra = {**dones[source.shards[0].name]["extra"], **encoded_with} if source.shards else dict(encoded_with)
    return save_code_manifest(storage, prefix, infos, extra)
