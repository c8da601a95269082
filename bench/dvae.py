"""dVAE speed at the paper's size: encode throughput and one training step.

Prints one JSON object. The baseline, measured in the same run, is this
machine's dense matmul rate (torch.mm, fp32 or the GPU's dtype): each figure is
also given as achieved FLOP/s over that rate, which is comparable across noisy
runs and machines. FLOPs are counted by torch.utils.flop_counter.

    .venv/bin/python bench/dvae.py                  # paper shape (256x256 -> 32x32, vocab 8192), CPU
    .venv/bin/python bench/dvae.py --profile small --batch 16 --threads 1   # the demo's dVAE
    .venv/bin/python bench/dvae.py --batch 8 --device cuda --dtype bf16
    .venv/bin/python bench/dvae.py --profile small --batch 16 --dtype bf16   # CPU bf16 vs fp32, same run

The training step is timed in both memory layouts, the contiguous (NCHW) one
as the baseline and channels_last (what train_dvae uses) as the figure.
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

from dalle_core.machine import matmul_rate  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402
from dalle_core.dvae.losses import elb_loss, gumbel_softmax_relaxation  # noqa: E402
from dalle_core.dvae.model import build_dvae, encode_to_codes, map_pixels  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="paper-12B", help="profile whose dVAE to time (default: the paper's 256x256 model)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype (on CPU: bf16 or fp32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = get_profile(args.profile).dvae
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    use_amp = amp is not None and (device.type == "cuda" or (device.type == "cpu" and amp == torch.bfloat16))
    torch.manual_seed(0)
    enc, dec = build_dvae(cfg, device=device, requires_grad=True, use_mixed_precision=use_amp)
    x = torch.rand(args.batch, 3, cfg.image_size, cfg.image_size, device=device)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(dec.parameters()), lr=1e-4)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=use_amp)

    def encode():
        with autocast():
            encode_to_codes(enc, x)

    def train_step():
        with autocast():
            logits = enc(map_pixels(x))
            z = gumbel_softmax_relaxation(logits.float(), 1.0)
            out = dec(z)
            loss = elb_loss(x, logits.float(), out.float(), kl_weight=6.6)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the baseline layout first (contiguous NCHW), then channels_last as train_dvae runs it
    step_s_nchw = timed(train_step, device, args.repeats)
    for m in (enc, dec):
        m.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    enc_s = timed(encode, device, args.repeats)
    step_s = timed(train_step, device, args.repeats)
    step_s_fp32 = None
    if use_amp:  # the same step without autocast, in the same run: the low precision's own gain
        use_amp = False
        step_s_fp32 = timed(train_step, device, args.repeats)
        use_amp = True
    enc_flops = count_flops(encode)
    step_flops = count_flops(train_step)
    peak = matmul_rate(device, amp if use_amp else torch.float32, n=2048)
    out = {
        "benchmark": "dvae",
        "profile": args.profile,
        "image_size": cfg.image_size,
        "grid": cfg.grid_size,
        "vocab": cfg.vocab_size,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype if use_amp else "fp32",
        "encode_images_per_s": round(args.batch / enc_s, 3),
        "train_step_s": round(step_s, 3),
        "train_images_per_s": round(args.batch / step_s, 3),
        "train_step_s_contiguous_nchw": round(step_s_nchw, 3),
        "channels_last_speedup": round(step_s_nchw / step_s, 3),
        "train_step_s_fp32": round(step_s_fp32, 3) if step_s_fp32 else None,
        "speedup_over_fp32": round(step_s_fp32 / step_s, 3) if step_s_fp32 else None,
        "matmul_baseline_tflops": round(peak / 1e12, 4),
        "encode_fraction_of_matmul_rate": round(enc_flops / enc_s / peak, 4),
        "train_fraction_of_matmul_rate": round(step_flops / step_s / peak, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
