"""Gaussian blur of image sets (paper section 3.2, Figure 9: FID and IS after blurring).

The paper blurs both the generated and the reference images with radius 1, 2, 4
and 8, which removes the high-frequency detail that a discrete VAE's 8x
downsampling cannot reproduce, so the metric compares content rather than
texture. PIL's ImageFilter.GaussianBlur is used; its `radius` is the standard
deviation of the kernel in pixels.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageFilter

BLUR_RADII = (1, 2, 4, 8)
BLUR_SETTING = "PIL.ImageFilter.GaussianBlur(radius) on RGB, radius = std in pixels, both image sets"


def blur_images(images: Sequence[Image.Image], radius: float) -> list[Image.Image]:
    """RGB copies of `images` blurred with a Gaussian of std `radius` (0: unchanged, as RGB)."""
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    rgb = [im.convert("RGB") for im in images]
    if radius == 0:
        return rgb
    f = ImageFilter.GaussianBlur(radius)
    return [im.filter(f) for im in rgb]
