"""Cosine schedules for dVAE training (paper appendix A.2: all cosine; a linear
temperature schedule diverged)."""

from __future__ import annotations

import math

from .config import DVAEConfig


def cosine_schedule(step: int, start: float, end: float, steps: int) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `steps`, then held at `end`."""
    if steps <= 0 or step >= steps:
        return float(end)
    t = max(step, 0) / steps
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def temperature_at(step: int, config: DVAEConfig) -> float:
    """Gumbel-softmax temperature: 1 -> 1/16 over temp_anneal_steps."""
    return cosine_schedule(step, config.temperature_start, config.temperature_end, config.temp_anneal_steps)


def kl_weight_at(step: int, config: DVAEConfig) -> float:
    """KL weight beta: 0 -> 6.6 over kl_warmup_steps."""
    return cosine_schedule(step, config.kl_weight_start, config.kl_weight, config.kl_warmup_steps)


def lr_at(step: int, config: DVAEConfig) -> float:
    """Learning rate: 1e-4 -> 1.25e-6 over lr_decay_steps."""
    return cosine_schedule(step, config.lr, config.lr_end, config.lr_decay_steps)
