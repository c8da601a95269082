"""How many rows the sampler decodes together, and in which precision.

At 12B a fixed batch is wrong in both directions: the key/value cache of one
row is 2 (k, v) x 64 layers x 1280 positions x 3968 x 2 bytes = 1.3 GB in
bf16, so 256 rows would need 333 GB, while a 1.3B model fits hundreds of rows.
`sampling_batch_size` sizes the batch from the device memory left after the
weights, and `sampling_dtype` picks the half precision the device supports
(the paper sampled its fp16-trained model in fp16; bf16 where the GPU has it,
since its range needs no loss scale). CPU sampling stays fp32 by default:
its results are what the demo's figures and the resumable evaluation chunks
are keyed on, and bf16 is only fast on CPUs with AVX-512 BF16.

Memory per row (bytes, `b` = bytes of the cache dtype):
    KV cache        2 * n_layer * seq_len * n_embd * b          (StaticKVCache)
    prefill         seq_len * n_embd * (2 * 4 + 8 * b)          (one layer's working set for
                    + n_head * text_len^2 * 4                    the caption pass: fp32 residual
                                                                 and LN, qkv/MLP in b; fp32 scores)
    logits          (V_text + text_len + V_image) * 4 * 2        (fp32 logits and the filtered copy)
The weights take n_params * b. A `reserve` fraction of the device is left for
the allocator's fragmentation and the dVAE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def sampling_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def kv_cache_bytes_per_row(config, dtype: torch.dtype = torch.bfloat16) -> int:
    return 2 * config.n_layer * config.seq_len * config.n_embd * DTYPE_BYTES[dtype]


def sampling_bytes_per_row(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Everything one more row costs the sampler: its KV cache, the caption pass, the logits."""
    b = DTYPE_BYTES[dtype]
    prefill = config.seq_len * config.n_embd * (2 * 4 + 8 * b) + config.n_head * config.text_len ** 2 * 4
    logits = (config.text_vocab_size + config.text_len + config.image_vocab_size) * 4 * 2
    return kv_cache_bytes_per_row(config, dtype) + prefill + logits


@dataclass(frozen=True)
class SamplingFit:
    batch_size: int
    bytes_per_row: int
    weights_bytes: int
    device_bytes: int
    reserve: float

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.batch_size * self.bytes_per_row

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "bytes_per_row": self.bytes_per_row,
                "weights_bytes": self.weights_bytes, "device_bytes": self.device_bytes,
                "peak_bytes": self.peak_bytes, "reserve": self.reserve}


class SamplingMemoryError(RuntimeError):
    pass


def sampling_batch_size(config, n_params: int, device_bytes: int, dtype: torch.dtype = torch.bfloat16,
                        reserve: float = 0.1, max_batch: int = 1024) -> SamplingFit:
    """The most rows (<= max_batch) whose KV caches and working memory fit next to the weights
    in (1 - reserve) of `device_bytes`; SamplingMemoryError when not even one row fits."""
    per_row = sampling_bytes_per_row(config, dtype)
    weights = n_params * DTYPE_BYTES[dtype]
    usable = int(device_bytes * (1 - reserve)) - weights
    rows = min(max_batch, usable // per_row) if usable > 0 else 0
    if rows < 1:
        raise SamplingMemoryError(
            f"sampling does not fit: weights {weights / 2**30:.1f} GiB + one row {per_row / 2**30:.2f} GiB "
            f"> {(1 - reserve) * device_bytes / 2**30:.1f} GiB usable of the device's {device_bytes / 2**30:.1f} GiB")
    return SamplingFit(int(rows), per_row, weights, int(device_bytes), reserve)


def device_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of a GPU (what the sampler may still allocate), None on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def batch_size_for(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                   cpu_batch: int = 512) -> int:
    """The sampling batch for a loaded prior on `device`: sized from free GPU memory on a GPU
    (the weights are already resident, so they are not counted again), `cpu_batch` on CPU.

    512 on CPU: the zero-shot report's chunk of the small profile (32 captions x 16 draws) in one
    batch; on `runs/d14`'s chain a row took 11.0 ms at 512 rows vs 11.7 at 256 (10.0 at 1,024),
    with the small prior's KV cache at ~1.2 MB a row (2026-12-03)."""
    free = device_memory_bytes(device)
    if free is None:
        return cpu_batch
    return sampling_batch_size(model.config, 0, free, dtype).batch_size


__all__ = ["SamplingFit", "SamplingMemoryError", "batch_size_for", "device_memory_bytes",
           "kv_cache_bytes_per_row", "sampling_batch_size", "sampling_bytes_per_row", "sampling_dtype"]
