"""The crawler: URL list -> WebDataset parts of resized image-text pairs.

Paper, section 2.3: the training set is image-text pairs collected from the
internet. `crawl` downloads an img2dataset-style URL list (see
`dalle_core.data.urllist`) with a pool of workers and writes, through a
`Storage`, one part per `config.crawl_part_size` rows: a tar of the pairs, a
failures file and a done marker, written last (`dalle_core.data.crawl_parts`).

Nothing is lost and nothing is duplicated: every row of the URL list ends up in
exactly one of a tar (once) or a failures file (once).

Resume. A rerun skips every part whose done marker exists (no refetch); inside
an unfinished part, the rows its journal holds are not fetched again, so a
killed crawl refetches only what was in flight. One crawl at a time writes a
prefix (a lock in its scratch directory).

Each row: fetched over HTTP with retries, redirects followed and every address
checked (`dalle_core.data.fetch`, `dalle_core.data.net_guard`), then decoded,
resized and encoded (`dalle_core.data.image_decode`).

Failure reasons are a fixed vocabulary: `http_<code>` (http_404, http_500, ...)
and the names in `FAILURE_REASONS`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .config import DataConfig
from ..storage import Storage
from .crawl_parts import CrawlResult, Part, commit_part, default_key_prefix, default_scratch_dir, result_from_markers
from .fetch import MAX_BODY_BYTES, address_policy_for, fetch, make_session
from .image_decode import IMAGE_EXT, ImageDecodeError, process_image
from .net_guard import AddressPolicy
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

PROGRESS_INTERVAL_S = 0.25  # progress callbacks at most this often (plus a final one)


def is_failure_reason(reason: str) -> bool:
    return reason in FAILURE_REASONS or bool(_HTTP_REASON.fullmatch(reason))


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


# --------------------------------------------------------------------------- progress


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


# --------------------------------------------------------------------------- one row


class _Fetcher:
    """One row -> its journal record: fetched (with retries), decoded and resized, or failed."""

    def __init__(self, config: DataConfig, session, stop: threading.Event, max_body_bytes: int):
        self.config = config
        self.session = session
        self.stop = stop
        self.max_body_bytes = max_body_bytes

    def __call__(self, row: UrlRow) -> dict:
        cfg = self.config
        result, attempts = fetch(self.session, row.url, timeout_s=cfg.crawl_timeout_s, retries=cfg.crawl_retries,
                                 backoff_s=cfg.crawl_backoff_s, stop=self.stop, max_body_bytes=self.max_body_bytes)
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


# --------------------------------------------------------------------------- the crawl


def _check_config(config: DataConfig, key_prefix: str) -> None:
    if config.image_format.lower() not in IMAGE_EXT:
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
    parts: list[Part] = []
    for index, chunk in enumerate(chunks):
        part = Part(index, chunk, prefix, scratch)
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

    def commit(part: Part) -> None:
        nonlocal last_commit
        now = time.monotonic()
        marker = commit_part(part, storage, config, key_prefix, now - last_commit, url_list)
        last_commit = time.monotonic()
        markers[part.index] = marker
        report(force=True)

    stop = threading.Event()
    own_session = session is None
    if own_session:
        session = make_session(config.crawl_workers, address_policy)
    fetch = _Fetcher(config, session, stop, max_body_bytes)
    pool = ThreadPoolExecutor(max_workers=config.crawl_workers, thread_name_prefix="crawl")
    in_flight: dict[Future, tuple[Part, UrlRow]] = {}
    window = config.crawl_workers * 2

    def todo() -> Iterator[tuple[Part, UrlRow]]:
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
    return result_from_markers([markers[i] for i in range(len(chunks))])
