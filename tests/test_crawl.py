"""The crawler against real HTTP servers on loopback.

A small scripted server checks each failure reason, retry and limit one by
one; the demo world's own server (its faults: dead links, 500s, timeouts,
flaky 500s, truncated / corrupt / non-image bodies, and the caption- and
image-level faults the crawler must keep) checks a whole crawl, kill and resume.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dalle_core.data.crawl import FAILURE_REASONS, CrawlError, CrawlStopped, crawl, is_failure_reason
from dalle_core.data.crawl_parts import CrawlResult, summarize_crawl
from dalle_core.data.image_decode import process_image
from dalle_core.data.urllist import UrlListError
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
TINY = get_profile("tiny").data
FAST = replace(TINY, crawl_timeout_s=2.0, crawl_backoff_s=0.02)  # nothing slow is served here


# --------------------------------------------------------------------------- helpers


def _png(w: int, h: int, color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def read_part_outputs(storage, prefix):
    """{row: sample dict} from the tars and {row: failure} from the failures files."""
    ok, failed = {}, {}
    keys = storage.list(prefix + "/")
    for key in keys:
        if key.endswith(".tar"):
            with storage.local_copy(key) as p, tarfile.open(p) as tf:
                samples: dict[str, dict] = {}
                for m in tf.getmembers():
                    base, _, ext = m.name.partition(".")
                    samples.setdefault(base, {})[ext] = tf.extractfile(m).read()
            for k, s in samples.items():
                meta = json.loads(s["json"])
                assert k.endswith(f"-{meta['row']:09d}") and "." not in k
                assert meta["row"] not in ok, f"row {meta['row']} twice in the tars"
                ok[meta["row"]] = {"key": k, **s, "meta": meta}
        elif key.endswith(".failures.jsonl"):
            for line in storage.get_text(key).splitlines():
                rec = json.loads(line)
                assert rec["row"] not in failed, f"row {rec['row']} twice in the failures"
                failed[rec["row"]] = rec
    assert not set(ok) & set(failed), "a row both fetched and failed"
    return ok, failed


class Scripted(BaseHTTPRequestHandler):
    """Paths /<kind>/<n>; counts requests per path."""

    protocol_version = "HTTP/1.1"
    counts: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", ctype="image/png", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with self.lock:
            self.counts[self.path] += 1
            n = self.counts[self.path]
        kind = self.path.split("/")[1]
        if kind == "ok":
            return self._send(200, _png(120, 60))
        if kind == "rgba":
            return self._send(200, _png(50, 50, (0, 0, 0, 0), "RGBA"))
        if kind == "octet":
            return self._send(200, _png(40, 40), "application/octet-stream")
        if kind in ("404", "410", "403", "503"):
            return self._send(int(kind), b"nope", "text/plain")
        if kind == "429":  # throttled once, with Retry-After
            if n == 1:
                return self._send(429, b"slow down", "text/plain", [("Retry-After", "0.3")])
            return self._send(200, _png(30, 30))
        if kind == "html":
            return self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        if kind == "big":  # announced as too large
            return self._send(200, b"x" * 5000)
        if kind == "bigstream":  # no Content-Length, streamed past the cap
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"y" * 1000)
            self.close_connection = True
            return None
        if kind == "empty":
            return self._send(200, b"")
        return self._send(404, b"", "text/plain")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs under 8 workers: 1 s connect stalls

    def handle_error(self, request, client_address):
        pass  # clients that give up (timeouts, caps) reset connections: expected here


@pytest.fixture
def scripted():
    Scripted.counts = Counter()
    srv = QuietServer(("127.0.0.1", 0), Scripted)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", Scripted.counts
    srv.shutdown()
    srv.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


# --------------------------------------------------------------------------- one download at a time


def test_every_failure_reason_retry_and_limit(tmp_path, scripted):
    base, counts = scripted
    cases = {
        "ok": f"{base}/ok/0",
        "rgba": f"{base}/rgba/0",
        "octet": f"{base}/octet/0",
        "429": f"{base}/429/0",
        "404": f"{base}/404/0",
        "410": f"{base}/410/0",
        "403": f"{base}/403/0",
        "503": f"{base}/503/0",
        "html": f"{base}/html/0",
        "big": f"{base}/big/0",
        "bigstream": f"{base}/bigstream/0",
        "empty_body": f"{base}/empty/0",
        "refused": _closed_port_url(),
        "empty_url": "",
        "ftp": "ftp://example.org/x.png",
    }
    names = list(cases)
    pd.DataFrame({"url": list(cases.values()), "caption": names}).to_csv(tmp_path / "l.csv", index=False)
    storage = LocalStorage(tmp_path / "store")
    cfg = replace(FAST, crawl_part_size=4, crawl_retries=2, image_format="jpg", jpeg_quality=80)
    result = crawl(tmp_path / "l.csv", storage, "raw", cfg, max_body_bytes=2000)
    ok, failed = read_part_outputs(storage, "raw")
    by_name = {names[r]: v for r, v in {**ok, **failed}.items()}
    assert set(by_name) == set(names)
    assert {names[r] for r in ok} == {"ok", "rgba", "octet", "429"}
    expect = {
        "404": ("http_404", 1),
        "410": ("http_410", 1),
        "403": ("http_403", 1),
        "503": ("http_503", 3),  # retried crawl_retries times
        "html": ("not_image", 1),
        "big": ("too_large", 1),
        "bigstream": ("too_large", 1),
        "empty_body": ("decode_error", 1),
        "refused": ("connection_error", 3),
        "empty_url": ("empty_url", 0),
        "ftp": ("invalid_url", 1),
    }
    for name, (reason, attempts) in expect.items():
        rec = by_name[name]
        assert (rec["reason"], rec["attempts"]) == (reason, attempts), (name, rec)
        assert rec["caption"] == name and rec["url"] == cases[name] and rec["detail"]
        assert is_failure_reason(rec["reason"])
    assert counts["/404/0"] == 1 and counts["/503/0"] == 3 and counts["/429/0"] == 2
    assert by_name["429"]["meta"]["attempts"] == 2
    # the sample: jpg at image_size, original size and the sha256 of the downloaded bytes
    s = by_name["ok"]
    assert set(s) >= {"jpg", "txt", "json"} and s["txt"] == b"ok"
    img = Image.open(io.BytesIO(s["jpg"]))
    assert img.format == "JPEG" and img.size == (cfg.image_size, cfg.image_size)
    import hashlib

    assert s["meta"]["sha256"] == hashlib.sha256(_png(120, 60)).hexdigest()
    assert (s["meta"]["original_width"], s["meta"]["original_height"]) == (120, 60)
    assert s["meta"]["content_type"] == "image/png" and s["meta"]["url"] == cases["ok"]
    # transparent pixels become white, not black
    rgba = Image.open(io.BytesIO(by_name["rgba"]["jpg"])).convert("RGB")
    assert min(rgba.getpixel((16, 16))) > 240
    assert result.n_rows == len(cases) and result.n_ok == 4 and result.n_failed == len(cases) - 4
    assert result.failures_by_reason["http_404"] == 1 and result.failures_by_reason["too_large"] == 2
    assert result.parts == [f"raw/part-0000{i}.tar" for i in range(4)]
    assert summarize_crawl(storage, "raw") == result
    assert CrawlResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    marker = json.loads(storage.get_text("raw/part-00000.done.json"))
    assert marker["resize_filter"] == "lanczos" and marker["image_format"] == "jpg"
    # nothing but the parts is visible in storage; no journal left behind
    assert all(k.rsplit(".", 2)[-2:] in (["done", "json"], ["failures", "jsonl"]) or k.endswith(".tar") for k in storage.list("raw/"))
    assert not list((tmp_path / "store" / "raw").glob(".*journal"))


def test_process_image_resizes_shorter_side_and_centre_crops():
    # 300x100: left / centre / right thirds in three colours; the centre square is green
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out, w, h = process_image(buf.getvalue(), 32, "png")
    assert (w, h) == (300, 100)
    small = Image.open(io.BytesIO(out))
    assert small.format == "PNG" and small.size == (32, 32)
    pixels = [small.getpixel((x, y)) for x in range(1, 31) for y in range(32)]
    assert all(r < 8 and g > 247 and b < 8 for r, g, b in pixels)
    # tiny images are upscaled (the filter stage drops them by original size)
    out, w, h = process_image(_png(8, 5), 32, "png")
    assert (w, h) == (8, 5) and Image.open(io.BytesIO(out)).size == (32, 32)
    # truncated bytes fail at load(), with Pillow's message
    from dalle_core.data.image_decode import ImageDecodeError

    noisy = Image.effect_noise((64, 64), 50).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    with pytest.raises(ImageDecodeError) as e:
        process_image(buf.getvalue()[: len(buf.getvalue()) // 2], 32)
    assert e.value.reason == "decode_error" and "truncated" in e.value.detail


def test_retry_after_is_parsed_and_bounded():
    from email.utils import formatdate

    from dalle_core.data.fetch import MAX_RETRY_AFTER_S, _parse_retry_after

    assert _parse_retry_after("0.3") == 0.3 and _parse_retry_after("120") == 120.0
    assert 5 < _parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert _parse_retry_after("soon") is None and _parse_retry_after(None) is None
    assert MAX_RETRY_AFTER_S <= 60  # a hostile Retry-After cannot stall a worker for long


def test_settings_errors_name_the_setting(tmp_path, scripted):
    base, _ = scripted
    pd.DataFrame({"url": [f"{base}/ok/{i}" for i in range(6)], "caption": ["c"] * 6}).to_parquet(
        tmp_path / "l.parquet"
    )
    storage = LocalStorage(tmp_path / "s")
    with pytest.raises(CrawlError, match="image_format='gif'"):
        crawl(tmp_path / "l.parquet", storage, "p", replace(FAST, image_format="gif"))
    with pytest.raises(CrawlError, match="crawl_workers=0"):
        crawl(tmp_path / "l.parquet", storage, "p", replace(FAST, crawl_workers=0))
    with pytest.raises(UrlListError, match=r"no column 'URL' \(setting url_col='URL'\); columns found: 'url', 'caption'"):
        crawl(tmp_path / "l.parquet", storage, "p", FAST, url_col="URL")
    crawl(tmp_path / "l.parquet", storage, "p", replace(FAST, crawl_part_size=4))
    # the same prefix with a different part size would mix rows: refused
    with pytest.raises(CrawlError, match="crawl_part_size=3"):
        crawl(tmp_path / "l.parquet", storage, "p", replace(FAST, crawl_part_size=3))
    assert FAILURE_REASONS  # a fixed vocabulary, exported for reports
    # two crawls never write the same prefix at once
    from dalle_core.data.crawl import _lock_scratch

    held = _lock_scratch(storage.path("q"), "q") if storage.path("q").mkdir() is None else None
    try:
        with pytest.raises(CrawlError, match="another crawl is writing"):
            crawl(tmp_path / "l.parquet", storage, "q", FAST)
    finally:
        held.close()
    assert crawl(tmp_path / "l.parquet", storage, "q", FAST).n_ok == 6


# --------------------------------------------------------------------------- the demo world

# the fetch faults and the reason each must be recorded with
FAULT_REASON = {
    "http_404": "http_404",
    "http_500": "http_500",
    "slow": "timeout",
    "truncated": "decode_error",
    "corrupt": "decode_error",
    "not_image": "not_image",
}
# crawl_timeout_s well under the server's slow delay, and short, to keep the tests fast
CFG = replace(TINY, crawl_timeout_s=0.5)
SLOW_DELAY_S = 1.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dalle_core.demo.server import serve_demo_world
    from dalle_core.demo.world import DemoWorld

    world = DemoWorld(seed=3, items_per_batch=120, n_batches=3, n_eval=16)
    with serve_demo_world(world, host="127.0.0.1", port=0, slow_delay_s=SLOW_DELAY_S) as server:
        lists = world.write_url_lists(tmp_path_factory.mktemp("lists"), server.url)
        yield world, server, lists


def _key_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def check_batch(world, batch: int, url_list: Path, storage, prefix: str) -> tuple[dict, dict]:
    """Every row once, in a tar or in the failures, with the reason its fault implies."""
    from dalle_core.data.urllist import read_url_list

    items = world.batch_items(batch)
    rows = read_url_list(url_list)
    assert [_key_of(r.url) for r in rows] == [it.key for it in items]
    ok, failed = read_part_outputs(storage, prefix)
    assert set(ok) | set(failed) == set(range(len(rows))) and len(ok) + len(failed) == len(rows)
    for r, it in zip(rows, items):
        if it.expected == "fetch_error":
            assert r.row in failed, (it.key, it.fault, ok.get(r.row, {}).get("meta"))
            assert failed[r.row]["reason"] == FAULT_REASON[it.fault], (it.key, it.fault, failed[r.row])
            assert failed[r.row]["url"] == r.url and failed[r.row]["caption"] == r.caption
        else:  # flaky_500 (after a retry) and every caption- / image-level fault are kept
            assert r.row in ok, (it.key, it.fault, failed.get(r.row))
            s = ok[r.row]
            assert s["meta"]["url"] == r.url and s["txt"].decode() == r.caption == s["meta"]["caption"]
            img = Image.open(io.BytesIO(s[CFG.image_format]))
            assert img.size == (CFG.image_size, CFG.image_size) and img.mode == "RGB"
            assert s["meta"]["original_width"] > 0 and s["meta"]["original_height"] > 0
            assert len(s["meta"]["sha256"]) == 64
    return ok, failed


def test_demo_world_crawl_of_all_three_formats(demo, tmp_path):
    world, server, lists = demo
    assert [p.suffix for p in lists[:3]] == [".parquet", ".csv", ".tsv"]
    storage = LocalStorage(tmp_path / "store")
    faults_seen: Counter = Counter()
    rates = []
    for b, url_list in enumerate(lists[:3]):
        items = world.batch_items(b)
        before = Counter(server.request_counts)
        calls = []
        t0 = time.monotonic()
        result = crawl(url_list, storage, f"raw/batch-{b:03d}", CFG, progress=calls.append)
        elapsed = time.monotonic() - t0
        ok, failed = check_batch(world, b, url_list, storage, f"raw/batch-{b:03d}")
        faults_seen.update(it.fault for it in items if it.fault)
        # requests: dead links once, 5xx retried, flaky_500 kept after exactly one retry
        after = server.request_counts  # a snapshot
        for r, it in enumerate(items):
            n = after[it.key] - before[it.key]
            if it.fault == "http_404":
                assert n == 1, it
            elif it.fault == "http_500":
                assert n == CFG.crawl_retries + 1, it
            elif it.fault == "flaky_500":
                assert n == 2 and ok[r]["meta"]["attempts"] >= 2, it
            elif it.fault == "slow":
                assert failed[r]["attempts"] == CFG.crawl_retries + 1
        assert result.n_rows == len(items) and result.n_ok == len(ok) and result.n_failed == len(failed)
        assert sum(result.failures_by_reason.values()) == len(failed)
        assert len(result.parts) == -(-len(items) // CFG.crawl_part_size)
        assert summarize_crawl(storage, f"raw/batch-{b:03d}") == result
        # progress: throttled, and the last call says everything is done
        assert calls[-1].rows_done == calls[-1].rows_total == len(items)
        assert calls[-1].ok == len(ok) and calls[-1].parts_done == len(result.parts)
        assert len(calls) <= elapsed / 0.25 + len(result.parts) + 4
        rates.append(result.pairs_per_s)
    # the world exercised every fault the crawler must record, and some it must keep
    assert set(FAULT_REASON) <= set(faults_seen), faults_seen
    assert {"flaky_500", "non_english", "extreme_aspect", "tiny_image"} <= set(faults_seen), faults_seen
    print(f"demo crawl rates (pairs/s): {rates}")
    # a rerun of a finished crawl fetches nothing
    before = Counter(server.request_counts)
    again = crawl(lists[0], storage, "raw/batch-000", CFG)
    assert again == summarize_crawl(storage, "raw/batch-000") and server.request_counts == before


def _journaled_rows(directory: Path) -> set[int]:
    rows = set()
    for j in directory.glob(".part-*.journal"):
        try:
            data = j.read_bytes()
        except FileNotFoundError:  # committed (and deleted) meanwhile
            continue
        for line in data.split(b"\n")[1:]:
            try:
                rows.add(json.loads(line)["row"])
            except ValueError:
                pass  # the line the kill cut
    return rows


def _committed_rows(storage, prefix) -> set[int]:
    rows = set()
    for k in storage.list(prefix + "/"):
        if k.endswith(".done.json"):
            m = json.loads(storage.get_text(k))
            rows.update(range(m["row_start"], m["row_end"]))
    return rows


def _resume_and_check(world, server, batch, url_list, storage, prefix, scratch: Path):
    committed = _committed_rows(storage, prefix)
    journaled = _journaled_rows(scratch)
    assert committed and journaled, (committed, journaled)
    assert not committed & journaled
    keys = [it.key for it in world.batch_items(batch)]
    before = Counter(server.request_counts)
    result = crawl(url_list, storage, prefix, CFG)
    after = server.request_counts  # a snapshot
    fetched_again = {r for r, k in enumerate(keys) if after[k] > before[k]}
    # nothing committed or journaled before the kill is fetched again
    assert not fetched_again & committed, sorted(fetched_again & committed)
    assert not fetched_again & journaled, sorted(fetched_again & journaled)
    assert fetched_again, "the resumed crawl should have had work left"
    ok, failed = check_batch(world, batch, url_list, storage, prefix)
    assert (result.n_ok, result.n_failed) == (len(ok), len(failed))
    assert result == summarize_crawl(storage, prefix)
    assert not list(scratch.glob(".part-*.journal")), "journals are deleted after the commit"
    return result


def test_should_stop_then_resume_loses_and_duplicates_nothing(demo, tmp_path):
    world, server, lists = demo
    storage = LocalStorage(tmp_path / "store")
    prefix = "stopped/batch-000"
    scratch = storage.path(prefix)

    def should_stop() -> bool:  # once a part is committed and another is under way
        return bool(_committed_rows(storage, prefix)) and len(_journaled_rows(scratch)) >= 3

    with pytest.raises(CrawlStopped) as e:
        crawl(lists[0], storage, prefix, CFG, should_stop=should_stop)
    assert e.value.parts_committed >= 1 and e.value.rows_journaled >= 3
    assert len(_committed_rows(storage, prefix)) < len(world.batch_items(0))
    # an unfinished part is invisible: no tar or failures without their done marker
    for k in storage.list(prefix + "/"):
        assert storage.exists(k.split(".")[0] + ".done.json"), k
    assert summarize_crawl(storage, prefix).n_rows == len(_committed_rows(storage, prefix))
    _resume_and_check(world, server, 0, lists[0], storage, prefix, scratch)


KILLED_CRAWL = """
import sys, time
sys.path.insert(0, {root!r})
from dataclasses import replace
from dalle_core.data.crawl import crawl
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage
cfg = replace(get_profile("tiny").data, crawl_timeout_s={timeout!r})
# a slow consumer (10 ms a row), so that the kill lands mid-crawl
crawl({url_list!r}, LocalStorage({root_store!r}), {prefix!r}, cfg, should_stop=lambda: time.sleep(0.01) or False)
print("finished")
"""


def test_sigkilled_crawl_resumes_without_loss_duplicates_or_refetch(demo, tmp_path):
    world, server, lists = demo
    store_dir = tmp_path / "store"
    prefix = "killed/batch-001"
    storage = LocalStorage(store_dir)
    scratch = storage.path(prefix)
    code = KILLED_CRAWL.format(
        root=str(ROOT), timeout=CFG.crawl_timeout_s, url_list=str(lists[1]),
        root_store=str(store_dir), prefix=prefix,
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if _committed_rows(storage, prefix) and len(_journaled_rows(scratch)) >= 5:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the crawl ended before the kill: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(_committed_rows(storage, prefix)) < len(world.batch_items(1))
    _resume_and_check(world, server, 1, lists[1], storage, prefix, scratch)


def test_crawl_into_s3_storage(demo, s3_endpoint, s3_bucket):
    from dalle_core.data.crawl_parts import default_scratch_dir
    from dalle_core.storage import open_storage

    world, server, lists = demo
    storage = open_storage(f"s3://{s3_bucket}/run", endpoint_url=s3_endpoint)
    result = crawl(lists[2], storage, "raw/batch-002", CFG)
    ok, failed = check_batch(world, 2, lists[2], storage, "raw/batch-002")
    assert result == summarize_crawl(storage, "raw/batch-002") and result.n_ok == len(ok)
    scratch = default_scratch_dir(storage, "raw/batch-002")
    assert not list(scratch.glob(".part-*")), "journals and tars in the making are removed"
