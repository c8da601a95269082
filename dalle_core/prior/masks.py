"""Attention masks of the DALL-E prior (paper appendix B.1, Figure 11).

The transformer sees one stream of `text_len` text positions followed by
`grid * grid` image positions in raster order (row by row). Every mask here is a
boolean matrix ``mask[q, k]`` over that stream, True where query position q may
attend to key position k (the convention of
`torch.nn.functional.scaled_dot_product_attention`). One softmax runs over the
text and image keys together.

Rules shared by every kind:

- text -> text: causal (q attends to k <= q);
- text -> image: never;
- image -> text: always (every image position sees the whole caption);
- image -> the first image position: always. Because the stream is shifted by
  one (see "Which position holds which token" below), the *input* at image
  position 0 is the last text token t_L, so this position belongs to the text
  stream as far as the keys go: every image query, in every layer kind, sees
  it (`combine_text_image`);
- image -> image: causal (k <= q, the diagonal included) and further restricted
  by the layer's kind. With image positions numbered j = 0 .. grid*grid - 1 and
  (row, col) = divmod(j, grid), image query j may attend to image key k if

  row     ``0 <= j - k <= grid``: its own row up to itself and, "wrapping
          around", the end of the previous row down to the same column
          (grid + 1 keys; Figure 11a: on a 4x4 grid, token 8 sees 4..8 in the
          1-based numbering of the figure, 5 tokens);
  column  ``k <= j and k % grid == j % grid``: its own column in earlier rows
          and itself (Figure 11b; the paper transposes the image states so that
          this becomes a contiguous block mask on the GPU, mask 11c - the same
          attention, computed differently);
  conv    a causal ``kernel x kernel`` neighbourhood, h = kernel // 2: keys in
          the h previous rows at most h columns away, and the h previous keys
          of its own row. With ``wraparound=True`` (the paper's Figure 11d,
          "with wraparound behavior, similar to the row attention") the column
          offsets are taken in raster order: ``j - k`` in ``[0, h]`` or in
          ``[r*grid - h, r*grid + h]`` for r = 1..h, so a neighbourhood cut by
          the image's left or right edge continues on the adjacent row. With
          ``wraparound=False`` it is the plain 2-D window clipped at the edges:
          ``0 <= row_j - row_k <= h``, ``|col_j - col_k| <= h``, ``k <= j``.

Which position holds which token: the model feeds ``[BOS, t_1 .. t_L, i_1 ..
i_{N-1}]`` and position p predicts token p of ``[t_1 .. t_L, i_1 .. i_N]`` (see
model.py), so "image position j" is the position whose output predicts image
token j, and its row/column embedding is that of token j. The masks above are
over positions; they do not depend on that convention.

Layer pattern (`layer_attention_kind`): with the paper's 1-based layer number
i = 1..n_layer, layers i < n_layer use column attention where (i - 2) mod 4 == 0
and row attention otherwise (row, column, row, row, row, column, ...); the last
layer uses the convolutional mask.

These dense masks cost O(seq^2) memory (1.6 MB each for 1280 positions) and are
cached per (kind, sizes, device) by `build_attention_mask`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .config import ATTENTION_KINDS


def layer_attention_kind(layer_index: int, n_layer: int) -> str:
    """The paper's attention kind of a layer; `layer_index` is 0-based (the index
    into `model.blocks`), the paper's layer number is ``i = layer_index + 1``.

    The last layer is "conv"; for i in 1..n_layer-1, "column" where
    (i - 2) % 4 == 0, otherwise "row".
    """
    if not 0 <= layer_index < n_layer:
        raise ValueError(f"layer_index {layer_index} out of range for {n_layer} layers")
    i = layer_index + 1
    if i == n_layer:
        return "conv"
    return "column" if (i - 2) % 4 == 0 else "row"


def text_causal_mask(text_len: int) -> torch.Tensor:
    """[text_len, text_len]: standard causal mask, ``mask[q, k] = k <= q``."""
    return torch.ones(text_len, text_len, dtype=torch.bool).tril()


def _image_coords(grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    j = torch.arange(grid * grid)
    return j, j // grid, j % grid


def row_image_mask(grid: int) -> torch.Tensor:
    """[N, N] image -> image part of the row mask: ``0 <= j - k <= grid``."""
    j, _, _ = _image_coords(grid)
    d = j[:, None] - j[None, :]
    return (d >= 0) & (d <= grid)


def column_image_mask(grid: int) -> torch.Tensor:
    """[N, N] image -> image part of the column mask: same column, ``k <= j``."""
    j, _, col = _image_coords(grid)
    return (j[None, :] <= j[:, None]) & (col[:, None] == col[None, :])


def conv_image_mask(grid: int, kernel: int = 11, wraparound: bool = True) -> torch.Tensor:
    """[N, N] image -> image part of the causal convolutional mask (see the module
    docstring for the exact definition of both variants)."""
    if kernel < 1 or kernel % 2 != 1:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}")
    h = kernel // 2
    j, row, col = _image_coords(grid)
    d = j[:, None] - j[None, :]  # raster distance from key back to query
    if wraparound:
        allowed = (d >= 0) & (d <= h)  # this row, h keys back (wrapping to the row above)
        for r in range(1, h + 1):
            allowed |= (d >= r * grid - h) & (d <= r * grid + h)
        return allowed
    dr = row[:, None] - row[None, :]
    dc = (col[:, None] - col[None, :]).abs()
    return (d >= 0) & (dr >= 0) & (dr <= h) & (dc <= h)


def dense_image_mask(grid: int) -> torch.Tensor:
    """[N, N] image -> image part of a dense causal mask: every key ``k <= j``. Not
    one of the paper's kinds (its layers are all sparse); a profile may choose it."""
    return torch.ones(grid * grid, grid * grid, dtype=torch.bool).tril()


def _image_mask(kind: str, grid: int, kernel: int, wraparound: bool) -> torch.Tensor:
    if kind == "dense":
        return dense_image_mask(grid)
    if kind == "row":
        return row_image_mask(grid)
    if kind == "column":
        return column_image_mask(grid)
    if kind == "conv":
        return conv_image_mask(grid, kernel, wraparound)
    raise ValueError(f"unknown attention kind {kind!r}: choose from {ATTENTION_KINDS}")


def combine_text_image(text_len: int, image_mask: torch.Tensor) -> torch.Tensor:
    """[L + N, L + N] stream mask from its image -> image block: text causal,
    text never sees image, image sees all text - the last text token included.

    The last text token t_L is the *input* at position L, the first image
    position (the stream is shifted by one behind BOS: model.py), so the image
    block's own pattern would open it only to the image queries that may see
    image key 0 (row layers: queries 0..grid; column layers: column 0; the conv
    layer: the 6 + 5 * 11 = 61 queries within its reach, paper size). Key
    position L is therefore opened to every image query in every layer kind.
    The paper (appendix B.1, Figure 11) shows the masks over image tokens only
    and has every image token attend to all text tokens, without saying where
    its stream puts the last text token. Reading taken: the text part of every
    image query is the whole caption, t_1 .. t_L, wherever the shift puts t_L
    (here: keys 0 .. L, BOS included) - otherwise a row layer's 991 later image
    tokens could not read the caption's last word directly, which no reading of
    the figure suggests. Text queries never see key L (text stays causal);
    query L sees keys 0..L as before.

    Density (paper size, L = 256, 32x32, kernel 11): each image query past the
    image block's own reach gains one key. Keys kept of the S^2 = 1280^2 matrix:
    row 328,304 -> 329,295 (20.04% -> 20.10%), column 311,936 -> 312,928
    (19.04% -> 19.10%), conv 352,209 -> 353,172 (21.50% -> 21.56%); mean image
    keys per image query (the image block plus key L) row 32.48 -> 33.45,
    column 16.50 -> 17.47, conv 55.83 -> 56.77 (tests/test_prior_masks.py).
    """
    n = image_mask.shape[0]
    mask = torch.zeros(text_len + n, text_len + n, dtype=torch.bool)
    mask[:text_len, :text_len] = text_causal_mask(text_len)
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask
    if n:
        mask[text_len:, text_len] = True  # key L holds t_L: the rest of the caption
    return mask


def row_attention_mask(text_len: int, grid: int) -> torch.Tensor:
    """[L + N, L + N] mask of the row-attention layers."""
    return combine_text_image(text_len, row_image_mask(grid))


def column_attention_mask(text_len: int, grid: int) -> torch.Tensor:
    """[L + N, L + N] mask of the column-attention layers."""
    return combine_text_image(text_len, column_image_mask(grid))


def convolutional_attention_mask(text_len: int, grid: int, kernel: int = 11,
                                 wraparound: bool = True) -> torch.Tensor:
    """[L + N, L + N] mask of the convolutional-attention layer (the last one)."""
    return combine_text_image(text_len, conv_image_mask(grid, kernel, wraparound))


def attention_mask(kind: str, text_len: int, grid: int, kernel: int = 11,
                   wraparound: bool = True) -> torch.Tensor:
    """Uncached [L + N, L + N] CPU mask of `kind` ("row", "column" or "conv")."""
    return combine_text_image(text_len, _image_mask(kind, grid, kernel, wraparound))


@lru_cache(maxsize=64)
def _cached_mask(kind: str, text_len: int, grid: int, kernel: int, wraparound: bool,
                 device: torch.device) -> torch.Tensor:
    return attention_mask(kind, text_len, grid, kernel, wraparound).to(device)


def build_attention_mask(kind: str, text_len: int, grid: int, device: torch.device | str | None = None,
                         kernel: int = 11, wraparound: bool = True) -> torch.Tensor:
    """The [L + N, L + N] mask of `kind` on `device`, built once and cached.

    The returned tensor is shared between callers: do not modify it in place.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached_mask(kind, int(text_len), int(grid), int(kernel), bool(wraparound), dev)


def format_mask(mask: torch.Tensor) -> str:
    """Render a mask as rows of '1'/'.' (for docs, debugging and test messages)."""
    return "\n".join("".join("1" if v else "." for v in row) for row in mask.tolist())
