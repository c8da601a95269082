"""FlexAttention for the prior's sparse masks (`PriorConfig.attention = "flex"`).

Why hand-written: the paper's row, column and convolutional masks (masks.py) leave
most of the 1280 x 1280 attention matrix empty (about 20% of it is kept), but
`scaled_dot_product_attention` with a boolean mask computes every score and then
masks it. FlexAttention takes a `BlockMask`: it skips the 128 x 128 tiles that
are fully masked and applies the mask elementwise only in the partial ones.

Identical to SDPA by construction: the `mask_mod` reads the very boolean tensor
the SDPA path passes as ``attn_mask`` (`build_attention_mask`), so both compute
the same softmax over the same keys; tests/test_flex_attention.py checks outputs
and gradients against each other.

What it skips depends on the kind (paper size, 128-tiles): row and conv layers
keep a band near the diagonal plus the text columns, so most tiles go; column
layers in raster order touch every tile below the diagonal (a query sees its
column in every earlier row), so only the upper triangle goes - the paper
transposes the image for those (Figure 11c), which we do not (yet).

Limits (torch 2.13):
- FlexAttention has no CPU backward: training with attention="flex" needs a GPU
  ("auto" picks SDPA on the CPU). Forward-only use on the CPU works.
- Without torch.compile it materialises the whole score matrix (slower than
  SDPA). `flex_attention_fn` compiles it (on the CPU too: forward only, a
  compile of about 20 s per shape); if compiling fails it falls back to eager
  with a warning. DALLE_FLEX_COMPILE=0 forces eager (tests use that).
- No attention dropout: "flex" with dropout > 0 is refused by the config and
  "auto" picks SDPA there.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import torch

from .config import ATTENTION_CHOICES
from .masks import build_attention_mask


def resolve_attention(choice: str, device: torch.device, dropout: float = 0.0) -> str:
    """"sdpa", "flex" or "block" for `choice` on `device`. "auto" = flex on CUDA, where
    fused Triton kernels skip the empty tiles forward and backward (the expected win;
    the GPU check's `prior_attention` part measures it, still to run), and the
    block-sparse path elsewhere (block_sparse.py): on the CPU flex has no backward and
    even compiled its forward is not faster than SDPA (1.03-1.14x SDPA's time at 288
    and 1280 positions), while the block-sparse step is faster (docs/benchmarks.md).
    With dropout > 0 on CUDA, SDPA (flex does not implement attention dropout)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda":
            return "flex" if dropout == 0.0 else "sdpa"
        return "block"
    return choice


def _compile_wanted() -> bool:
    return os.environ.get("DALLE_FLEX_COMPILE", "1") != "0"


_compiled = None
_compile_failed = False


def flex_attention_fn():
    """`flex_attention`, compiled (once per process) unless DALLE_FLEX_COMPILE=0 or
    compiling failed before."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled
    if not _compile_wanted() or _compile_failed:
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """[B, H, S, D] attention under `block_mask` (scale 1/sqrt(D), as SDPA)."""
    global _compile_failed
    _check_device(q, k, v)
    fn = flex_attention_fn()
    try:
        return fn(q, k, v, block_mask=block_mask)
    except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler / Triton: eager still works
        if fn is not _compiled:
            raise
        _compile_failed = True
        warnings.warn(f"torch.compile(flex_attention) failed ({type(e).__name__}: {e}); using eager "
                      "flex_attention, which computes the full score matrix", stacklevel=2)
        return flex_attention_fn()(q, k, v, block_mask=block_mask)


def _check_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """torch's own check (no CPU backward), before compiling, with what to do instead."""
    from torch.nn.attention import flex_attention as fa

    try:
        fa._validate_device(q, k, v)
    except NotImplementedError as e:
        raise NotImplementedError(f"attention='flex': {e} Train on the CPU with attention='sdpa' or 'auto' "
                                  "(identical outputs), or run this forward under torch.no_grad().") from None


@lru_cache(maxsize=64)
def _cached_block_mask(kind: str, text_len: int, grid: int, kernel: int, wraparound: bool, length: int,
                       device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = build_attention_mask(kind, text_len, grid, device, kernel=kernel, wraparound=wraparound)
    if length != mask.shape[0]:
        mask = mask[:length, :length].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):  # the SDPA path's boolean mask, read elementwise
        return mask[q_idx, kv_idx]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


def block_mask(kind: str, text_len: int, grid: int, length: int, device: torch.device | str,
               kernel: int = 11, wraparound: bool = True):
    """The `BlockMask` of rows and keys 0..length-1 of the layer mask `kind`, built
    from `build_attention_mask`'s tensor; cached per (kind, mask sizes, length, device)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached_block_mask(kind, int(text_len), int(grid), int(kernel), bool(wraparound), int(length), dev)


def tiles_kept(kind: str, text_len: int, grid: int, kernel: int = 11, wraparound: bool = True,
               tile: int = 128) -> float:
    """Fraction of the tile x tile blocks of the full mask with at least one key kept
    (what flex computes; SDPA computes all of them)."""
    m = build_attention_mask(kind, text_len, grid, "cpu", kernel=kernel, wraparound=wraparound)
    s = m.shape[0]
    n = -(-s // tile)
    padded = torch.zeros(n * tile, n * tile, dtype=torch.bool)
    padded[:s, :s] = m
    return float(padded.view(n, tile, n, tile).any(dim=3).any(dim=1).float().mean())
