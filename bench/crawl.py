"""Crawl throughput: our crawler next to img2dataset, same URL list, same server, same run.

    .venv/bin/python bench/crawl.py [--items 1000] [--image-size 64] [--workers 16]

Prints one JSON object on stdout (progress and diagnostics go to stderr):

    {"benchmark": "crawl", "items": N, "image_size": S, "workers": W,
     "ours_pairs_per_s": ..., "img2dataset_pairs_per_s": ..., "ratio": ours / img2dataset,
     "ours_ok": ..., "img2dataset_ok": ..., "date": ..., "cpus": ..., ...}

What is measured. The demo world (`dalle_core.demo.world`) is served over
HTTP on 127.0.0.1 by `dalle_core.demo.server`, in a process of its own so
that neither tool shares an interpreter (a GIL) with the server. The URL list is
a parquet of `--items` items of the world with no fault (no dead links, no slow
responses: faults make both tools wait on timeouts, which measures the timeout
setting, not the crawler). The server renders those images once before the
clock starts and serves them from memory (`--render-on-request` turns that off:
rendering costs ~10 ms of CPU an image, which caps any crawler on 2 cores near
100 pairs/s and so measures the server), and with TCP_NODELAY set on its
replies (`--server-as-is` turns that off; see `_server_nodelay`: without it a
pooled client stalls ~40 ms a request on this server). Each tool downloads every
URL, decodes the image, resizes it (shorter side to `--image-size`, centre
square crop, Lanczos), re-encodes it (`--image-format`) and writes WebDataset
tars to a local folder:

- ours: `dalle_core.data.crawl.crawl` in this process, `crawl_workers=W`;
- img2dataset: `img2dataset.download(...)` with `processes_count=1`,
  `thread_count=W`, `resize_mode="center_crop"`, in a subprocess run by the
  python of a separate venv, `bench/.venv-img2dataset` (gitignored; created on
  first use from `bench/requirements-img2dataset.txt`; img2dataset is never
  installed into the project's venv).

pairs/s = pairs written / wall-clock seconds of the crawl call (`crawl()` for
ours, `download()` for img2dataset, timed inside the process that makes the
call, so interpreter start-up and imports are not counted; img2dataset's own
worker and logger process start-up is, since `download()` does it every time).
Both tools run `--repeats` times (default 2) in alternating order (ours first in
even rounds, img2dataset first in odd ones) and the median of each is
reported, with every run's figures under "runs". Because img2dataset's start-up
(a spawned worker process that imports it, a logger process, the URL list
converted to feather) costs it seconds per call, "img2dataset_shard_pairs_per_s"
also gives its steady rate from its worker's own timing of the shards, and
"ratio_vs_img2dataset_shard_rate" ours against that. If img2dataset cannot be
installed or run here, "img2dataset_error" says why, its figures are null and
ours still prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_I2D_VENV = BENCH_DIR / ".venv-img2dataset"
I2D_REQUIREMENTS = BENCH_DIR / "requirements-img2dataset.txt"

if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from bench_venv import ensure_venv  # noqa: E402


def log(*args) -> None:
    print("[bench/crawl]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the server


def _server_nodelay(force: bool):
    """Whether the demo server's replies go out with TCP_NODELAY; with `force`, make it so.

    The server writes the status line and headers, then the body, in two
    writes on a keep-alive connection. Without TCP_NODELAY, Nagle's algorithm
    holds the body until the client ACKs the headers, and the client delays
    that ACK (up to 40 ms on Linux): every request on a reused connection (a
    pooled client, ours) stalls ~40 ms, while a client opening a connection per
    request (img2dataset's urllib) does not (quick-ACK at connection start).
    Web servers do not behave like that (they send headers and body together),
    so by default the benchmark sets TCP_NODELAY on the server's handler, in
    the server's process only. Returns None when the handler cannot be found.
    """
    from dalle_core.demo import server as demo_server

    handler = getattr(demo_server, "_Handler", None)
    if handler is None:
        return None
    if force and not getattr(handler, "disable_nagle_algorithm", False):
        handler.disable_nagle_algorithm = True  # socketserver.StreamRequestHandler's switch
    return bool(getattr(handler, "disable_nagle_algorithm", False))


def _serve(seed: int, items: int, slow_delay_s: float, list_dir: str, prerender: bool,
           server_nodelay: bool, conn) -> None:
    """Child process: build the world, serve it, write the clean URL list, wait."""
    try:
        import pandas as pd

        from dalle_core.demo.server import serve_demo_world
        from dalle_core.demo.world import DemoWorld

        # fault_rate=0 still plants a couple of items per fault kind (>= 60 items);
        # grow the batch until it holds `items` clean ones.
        per_batch = items + 64
        while True:
            world = DemoWorld(seed=seed, items_per_batch=per_batch, n_batches=1, n_eval=0, fault_rate=0.0)
            clean = [i for i in world.batch_items(0) if i.fault is None]
            if len(clean) >= items:
                break
            per_batch = per_batch * 5 // 4 + 16
        if prerender:
            # Rendering an image costs the server ~10 ms of CPU, so an uncached
            # server on 2 cores caps both tools near 100 pairs/s and the figure
            # measures the server. Render every served image once, up front, and
            # serve the bytes from memory (this process only).
            from dalle_core.demo.items import WorldItem

            cache: dict[str, bytes] = {}
            render = WorldItem.image_bytes

            def cached_image_bytes(self) -> bytes:
                data = cache.get(self.key)
                if data is None:
                    data = cache[self.key] = render(self)
                return data

            WorldItem.image_bytes = cached_image_bytes
            for item in clean[:items]:
                item.image_bytes()
        nodelay = _server_nodelay(server_nodelay)
        with serve_demo_world(world, host="127.0.0.1", port=0, slow_delay_s=slow_delay_s) as server:
            base = server.url.rstrip("/")
            # the world's own URL list, filtered to the clean items (same url scheme)
            full = pd.read_parquet(world.write_url_lists(Path(list_dir) / "world", base)[0])
            keys = {i.key for i in clean[:items]}
            frame = full[[u.rsplit("/", 1)[-1] in keys for u in full["url"]]].reset_index(drop=True)
            if len(frame) != items:
                raise RuntimeError(f"clean URL list has {len(frame)} rows, wanted {items}")
            path = Path(list_dir) / "clean.parquet"
            frame.to_parquet(path, index=False)
            formats: dict[str, int] = {}
            for i in clean[:items]:
                formats[i.image_format] = formats.get(i.image_format, 0) + 1
            conn.send({"url": base, "url_list": str(path), "world_items": per_batch, "tcp_nodelay": nodelay,
                       "source_formats": formats,
                       "source_sizes": [min(i.width for i in clean[:items]), max(i.width for i in clean[:items])]})
            conn.recv()  # stop
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send({"error": f"{type(e).__name__}: {e}"})
        except Exception:
            pass
        raise


# --------------------------------------------------------------------------- ours


def run_ours(url_list: Path, out_dir: Path, config) -> dict:
    from dalle_core.data.crawl import crawl
    from dalle_core.storage import LocalStorage

    storage = LocalStorage(out_dir)
    last = [0.0]

    def progress(p) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0:
            last[0] = now
            log("  ours:", p.line())

    t0 = time.perf_counter()
    result = crawl(url_list, storage, "crawl", config, progress=progress)
    wall = time.perf_counter() - t0
    return {
        "tool": "ours",
        "ok": result.n_ok,
        "failed": result.n_failed,
        "failures": dict(result.failures_by_reason),
        "wall_s": round(wall, 3),
        "pairs_per_s": round(result.n_ok / wall, 2) if wall > 0 else 0.0,
        "tool_reported_pairs_per_s": result.pairs_per_s,
    }


# --------------------------------------------------------------------------- img2dataset

# Runs inside bench/.venv-img2dataset's python: argv[1] = JSON kwargs for
# download(), argv[2] = where to write the result JSON. img2dataset prints to
# stdout; the parent sends that to its stderr.
_I2D_RUNNER = r"""
import glob, json, os, sys, time
kwargs = json.loads(sys.argv[1])
result_path = sys.argv[2]

def main():
    import img2dataset
    from importlib.metadata import version
    t0 = time.perf_counter()
    img2dataset.download(**kwargs)
    wall = time.perf_counter() - t0
    ok = count = failed_download = failed_resize = 0
    statuses = {}
    shard_seconds = 0.0
    for f in sorted(glob.glob(os.path.join(kwargs["output_folder"], "*_stats.json"))):
        with open(f) as fh:
            s = json.load(fh)
        ok += s["successes"]
        count += s["count"]
        failed_download += s["failed_to_download"]
        failed_resize += s["failed_to_resize"]
        shard_seconds += s["end_time"] - s["start_time"]
        for k, v in s.get("status_dict", {}).items():
            statuses[k] = statuses.get(k, 0) + v
    tars = glob.glob(os.path.join(kwargs["output_folder"], "*.tar"))
    with open(result_path, "w") as fh:
        json.dump({"ok": ok, "count": count, "failed_to_download": failed_download,
                   "failed_to_resize": failed_resize, "status_dict": statuses,
                   "wall_s": wall, "shard_seconds": shard_seconds, "tars": len(tars),
                   "version": version("img2dataset")}, fh)

if __name__ == "__main__":
    main()
"""


def _i2d_env() -> dict:
    env = dict(os.environ)
    env.update(
        NO_ALBUMENTATIONS_UPDATE="1",  # albumentations otherwise checks PyPI for updates at import
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)  # nothing of the project venv leaks in
    return env


def ensure_img2dataset_venv(venv: Path, install: bool) -> Path:
    """The venv's python with img2dataset importable; creates/updates it when `install`.

    Raises RuntimeError with the reason when that cannot be had.
    """
    return ensure_venv(venv, I2D_REQUIREMENTS, "import img2dataset", install, env=_i2d_env(), log=log)


def img2dataset_kwargs(url_list: Path, out_dir: Path, config, workers: int) -> dict:
    fmt = "jpg" if config.image_format in ("jpg", "jpeg") else config.image_format
    return dict(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out_dir),
        image_size=config.image_size,
        resize_mode="center_crop",  # shorter side to image_size, centre crop: what ours does
        upscale_interpolation="lanczos",  # ours resizes with Lanczos both ways
        downscale_interpolation="lanczos",
        encode_format=fmt,
        encode_quality=config.jpeg_quality if fmt == "jpg" else 6,  # png: zlib level, Pillow's default (ours)
        processes_count=1,
        thread_count=workers,
        timeout=config.crawl_timeout_s,
        retries=config.crawl_retries,
        number_sample_per_shard=config.crawl_part_size,
        save_additional_columns=None,
        enable_wandb=False,
        distributor="multiprocessing",
        # each run gets a fresh folder; "overwrite" is broken in 1.47.0 (it deletes
        # the output folder after creating its _tmp folder inside it)
        incremental_mode="incremental",
    )


def run_img2dataset(py: Path, kwargs: dict, work: Path, timeout_s: float) -> dict:
    result_path = work / "i2d-result.json"
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(py), "-c", _I2D_RUNNER, json.dumps(kwargs), str(result_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_i2d_env(),
            cwd=str(work), timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"img2dataset did not finish in {timeout_s:.0f}s") from e
    outer = time.perf_counter() - t0
    out = proc.stdout or ""
    for line in out.strip().splitlines()[-5:]:
        log("  img2dataset:", line[-300:])
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"img2dataset run failed (rc {proc.returncode}): {tail}")
    r = json.loads(result_path.read_text())
    wall = r["wall_s"]
    return {
        "tool": "img2dataset",
        "ok": r["ok"],
        "failed": r["count"] - r["ok"],
        "failures": {k: v for k, v in r["status_dict"].items() if k != "success"},
        "wall_s": round(wall, 3),
        "pairs_per_s": round(r["ok"] / wall, 2) if wall > 0 else 0.0,
        "subprocess_wall_s": round(outer, 3),  # with interpreter start-up and imports
        "shard_seconds": round(r["shard_seconds"], 3),  # img2dataset's own per-shard timing
        "shard_pairs_per_s": round(r["ok"] / r["shard_seconds"], 2) if r["shard_seconds"] > 0 else None,
        "version": r["version"],
    }


# --------------------------------------------------------------------------- main


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def main(argv=None) -> int:
    from dalle_core.profiles import get_profile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1000, help="clean URLs to crawl (default 1000)")
    p.add_argument("--image-size", type=int, default=64, help="side of the stored square images (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="download threads of each tool (default: the profile's crawl_workers)")
    p.add_argument("--profile", default="small", help="profile whose DataConfig is the base (default small)")
    p.add_argument("--image-format", choices=("png", "jpg"), default=None,
                   help="format both tools encode (default: the profile's image_format)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="pairs per tar for both tools (default: --items, one tar each)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating order (default 2)")
    p.add_argument("--seed", type=int, default=0, help="demo world seed")
    p.add_argument("--server-as-is", action="store_true",
                   help="do not set TCP_NODELAY on the demo server's replies (see _server_nodelay)")
    p.add_argument("--render-on-request", action="store_true",
                   help="let the server render each image when asked (default: pre-rendered, served from"
                        " memory, so that the server is not the bottleneck)")
    p.add_argument("--img2dataset-venv", type=Path, default=DEFAULT_I2D_VENV,
                   help=f"venv with img2dataset (default {DEFAULT_I2D_VENV.relative_to(REPO_ROOT)})")
    p.add_argument("--no-install", action="store_true", help="do not create/update the img2dataset venv")
    p.add_argument("--skip-img2dataset", action="store_true", help="measure ours only")
    p.add_argument("--img2dataset-timeout", type=float, default=600.0, help="seconds per img2dataset run")
    p.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    args = p.parse_args(argv)
    if args.items < 1 or args.repeats < 1 or args.image_size < 1:
        p.error("--items, --repeats and --image-size must be >= 1")

    profile = get_profile(args.profile)
    base = profile.data
    workers = args.workers or base.crawl_workers
    config = dataclasses.replace(
        base,
        image_size=args.image_size,
        image_format=args.image_format or base.image_format,
        crawl_workers=workers,
        crawl_part_size=args.shard_size or args.items,
    )

    work = Path(tempfile.mkdtemp(prefix="bench-crawl-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "benchmark": "crawl",
        "items": args.items,
        "image_size": config.image_size,
        "workers": workers,
        "ours_pairs_per_s": None,
        "img2dataset_pairs_per_s": None,
        "ratio": None,
        "ours_ok": None,
        "img2dataset_ok": None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews both
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.machine()},
        "image_format": config.image_format,
        "shard_size": config.crawl_part_size,
        "repeats": args.repeats,
        "profile": profile.name,
        "timeout_s": config.crawl_timeout_s,
        "retries": config.crawl_retries,
        "server": "dalle_core.demo.server on 127.0.0.1, in its own process",
        "server_prerendered": not args.render_on_request,
    }

    # img2dataset's venv first (a slow first install should not sit between runs)
    i2d_py = None
    if args.skip_img2dataset:
        report["img2dataset_error"] = "skipped (--skip-img2dataset)"
    else:
        try:
            i2d_py = ensure_img2dataset_venv(args.img2dataset_venv, install=not args.no_install)
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            report["img2dataset_error"] = f"install: {e}"
            log("img2dataset unavailable:", e)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.seed, args.items, 3.0, str(work / "lists"), not args.render_on_request,
                                            not args.server_as_is, child), daemon=True)
    server.start()
    runs: list[dict] = []
    try:
        log(f"starting the demo server ({'pre-rendering' if not args.render_on_request else 'rendering on request'}"
            f" {args.items} images)")
        if not parent.poll(600):
            raise RuntimeError("the demo server did not start in 600 s")
        info = parent.recv()
        if "error" in info:
            raise RuntimeError(f"demo server: {info['error']}")
        url_list = Path(info["url_list"])
        report["server_tcp_nodelay"] = info["tcp_nodelay"]
        report["source_images"] = {"formats": info["source_formats"], "width_range": info["source_sizes"]}
        log(f"serving {args.items} clean items at {info['url']}; URL list {url_list}")

        # the modules ours imports lazily, out of the timed region (img2dataset's
        # runner has imported its own before its clock starts)
        import PIL.Image  # noqa: F401
        import pyarrow.parquet  # noqa: F401
        import pandas  # noqa: F401
        import requests  # noqa: F401
        import webdataset  # noqa: F401

        for rnd in range(args.repeats):
            order = ("ours", "img2dataset") if rnd % 2 == 0 else ("img2dataset", "ours")
            for tool in order:
                out = work / f"{tool}-{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "ours":
                    log(f"round {rnd}: ours ({workers} workers)")
                    r = run_ours(url_list, out, config)
                else:
                    if i2d_py is None:
                        continue
                    log(f"round {rnd}: img2dataset ({workers} threads)")
                    try:
                        kwargs = img2dataset_kwargs(url_list, out, config, workers)
                        r = run_img2dataset(i2d_py, kwargs, work, args.img2dataset_timeout)
                        report["img2dataset_version"] = r.pop("version")
                        report["img2dataset_kwargs"] = {k: v for k, v in kwargs.items()
                                                        if k not in ("url_list", "output_folder")}
                    except Exception as e:  # noqa: BLE001
                        report["img2dataset_error"] = f"run: {e}"
                        log("img2dataset failed:", e)
                        i2d_py = None
                        continue
                r["round"] = rnd
                log(f"  {tool}: {r['ok']} ok, {r['failed']} failed in {r['wall_s']}s = {r['pairs_per_s']} pairs/s")
                runs.append(r)
                if args.keep is None:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        try:
            parent.send("stop")
        except Exception:
            pass
        server.join(30)
        if server.is_alive():
            server.terminate()
            server.join(5)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    ours = [r for r in runs if r["tool"] == "ours"]
    i2d = [r for r in runs if r["tool"] == "img2dataset"]
    report["ours_pairs_per_s"] = _median([r["pairs_per_s"] for r in ours])
    report["ours_ok"] = min((r["ok"] for r in ours), default=None)
    if i2d:
        report["img2dataset_pairs_per_s"] = _median([r["pairs_per_s"] for r in i2d])
        report["img2dataset_ok"] = min(r["ok"] for r in i2d)
        if report["img2dataset_pairs_per_s"]:
            report["ratio"] = round(report["ours_pairs_per_s"] / report["img2dataset_pairs_per_s"], 3)
        # img2dataset's steady rate: its worker's own timing of the shards (download, resize,
        # write), without the start-up of its worker and logger processes and the URL list
        # conversion that every download() call pays
        report["img2dataset_shard_pairs_per_s"] = _median([r.get("shard_pairs_per_s") for r in i2d])
        if report["img2dataset_shard_pairs_per_s"]:
            report["ratio_vs_img2dataset_shard_rate"] = round(
                report["ours_pairs_per_s"] / report["img2dataset_shard_pairs_per_s"], 3)
    report["runs"] = runs
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
