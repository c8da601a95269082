"""Small image helpers shared by every stage: grids for previews, PNG bytes."""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image], ncols: int = 8, cell: int = 64, pad: int = 2) -> Image.Image:
    """Tile images (resized to cell x cell) into one RGB grid with a white gutter."""
    if not images:
        return Image.new("RGB", (cell, cell), "white")
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * (cell + pad) + pad, nrows * (cell + pad) + pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                   (pad + c * (cell + pad), pad + r * (cell + pad)))
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
