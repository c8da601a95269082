"""Inception feature rate: images/s through the FID / IS extractor.

`dalle_core.eval.inception.InceptionMetrics` (torch-fidelity's Inception v3,
images resized to 299x299 inside) over N random 256x256 images. The weights
are the configured file when $DALLE_INCEPTION_WEIGHTS names one, else seeded
random weights in the same architecture (`write_random_weights`): the rate
does not depend on the values. Baseline in the same run: the same extractor
at batch 1, so the figure is also the batching speed-up. Prints one JSON object.

    .venv/bin/python bench/inception.py --device cuda --images 2048 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.eval.inception import WEIGHTS_ENV, InceptionMetrics, write_random_weights  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(metrics: InceptionMetrics, images: list, device: str) -> float:
    metrics.features(images[: metrics.batch_size])  # warm-up (kernels, allocator)
    _sync(device)
    t = time.perf_counter()
    metrics.features(images)
    _sync(device)
    return len(images) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="side of the generated images (the paper's 256)")
    ap.add_argument("--baseline-images", type=int, default=8, help="images timed at batch 1")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
              for _ in range(args.images)]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        configured = os.environ.get(WEIGHTS_ENV)
        path = configured if configured else write_random_weights(Path(tmp) / "inception.pth")
        batched = InceptionMetrics.from_weights(path, batch_size=args.batch_size, device=args.device)
        single = InceptionMetrics(batched.extractor, batched.weights_path, batched.weights_sha256, batch_size=1,
                                  device=args.device)
        r = rate(batched, images, args.device)
        r1 = rate(single, images[: max(1, args.baseline_images)], args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({
        "benchmark": "inception", "device": name, "images": args.images, "image_size": args.size,
        "batch_size": args.batch_size, "weights": "configured" if configured else "random (seeded), same architecture",
        "images_per_s": round(r, 2), "batch1_images_per_s": round(r1, 2), "batching_speedup": round(r / r1, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if args.device.startswith("cuda") else None,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
