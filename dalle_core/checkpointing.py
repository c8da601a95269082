"""Single-file training checkpoints shared by the dVAE and reranker loops:
listing by step, and loading the newest one that reads back (they are written
with dalle_core.io.atomic_torch_save).
(The prior's sharded checkpoints live in dalle_core/distributed/checkpoint.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def list_step_files(checkpoint_dir: str | Path, pattern: str) -> list[tuple[int, Path]]:
    """(step, path) of files named like `pattern` ("name-step-*.pt"), oldest first."""
    out = []
    for p in Path(checkpoint_dir).glob(pattern):
        try:
            out.append((int(p.stem.split("-")[-1]), p))
        except ValueError:
            continue
    return sorted(out)


def load_latest_step_file(checkpoint_dir: str | Path, pattern: str, fmt: str, what: str) -> tuple[dict, Path] | None:
    """The newest checkpoint whose "format" is `fmt` that reads back; unreadable ones
    are skipped with a warning (a truncated file falls back to the one before)."""
    for _, path in reversed(list_step_files(checkpoint_dir, pattern)):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
                raise ValueError(f"not a {what} training checkpoint")
            return ckpt, path
        except Exception as e:
            warnings.warn(f"skipping unreadable {what} checkpoint {path}: {e}")
    return None
