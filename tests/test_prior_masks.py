"""The prior's attention masks (paper appendix B.1, Figure 11) against
hand-written matrices for small grids, and the paper's layer pattern."""

import pytest
import torch

from dalle_core.prior.masks import (
    attention_mask,
    build_attention_mask,
    column_attention_mask,
    column_image_mask,
    conv_image_mask,
    convolutional_attention_mask,
    format_mask,
    layer_attention_kind,
    row_attention_mask,
    row_image_mask,
    text_causal_mask,
)


def parse(rows: str) -> torch.Tensor:
    """'1' = may attend, '.' = masked; one line per query."""
    lines = [ln.strip() for ln in rows.strip().splitlines()]
    return torch.tensor([[c == "1" for c in ln] for ln in lines], dtype=torch.bool)


def assert_mask(actual: torch.Tensor, expected: str) -> None:
    exp = parse(expected)
    assert actual.dtype == torch.bool
    assert torch.equal(actual, exp), f"\nactual:\n{format_mask(actual)}\nexpected:\n{format_mask(exp)}"


# --- image -> image blocks, 3x3 grid ------------------------------------------------

def test_row_mask_3x3_attends_to_the_previous_grid_tokens_and_itself():
    # j attends to k with 0 <= j - k <= 3: its row so far plus the end of the
    # previous row back to the same column (wraps around the row boundary).
    assert_mask(row_image_mask(3), """
        1........
        11.......
        111......
        1111.....
        .1111....
        ..1111...
        ...1111..
        ....1111.
        .....1111
    """)


def test_column_mask_3x3_same_column_earlier_rows_and_itself():
    assert_mask(column_image_mask(3), """
        1........
        .1.......
        ..1......
        1..1.....
        .1..1....
        ..1..1...
        1..1..1..
        .1..1..1.
        ..1..1..1
    """)


def test_row_mask_4x4_matches_figure_11a():
    # Figure 11a: 4x4 grid, each image token sees 5 image tokens (itself
    # included); the last one is in the same column of the previous row.
    m = row_image_mask(4)
    for j in range(16):
        assert m[j].sum() == min(j + 1, 5)
    # the figure's example, 1-based: token 8 sees 4, 5, 6, 7, 8
    assert m[7].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


# --- convolutional, 3x3 kernel on a 4x4 grid (Figure 11d) ------------------------------

def test_conv_mask_3x3_kernel_4x4_grid_with_wraparound():
    # raster offsets j - k in {0, 1} (this row) or {3, 4, 5} (previous row):
    # at the left edge the window continues at the end of the row above.
    assert_mask(conv_image_mask(4, kernel=3, wraparound=True), """
        1...............
        11..............
        .11.............
        1.11............
        11.11...........
        111.11..........
        .111.11.........
        ..111.11........
        ...111.11.......
        ....111.11......
        .....111.11.....
        ......111.11....
        .......111.11...
        ........111.11..
        .........111.11.
        ..........111.11
    """)


def test_conv_mask_3x3_kernel_4x4_grid_clipped():
    # the plain 2-D causal window: previous row, columns c-1..c+1; this row, c-1..c
    assert_mask(conv_image_mask(4, kernel=3, wraparound=False), """
        1...............
        11..............
        .11.............
        ..11............
        11..1...........
        111.11..........
        .111.11.........
        ..11..11........
        ....11..1.......
        ....111.11......
        .....111.11.....
        ......11..11....
        ........11..1...
        ........111.11..
        .........111.11.
        ..........11..11
    """)


def test_conv_mask_paper_size_has_61_keys_inside_the_image():
    # 11x11 causal half-kernel: 5 earlier tokens of the row + 5 rows x 11 + itself
    m = conv_image_mask(32, kernel=11)
    assert m[10 * 32 + 16].sum() == 5 + 5 * 11 + 1
    clipped = conv_image_mask(32, kernel=11, wraparound=False)
    assert clipped[10 * 32 + 16].sum() == 61
    assert clipped[10 * 32 + 0].sum() == 5 * 6 + 1  # left edge: columns 0..5 only
    assert m[10 * 32 + 0].sum() == 61  # wraps instead


# --- the whole stream: text then image --------------------------------------------------

def test_stream_layout_text_causal_image_sees_all_text():
    # 2 text tokens then a 2x2 image, row attention
    assert_mask(row_attention_mask(2, 2), """
        1.....
        11....
        111...
        1111..
        11111.
        11.111
    """)
    assert_mask(column_attention_mask(2, 2), """
        1.....
        11....
        111...
        11.1..
        111.1.
        11.1.1
    """)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_common_rules(kind):
    L, g = 5, 4
    m = attention_mask(kind, L, g, kernel=3)
    S = L + g * g
    assert m.shape == (S, S)
    assert torch.equal(m[:L, :L], text_causal_mask(L))  # text causal
    assert not m[:L, L:].any()  # text never sees image
    assert m[L:, :L].all()  # image sees all text
    assert not torch.triu(m, diagonal=1).any()  # causal everywhere
    assert m.diagonal().all()  # every position sees itself (no empty softmax row)


def test_column_mask_is_a_block_mask_after_transposing_the_image():
    # Figure 11 b/c: column attention == within-column causal blocks once the
    # image positions are put in column-major order.
    g = 4
    m = column_image_mask(g)
    perm = torch.arange(g * g).view(g, g).t().flatten()  # column-major order
    blocks = torch.block_diag(*[torch.ones(g, g, dtype=torch.bool).tril()] * g)
    assert torch.equal(m[perm][:, perm], blocks)


def test_named_constructors_match_attention_mask():
    assert torch.equal(row_attention_mask(3, 4), attention_mask("row", 3, 4))
    assert torch.equal(column_attention_mask(3, 4), attention_mask("column", 3, 4))
    assert torch.equal(convolutional_attention_mask(3, 4, kernel=3), attention_mask("conv", 3, 4, kernel=3))
    assert torch.equal(convolutional_attention_mask(3, 8), attention_mask("conv", 3, 8, kernel=11))


def test_build_attention_mask_is_cached_per_device():
    a = build_attention_mask("row", 4, 3, "cpu")
    b = build_attention_mask("row", 4, 3, torch.device("cpu"))
    assert a is b
    assert build_attention_mask("row", 4, 3) is a
    assert torch.equal(a, row_attention_mask(4, 3))
    meta = build_attention_mask("conv", 256, 32, "meta", kernel=11)
    assert meta.is_meta and meta.shape == (1280, 1280)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown attention kind"):
        attention_mask("diagonal", 2, 2)
    with pytest.raises(ValueError, match="odd"):
        conv_image_mask(4, kernel=4)
    with pytest.raises(ValueError, match="out of range"):
        layer_attention_kind(64, 64)


# --- the layer pattern ----------------------------------------------------------------------

def test_layer_pattern_64_layers():
    kinds = [layer_attention_kind(idx, 64) for idx in range(64)]
    for idx, kind in enumerate(kinds):
        i = idx + 1  # the paper's 1-based layer number
        if i == 64:
            assert kind == "conv"
        elif (i - 2) % 4 == 0:
            assert kind == "column", i
        else:
            assert kind == "row", i
    assert kinds[:6] == ["row", "column", "row", "row", "row", "column"]
    assert kinds.count("column") == 16 and kinds.count("conv") == 1 and kinds.count("row") == 47


def test_layer_pattern_small_models():
    assert [layer_attention_kind(i, 1) for i in range(1)] == ["conv"]
    assert [layer_attention_kind(i, 2) for i in range(2)] == ["row", "conv"]
    assert [layer_attention_kind(i, 4) for i in range(4)] == ["row", "column", "row", "conv"]
