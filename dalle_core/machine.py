"""How fast this machine multiplies matrices right now: the condition a wall-clock figure
was measured under.

The project's 2-core machine runs the same 1024-square bf16 matmul at ~857 GFLOP/s in a
good hour and at 310-435 in a bad one (same hardware, a shared host), and every stage of the
demo slows with it (docs/runs.md: stages of the same sizes took 587 s and 723 s). A timing stored
without that figure cannot be compared with another, so the demo probes the rate before and
after its run (well under a second each) and stores it beside its stage timings, and the
benchmarks take the same probe as their baseline.
"""

from __future__ import annotations

import os
import time

import torch

from dalle_core.precision.device import cpu_has_fast_bf16

PROBE_SIZE = 1024  # a product of ~2 GFLOP: a few ms a matmul on 2 cores, well above the timer's noise


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n by n x n matmul on `device` in `dtype` (one warm-up, then the
    median of `repeats` timed products)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def machine_speed() -> dict:
    """This CPU's matmul rates now, in GFLOP/s, on torch's current thread count: fp32 always,
    bf16 only where the CPU has bf16 matrix instructions (elsewhere bf16 is emulated, slow, and
    no profile uses it: None)."""
    fast_bf16 = cpu_has_fast_bf16()
    return {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu_fast_bf16": fast_bf16,
        "matmul_size": PROBE_SIZE,
        "fp32_gflops": round(matmul_rate(dtype=torch.float32, n=PROBE_SIZE) / 1e9, 1),
        "bf16_gflops": round(matmul_rate(dtype=torch.bfloat16, n=PROBE_SIZE) / 1e9, 1) if fast_bf16 else None,
    }


def describe_speed(speed: dict) -> str:
    """One line for a log: "2 threads, 1024-square matmul: fp32 200 GFLOP/s, bf16 857 GFLOP/s"."""
    rates = f"fp32 {speed['fp32_gflops']:.0f} GFLOP/s"
    if speed.get("bf16_gflops") is not None:
        rates += f", bf16 {speed['bf16_gflops']:.0f} GFLOP/s"
    return f"{speed['threads']} threads, {speed['matmul_size']}-square matmul: {rates}"
