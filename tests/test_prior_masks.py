"""The prior's attention masks (paper appendix B.1, Figure 11) against
hand-written matrices for small grids, and the paper's layer pattern."""

import pytest
import torch

from dalle_core.prior.config import PriorConfig
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
    # (column 3 = position L holds the last text token: open to every image query)
    assert_mask(row_attention_mask(2, 2), """
        1.....
        11....
        111...
        1111..
        11111.
        111111
    """)
    assert_mask(column_attention_mask(2, 2), """
        1.....
        11....
        111...
        1111..
        111.1.
        1111.1
    """)


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
def test_common_rules(kind):
    L, g = 5, 4
    m = attention_mask(kind, L, g, kernel=3)
    S = L + g * g
    assert m.shape == (S, S)
    assert torch.equal(m[:L, :L], text_causal_mask(L))  # text causal
    assert not m[:L, L:].any()  # text never sees image
    assert m[L:, :L].all()  # image sees all text
    assert m[L:, L].all()  # ... and position L, whose input is the last text token
    assert not m[:L, L].any()  # which no text query sees
    assert not torch.triu(m, diagonal=1).any()  # causal everywhere
    assert m.diagonal().all()  # every position sees itself (no empty softmax row)


def test_dense_mask_is_causal_over_every_earlier_image_position():
    """The demo-only "dense" kind: image query j sees every image key k <= j."""
    L, g = 3, 3
    m = attention_mask("dense", L, g)
    assert torch.equal(m[L:, L:], torch.ones(g * g, g * g, dtype=torch.bool).tril())
    assert int(m[L:, L:].sum()) == g * g * (g * g + 1) // 2


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


# --- every image token sees every text token (issue 13, part 5) ------------------------------

def one_layer(kind: str) -> PriorConfig:
    return PriorConfig(n_layer=1, n_head=2, d_head=8, text_vocab_size=32, text_len=5,
                       image_vocab_size=16, image_grid=4, conv_kernel=3, attention_kinds=(kind,),
                       init_std=0.2)


def one_layer_model(kind: str):
    from dalle_core.prior.model import DalleTransformer

    torch.manual_seed(0)
    return DalleTransformer(one_layer(kind)).double().eval()


def stream(cfg: PriorConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab_size, (1, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.image_vocab_size, (1, cfg.image_len), generator=g)
    return text, image


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
def test_every_text_token_reaches_every_image_position_in_one_layer(kind):
    """One layer of each kind: changing any text token t_1 .. t_L - the last one,
    the input at the first image position, included - changes the logits of
    every image position.

    before: t_L reached only the image positions whose own pattern opens image
    key 0 - in this 4x4 grid row 5 of 16 (0..grid), column 4 (column 0), conv
    (3x3, wrapped) 5; at the paper's size (32x32, 11x11) row 33, column 32,
    conv 61 of 1024. after: all 16 here, all 1024 there (every kind)."""
    cfg = one_layer(kind)
    model = one_layer_model(kind)
    text, image = stream(cfg)
    with torch.no_grad():
        _, base = model(text, image)
        for i in range(cfg.text_len):
            other = text.clone()
            other[0, i] = (other[0, i] + 1) % cfg.text_vocab_size
            _, changed = model(other, image)
            moved = (changed - base).abs().amax(-1)[0]  # [N]
            assert bool((moved > 1e-9).all()), (
                f"{kind}: changing text token {i + 1} of {cfg.text_len} left image positions "
                f"{(moved <= 1e-9).nonzero().flatten().tolist()} unchanged")
    # the paper's size, on the masks: every image query sees keys 0 .. L
    L, g = 256, 32
    assert attention_mask(kind, L, g)[L:, : L + 1].all()


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
def test_future_image_tokens_never_change_earlier_logits(kind):
    """Causality kept: changing image token i_k (the input at position L + k)
    leaves the text logits and the logits of image positions 0 .. k - 1 exactly
    unchanged (one layer of each kind)."""
    cfg = one_layer(kind)
    model = one_layer_model(kind)
    text, image = stream(cfg, seed=1)
    with torch.no_grad():
        base_text, base = model(text, image)
        for k in range(1, cfg.image_len):
            other = image.clone()
            other[0, k - 1] = (other[0, k - 1] + 1) % cfg.image_vocab_size  # i_k is image[:, k - 1]
            t, changed = model(text, other)
            assert torch.equal(t, base_text), (kind, k)
            assert torch.equal(changed[:, :k], base[:, :k]), (kind, k)


@pytest.mark.parametrize("kind", ["row", "column", "conv", "dense"])
def test_kv_cached_logits_equal_the_full_forward(kind):
    """The sampler's cached path (prefill, then one position a step, each under
    its row of the same cached mask) gives the full forward's image logits."""
    from dalle_core.prior.sampling import StaticKVCache

    cfg = one_layer(kind).replace(n_layer=2, attention_kinds=(kind, kind))
    torch.manual_seed(0)
    from dalle_core.prior.model import DalleTransformer

    model = DalleTransformer(cfg).double().eval()
    text, image = stream(cfg, seed=2)
    L, N = cfg.text_len, cfg.image_len
    with torch.no_grad():
        _, full = model(text, image)
        cache = StaticKVCache(cfg.n_layer, L + N)
        h = model.hidden_states(model.embed(text, None, start=0), start=0, cache=cache)
        steps = [model.head_logits(h[:, -1:], start=L)[1]]
        for j in range(1, N):
            x = model.embed(None, image[:, :j], start=L + j)
            steps.append(model.head_logits(model.hidden_states(x, start=L + j, cache=cache), start=L + j)[1])
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
