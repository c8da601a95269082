"""The dVAE's training-time augmentation (paper, appendix A, Listing 1).

The paper's preprocessing for dVAE training (target_res = 256), paraphrased: take
a random square crop of the image's short side, resize it (area filter) to a
random side t drawn uniformly from [9/8, 12/8] x target_res (capped by the short
side), take a random target_res x target_res crop of that, and flip it left-right
at random. In other words: a random crop covering 8/12 .. 8/9 of the side,
zoomed back to target_res, mirrored half of the time.

Our batches arrive already at `image_size` (the loader resizes every image), so
the same zoom is applied to the tensor: a random square window of side
round(S * S / t), t ~ U{round(9/8 S) .. round(12/8 S)}, at a random offset,
resized back to S x S (bilinear), flipped with probability 1/2.

Every random choice for an image comes from a generator seeded by (seed, step,
index of the image in the step's *global* batch), not from a running stream:
a resumed run and a run whose batch is split over any number of ranks crop
every image exactly as an uninterrupted one-process run does.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

__all__ = ["sample_seed", "crop_window", "random_crop_resize"]


def sample_seed(seed: int, step: int, index: int, purpose: str = "crop") -> int:
    """A 63-bit seed for one image of one step (independent across the three
    numbers and across `purpose`s)."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def crop_window(size: int, seed: int, step: int, index: int, scale: tuple[float, float] = (9 / 8, 12 / 8),
                flip: bool = True) -> tuple[int, int, int, bool]:
    """(top, left, side, flipped) of the window image `index` of step `step` is cut from."""
    g = torch.Generator().manual_seed(sample_seed(seed, step, index))
    t_min, t_max = round(scale[0] * size), round(scale[1] * size)
    t = int(torch.randint(t_min, t_max + 1, (), generator=g))  # the listing's resized side
    side = max(1, min(size, round(size * size / t)))  # the window that becomes `size` after that resize
    top = int(torch.randint(0, size - side + 1, (), generator=g))
    left = int(torch.randint(0, size - side + 1, (), generator=g))
    flipped = flip and bool(torch.rand((), generator=g) < 0.5)
    return top, left, side, flipped


def random_crop_resize(images: torch.Tensor, seed: int, step: int, first_index: int = 0,
                       scale: tuple[float, float] = (9 / 8, 12 / 8), flip: bool = True) -> torch.Tensor:
    """The paper's crop-and-resize of a batch [B, C, S, S] in [0, 1]; image i of the
    batch is image `first_index + i` of the step's global batch."""
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"random_crop_resize expects square images, got {h}x{w}")
    out = []
    for i in range(b):
        top, left, side, flipped = crop_window(h, seed, step, first_index + i, scale, flip)
        x = images[i : i + 1, :, top : top + side, left : left + side]
        if side != h:
            x = F.interpolate(x.float(), size=(h, h), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        if flipped:
            x = x.flip(-1)
        out.append(x.to(images.dtype))
    return torch.cat(out).contiguous()
