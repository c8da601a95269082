"""WebDataset tar shards with a checksummed manifest.

Layout under a storage prefix:

    {prefix}/shard-00000.tar, shard-00001.tar, ...   WebDataset tars (webdataset.TarWriter)
    {prefix}/manifest.json                            {"shards": [{"name", "count", "sha256",
                                                       "bytes"}], "total", "created", "format"}

The manifest is written last (and an old one removed first), so a prefix with a
manifest always describes a complete write. Readers check every shard's sha256
against the manifest before yielding anything from it, so a corrupt shard is
reported by name and either raises `CorruptShardError` or, with
`skip_corrupt=True`, is skipped whole and reported — never silently truncated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..storage import Storage
from .pairs import InvalidSampleError, Pair

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.tar"
FORMAT = "webdataset-tar/v1"  # samples: __key__, png|jpg, txt, json

# fixed tar member mtime: the same rows give byte-identical tars. An int: a float (0.0) makes
# Python's tarfile add a 1 KiB PAX header to every member (+57% on code shards)
TAR_MTIME = 0


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".tar")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ManifestError(ValueError):
    pass


class CorruptShardError(RuntimeError):
    """A shard that is missing, fails its checksum or count, or does not parse."""

    def __init__(self, shard: str, reason: str):
        self.shard = shard
        self.reason = reason
        super().__init__(f"corrupt shard {shard!r}: {reason}")


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    shards: list[ShardInfo] = field(default_factory=list)
    total: int = 0
    created: str = ""
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "shards": [asdict(s) for s in self.shards],
            "total": self.total,
            "created": self.created,
            "format": self.format,
            "extra": dict(self.extra),
        }

    def content_digest(self) -> str:
        """sha256 naming the data alone: every shard's name, size and sha256 in order, and the
        extra fields (what the data was made with), not when the manifest was written. A model
        trained on one digest is not the model of another: training runs key their checkpoints
        on it, so new data starts a run afresh and a rerun on the same data resumes."""
        content = {"shards": [[s.name, s.count, s.sha256] for s in self.shards], "extra": self.extra}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            shards = [ShardInfo(**s) for s in d["shards"]]
            return cls(
                shards=shards,
                total=int(d["total"]),
                created=str(d.get("created", "")),
                format=str(d.get("format", FORMAT)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e!r}") from None

    def save(self, storage: Storage, prefix: str) -> str:
        key = _join(prefix, MANIFEST_NAME)
        storage.put_text(key, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return key

    @classmethod
    def load(cls, storage: Storage, prefix: str) -> "Manifest":
        key = _join(prefix, MANIFEST_NAME)
        try:
            text = storage.get_text(key)
        except FileNotFoundError:
            raise ManifestError(f"no shard manifest at {storage.uri(key)}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {storage.uri(key)} is not JSON: {e}") from None


def write_shards(
    pairs: Iterable[Pair],
    storage: Storage,
    prefix: str,
    shard_size: int,
    *,
    mtime: int = TAR_MTIME,
    extra: dict | None = None,
) -> Manifest:
    """Write `pairs` as WebDataset shards of `shard_size` samples under `prefix`.

    Each shard is written to a local temp file with `webdataset.TarWriter`
    (fixed member mtime, so equal input gives byte-identical shards), then
    uploaded with `storage.put_file`. Shards left from an earlier, larger write
    under the same prefix are removed. Returns the manifest (also saved).
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    manifest_key = _join(prefix, MANIFEST_NAME)
    if storage.exists(manifest_key):
        storage.delete(manifest_key)  # the prefix is incomplete until the new manifest lands

    infos: list[ShardInfo] = []
    seen_keys: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="dalle-shards-") as tmp:
        writer: wds.TarWriter | None = None
        path: Path | None = None
        count = 0

        def finish() -> None:
            nonlocal writer, count
            assert writer is not None and path is not None
            writer.close()
            name = SHARD_PATTERN.format(len(infos))
            info = ShardInfo(
                name=name, count=count, sha256=file_sha256(path), bytes=path.stat().st_size
            )
            storage.put_file(_join(prefix, name), path)
            path.unlink()
            infos.append(info)
            writer, count = None, 0

        for pair in pairs:
            if pair.key in seen_keys:
                raise ValueError(f"duplicate sample key {pair.key!r} in shard write to {prefix!r}")
            seen_keys.add(pair.key)
            if writer is None:
                path = Path(tmp) / SHARD_PATTERN.format(len(infos))
                writer = wds.TarWriter(str(path), encoder=False, mtime=mtime)
            writer.write(pair.to_sample())
            count += 1
            if count >= shard_size:
                finish()
        if writer is not None:
            finish()

    keep = {i.name for i in infos}
    for key in storage.list(prefix.strip("/")):
        name = key.rsplit("/", 1)[-1]
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        if parent == prefix.strip("/") and _is_shard_name(name) and name not in keep:
            storage.delete(key)

    manifest = Manifest(
        shards=infos,
        total=sum(i.count for i in infos),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
    )
    manifest.save(storage, prefix)
    return manifest


# --------------------------------------------------------------------------- verification


@dataclass
class ShardProblem:
    shard: str
    kind: str  # "missing" | "extra" | "checksum" | "count" | "size" | "unreadable" | "manifest"
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.kind}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


def count_samples(path: str | Path) -> int:
    """Samples in a WebDataset tar (consecutive members sharing a key), parsed with tarfile."""
    n = 0
    last = None
    with tarfile.open(path, mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
            if key != last:
                n += 1
                last = key
            # read the data so that a truncated member is detected
            f = tf.extractfile(member)
            if f is not None:
                while f.read(1 << 20):
                    pass
    return n


def _check_shard(path: Path, info: ShardInfo) -> list[ShardProblem]:
    problems: list[ShardProblem] = []
    size = path.stat().st_size
    if size != info.bytes:
        problems.append(ShardProblem(info.name, "size", f"{size} bytes, manifest says {info.bytes}"))
    digest = file_sha256(path)
    if digest != info.sha256:
        problems.append(
            ShardProblem(info.name, "checksum", f"sha256 {digest[:12]}…, manifest says {info.sha256[:12]}…")
        )
    try:
        n = count_samples(path)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(ShardProblem(info.name, "unreadable", f"tar does not parse: {e}"))
    else:
        if n != info.count:
            problems.append(ShardProblem(info.name, "count", f"{n} samples, manifest says {info.count}"))
    return problems


def verify_shards(storage: Storage, prefix: str) -> list[ShardProblem]:
    """Every problem with the shards under `prefix` (empty list: all good)."""
    try:
        manifest = Manifest.load(storage, prefix)
    except ManifestError as e:
        return [ShardProblem(MANIFEST_NAME, "manifest", str(e))]
    problems: list[ShardProblem] = []
    listed = {i.name for i in manifest.shards}
    total = sum(i.count for i in manifest.shards)
    if total != manifest.total:
        problems.append(
            ShardProblem(MANIFEST_NAME, "count", f"shard counts sum to {total}, total says {manifest.total}")
        )
    for info in manifest.shards:
        key = _join(prefix, info.name)
        if not storage.exists(key):
            problems.append(ShardProblem(info.name, "missing", f"no object {storage.uri(key)}"))
            continue
        with storage.local_copy(key) as path:
            problems.extend(_check_shard(Path(path), info))
    base = prefix.strip("/")
    for key in storage.list(base):
        parent, _, name = key.rpartition("/")
        if parent == base and _is_shard_name(name) and name not in listed:
            problems.append(ShardProblem(name, "extra", "shard not in the manifest"))
    return problems


# --------------------------------------------------------------------------- reading


def _iter_tar(path: Path, name: str) -> Iterator[Pair]:
    """Pairs of one tar through webdataset; a damaged tar raises CorruptShardError naming it."""
    import webdataset as wds

    ds = wds.WebDataset(
        str(path),
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
    )
    it = iter(ds)
    n = 0
    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except Exception as e:  # tarfile / webdataset errors on a damaged tar
            raise CorruptShardError(
                name, f"does not parse after {n} samples: {type(e).__name__}: {e}"
            ) from e
        try:
            pair = Pair.from_sample(sample)
        except InvalidSampleError as e:
            raise CorruptShardError(name, f"bad sample after {n} samples: {e}") from e
        n += 1
        yield pair


def read_tar(storage: Storage, key: str) -> Iterator[Pair]:
    """Pairs of one tar that has no manifest (a crawl part); damage raises CorruptShardError."""
    with storage.local_copy(key) as path:
        yield from _iter_tar(Path(path), key)


def _read_one(path: Path, info: ShardInfo, verify: bool) -> Iterator[Pair]:
    if verify:
        size = path.stat().st_size
        if size != info.bytes:
            raise CorruptShardError(info.name, f"{size} bytes, manifest says {info.bytes}")
        digest = file_sha256(path)
        if digest != info.sha256:
            raise CorruptShardError(
                info.name, f"sha256 {digest} does not match the manifest's {info.sha256}"
            )
    n = 0
    for pair in _iter_tar(path, info.name):
        n += 1
        yield pair
    if n != info.count:
        raise CorruptShardError(info.name, f"{n} samples read, manifest says {info.count}")


def read_shards(
    storage: Storage,
    prefix: str,
    verify: bool = True,
    skip_corrupt: bool = False,
    on_error: Callable[[CorruptShardError], None] | None = None,
) -> Iterator[Pair]:
    """Pairs from every shard in the manifest, in order, through a `webdataset` pipeline.

    With `verify` (default) a shard's size and sha256 are checked before any of
    its samples are yielded. A bad shard raises `CorruptShardError` naming it;
    with `skip_corrupt=True` it is skipped and reported to `on_error` (or
    `logging.warning` when no callback is given). Without `verify`, a shard
    that fails to parse part-way has already yielded its earlier samples; the
    error is still raised or reported, never swallowed.
    """
    manifest = Manifest.load(storage, prefix)

    def report(err: CorruptShardError) -> None:
        if not skip_corrupt:
            raise err
        if on_error is not None:
            on_error(err)
        else:
            log.warning("skipping %s", err)

    for info in manifest.shards:
        key = _join(prefix, info.name)
        if not storage.exists(key):
            report(CorruptShardError(info.name, f"missing: no object {storage.uri(key)}"))
            continue
        with storage.local_copy(key) as path:
            try:
                yield from _read_one(Path(path), info, verify)
            except CorruptShardError as err:
                report(err)


def shard_urls(storage: Storage, prefix: str, s3_pipe: bool = False) -> list[str]:
    """Where each shard in the manifest lives, for training readers (`wds.WebDataset(urls)`).

    Local storage gives file paths. S3 gives `s3://` URIs, or with `s3_pipe`
    the `pipe:aws s3 cp ... -` form that `webdataset` streams from (with the
    storage's endpoint URL, so it works against MinIO or moto too).
    """
    manifest = Manifest.load(storage, prefix)
    urls = []
    for info in manifest.shards:
        uri = storage.uri(_join(prefix, info.name))
        if s3_pipe and uri.startswith("s3://"):
            endpoint = getattr(getattr(getattr(storage, "client", None), "meta", None), "endpoint_url", None)
            opt = f" --endpoint-url {endpoint}" if endpoint else ""
            uri = f"pipe:aws{opt} s3 cp {uri} -"
        urls.append(uri)
    return urls


__all__ = [
    "CorruptShardError",
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "ShardProblem",
    "count_samples",
    "file_sha256",
    "read_shards",
    "shard_urls",
    "verify_shards",
    "write_shards",
]
