"""Sampling at 12B: the batch is sized from the KV cache per row, not a fixed 256, and the
precision is the device's half precision (issue 13, part 6). Before: `samples` and the zero-shot
report decoded 256 rows at once, which at paper-12B needs 256 x 1.21 GiB = 310 GiB of KV cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_core.prior.config import count_parameters
from dalle_core.prior.sampling_memory import (
    SamplingMemoryError,
    kv_cache_bytes_per_row,
    sampling_batch_size,
    sampling_bytes_per_row,
    sampling_dtype,
)
from dalle_core.profiles import get_profile

GIB = 2**30


def test_paper_12b_kv_cache_per_row_by_hand():
    cfg = get_profile("paper-12B").prior
    # 2 (k, v) x 64 layers x (256 + 1024) positions x 3968 channels x 2 bytes (bf16)
    assert kv_cache_bytes_per_row(cfg, torch.bfloat16) == 2 * 64 * 1280 * 3968 * 2 == 1_300_234_240
    assert kv_cache_bytes_per_row(cfg, torch.float32) == 2 * kv_cache_bytes_per_row(cfg, torch.float16)


@pytest.mark.parametrize("gpu_gib, expected", [(80, 36), (141, 77)])  # H100 80 GB, H200 141 GB
def test_paper_12b_sampling_batch_fits_the_gpu(gpu_gib, expected):
    """The weights counted on the meta device, then the most rows that fit in 90% of the GPU."""
    from dalle_core.prior.model import DalleTransformer

    cfg = get_profile("paper-12B").prior
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DalleTransformer(cfg).parameters())
    assert n_params == count_parameters(cfg)
    fit = sampling_batch_size(cfg, n_params, gpu_gib * GIB, torch.bfloat16)
    usable = 0.9 * gpu_gib * GIB
    assert fit.peak_bytes <= usable < fit.peak_bytes + fit.bytes_per_row  # fits, one more row would not
    assert fit.batch_size == expected and fit.batch_size < 256


def test_too_small_a_device_is_an_error_that_says_why():
    cfg = get_profile("paper-12B").prior
    with pytest.raises(SamplingMemoryError, match="does not fit"):
        sampling_batch_size(cfg, count_parameters(cfg), 16 * GIB)


def test_kv_cache_formula_matches_the_cache_the_sampler_allocates(sampler_caches):
    """Measured: the StaticKVCache buffers of a real (tiny) sampling run, per row."""
    from dalle_core.prior import sampling
    from dalle_core.prior.model import DalleTransformer

    cfg = get_profile("tiny").prior
    torch.manual_seed(0)
    model = DalleTransformer(cfg).eval()
    caches = sampler_caches
    text = torch.randint(0, cfg.text_vocab_size, (3, cfg.text_len))
    sampling.sample_image_codes(model, text, n_per_caption=2, batch_size=6)
    [cache] = caches
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert allocated == 6 * kv_cache_bytes_per_row(cfg, torch.float32)
    assert sampling_bytes_per_row(cfg, torch.float32) > kv_cache_bytes_per_row(cfg, torch.float32)


def test_cpu_samples_in_fp32_and_the_chain_sizes_its_batch(monkeypatch):
    from dalle_core.prior import sampling_memory

    assert sampling_dtype("cpu") == torch.float32
    assert sampling_memory.batch_size_for(torch.nn.Linear(1, 1), "cpu", torch.float32) == 512


def test_dalle_plan_reports_the_sampling_batch():
    dalle = Path(sys.executable).parent / "dalle"
    out = subprocess.run([str(dalle), "plan", "--profile", "paper-12B", "--json", "--gpu-memory-gib", "80"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sampling = json.loads(out.stdout)["sampling"]
    assert sampling["batch_size"] == 36 and sampling["kv_cache_bytes_per_row"] == 1_300_234_240
