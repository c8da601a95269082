"""The sampler's one-query attention, reading only the keys the layer's mask allows.

A cached sampling step has one query (the next image position) and up to
L + N cached keys; dense attention under the mask row reads them all, and on a
CPU that read is the step's cost (at 256 rows, 4 heads, d_head 32 the masked
SDPA of one layer ran ~4.5 ms at 160 keys, bound by memory traffic, 55% of a
small prior's sampling time). The paper's masks keep few of them (appendix B.1,
Figure 11): every image query sees the caption block, and then

- row attention: the previous ``grid`` image positions (one contiguous slice);
- column attention: its own column in earlier rows (a slice with step ``grid``);
- convolutional attention: a causal window of ``kernel // 2`` rows (one
  contiguous slice, some of whose keys the window's own mask drops).

So the keys of a step are always the caption block ``[0, L]`` (the text and the
first image position, which every image query sees: masks.py) plus one slice of
image keys, read in place from the cache as views: no gather, no copy. The two
blocks' scores share one softmax (the paper's single softmax over text and image
keys), which is the dense masked attention term for term; only the summation
order differs (tests/test_prior_sampling.py compares both paths).

The caption block is the same for every draw of a caption (the paper draws 512 per
caption). When the cache holds it once per caption (`StaticKVCache.share_rows`, the
sampler's prefill), ``caption`` passes it and the n draws' queries go against it as one
[n, D] x [D, L + 1] matmul per caption and head, instead of n one-row products that each
read the same keys: on a CPU those small batched products were ~30% of the small prior's
sampling time (2026-12-03).

`key_plan` derives the slice from the dense mask row itself, so it follows any
mask `masks.py` defines; it is computed once per (layer kind, position) and
cached. No library attends over a strided view of a KV cache with an extra
window mask; FlexAttention's block masks skip whole key tiles, which a single
query row does not have.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .masks import build_attention_mask


@lru_cache(maxsize=None)
def key_plan(kind: str, text_len: int, grid: int, kernel: int, wraparound: bool, pos: int,
             device: torch.device = torch.device("cpu")) -> tuple[slice | None, torch.Tensor | None]:
    """(image keys, window mask) of the query at stream position ``pos`` (> text_len):
    the keys after the caption block as one slice of the cache (None: the caption
    block alone), and a bool mask over that slice's keys, or None when it keeps all."""
    L = text_len
    if pos <= L:
        raise ValueError(f"key_plan is for image queries (position > {L}), got {pos}")
    row = build_attention_mask(kind, text_len, grid, "cpu", kernel=kernel, wraparound=wraparound)[pos, :pos + 1]
    if not bool(row[:L + 1].all()):
        raise ValueError(f"a {kind} image query must see the whole caption block [0, {L}]")
    image = row[L + 1:].nonzero().squeeze(1) + L + 1
    if image.numel() == 0:
        return None, None
    lo, hi = int(image[0]), int(image[-1])
    if image.numel() > 1:
        step = image[1:] - image[:-1]
        if bool((step == step[0]).all()):  # row: step 1; column: step grid
            return slice(lo, hi + 1, int(step[0])), None
    else:
        return slice(lo, hi + 1), None
    return slice(lo, hi + 1), row[lo:hi + 1].to(device, copy=True)  # conv: a window with holes


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int,
                     image_keys: slice | None, window_mask: torch.Tensor | None,
                     caption: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of q [B, H, 1, D] over the caption block k/v[:, :, :L + 1] and the
    slice ``image_keys`` of the cache k/v [B, H, T, D], under one softmax (in fp32).

    caption: the caption block's keys and values once per group of rows that share it,
    [C, H, >= L + 1, D] with B = C * g (rows c * g .. c * g + g - 1 are caption c's);
    read instead of k/v[:, :, :L + 1], which must then hold the same values."""
    head = text_len + 1
    B, H, _, D = q.shape
    kc, vc = caption if caption is not None else (k, v)  # without sharing, every row is its own group
    kt, vt = kc[:, :, :head], vc[:, :, :head]
    C = kt.shape[0]
    if B % C:
        raise ValueError(f"{B} rows do not split into groups for {C} shared caption blocks")
    g = B // C
    qg = q.reshape(C, g, H, D).transpose(1, 2)  # [C, H, g, D]: the draws of a caption together
    scores = [(qg @ kt.transpose(-1, -2)).transpose(1, 2).reshape(B, H, 1, head)]
    if image_keys is not None:
        ki, vi = k[:, :, image_keys], v[:, :, image_keys]
        s = q @ ki.transpose(-1, -2)
        if window_mask is not None:
            s = s.masked_fill(~window_mask, float("-inf"))
        scores.append(s)
    scores = torch.cat(scores, -1)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # half-precision scores: fp32 softmax
    p = (scores * q.shape[-1] ** -0.5).softmax(-1).to(v.dtype)
    pg = p[..., :head].reshape(C, g, H, head).transpose(1, 2)  # [C, H, g, L + 1]
    y = (pg @ vt).transpose(1, 2).reshape(B, H, 1, D)
    if image_keys is not None:
        y = y + p[..., head:] @ vi
    return y


__all__ = ["decode_attention", "key_plan"]
