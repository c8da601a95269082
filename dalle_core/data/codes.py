"""Image-code shards: what the prior trains on.

One WebDataset sample per pair: the dVAE's token grid of the image ("codes.npy",
int16 [grid, grid], argmax of the encoder logits), the tokenized caption
("text.npy", int32 [text_len], with per-position padding ids), the caption and
the source metadata. One code shard per image shard, same name, so encoding
resumes shard by shard; a manifest of counts and checksums sits beside them.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dalle_core.data.shards import Manifest, ShardInfo, file_sha256
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
        with wds.TarWriter(str(path), mtime=0.0) as sink:
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
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for s in ds:
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
