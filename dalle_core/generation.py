"""Text -> images, the way the paper generates (sections 2.6 and 3):

    caption --BPE--> text ids --prior, N samples--> N image-code grids
            --dVAE decoder--> N images --contrastive reranker--> the best k

`TextToImage` holds the four trained parts and checks that they fit together
(the prior's text context and image vocabulary against the tokenizer and the
dVAE, the reranker's text ids against the tokenizer); `generate` runs the whole
chain for a batch of captions, optionally with an image prompt (the top rows of
an image's code grid kept, the rest sampled: paper figure 2).

Without a reranker, or with ``keep == n``, the candidates come back in the order
they were drawn. The first ``keep`` candidates are then an unbiased sample of
the prior: that is what "without reranking" means in the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from dalle_core.dvae.model import decode_codes, encode_to_codes
from dalle_core.prior.model import DalleTransformer
from dalle_core.prior.sampling import prompt_rows as cut_prompt_rows
from dalle_core.prior.sampling import sample_image_codes
from dalle_core.prior.sampling_memory import batch_size_for, sampling_dtype
from dalle_core.text.bpe import DalleTokenizer

ProgressFn = Callable[[int, int], None]


class CaptionError(ValueError):
    """A caption the prior cannot take (empty, or longer than its text context)."""


@dataclass
class Generated:
    """What `TextToImage.generate` returns, for B captions and `keep` images each.

    images: float [B, keep, 3, H, W] in [0, 1], best first when reranked;
    codes: long [B, keep, g, g], the image tokens of those images;
    scores: float [B, keep], the reranker's cosine similarity (None without one);
    candidates: float [B, n, 3, H, W], every candidate in draw order (only with
        ``return_candidates=True``).
    """

    captions: list[str]
    images: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor | None
    candidates: torch.Tensor | None = None
    reranked: bool = False


class TextToImage:
    """The generation chain over trained parts (all on one device, eval mode)."""

    def __init__(self, prior: DalleTransformer, decoder: nn.Module, tokenizer: DalleTokenizer,
                 reranker: nn.Module | None = None, encoder: nn.Module | None = None):
        self.prior, self.decoder, self.tokenizer = prior.eval(), decoder.eval(), tokenizer
        # the decoder's weights in channels_last, the layout of its one-hot input (decode_codes):
        # oneDNN's convolutions then skip a layout change per layer; on 2 CPU threads 512 of the
        # small dVAE's images decode in 1.95 s instead of 2.50 (2026-12-03), the same pixels
        self.decoder.to(memory_format=torch.channels_last)
        self.reranker = reranker.eval() if reranker is not None else None
        self.encoder = encoder.eval() if encoder is not None else None
        self._check_parts()

    def _check_parts(self) -> None:
        p, tok = self.prior.config, self.tokenizer
        problems = []
        if p.text_len != tok.text_len or p.text_vocab_size != tok.vocab_size:
            problems.append(f"the prior reads {p.text_len} text positions of {p.text_vocab_size} BPE ids, "
                            f"the tokenizer writes {tok.text_len} of {tok.vocab_size}")
        if p.image_vocab_size != self.decoder.vocab_size:
            problems.append(f"the prior draws {p.image_vocab_size} image codes, the dVAE decodes "
                            f"{self.decoder.vocab_size}")
        if self.reranker is not None:
            r = self.reranker.config
            if r.text_len != tok.text_len or r.text_vocab_size != tok.vocab_size:
                problems.append(f"the reranker reads {r.text_len} text positions of {r.text_vocab_size} ids, "
                                f"the tokenizer writes {tok.text_len} of {tok.vocab_size}")
        if problems:
            raise ValueError("these models do not belong together: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.prior.config.image_grid

    # --- inputs ---------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Text ids [B, text_len]; an empty caption, or one longer than the
        prior's text context (unless ``truncate``), raises `CaptionError`."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            raise CaptionError("no captions given")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise CaptionError(f"caption {i} is empty")
        try:
            ids, truncated = self.tokenizer.encode_batch_with_info(captions)
        except ValueError as e:  # e.g. only characters the BPE drops
            raise CaptionError(str(e)) from None
        if not truncate and bool(truncated.any()):
            i = int(truncated.nonzero()[0])
            n = len(self.tokenizer.tokens(captions[i]))
            raise CaptionError(f"caption {i} is {n} BPE tokens long, longer than the prior's text "
                               f"context of {self.tokenizer.text_len}: shorten it (or allow truncation)")
        return ids

    def image_prompt(self, images: torch.Tensor, rows: int) -> torch.Tensor:
        """The top ``rows`` rows of the images' code grids (float [B, 3, H, W] in
        [0, 1] at the dVAE's size), flattened: the prompt for `generate`."""
        if self.encoder is None:
            raise ValueError("an image prompt needs the dVAE's encoder: build TextToImage with encoder=")
        if not 1 <= rows < self.grid:
            raise ValueError(f"prompt rows must be in [1, {self.grid - 1}] for a {self.grid}x{self.grid} grid, "
                             f"got {rows}")
        with torch.no_grad():
            codes = encode_to_codes(self.encoder, images)
        if codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"the image prompt encodes to a {codes.shape[1]}x{codes.shape[2]} grid, "
                             f"the prior draws {self.grid}x{self.grid}: give {self.grid * 2 ** (self.encoder.group_count - 1)}-pixel images")
        return cut_prompt_rows(codes.cpu(), rows)

    # --- the chain ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, captions: Sequence[str], n: int = 8, keep: int | None = None, *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, prompt_codes: torch.Tensor | None = None, use_cache: bool = True,
                 batch_size: int | None = None, decode_batch_size: int = 64, truncate: bool = False,
                 rerank: bool = True, return_candidates: bool = False,
                 progress: ProgressFn | None = None, dtype: torch.dtype | None = None,
                 guidance_scale: float = 1.0) -> Generated:
        """Draw ``n`` candidates per caption and keep ``keep`` (default all).

        prompt_codes: [B, r] or [1, r] (shared) from `image_prompt`;
        rerank: use the reranker when there is one (keep the best ``keep`` by
        its score); otherwise the first ``keep`` draws are kept;
        batch_size: rows the prior decodes together (None: as many as the device's free
        memory holds, from the KV cache per row: `dalle_core.prior.sampling_memory`);
        dtype: the prior's sampling precision (None: bf16/fp16 on a GPU, fp32 on CPU);
        progress(done, total): per drawn token position (from the sampler);
        guidance_scale: classifier-free guidance (`dalle_core.prior.sampling`; 1 = none).
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        keep = n if keep is None else keep
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (candidates per caption) must be an integer >= 1, got {n!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
            raise ValueError(f"keep must be an integer in [1, n={n}], got {keep!r}")
        text = self.tokenize(captions, truncate=truncate)
        B = text.shape[0]
        if prompt_codes is not None and prompt_codes.shape[0] == 1 and B > 1:
            prompt_codes = prompt_codes.expand(B, -1)
        device = next(self.prior.parameters()).device
        dtype = sampling_dtype(device) if dtype is None else dtype
        if batch_size is None:
            batch_size = batch_size_for(self.prior, device, dtype)
        # half precision where the device has it (the paper sampled in fp16); the sampler's
        # logits are taken in fp32 either way (filter_logits / sample_from_logits)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            codes = sample_image_codes(self.prior, text, n_per_caption=n, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, use_cache=use_cache, prompt_codes=prompt_codes,
                                       progress=progress, batch_size=batch_size,
                                       guidance_scale=guidance_scale).cpu()
        grids = codes.view(B * n, self.grid, self.grid)
        images = torch.cat([decode_codes(self.decoder, grids[i:i + decode_batch_size]).cpu()
                            for i in range(0, B * n, decode_batch_size)])
        reranked = rerank and self.reranker is not None
        scores = None
        if reranked:
            idx, scores = self.reranker.rerank_groups(images, text, keep=keep)
            idx = idx.cpu()
            scores = scores.cpu()
        else:
            idx = (torch.arange(B).unsqueeze(1) * n + torch.arange(keep).unsqueeze(0))
            if self.reranker is not None:
                scores = self.reranker.score(images[idx.flatten()], text.repeat_interleave(keep, 0)).view(B, keep)
        s = images.shape[1:]
        return Generated(
            captions=captions,
            images=images[idx.flatten()].view(B, keep, *s),
            codes=grids[idx.flatten()].view(B, keep, self.grid, self.grid),
            scores=scores,
            candidates=images.view(B, n, *s) if return_candidates else None,
            reranked=reranked,
        )


__all__ = ["CaptionError", "Generated", "TextToImage"]
