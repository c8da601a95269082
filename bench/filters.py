"""Filter cost per pair: CPU seconds of the paper's filter pipeline on one core.

Runs `dalle_core.data.filters.build_filters` (the paper-12B profile's
thresholds: caption length, boilerplate dates, language identification,
aspect ratio, size, exact and near duplicates, overlap with an evaluation set)
over N pairs at the paper's stored size (256x256 JPEG, quality 95): demo-world
scenes with pixel noise added (so the JPEG is not a few hundred bytes of flat
colour), 80% English captions, the rest foreign, date boilerplate or too short.
Prints one JSON object; `dalle plan` takes the CPU ms per pair
(`filter_cpu_ms_per_pair`) as its filter rate (dalle_core/stage_plan.py).
Baseline in the same run: the cost of decoding the JPEG alone, which every
image filter needs.

    .venv/bin/python bench/filters.py --pairs 2000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.data.filters import build_filters  # noqa: E402
from dalle_core.data.pairs import Pair  # noqa: E402
from dalle_core.demo.captions import date_caption, foreign_caption, random_caption  # noqa: E402
from dalle_core.demo.render import render  # noqa: E402
from dalle_core.demo.scenes import random_scene  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402


def make_pairs(n: int, size: int, quality: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        scene = random_scene(rng)
        img = np.asarray(render(scene, size, size, rng), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        u = rng.random()
        caption = (random_caption(scene, rng) if u < 0.8 else foreign_caption(scene, rng) if u < 0.9
                   else date_caption(rng) if u < 0.95 else "photo")
        data = buf.getvalue()
        pairs.append(Pair(key=f"{i:08d}", caption=caption, image_bytes=data, image_ext="jpg",
                          meta={"original_width": size, "original_height": size,
                                "sha256": hashlib.sha256(data).hexdigest()}))
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--profile", default="paper-12B")
    ap.add_argument("--eval-hashes", type=int, default=5000, help="evaluation-set pHashes to check overlap against")
    args = ap.parse_args(argv)
    data = get_profile(args.profile).data
    pairs = make_pairs(args.pairs, data.image_size, data.jpeg_quality)
    rng = np.random.default_rng(1)
    eval_hashes = [f"{int(x):016x}" for x in rng.integers(0, 2**63, args.eval_hashes, dtype=np.int64)]
    pipeline = build_filters(data, eval_hashes)
    list(pipeline.apply(make_pairs(20, data.image_size, data.jpeg_quality, seed=9)))  # warm-up (langid model load)
    pipeline.reset_report()

    from PIL import Image

    t = time.process_time()
    for p in pairs:
        with Image.open(io.BytesIO(p.image_bytes)) as im:
            im.convert("RGB")
    decode_s = time.process_time() - t
    for p in pairs:
        p._cache.clear()

    t, w = time.process_time(), time.perf_counter()
    kept = sum(1 for _ in pipeline.apply(pairs))
    cpu_s, wall_s = time.process_time() - t, time.perf_counter() - w
    print(json.dumps({
        "benchmark": "filters", "profile": args.profile, "pairs": len(pairs), "kept": kept,
        "removed": pipeline.report.removed, "image_size": data.image_size,
        "mean_jpeg_bytes": round(sum(len(p.image_bytes) for p in pairs) / len(pairs)),
        "filter_cpu_ms_per_pair": round(1000 * cpu_s / len(pairs), 3),
        "filter_wall_ms_per_pair": round(1000 * wall_s / len(pairs), 3),
        "decode_cpu_ms_per_pair": round(1000 * decode_s / len(pairs), 3),
        "pairs_per_core_s": round(len(pairs) / cpu_s, 1),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
