"""The sampler's one-query attention over the keys its mask row keeps
(dalle_core/prior/decode_attention.py): the keys are exactly the mask row's, the
result is the dense masked attention's, and it reads few keys at the paper's size."""

import pytest
import torch
import torch.nn.functional as F

from dalle_core.prior.decode_attention import decode_attention, key_plan
from dalle_core.prior.masks import build_attention_mask

SIZES = [  # (text_len, grid, kernel, wraparound)
    (5, 4, 3, True), (5, 4, 3, False), (7, 6, 5, True), (3, 8, 7, False), (16, 16, 7, True),
]


def planned_keys(kind, L, grid, kernel, wrap, pos) -> list[int]:
    image_keys, window = key_plan(kind, L, grid, kernel, wrap, pos)
    keys = list(range(L + 1))
    if image_keys is not None:
        span = range(image_keys.start, image_keys.stop, image_keys.step or 1)
        keys += [k for i, k in enumerate(span) if window is None or bool(window[i])]
    return keys


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
@pytest.mark.parametrize("L,grid,kernel,wrap", SIZES)
def test_the_planned_keys_are_the_mask_rows(kind, L, grid, kernel, wrap):
    mask = build_attention_mask(kind, L, grid, kernel=kernel, wraparound=wrap)
    for pos in range(L + 1, L + grid * grid):
        want = mask[pos, :pos + 1].nonzero().squeeze(1).tolist()
        assert planned_keys(kind, L, grid, kernel, wrap, pos) == want, (kind, pos)


def test_row_and_column_need_no_window_mask_and_column_steps_by_the_grid():
    L, g = 16, 8
    pos = L + 5 * g + 3  # row 5, column 3
    row_keys, row_mask = key_plan("row", L, g, 7, True, pos)
    col_keys, col_mask = key_plan("column", L, g, 7, True, pos)
    assert row_mask is None and col_mask is None
    assert (row_keys.start, row_keys.stop, row_keys.step) == (pos - g, pos + 1, 1)
    # its column in rows 0..5: image positions 3, 3 + g, ..., at stream positions L + 3 + r * g
    assert (col_keys.start, col_keys.stop, col_keys.step) == (L + 3, pos + 1, g)
    conv_keys, conv_mask = key_plan("conv", L, g, 7, False, pos)
    assert conv_mask is not None and conv_mask.numel() == conv_keys.stop - conv_keys.start


def test_key_plan_refuses_a_text_query():
    with pytest.raises(ValueError, match="image queries"):
        key_plan("row", 5, 4, 3, True, 5)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_decode_attention_equals_the_dense_masked_attention(kind):
    L, g, kernel = 6, 5, 3
    mask = build_attention_mask(kind, L, g, kernel=kernel, wraparound=True)
    gen = torch.Generator().manual_seed(0)
    T = L + g * g
    k = torch.randn(3, 2, T, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 2, T, 8, generator=gen, dtype=torch.float64)
    for pos in range(L + 1, T):
        q = torch.randn(3, 2, 1, 8, generator=gen, dtype=torch.float64)
        dense = F.scaled_dot_product_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1],
                                               attn_mask=mask[pos:pos + 1, :pos + 1])
        sparse = decode_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], L,
                                  *key_plan(kind, L, g, kernel, True, pos))
        torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=0)


def test_at_the_papers_size_a_step_reads_few_keys():
    # appendix B.1: 256 text positions, a 32x32 grid, 11x11 conv: the last image query of a
    # row layer reads the caption block (257) + its 33 row keys instead of 1,280; of a column
    # layer 257 + the 32 of its column
    L, g = 256, 32
    last = L + g * g - 1
    assert len(planned_keys("row", L, g, 11, True, last)) == L + 1 + g + 1
    assert len(planned_keys("column", L, g, 11, True, last)) == L + 1 + g
    assert len(planned_keys("conv", L, g, 11, True, last)) < L + 1 + 6 * g


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_a_caption_block_shared_by_a_captions_draws_gives_each_draws_attention(kind):
    # 2 captions x 3 draws: the caption block held once per caption (StaticKVCache.share_rows)
    # gives what each row's own copy of it gives
    L, g, kernel, C, n = 6, 5, 3, 2, 3
    gen = torch.Generator().manual_seed(1)
    T = L + g * g
    k = torch.randn(C * n, 2, T, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(C * n, 2, T, 8, generator=gen, dtype=torch.float64)
    kc = torch.randn(C, 2, L + 3, 8, generator=gen, dtype=torch.float64)  # a prefix longer than the block
    vc = torch.randn(C, 2, L + 3, 8, generator=gen, dtype=torch.float64)
    k[:, :, :L + 1], v[:, :, :L + 1] = kc[:, :, :L + 1].repeat_interleave(n, 0), vc[:, :, :L + 1].repeat_interleave(n, 0)
    for pos in range(L + 1, T):
        q = torch.randn(C * n, 2, 1, 8, generator=gen, dtype=torch.float64)
        plan = key_plan(kind, L, g, kernel, True, pos)
        own = decode_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], L, *plan)
        shared = decode_attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], L, *plan, caption=(kc, vc))
        torch.testing.assert_close(shared, own, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="groups"):
        decode_attention(q[:5], k[:5], v[:5], L, *plan, caption=(kc, vc))
