"""The machine-speed probe the demo stores beside its timings (dalle_core/machine.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dalle_core.machine import describe_speed, machine_speed, matmul_rate


def test_matmul_rate_agrees_with_an_independent_timing():
    """FLOP/s of the product, not its time or its GFLOP/s: against the test's own clock of the
    same product (a unit slip would be off by 1000x; the band allows a noisy machine)."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    reference = 2 * n**3 / sorted(times)[3]
    measured = matmul_rate("cpu", torch.float32, n=n, repeats=7)
    assert 1 / 4 < measured / reference < 4, (measured, reference)


def test_machine_speed_measures_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setenv("DALLE_CPU_BF16", "0")
    speed = machine_speed()
    assert speed["bf16_gflops"] is None and speed["fp32_gflops"] > 0
    assert speed["threads"] == torch.get_num_threads()
    assert "bf16" not in describe_speed(speed) and "fp32" in describe_speed(speed)
    monkeypatch.setenv("DALLE_CPU_BF16", "1")
    speed = machine_speed()
    assert speed["bf16_gflops"] > 0
    assert f"bf16 {speed['bf16_gflops']:.0f} GFLOP/s" in describe_speed(speed)


def test_the_demo_stores_each_stage_time_with_the_machine_speed(demo_run):
    """`make demo` writes <run dir>/demo_timing.json and prints the machine's rate first,
    so a timing is compared only with one taken on an equally fast machine."""
    settings, summary, lines = demo_run
    timing = json.loads((Path(settings.run_dir) / "demo_timing.json").read_text())
    assert timing == summary["timing"] and timing["profile"] == "tiny"
    labels = [s["stage"] for s in timing["stages"]]
    assert labels[0].startswith("crawled ") and "merged and sharded" in labels
    assert all(s["seconds"] >= 0 for s in timing["stages"])
    assert sum(s["seconds"] for s in timing["stages"]) <= timing["total_seconds"] + 0.1 * len(labels)
    for speed in (timing["machine_before"], timing["machine_after"]):
        assert speed["fp32_gflops"] > 0 and speed["threads"] >= 1
    assert any(line.startswith("[demo] machine: ") and "GFLOP/s" in line for line in lines[:3])
    assert any(line.startswith("[demo] done in ") and "demo_timing.json" in line for line in lines)
