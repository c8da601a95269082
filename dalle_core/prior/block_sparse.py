"""Block-sparse attention for the prior's masks on the CPU (`PriorConfig.attention = "block"`).

Why hand-written: `scaled_dot_product_attention` with a boolean mask computes every
score of the [S, S] matrix and then masks it, while the paper's row, column and
convolutional masks (masks.py) keep about 1 key in 5 at the demo's size. FlexAttention
skips empty tiles but has no CPU backward in torch 2.13 (flex.py), and no library
offers sparse attention with an arbitrary mask that trains on a CPU. On the small
prior's training step, masked SDPA is half the time (profile, 2026-12-01:
`_scaled_dot_product_flash_attention_for_cpu` forward + backward ~127 of ~253 ms).

How: the queries are cut into blocks of `block` consecutive positions in a
per-kind order, and each block attends only to the union of the keys its queries
may see (padded to the longest union; padding and the rest of the union are masked
with the same boolean mask); the scores are then dense over [blocks, block, keys]:

- row layers, raster order: a block is two image rows; it sees the text, image
  position 0, its own rows and the row before (81 of 288 keys at the demo's size);
- column layers: the image is visited column by column (the paper transposes the
  image states for these layers, Figure 11c, for the same reason), so a block is
  two image columns and sees the text plus those columns (65 keys);
- the conv layer, raster order: a block sees the rows its kernel reaches.

Identical to dense SDPA by construction: the layout is derived from the very mask
tensor `build_attention_mask` returns, every (query, key) pair the mask allows is in
its block's union, and every other pair in the union is masked; outputs and
gradients are compared with SDPA's in tests/test_block_sparse_attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from .masks import build_attention_mask


@dataclass(frozen=True)
class BlockSparseLayout:
    """Where each query block looks. `query_index` [n_blocks * block]: the stream
    positions in block order (the last block padded by repeating a position);
    `key_index` [n_blocks, n_keys]: each block's key positions (padded with
    position 0); `mask` [n_blocks, block, n_keys]: True where the query may attend;
    `inverse` [S]: where each position's output sits in block order."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    mask: torch.Tensor
    inverse: torch.Tensor
    block: int
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # made once: additive masks, in_order

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as 0 / -inf in `dtype` (added to the scores), made once per dtype."""
        m = self._cache.get(dtype)
        if m is None:
            m = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            m = self._cache[dtype] = m.masked_fill(~self.mask, float("-inf"))
        return m

    @property
    def permutes(self) -> bool:
        """Whether `query_index` is a permutation of the positions (no padded block): then
        `inverse` undoes it exactly, and the backward of each reorder is a gather."""
        return self.query_index.numel() == self.inverse.numel()

    @property
    def in_order(self) -> bool:
        """Whether the queries are blocked in stream order (row and conv layers at sizes
        the block divides): the reorder and its inverse are then no-ops."""
        m = self._cache.get("in_order")
        if m is None:
            m = self._cache["in_order"] = bool(
                self.permutes and torch.equal(self.query_index.cpu(), torch.arange(self.inverse.numel())))
        return m

    @property
    def kept(self) -> float:
        """Scores computed, as a fraction of the dense [S, S] matrix."""
        n_blocks, n_keys = self.key_index.shape
        return n_blocks * self.block * n_keys / self.inverse.numel() ** 2


def query_order(kind: str, text_len: int, grid: int) -> torch.Tensor:
    """The order in which the queries are blocked: text first, then the image in raster
    order, or column by column for "column" layers."""
    image = torch.arange(grid * grid).view(grid, grid)
    if kind == "column":
        image = image.t()
    return torch.cat([torch.arange(text_len), text_len + image.reshape(-1)])


def layout_from_mask(mask: torch.Tensor, order: torch.Tensor, block: int) -> BlockSparseLayout:
    """The block layout of boolean `mask` [S, S] (True = may attend) with queries taken
    in `order` (a permutation of 0..S-1), `block` at a time."""
    S = mask.shape[0]
    if mask.shape != (S, S) or sorted(order.tolist()) != list(range(S)):
        raise ValueError(f"need a square mask and a permutation of its {S} positions")
    n_blocks = -(-S // block)
    pad = n_blocks * block - S
    query_index = torch.cat([order, order[-1:].expand(pad)]) if pad else order.clone()
    rows = mask[query_index].view(n_blocks, block, S)
    union = rows.any(dim=1)  # [n_blocks, S]: the keys any query of the block may see
    n_keys = int(union.sum(dim=1).max())
    key_index = torch.zeros(n_blocks, n_keys, dtype=torch.long)
    valid = torch.zeros(n_blocks, n_keys, dtype=torch.bool)
    for b in range(n_blocks):
        keys = union[b].nonzero().flatten()
        key_index[b, : keys.numel()] = keys
        valid[b, : keys.numel()] = True
    block_mask = torch.gather(rows, 2, key_index[:, None, :].expand(n_blocks, block, n_keys)) & valid[:, None, :]
    inverse = torch.empty(S, dtype=torch.long)
    inverse[order] = torch.arange(S)  # the first (unpadded) slot of each position
    return BlockSparseLayout(query_index, key_index, block_mask, inverse, block)


@lru_cache(maxsize=64)
def _cached_layout(kind: str, text_len: int, grid: int, kernel: int, wraparound: bool,
                   device: torch.device) -> BlockSparseLayout:
    mask = build_attention_mask(kind, text_len, grid, "cpu", kernel=kernel, wraparound=wraparound)
    # two image rows (columns) a block: on the small prior's bf16 step 0.140 s vs 0.15-0.18 s
    # with one row and 0.18 s with four (bench/prior.py, 2026-12-01): fewer, larger
    # matmuls against a few more keys computed in vain
    lay = layout_from_mask(mask, query_order(kind, text_len, grid), block=2 * grid)
    return BlockSparseLayout(*(t.to(device) for t in (lay.query_index, lay.key_index, lay.mask, lay.inverse)),
                             block=lay.block)


def layer_layout(kind: str, text_len: int, grid: int, device: torch.device | str, kernel: int = 11,
                 wraparound: bool = True) -> BlockSparseLayout:
    """The layout of a layer's whole-stream mask (blocks of two image rows or columns),
    cached per (kind, sizes, device)."""
    return _cached_layout(kind, int(text_len), int(grid), int(kernel), bool(wraparound), torch.device(device))


class _TakePositions(torch.autograd.Function):
    """x.index_select(2, index) for x [B, H, S, D], with a backward that is fast on the CPU.

    Why not index_select's own backward: it is index_add_ along dim 2 of a [B, H, S, D]
    tensor, a slow path on the CPU (bf16: 5.3 ms against 0.25 ms for the same sums along
    dim 0 of an [S, B*H*D] matrix; 16 of them were ~20% of the small prior's bf16 step,
    torch.profiler, 2026-12-03). So the gradient is summed row-wise in that layout, or,
    when `inverse` is given (index is a permutation), simply gathered back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None):
        ctx.save_for_backward(index, inverse)
        ctx.n_positions = x.shape[2]
        return x.index_select(2, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, inverse = ctx.saved_tensors
        if inverse is not None:
            return grad.index_select(2, inverse), None, None
        B, H, n, D = grad.shape
        rows = grad.permute(2, 0, 1, 3).reshape(n, B * H * D)
        summed = rows.new_zeros(ctx.n_positions, B * H * D).index_add_(0, index, rows)
        return summed.view(ctx.n_positions, B, H, D).permute(1, 2, 0, 3), None, None


def take_positions(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x[:, :, index] for x [B, H, S, D] (`inverse`: index's inverse, when index is a permutation)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(2, index)
    return _TakePositions.apply(x, index, inverse)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q, k, v [B, H, S, D] under the mask `layout` was built from,
    computing only each block's keys; returns [B, H, S, D] like SDPA.

    Written out (two batched matmuls and a softmax) rather than calling SDPA per
    block: CPU SDPA's flash kernel is slow on many 16-query blocks, and its bf16
    path slower than its fp32 one (bench/prior.py). Precision as in SDPA's flash
    kernel: scores and softmax in fp32 (rounding the scores to bf16 would make the
    outputs' error 1.4-1.7x that of SDPA in bf16), the probabilities rounded to v's
    dtype for the second matmul."""
    B, H, S, D = q.shape
    n_blocks, n_keys = layout.key_index.shape
    keys = layout.key_index.reshape(-1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16 inputs (float64 stays)
    qs = q.to(acc) * D**-0.5
    if not layout.in_order:  # row and conv layers take the queries as they stand
        qs = take_positions(qs, layout.query_index, layout.inverse if layout.permutes else None)
    qb = qs.reshape(B, H, n_blocks, layout.block, D)
    kb = take_positions(k.to(acc), keys).reshape(B, H, n_blocks, n_keys, D)
    vb = take_positions(v, keys).reshape(B, H, n_blocks, n_keys, D)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(qb, kb.transpose(-1, -2)) + layout.additive_mask(acc)
        p = torch.softmax(scores, dim=-1).to(vb.dtype)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    y = torch.matmul(p, vb).reshape(B, H, n_blocks * layout.block, D)
    if layout.in_order:
        return y
    return take_positions(y, layout.inverse, layout.query_index if layout.permutes else None)

