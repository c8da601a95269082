"""Deterministic synthetic images for dVAE tests (no demo world needed)."""

from __future__ import annotations

import torch


def make_batch(step: int, b: int = 8, size: int = 32) -> torch.Tensor:
    """A deterministic batch per step: plain backgrounds with a coloured square."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.rand(b, 3, 1, 1, generator=g).expand(b, 3, size, size).clone()
    for i in range(b):
        r0, c0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, r0:r0 + size // 3, c0:c0 + size // 3] = torch.rand(3, 1, 1, generator=g)
    return x
