"""The crawler: URL list -> WebDataset parts of resized image-text pairs.

Paper, section 2.3: the training set is image-text pairs collected from the
internet. This module downloads an img2dataset-style URL list (see
`dalle_core.data.urllist`) and writes, through a `Storage`, one unit of work
per `config.crawl_part_size` rows:

    {prefix}/part-00000.tar             WebDataset samples of the rows that were fetched
    {prefix}/part-00000.failures.jsonl  one line per failed row: row, url, caption,
                                        reason, detail, attempts
    {prefix}/part-00000.done.json       counts; written last, so a part without it is
                                        unfinished and a killed part is never half-visible

Nothing is lost and nothing is duplicated: every row of the URL list ends up in
exactly one of a tar (once) or a failures file (once).

Resume. A rerun skips every part whose done marker exists (no refetch). Inside
an unfinished part, each finished row (fetched or failed) is appended to a
local journal `{scratch}/.part-00000.journal` and flushed at once, so that a
killed crawl refetches only what was in flight. A part is built from its
journal when its last row is in, committed (tar, failures, marker) and its
journal deleted. For a `LocalStorage` the scratch directory is the prefix's own
directory (dot-files, which `LocalStorage.list` hides); for other storages it is
a folder under the system temp dir derived from the storage URI and prefix.

Each download: GET with `config.crawl_timeout_s` for connect and for each read
(and at most `TOTAL_TIMEOUT_FACTOR` times that for the whole body), retries of
connection errors, timeouts, HTTP 429 and 5xx with exponential back-off
(`crawl_backoff_s * 2**attempt` plus up to 25% jitter, or the server's
`Retry-After` when larger, bounded by `MAX_RETRY_AFTER_S`); other 4xx are final.
Redirects are followed here, at most `MAX_REDIRECTS` hops.

Addresses (`dalle_core.data.net_guard`): every connection, so every redirect
hop, resolves its host, checks all the addresses it resolves to and connects to
one of exactly those (no second DNS lookup). Unless
`config.allow_private_addresses` (the demo and test profiles, for the demo
world on 127.0.0.1), only globally routable addresses are allowed: a URL list
from the open web cannot make the crawler fetch from the cluster's own services
or the cloud metadata endpoint. A refused target fails with `blocked_address`
and is not retried.

The body must have an image content type, fit in `max_body_bytes`, be one of
`IMAGE_FORMATS`, declare in its header at most `config.max_image_pixels`
pixels (checked before anything is decoded: `too_many_pixels`) and decode
fully with Pillow; it is converted to RGB, its original size recorded, then
resized (shorter side to `config.image_size`, centre square crop) and encoded
as `config.image_format`. No filtering on size, aspect ratio or caption
happens here: that is the filter stage's job, which needs the original sizes.

Failure reasons are a fixed vocabulary: `http_<code>` (http_404, http_500, ...)
and the names in `FAILURE_REASONS`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

from ..profiles import DataConfig
from ..storage import LocalStorage, Storage
from .net_guard import AddressPolicy, BlockedAddressError, guarded_session
from .urllist import UrlRow, read_url_list

# --------------------------------------------------------------------------- constants

FAILURE_REASONS = (
    "timeout",  # connect or read timed out (after retries)
    "connection_error",  # refused, reset, DNS, broken transfer (after retries)
    "not_image",  # the response's content type is not an image
    "decode_error",  # Pillow could not decode the bytes fully (truncated, corrupt)
    "empty_url",  # the URL list row has no url
    "too_large",  # body over max_body_bytes
    "invalid_url",  # not an http(s) URL requests can fetch
    "blocked_address",  # the host (or a redirect hop's) resolves to a non-public address (net_guard)
    "too_many_pixels",  # the header declares more than max_image_pixels pixels (a decompression bomb): not decoded
)  # ... plus "http_<code>" for any non-2xx final status
_HTTP_REASON = re.compile(r"http_\d{3}")

MAX_BODY_BYTES = 20 * 1024 * 1024  # bodies are streamed and cut off past this
MAX_REDIRECTS = 5  # redirect hops followed per download (each hop's address is checked)
# what Pillow may open: web image formats only (no EPS, which would run Ghostscript, and the like)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "MPO")
MAX_RETRY_AFTER_S = 30.0  # a server's Retry-After is honoured up to this
TOTAL_TIMEOUT_FACTOR = 3.0  # whole-body deadline, in units of crawl_timeout_s
JITTER = 0.25  # back-off jitter, as a fraction of the back-off
RESIZE_FILTER = "lanczos"  # recorded in every done marker (FID depends on it)
TAR_MTIME = 0.0  # fixed tar member mtime: the same rows give byte-identical tars
PROGRESS_INTERVAL_S = 0.25  # progress callbacks at most this often (plus a final one)
USER_AGENT = "dalle-platform-crawler/0.1 (+img2dataset-compatible)"
_IMAGE_EXT = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
_OCTET = ("application/octet-stream", "binary/octet-stream")  # decoded to decide


def is_failure_reason(reason: str) -> bool:
    return reason in FAILURE_REASONS or bool(_HTTP_REASON.fullmatch(reason))


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


# --------------------------------------------------------------------------- errors


class CrawlError(RuntimeError):
    """A crawl that cannot start or continue; the message names the file and setting."""


class CrawlStopped(RuntimeError):
    """`should_stop` returned True: the crawl stopped like a killed process.

    Committed parts stay committed; the current parts are not committed, their
    finished rows stay in the local journals and a rerun picks them up.
    """

    def __init__(self, parts_committed: int, rows_journaled: int):
        self.parts_committed = parts_committed
        self.rows_journaled = rows_journaled
        super().__init__(
            f"crawl stopped: {parts_committed} part(s) committed in this run,"
            f" {rows_journaled} row(s) journaled for resume"
        )


class _Stopped(Exception):
    pass


# --------------------------------------------------------------------------- results


@dataclass
class CrawlProgress:
    rows_done: int
    rows_total: int
    ok: int
    failed: int
    pairs_per_s: float  # pairs fetched per second in this run
    elapsed_s: float
    parts_done: int
    parts_total: int

    def line(self) -> str:
        pct = 100.0 * self.rows_done / self.rows_total if self.rows_total else 100.0
        return (
            f"crawl {self.rows_done}/{self.rows_total} rows ({pct:.0f}%)"
            f" ok {self.ok} failed {self.failed}"
            f" parts {self.parts_done}/{self.parts_total}"
            f" {self.pairs_per_s:.1f} pairs/s {self.elapsed_s:.1f}s"
        )

    __str__ = line

    @property
    def done(self) -> int:  # short names for callers' progress lines
        return self.rows_done

    @property
    def total(self) -> int:
        return self.rows_total


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
    return _result_from_markers([json.loads(storage.get_text(k)) for k in sorted(markers)])


def _result_from_markers(markers: list[dict]) -> CrawlResult:
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


# --------------------------------------------------------------------------- one download


def make_session(workers: int, policy: AddressPolicy | None = None):
    """A `requests.Session` whose connection pool is sized to the workers and whose every
    connection is resolved, checked and pinned by `policy` (default: public addresses only)."""
    return guarded_session(policy if policy is not None else AddressPolicy(), workers, USER_AGENT)


def address_policy_for(config: DataConfig) -> AddressPolicy:
    """The address policy of a DataConfig: public addresses only unless allow_private_addresses."""
    return AddressPolicy(allow_private=bool(config.allow_private_addresses))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _is_timeout(exc: BaseException) -> bool:
    """requests wraps read timeouts during streaming in ConnectionError.

    (urllib3's NewConnectionError subclasses ConnectTimeoutError for history's
    sake; a refused connection is a connection_error, so only read timeouts
    and socket timeouts count here. Connect timeouts arrive as requests'
    ConnectTimeout and are caught before this.)
    """
    import socket

    from urllib3.exceptions import NewConnectionError, ReadTimeoutError

    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NewConnectionError):
            continue
        if isinstance(e, (ReadTimeoutError, socket.timeout, TimeoutError)):
            return True
        stack.extend([e.__cause__, e.__context__])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError
        if isinstance(reason, BaseException):
            stack.append(reason)
    return False


@dataclass
class _Attempt:
    ok: bool
    data: bytes = b""
    content_type: str = ""
    reason: str = ""
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None


def _fail(reason, detail, retryable=False, retry_after=None) -> _Attempt:
    return _Attempt(False, reason=reason, detail=str(detail)[:500], retryable=retryable, retry_after=retry_after)


def _get_once(session, url: str, timeout_s: float, max_body_bytes: int, start: float, deadline: float):
    """One GET without following redirects: the outcome, or the next URL when redirected."""
    with session.get(url, timeout=(timeout_s, timeout_s), stream=True, allow_redirects=False) as r:
        code = r.status_code
        if r.is_redirect:  # 301, 302, 303, 307, 308 with a Location
            from requests.compat import urljoin

            return urljoin(r.url, session.get_redirect_target(r))
        if not 200 <= code < 300:
            retryable = code == 429 or 500 <= code < 600
            return _fail(
                f"http_{code}",
                f"HTTP {code} {r.reason or ''}".strip(),
                retryable,
                _parse_retry_after(r.headers.get("Retry-After")) if retryable else None,
            )
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _OCTET:
            return _fail("not_image", f"content type {ctype!r}")
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return _fail("too_large", f"Content-Length {length} > {max_body_bytes} bytes")
        buf = bytearray()
        for chunk in r.iter_content(chunk_size=64 * 1024):
            buf += chunk
            if len(buf) > max_body_bytes:
                return _fail("too_large", f"body over {max_body_bytes} bytes")
            if time.monotonic() > deadline:
                return _fail("timeout", f"body not complete after {deadline - start:.1f}s", True)
        return _Attempt(True, data=bytes(buf), content_type=ctype)


def _download_once(session, url: str, timeout_s: float, max_body_bytes: int) -> _Attempt:
    import requests

    start = time.monotonic()
    deadline = start + timeout_s * TOTAL_TIMEOUT_FACTOR
    hop, current = 0, url
    try:
        while True:
            attempt = _get_once(session, current, timeout_s, max_body_bytes, start, deadline)
            if isinstance(attempt, _Attempt):
                return attempt
            if hop == MAX_REDIRECTS:
                return _fail("connection_error", f"TooManyRedirects: more than {MAX_REDIRECTS} redirects")
            hop, current = hop + 1, attempt
            if current.split(":", 1)[0].lower() not in ("http", "https"):
                return _fail("invalid_url", f"redirect {hop} to {current!r}: not an http(s) URL")
    except BlockedAddressError as e:
        where = f" (redirect {hop} to {current})" if hop else ""
        return _fail("blocked_address", f"{e}{where}")
    except requests.exceptions.Timeout as e:
        return _fail("timeout", f"{type(e).__name__}: {e}", True)
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.URLRequired,
    ) as e:
        return _fail("invalid_url", f"{type(e).__name__}: {e}")
    except requests.exceptions.TooManyRedirects as e:
        return _fail("connection_error", f"TooManyRedirects: {e}")
    except requests.exceptions.RequestException as e:  # ConnectionError, ChunkedEncodingError, ...
        if _is_timeout(e):
            return _fail("timeout", f"{type(e).__name__}: {e}", True)
        return _fail("connection_error", f"{type(e).__name__}: {e}", True)
    except (OSError, ValueError) as e:  # socket errors outside requests' wrapping; odd URLs
        return _fail("connection_error", f"{type(e).__name__}: {e}", True)


class ImageDecodeError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def load_rgb(data: bytes, max_pixels: int | None = None, formats: tuple[str, ...] | None = None):
    """Decode image bytes fully and return an RGB PIL image (camera orientation applied).

    Transparent areas become white. Raises ImageDecodeError("decode_error" |
    "too_many_pixels", Pillow's message): truncated data fails
    here, at load(). With `max_pixels`, an image whose header declares more
    pixels is refused before anything is decoded (Image.open reads only the
    header), so a worker's memory stays bounded by max_pixels (see
    DataConfig.max_image_pixels). `formats`: what Pillow may open (default: any).
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageDecodeError("decode_error", "empty body")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels",
                    f"{im.format} header declares {width}x{height} = {width * height} pixels"
                    f" > max_image_pixels={max_pixels} (not decoded)",
                )
            im.load()  # decode everything now: truncated data fails here
            im = ImageOps.exif_transpose(im)  # camera orientation; returns a copy
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own header check (2 x MAX_IMAGE_PIXELS)
        raise ImageDecodeError("too_many_pixels", f"{e} (not decoded)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from e
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # no extra copy: memory per worker
        del im
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)  # transparent areas become white, not black
        del rgba
        return background.convert("RGB")
    return im.convert("RGB")


def resize_center_crop(img, image_size: int):
    """Shorter side to `image_size`, then the centre square: an image_size^2 image.

    Done in one resampling step: the centre square of side min(w, h) is
    resampled to image_size x image_size (Pillow's resize with `box`).
    Filter: LANCZOS (`RESIZE_FILTER`), as in the released dall_e preprocessing
    (TF.resize(..., interpolation=LANCZOS)); reducing_gap=3 speeds up large
    downscales with no visible difference.
    """
    from PIL import Image

    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return img.resize(
        (image_size, image_size),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def encode_image(img, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    fmt = _IMAGE_EXT[image_format.lower()]
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def process_image(
    data: bytes,
    image_size: int,
    image_format: str = "png",
    jpeg_quality: int = 95,
    max_pixels: int | None = None,
):
    """Downloaded bytes -> (encoded square image, original_width, original_height).

    Decode fully (only `IMAGE_FORMATS`, at most `max_pixels` pixels), convert
    to RGB, resize + centre-crop, encode as png or jpg.
    Raises ImageDecodeError("decode_error" | "too_many_pixels", message).
    """
    rgb = load_rgb(data, max_pixels=max_pixels, formats=IMAGE_FORMATS)
    width, height = rgb.size
    return encode_image(resize_center_crop(rgb, image_size), image_format, jpeg_quality), width, height


class _Fetcher:
    def __init__(self, config: DataConfig, session, stop: threading.Event, max_body_bytes: int):
        self.config = config
        self.session = session
        self.stop = stop
        self.max_body_bytes = max_body_bytes

    def __call__(self, row: UrlRow) -> dict:
        cfg = self.config
        attempts = 0
        result: _Attempt | None = None
        for attempt in range(cfg.crawl_retries + 1):
            if self.stop.is_set():
                raise _Stopped()
            attempts += 1
            result = _download_once(self.session, row.url, cfg.crawl_timeout_s, self.max_body_bytes)
            if result.ok or not result.retryable or attempt == cfg.crawl_retries:
                break
            delay = cfg.crawl_backoff_s * 2**attempt
            delay += random.uniform(0.0, JITTER * delay)
            if result.retry_after is not None:
                delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER_S))
            if self.stop.wait(delay):
                raise _Stopped()
        assert result is not None
        if not result.ok:
            return _failure_record(row, result.reason, result.detail, attempts)
        try:
            encoded, width, height = process_image(
                result.data, cfg.image_size, cfg.image_format, cfg.jpeg_quality, cfg.max_image_pixels
            )
        except ImageDecodeError as e:
            detail = e.detail if result.content_type else f"{e.detail} (no content type)"
            return _failure_record(row, e.reason, detail, attempts)
        except Exception as e:  # an image Pillow opens but cannot convert or resize
            return _failure_record(row, "decode_error", f"{type(e).__name__}: {e}", attempts)
        return {
            "row": row.row,
            "status": "ok",
            "url": row.url,
            "caption": row.caption,
            "image": base64.b64encode(encoded).decode("ascii"),
            "original_width": width,
            "original_height": height,
            "sha256": hashlib.sha256(result.data).hexdigest(),
            "content_type": result.content_type,
            "attempts": attempts,
        }


def _failure_record(row: UrlRow, reason: str, detail: str, attempts: int) -> dict:
    return {
        "row": row.row,
        "status": "failed",
        "url": row.url,
        "caption": row.caption,
        "reason": reason,
        "detail": detail,
        "attempts": attempts,
    }


# --------------------------------------------------------------------------- parts and journals


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


class _Part:
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


def _commit(part: _Part, storage: Storage, config: DataConfig, key_prefix: str, seconds: float, url_list: Path) -> dict:
    import webdataset as wds

    assert part.complete, part.name
    ext = _IMAGE_EXT[config.image_format.lower()]
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


# --------------------------------------------------------------------------- the crawl


def _check_config(config: DataConfig, key_prefix: str) -> None:
    if config.image_format.lower() not in _IMAGE_EXT:
        raise CrawlError(
            f"DataConfig.image_format={config.image_format!r} is not supported (use 'png' or 'jpg')"
        )
    for name, value, low in (
        ("crawl_part_size", config.crawl_part_size, 1),
        ("crawl_workers", config.crawl_workers, 1),
        ("crawl_retries", config.crawl_retries, 0),
        ("image_size", config.image_size, 1),
        ("max_image_pixels", config.max_image_pixels, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise CrawlError(f"DataConfig.{name}={value!r} must be an integer >= {low}")
    if not config.crawl_timeout_s > 0:
        raise CrawlError(f"DataConfig.crawl_timeout_s={config.crawl_timeout_s!r} must be > 0")
    if not config.crawl_backoff_s >= 0:
        raise CrawlError(f"DataConfig.crawl_backoff_s={config.crawl_backoff_s!r} must be >= 0")
    if "." in key_prefix or "/" in key_prefix:
        raise CrawlError(f"key_prefix={key_prefix!r} must contain neither '.' nor '/'")


def crawl(
    url_list: str | Path,
    storage: Storage,
    prefix: str,
    config: DataConfig,
    progress: Callable[[CrawlProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    scratch_dir: str | Path | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    key_prefix: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    session=None,
    address_policy: AddressPolicy | None = None,
) -> CrawlResult:
    """Crawl `url_list` into WebDataset parts under `prefix` (see the module doc).

    Resumable: parts with a done marker are skipped, journaled rows of
    unfinished parts are not refetched. Returns the result over all parts of
    this URL list (`summarize_crawl` recomputes it from the markers). Raises
    `CrawlStopped` when `should_stop()` returns True (nothing of the open parts
    is committed), `UrlListError` for a bad URL list and `CrawlError` for bad
    settings or a prefix holding parts of different rows.

    Sample keys are `key_prefix + f"{row:09d}"`; by default the prefix is the
    URL list's file stem ("batch-000-000000012"), so keys stay unique when the
    batches are merged into shards. `url_col` / `caption_col` name the URL
    list's columns (img2dataset's "URL" / "TEXT" only when given here).
    `scratch_dir` holds the journals (default: `default_scratch_dir`).
    `address_policy` decides which addresses may be fetched (default:
    `address_policy_for(config)`); a `session` given here must come from
    `make_session` (its connections are the ones that check addresses).
    """
    t_run = time.monotonic()
    url_list = Path(url_list)
    if key_prefix is None:
        key_prefix = default_key_prefix(url_list)
    _check_config(config, key_prefix)
    if session is not None and getattr(session, "address_policy", None) is None:
        raise CrawlError("crawl(session=...) must be a session from make_session(): its connections check addresses")
    if address_policy is None:
        address_policy = address_policy_for(config)
    prefix = prefix.strip("/")
    rows = read_url_list(url_list, url_col=url_col, caption_col=caption_col)
    scratch = Path(scratch_dir) if scratch_dir is not None else default_scratch_dir(storage, prefix)
    scratch.mkdir(parents=True, exist_ok=True)
    lock = _lock_scratch(scratch, storage.uri(prefix))
    try:
        return _crawl_locked(
            url_list, rows, storage, prefix, config, progress, should_stop, scratch,
            key_prefix, max_body_bytes, session, t_run, address_policy,
        )
    finally:
        lock.close()  # releases the lock (the kernel does the same for a killed process)


def _lock_scratch(scratch: Path, where: str):
    """One crawl at a time per prefix: an exclusive flock on {scratch}/.crawl.lock."""
    fh = open(scratch / ".crawl.lock", "a+b")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise CrawlError(
            f"another crawl is writing {where} (it holds {scratch / '.crawl.lock'}); wait for it or stop it"
        ) from None
    return fh


def _crawl_locked(
    url_list: Path,
    rows: list[UrlRow],
    storage: Storage,
    prefix: str,
    config: DataConfig,
    progress,
    should_stop,
    scratch: Path,
    key_prefix: str,
    max_body_bytes: int,
    session,
    t_run: float,
    address_policy: AddressPolicy,
) -> CrawlResult:
    size = config.crawl_part_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    markers: dict[int, dict] = {}
    parts: list[_Part] = []
    for index, chunk in enumerate(chunks):
        part = _Part(index, chunk, prefix, scratch)
        if storage.exists(part.keys["done"]):
            marker = json.loads(storage.get_text(part.keys["done"]))
            if marker.get("rows_sha256") != part.rows_sha256:
                raise CrawlError(
                    f"{storage.uri(part.keys['done'])} was written for other rows than rows"
                    f" {chunk[0].row}..{chunk[-1].row} of {url_list} (did the URL list or"
                    f" DataConfig.crawl_part_size={size} change?); crawl into a new prefix"
                )
            if marker.get("key_prefix") != key_prefix:
                raise CrawlError(
                    f"{storage.uri(part.keys['done'])} was written with key_prefix="
                    f"{marker.get('key_prefix')!r}, this crawl uses key_prefix={key_prefix!r};"
                    " crawl into a new prefix"
                )
            markers[index] = marker
        else:
            parts.append(part)

    rows_total = len(rows)
    base_ok = sum(m["n_ok"] for m in markers.values())
    base_failed = sum(m["n_failed"] for m in markers.values())
    fetched_ok = 0  # this run, for the rate
    last_commit = t_run
    last_progress = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_progress
        if progress is None:
            return
        now = time.monotonic()
        if not force and now - last_progress < PROGRESS_INTERVAL_S:
            return
        last_progress = now
        ok = base_ok + sum(p.counts()[0] for p in parts)
        failed = base_failed + sum(p.counts()[1] for p in parts)
        elapsed = now - t_run
        progress(
            CrawlProgress(
                rows_done=ok + failed,
                rows_total=rows_total,
                ok=ok,
                failed=failed,
                pairs_per_s=round(fetched_ok / elapsed, 2) if elapsed > 0 else 0.0,
                elapsed_s=round(elapsed, 3),
                parts_done=len(markers),
                parts_total=len(chunks),
            )
        )

    def commit(part: _Part) -> None:
        nonlocal last_commit
        now = time.monotonic()
        marker = _commit(part, storage, config, key_prefix, now - last_commit, url_list)
        last_commit = time.monotonic()
        markers[part.index] = marker
        report(force=True)

    stop = threading.Event()
    own_session = session is None
    if own_session:
        session = make_session(config.crawl_workers, address_policy)
    fetch = _Fetcher(config, session, stop, max_body_bytes)
    pool = ThreadPoolExecutor(max_workers=config.crawl_workers, thread_name_prefix="crawl")
    in_flight: dict[Future, tuple[_Part, UrlRow]] = {}
    window = config.crawl_workers * 2

    def todo() -> Iterator[tuple[_Part, UrlRow]]:
        for part in parts:
            for row in part.rows:
                if row.row not in part.done:
                    yield part, row

    stopped = False
    try:
        for part in parts:
            part.open_journal()
        report(force=True)
        for part in parts:  # killed after the last row but before the commit
            if part.complete:
                commit(part)
        queue = todo()
        exhausted = False
        while True:
            if should_stop is not None and should_stop():
                stopped = True
                break
            while not exhausted and len(in_flight) < window:
                item = next(queue, None)
                if item is None:
                    exhausted = True
                    break
                part, row = item
                if not row.url:
                    part.append(_failure_record(row, "empty_url", "the URL list row has no url", 0))
                    if part.complete:
                        commit(part)
                else:
                    in_flight[pool.submit(fetch, row)] = item
            if not in_flight:
                if exhausted:
                    break
                continue
            finished, _ = wait(list(in_flight), timeout=0.1, return_when=FIRST_COMPLETED)
            for fut in finished:
                part, row = in_flight.pop(fut)
                rec = fut.result()  # _Fetcher turns every download problem into a record
                part.append(rec)
                if rec["status"] == "ok":
                    fetched_ok += 1
                if part.complete:
                    commit(part)
                if should_stop is not None and should_stop():
                    stopped = True
                    break
            if stopped:
                break
            report()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if own_session:
            session.close()
        for part in parts:
            part.close()
    if stopped:
        raise CrawlStopped(
            parts_committed=sum(p.committed for p in parts),
            rows_journaled=sum(len(p.done) for p in parts if not p.committed),
        )
    report(force=True)
    return _result_from_markers([markers[i] for i in range(len(chunks))])
