"""A crawl's parts on storage, their journals and done markers.

A crawl writes, through a `Storage`, one unit of work per
`DataConfig.crawl_part_size` rows of its URL list:

    {prefix}/part-00000.tar             WebDataset samples of the rows that were fetched
    {prefix}/part-00000.failures.jsonl  one line per failed row: row, url, caption,
                                        reason, detail, attempts
    {prefix}/part-00000.done.json       counts; written last, so a part without it is
                                        unfinished and a killed part is never half-visible

Inside an unfinished part, each finished row (fetched or failed) is appended
to a local journal `{scratch}/.part-00000.journal` and flushed at once, so that
a killed crawl refetches only what was in flight. A part is built from its
journal when its last row is in, committed (tar, failures, marker) and its
journal deleted. For a `LocalStorage` the scratch directory is the prefix's own
directory (dot-files, which `LocalStorage.list` hides); for other storages it is
a folder under the system temp dir derived from the storage URI and prefix.
`summarize_crawl` adds the committed parts' markers up into a `CrawlResult`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from .config import DataConfig
from ..storage import LocalStorage, Storage
from .image_decode import IMAGE_EXT, RESIZE_FILTER
from .shards import TAR_MTIME
from .urllist import UrlRow


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def part_keys(prefix: str, index: int) -> dict[str, str]:
    """Storage keys of one part: {"tar", "failures", "done"}."""
    base = f"{prefix.strip('/')}/{part_name(index)}" if prefix.strip("/") else part_name(index)
    return {
        "tar": f"{base}.tar",
        "failures": f"{base}.failures.jsonl",
        "done": f"{base}.done.json",
    }


def sample_key(row: int, key_prefix: str = "") -> str:
    """WebDataset `__key__` of a row: stable across reruns, no dots."""
    return f"{key_prefix}{row:09d}"


def default_key_prefix(url_list: str | Path) -> str:
    """'batch-000-' for batch-000.parquet: keys stay unique when batches are merged."""
    stem = Path(url_list).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return f"{stem}-" if stem else ""


@dataclass
class CrawlResult:
    n_rows: int
    n_ok: int
    n_failed: int
    failures_by_reason: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)  # storage keys of the part tars, in order
    seconds: float = 0.0  # crawl time summed over parts (time between commits)
    pairs_per_s: float = 0.0  # n_ok / seconds

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CrawlResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def summarize_crawl(storage: Storage, prefix: str) -> CrawlResult:
    """Recompute a crawl's result from the done markers under `prefix`.

    Only committed parts count; an unfinished crawl summarises what is done.
    """
    prefix = prefix.strip("/")
    listing = storage.list(prefix + "/" if prefix else "")
    markers = [
        k
        for k in listing
        if k.endswith(".done.json") and (k.rpartition("/")[0] == prefix)
    ]
    return result_from_markers([json.loads(storage.get_text(k)) for k in sorted(markers)])


def result_from_markers(markers: list[dict]) -> CrawlResult:
    markers = sorted(markers, key=lambda m: m["row_start"])
    reasons: dict[str, int] = {}
    for m in markers:
        for r, n in m["failures_by_reason"].items():
            reasons[r] = reasons.get(r, 0) + n
    n_ok = sum(m["n_ok"] for m in markers)
    seconds = sum(m["seconds"] for m in markers)
    return CrawlResult(
        n_rows=sum(m["n_rows"] for m in markers),
        n_ok=n_ok,
        n_failed=sum(m["n_failed"] for m in markers),
        failures_by_reason=dict(sorted(reasons.items())),
        parts=[m["tar"] for m in markers],
        seconds=round(seconds, 3),
        pairs_per_s=round(n_ok / seconds, 2) if seconds > 0 else 0.0,
    )


def _rows_sha256(rows: list[UrlRow]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.row, r.url, r.caption], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def default_scratch_dir(storage: Storage, prefix: str) -> Path:
    """Where journals and tars in the making live (must be a local disk)."""
    prefix = prefix.strip("/")
    if isinstance(storage, LocalStorage):
        return storage.path(prefix) if prefix else storage.root
    digest = hashlib.sha256(storage.uri(prefix).encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "dalle-crawl" / digest


class Part:
    """One unfinished part: its rows, its journal and what the journal holds."""

    def __init__(self, index: int, rows: list[UrlRow], prefix: str, scratch: Path):
        self.index = index
        self.name = part_name(index)
        self.rows = rows
        self.keys = part_keys(prefix, index)
        self.rows_sha256 = _rows_sha256(rows)
        self.journal_path = scratch / f".{self.name}.journal"
        self.tar_tmp = scratch / f".{self.name}.tar.tmp"
        self.done: dict[int, tuple[int, str, str]] = {}  # row -> (offset, status, reason)
        self.fh = None
        self.committed = False

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.rows)

    def open_journal(self) -> None:
        """Load the journal of an earlier, killed run (if it is this part's), then append."""
        wanted = {r.row for r in self.rows}
        header = {"journal": 1, "part": self.name, "rows_sha256": self.rows_sha256}
        if self.journal_path.exists():
            raw = self.journal_path.read_bytes()
            end = raw.rfind(b"\n") + 1  # a line cut by the kill is dropped
            lines = raw[:end].split(b"\n")
            try:
                valid = json.loads(lines[0]) == header
            except (ValueError, IndexError):
                valid = False
            if valid:
                offset = len(lines[0]) + 1
                for line in lines[1:]:
                    if line:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            rec = None
                        if rec and rec.get("row") in wanted and rec["row"] not in self.done:
                            self.done[rec["row"]] = (offset, rec["status"], rec.get("reason", ""))
                    offset += len(line) + 1
                with open(self.journal_path, "r+b") as f:
                    f.truncate(end)
                self.fh = open(self.journal_path, "ab")
                return
        self.fh = open(self.journal_path, "wb")
        self.fh.write(json.dumps(header).encode("utf-8") + b"\n")
        self.fh.flush()

    def append(self, rec: dict) -> None:
        if rec["row"] in self.done:  # cannot happen; never write a row twice
            return
        offset = self.fh.tell()
        self.fh.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
        self.fh.flush()  # survives a SIGKILL (the OS has it); fsync would add power-loss safety
        self.done[rec["row"]] = (offset, rec["status"], rec.get("reason", ""))

    def counts(self) -> tuple[int, int]:
        ok = sum(1 for _, s, _ in self.done.values() if s == "ok")
        return ok, len(self.done) - ok

    def records(self, status: str) -> Iterator[dict]:
        """The journal's records with `status`, in row order, read one at a time."""
        self.fh.flush()
        with open(self.journal_path, "rb") as f:
            for row in sorted(self.done):
                offset, st, _ = self.done[row]
                if st != status:
                    continue
                f.seek(offset)
                yield json.loads(f.readline())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def commit_part(part: Part, storage: Storage, config: DataConfig, key_prefix: str, seconds: float, url_list: Path) -> dict:
    import webdataset as wds

    assert part.complete, part.name
    ext = IMAGE_EXT[config.image_format.lower()]
    reasons: dict[str, int] = {}
    n_ok = 0
    part.tar_tmp.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(part.tar_tmp), encoder=False, mtime=TAR_MTIME) as tw:
        for rec in part.records("ok"):
            meta = {
                "url": rec["url"],
                "caption": rec["caption"],
                "row": rec["row"],
                "original_width": rec["original_width"],
                "original_height": rec["original_height"],
                "sha256": rec["sha256"],
                "content_type": rec["content_type"],
                "attempts": rec["attempts"],
            }
            tw.write(
                {
                    "__key__": sample_key(rec["row"], key_prefix),
                    ext: base64.b64decode(rec["image"]),
                    "txt": rec["caption"].encode("utf-8"),
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
            )
            n_ok += 1
    failure_lines = []
    for rec in part.records("failed"):
        reasons[rec["reason"]] = reasons.get(rec["reason"], 0) + 1
        failure_lines.append(
            json.dumps(
                {k: rec[k] for k in ("row", "url", "caption", "reason", "detail", "attempts")},
                ensure_ascii=False,
            )
        )
    n_failed = len(failure_lines)
    assert n_ok + n_failed == len(part.rows), (part.name, n_ok, n_failed, len(part.rows))
    tar_bytes = part.tar_tmp.stat().st_size
    h = hashlib.sha256()
    with open(part.tar_tmp, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    storage.put_file(part.keys["tar"], part.tar_tmp)
    storage.put_text(part.keys["failures"], "".join(line + "\n" for line in failure_lines))
    marker = {
        "part": part.name,
        "url_list": url_list.name,
        "row_start": part.rows[0].row,
        "row_end": part.rows[-1].row + 1,
        "rows_sha256": part.rows_sha256,
        "n_rows": len(part.rows),
        "n_ok": n_ok,
        "n_failed": n_failed,
        "failures_by_reason": dict(sorted(reasons.items())),
        "tar": part.keys["tar"],
        "tar_bytes": tar_bytes,
        "tar_sha256": h.hexdigest(),
        "failures": part.keys["failures"],
        "image_size": config.image_size,
        "image_format": ext,
        "jpeg_quality": config.jpeg_quality if ext == "jpg" else None,
        "resize_filter": RESIZE_FILTER,
        "key_prefix": key_prefix,
        "seconds": round(seconds, 3),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.put_text(part.keys["done"], json.dumps(marker, indent=1, ensure_ascii=False))  # last
    part.committed = True
    part.close()
    part.journal_path.unlink(missing_ok=True)
    part.tar_tmp.unlink(missing_ok=True)
    return marker
