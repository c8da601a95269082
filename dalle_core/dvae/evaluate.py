"""How good is a dVAE: reconstruction error, codebook usage over a whole set, and,
on the demo world, whether reconstructions still show what their captions say."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from dalle_core.data.loader import image_to_tensor
from dalle_core.dvae.model import Decoder, Encoder, decode_codes, encode_to_codes


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


@dataclass
class ReconstructionReport:
    n_images: int
    mse: float
    codebook_usage: float  # fraction of the vocabulary used over the whole set
    code_perplexity: float  # exp(entropy) of the code histogram over the set
    caption_match_original: float | None = None  # checker on the inputs (the ceiling)
    caption_match_reconstruction: float | None = None
    originals: list[Image.Image] = field(default_factory=list, repr=False)
    reconstructions: list[Image.Image] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        out = {"recon_mse": self.mse, "eval_codebook_usage": self.codebook_usage,
               "eval_code_perplexity": self.code_perplexity}
        if self.caption_match_reconstruction is not None:
            out["caption_match_original"] = self.caption_match_original
            out["caption_match_reconstruction"] = self.caption_match_reconstruction
        return out


@torch.no_grad()
def evaluate_reconstructions(
    encoder: Encoder,
    decoder: Decoder,
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    check: Callable[[Image.Image, str], bool] | None = None,
    batch_size: int = 64,
    keep: int = 16,
) -> ReconstructionReport:
    """Encode -> decode every image (already square at the model's size)."""
    encoder.eval()
    decoder.eval()
    size = images[0].size[0]
    counts = torch.zeros(encoder.vocab_size)
    sq_err, n_px = 0.0, 0
    match_in = match_out = n_checked = 0
    originals, recons = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = torch.stack([image_to_tensor(im, size, name=f"image {start + i}") for i, im in enumerate(chunk)])
        codes = encode_to_codes(encoder, x)
        counts += torch.bincount(codes.flatten().cpu(), minlength=encoder.vocab_size).float()
        y = decode_codes(decoder, codes).cpu()
        sq_err += float(((y - x) ** 2).sum())
        n_px += x.numel()
        for i, (orig, rec) in enumerate(zip(chunk, y)):
            rec_img = tensor_to_image(rec)
            if len(recons) < keep:
                originals.append(orig)
                recons.append(rec_img)
            if captions is not None and check is not None:
                cap = captions[start + i]
                match_in += bool(check(orig, cap))
                match_out += bool(check(rec_img, cap))
                n_checked += 1
    p = counts / counts.sum()
    p = p[p > 0]
    return ReconstructionReport(
        n_images=len(images),
        mse=sq_err / max(n_px, 1),
        codebook_usage=float((counts > 0).float().mean()),
        code_perplexity=float(torch.exp(-(p * p.log()).sum())),
        caption_match_original=match_in / n_checked if n_checked else None,
        caption_match_reconstruction=match_out / n_checked if n_checked else None,
        originals=originals,
        reconstructions=recons,
    )
