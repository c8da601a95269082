"""Sampling speed: images/s and seconds per image, with and without the KV cache.

Runs the real sampler (`dalle_core.prior.sampling.sample_image_codes`) on a
randomly initialised prior of the given shape (speed does not depend on the
weights) and, for the whole chain, the dVAE decoder. The baseline, measured in
the same run, is uncached sampling (every step recomputes the whole stream): the
figure is the cache's speed-up. Cached and uncached tokens are compared too.

A second baseline of the same run: cached sampling with dense attention over every
cached key under the mask row (`AttentionResblock.sparse_decode = False`) against the
sampler's sparse step, which reads only the keys the row keeps
(dalle_core/prior/decode_attention.py): `sparse_decode_speedup`, and whether both
drew the same tokens. A third of the same run, with --draws n > 1 (rows = captions x n, as the report draws
them): each draw running its own caption prefill and reading its own copy of the caption
block (`sampling.share_caption_rows = False`) against the sampler's shared ones
(`StaticKVCache.share_rows`): `shared_caption_speedup`. No --attention option: the prefill runs SDPA whatever
`PriorConfig.attention` says (only the whole stream uses FlexAttention or the
block-sparse layout), so those are timed by bench/prior.py.

    .venv/bin/python bench/sample.py                       # small (16x16) and the 32x32 grid, CPU
    .venv/bin/python bench/sample.py --device cuda --rows 64 --grids 16 32
    .venv/bin/python bench/sample.py --grids 16 --rows 512 --draws 16 --threads 2   # the report's chunk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.dvae.model import build_dvae, decode_codes  # noqa: E402
from dalle_core.prior import DalleTransformer, sampling  # noqa: E402
from dalle_core.prior.model import AttentionResblock  # noqa: E402
from dalle_core.prior.sampling import sample_image_codes  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def bench_grid(grid: int, rows: int, device: str, dtype: torch.dtype, uncached_rows: int, draws: int = 1) -> dict:
    cfg = get_profile("small").prior.replace(image_grid=grid)
    torch.manual_seed(0)
    model = DalleTransformer(cfg).to(device=device, dtype=dtype).eval()
    if rows % draws:
        raise SystemExit(f"--rows {rows} is not a multiple of --draws {draws}")
    text = torch.randint(0, cfg.text_vocab_size, (rows // draws, cfg.text_len))

    def draw(t, **kw):
        return sample_image_codes(model, t, n_per_caption=draws, seed=1, **kw)

    # warm-up (allocations, kernels)
    sample_image_codes(model, text[:1], seed=0, use_cache=True)
    t_cached, codes = timed(lambda: draw(text, use_cache=True), device)
    # the baseline: full recomputation; on fewer rows when it would take too long
    sub = text[:max(1, uncached_rows // draws)]
    t_sub_cached, codes_sub = timed(lambda: draw(sub, use_cache=True), device)
    t_uncached, codes_u = timed(lambda: draw(sub, use_cache=False), device)
    same = float((codes_sub == codes_u).float().mean())
    AttentionResblock.sparse_decode = False
    try:
        t_dense, codes_d = timed(lambda: draw(text, use_cache=True), device)
    finally:
        AttentionResblock.sparse_decode = True
    sampling.share_caption_rows = False
    try:
        t_own, codes_o = timed(lambda: draw(text, use_cache=True), device)
    finally:
        sampling.share_caption_rows = True
    dv = get_profile("small").dvae.replace(image_size=grid * 4)
    _, decoder = build_dvae(dv, device=device)
    t_decode, _ = timed(lambda: decode_codes(decoder, codes.view(rows, grid, grid)), device)
    return {
        "grid": f"{grid}x{grid}", "image_tokens": grid * grid, "rows": rows,
        "cached_s": round(t_cached, 3), "cached_images_per_s": round(rows / t_cached, 3),
        "cached_s_per_image": round(t_cached / rows, 4),
        "decode_s_per_image": round(t_decode / rows, 5),
        "uncached_rows": len(sub) * draws, "uncached_s": round(t_uncached, 3),
        "uncached_s_per_image": round(t_uncached / (len(sub) * draws), 4),
        "cache_speedup": round(t_uncached / t_sub_cached, 2),
        "identical_tokens": same,
        "dense_decode_s": round(t_dense, 3), "sparse_decode_speedup": round(t_dense / t_cached, 2),
        "sparse_decode_identical_tokens": float((codes == codes_d).float().mean()),
        "draws_per_caption": draws, "own_caption_block_s": round(t_own, 3),
        "shared_caption_speedup": round(t_own / t_cached, 2),
        "shared_caption_identical_tokens": float((codes == codes_o).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="16 = the small demo, 32 = the paper's")
    ap.add_argument("--rows", type=int, default=8, help="images sampled together (cached)")
    ap.add_argument("--uncached-rows", type=int, default=2, help="images for the uncached baseline")
    ap.add_argument("--draws", type=int, default=1, help="draws per caption (the small report: 16)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    results = [bench_grid(g, args.rows, args.device, dtype, min(args.uncached_rows, args.rows), args.draws)
               for g in args.grids]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(json.dumps({
        "bench": "sample", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "prior": "small shape ({0.n_layer} layers x {0.n_embd})".format(get_profile("small").prior),
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
