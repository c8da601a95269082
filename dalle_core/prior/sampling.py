"""Sampling image tokens from the prior (paper section 2.6 and section 3.3).

DALL-E draws the 1024 image tokens of a picture one at a time, each from the
prior's distribution given the caption and the tokens drawn so far (the paper
samples at temperature 1 and reranks the candidates with a contrastive
image-text model: `dalle_core.rerank`). `sample_image_codes` does that for a
batch of captions, ``n_per_caption`` candidates each.

How a token is drawn
--------------------
The logits of the position that predicts token j (fp32 from the model's heads)
are taken to float64, divided by the temperature, filtered (top-k: the k most
likely tokens are kept; then top-p / nucleus: the smallest set of most likely
tokens whose probability reaches p, the most likely always kept), and a token is
drawn by inverting the cumulative distribution at a uniform number ``u[row, j]``.
All uniforms are drawn once up front, ``torch.rand(rows, N)`` from a CPU
``torch.Generator`` seeded with ``seed``, so

- the same seed gives the same tokens (on any device, and whatever
  ``batch_size`` splits the rows into);
- the cached and the uncached paths, fed the same uniforms, give identical
  tokens: a token can only differ if ``u`` falls within float rounding (about
  1e-7 for an fp32 model, 1e-16 in float64) of a boundary of the cumulative
  distribution;
- top-k = 1 is greedy decoding (argmax), temperature aside.

The key/value cache
-------------------
With ``use_cache=True`` the caption (and the image prompt, if any) is run once
through the model, filling a key/value cache (`StaticKVCache`: buffers
preallocated to the stream's length, so appending costs no copy); after that
each new token costs one step: its embedding at its position goes through every
layer, where its query attends to the cached keys that layer's mask row keeps
(the row, column or convolutional pattern of the paper: the caption block and
one slice of image keys, read in place, `dalle_core.prior.decode_attention`),
and its key and value are appended. The draws of one caption share the
caption: it is run once for them, and each step reads its caption block once
for them all (`StaticKVCache.share_rows`). With
``use_cache=False`` every step recomputes the whole stream so far (the
reference the cached path is tested against, and the speed baseline).

Sampling ignores `PriorConfig.attention`: a decode step is one query row against
its slice of the cached keys (no empty tiles to skip), and the prefill is the
caption (causal text under SDPA, no image masks). FlexAttention (dalle_core.prior.flex)
only runs on the whole stream (`AttentionResblock.block_mask`): training, scoring,
and the last step of the uncached path.

Image-to-image prompting
------------------------
``prompt_codes`` [B, r] are the first r tokens of an image's code grid in raster
order, normally its top rows (r = rows * grid; `prompt_rows` cuts them out):
they are kept as they are and the remaining N - r tokens are sampled (paper,
Figure 2 / section 3.3: "the top half of an image" as a prompt).

Classifier-free guidance (not the paper's)
------------------------------------------
With ``guidance_scale`` s != 1 every row is run twice, with its caption and with
the empty one (each position its pad token: `dalle_core.prior.data.empty_captions`),
the same codes drawn so far in both, and a token is drawn from
``uncond + s * (cond - uncond)`` of the two streams' logits (Ho & Salimans 2022;
Make-A-Scene applied it to an autoregressive prior). It needs a prior trained with
`PriorTrainingConfig.caption_dropout` > 0, or the empty caption is a stream it has
never seen: a prior loaded from a file that says so is refused (`guidance_refusal`).
s = 1 is the plain conditional draw (one stream: the paper's). The two streams double
the rows a chunk decodes, so a chunk takes half the rows.

Mixed precision: the model runs in whatever precision it is in; wrap the call in
``torch.autocast`` for fp16/bf16 on a GPU (the heads and logits stay fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from .data import empty_captions
from .model import DalleTransformer

ProgressFn = Callable[[int, int], None]


# --- the key/value cache ---------------------------------------------------------------------

class StaticKVCache:
    """A key/value cache with buffers preallocated to ``max_len`` positions.

    Same interface as `dalle_core.prior.model.KVCache` (``update(layer, k, v)``
    appends [B, H, T, D] keys / values and returns all so far; ``length``), but
    appending writes into the buffer instead of concatenating, so a 1024-step
    decode costs no quadratic copying. The buffers take the dtype and device of
    the first keys they see (fp16 under autocast)."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = int(max_len)
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self._len = [0] * n_layer
        self._prefix: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def share_rows(self, group: int) -> None:
        """After a prefill of one row per group of `group` rows with the same caption (and
        prompt): give each of the group's rows a copy of what is cached so far, and keep that
        prefix once per group too, for `decode_attention` to read the caption block once for
        the group's draws. Rows c * group .. c * group + group - 1 are row c's copies."""
        if group == 1:
            return
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                raise RuntimeError(f"share_rows comes after the prefill: layer {layer} holds nothing yet")
            n = self._len[layer]
            self._prefix[layer] = (k[:, :, :n].clone(), v[:, :, :n].clone())
            C, H, T, D = k.shape
            for buffers, old in ((self.k, k), (self.v, v)):  # copy the prefix only, not the empty rest
                new = old.new_empty(C * group, H, T, D)
                new.view(C, group, H, T, D)[:, :, :, :n] = old[:, None, :, :n]
                buffers[layer] = new

    def shared_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefix's keys and values once per group of rows ([rows / group, H, T, D]),
        or None before `share_rows` (every row holds its own)."""
        return self._prefix[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        start, end = self._len[layer], self._len[layer] + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} positions is full (layer {layer}, "
                               f"{start} cached, {k.shape[2]} more)")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self._len[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    @property
    def length(self) -> int:
        return self._len[0]


# --- drawing one token ----------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits [..., V] with the tokens outside the top-k and then outside the
    nucleus of probability top_p set to -inf (the most likely token always stays).
    Ties at the top-k boundary are broken by `torch.topk` (exactly k kept)."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        idx = torch.topk(logits, top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Tokens [B] from logits [B, V] by inverse-CDF sampling at uniforms u [B] in [0, 1).

    Computed in float64: temperature, then `filter_logits`, then softmax; the
    token is the first whose cumulative probability exceeds ``u * total``."""
    z = filter_logits(logits.double() / temperature, top_k, top_p)
    probs = torch.softmax(z, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to total: fall back to the last token with mass
    V = probs.shape[-1]
    last = V - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
    return torch.minimum(idx, last)


# --- inputs ---------------------------------------------------------------------------------------

def prompt_rows(codes: torch.Tensor, rows: int, grid: int | None = None) -> torch.Tensor:
    """The top `rows` rows of code grids, flattened for `sample_image_codes`:
    codes [B, g, g] (or [B, g * g] with `grid`) -> [B, rows * g]."""
    if codes.dim() == 3:
        if codes.shape[1] != codes.shape[2]:
            raise ValueError(f"codes must be square grids [B, g, g], got {tuple(codes.shape)}")
        g = codes.shape[2]
        codes = codes.reshape(codes.shape[0], -1)
    elif codes.dim() == 2:
        if grid is None:
            raise ValueError("flat codes [B, N] need `grid`")
        g = grid
        if codes.shape[1] != g * g:
            raise ValueError(f"flat codes must have {g * g} tokens for grid {g}, got {codes.shape[1]}")
    else:
        raise ValueError(f"codes must be [B, g, g] or [B, g * g], got {tuple(codes.shape)}")
    if not 0 <= rows <= g:
        raise ValueError(f"rows must be in [0, {g}], got {rows}")
    return codes[:, : rows * g]


def guidance_refusal(model: nn.Module, guidance_scale: float) -> str | None:
    """Why `model` cannot be drawn at `guidance_scale`, or None. Guidance reads the logits
    under the empty caption, which a prior learns only from caption dropout; a prior loaded
    from a file (`load_prior` keeps the trainer's meta as ``model.training_meta``) that was
    trained without it is refused. A file that does not record the rate predates caption
    dropout (trained at 0). A prior built in memory has no record: the caller's to know."""
    meta = getattr(model, "training_meta", None)
    if guidance_scale == 1.0 or meta is None or float(meta.get("caption_dropout") or 0.0) > 0.0:
        return None
    how = ("records caption_dropout=0" if "caption_dropout" in meta
           else "does not record caption dropout (trained before it existed, at 0)")
    return (f"guidance_scale={guidance_scale:g} needs a prior trained with caption dropout "
            f"(PriorTrainingConfig.caption_dropout > 0): this prior's file {how}, so it never learnt the "
            f"empty caption the guided draw contrasts with; draw it at guidance_scale=1")


def _check_inputs(model: DalleTransformer, text, n_per_caption, temperature, top_k, top_p,
                  prompt_codes, batch_size, guidance_scale=1.0) -> tuple[int | None, torch.Tensor | None]:
    cfg = model.config
    if isinstance(guidance_scale, bool) or not (isinstance(guidance_scale, (int, float))
                                                and 0 <= guidance_scale < float("inf")):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}")
    refusal = guidance_refusal(model, guidance_scale)
    if refusal:
        raise ValueError(refusal)
    if not isinstance(text, torch.Tensor):
        raise ValueError(f"text must be a LongTensor [B, {cfg.text_len}] of token ids, got {type(text).__name__}")
    if text.dim() != 2:
        raise ValueError(f"text must be [B, {cfg.text_len}] token ids, got shape {tuple(text.shape)}")
    if text.shape[0] == 0:
        raise ValueError("text is empty: no captions to sample for")
    if text.shape[1] != cfg.text_len:
        raise ValueError(f"text has {text.shape[1]} tokens per caption; this prior takes exactly "
                         f"{cfg.text_len} (pad with the tokenizer: DalleTokenizer.encode_batch)")
    if text.dtype.is_floating_point or text.dtype == torch.bool:
        raise ValueError(f"text must hold integer token ids, got dtype {text.dtype}")
    lo, hi = int(text.min()), int(text.max())
    if lo < 0 or hi >= cfg.text_embedding_size:
        raise ValueError(f"text ids must be in [0, {cfg.text_embedding_size}) (BPE {cfg.text_vocab_size} + "
                         f"{cfg.text_len} pads), got [{lo}, {hi}]")
    if not isinstance(n_per_caption, int) or n_per_caption < 1:
        raise ValueError(f"n_per_caption must be an integer >= 1, got {n_per_caption!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} "
                         f"(use top_k=1 for greedy decoding)")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        top_k = min(top_k, cfg.image_vocab_size)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if prompt_codes is not None:
        if not isinstance(prompt_codes, torch.Tensor) or prompt_codes.dim() != 2:
            shape = tuple(prompt_codes.shape) if isinstance(prompt_codes, torch.Tensor) else type(prompt_codes).__name__
            raise ValueError(f"prompt_codes must be [B, r] image codes (the top rows of a grid, "
                             f"r = rows * {cfg.image_grid}), got {shape}")
        if prompt_codes.shape[0] != text.shape[0]:
            raise ValueError(f"prompt_codes has {prompt_codes.shape[0]} rows for {text.shape[0]} captions")
        if prompt_codes.shape[1] > cfg.image_len:
            raise ValueError(f"prompt of {prompt_codes.shape[1]} codes is longer than the image "
                             f"({cfg.image_grid}x{cfg.image_grid} = {cfg.image_len} codes)")
        if prompt_codes.dtype.is_floating_point or prompt_codes.dtype == torch.bool:
            raise ValueError(f"prompt_codes must hold integer codes, got dtype {prompt_codes.dtype}")
        if prompt_codes.numel():
            lo, hi = int(prompt_codes.min()), int(prompt_codes.max())
            if lo < 0 or hi >= cfg.image_vocab_size:
                raise ValueError(f"prompt codes must be in [0, {cfg.image_vocab_size}), got [{lo}, {hi}]")
        if prompt_codes.shape[1] == 0:
            prompt_codes = None
    return top_k, prompt_codes


# --- the sampler ------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sample_chunk(model: DalleTransformer, text: torch.Tensor, prompt: torch.Tensor | None,
                  uniforms: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  use_cache: bool, tick: Callable[[], None], guidance_scale: float = 1.0,
                  group: int = 1) -> torch.Tensor:
    """Codes [b, N] for one chunk of rows (text [b, L] on the model's device), whose rows
    come in groups of `group` with the same caption and prompt (the draws of a caption)."""
    cfg = model.config
    L, N = cfg.text_len, cfg.image_len
    b = text.shape[0]
    r = 0 if prompt is None else prompt.shape[1]
    codes = torch.zeros(b, N, dtype=torch.long, device=text.device)
    if r:
        codes[:, :r] = prompt
    if r == N:
        return codes
    guided = guidance_scale != 1.0
    if guided:  # rows b.. are the unconditional stream: the empty caption, the same codes
        text = torch.cat([text, empty_captions(b, L, cfg.text_vocab_size).to(text.device)])

    def streams(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, c]) if guided else c

    def draw(logits: torch.Tensor, j: int) -> None:  # logits [b (x 2 guided), V] predicting token j
        if guided:
            cond, uncond = logits[:b].float(), logits[b:].float()
            logits = uncond + guidance_scale * (cond - uncond)
        codes[:, j] = sample_from_logits(logits, uniforms[:, j], temperature, top_k, top_p)
        tick()

    if use_cache:
        cache = StaticKVCache(cfg.n_layer, L + N)
        # prefill: BOS, the caption and the prompt (positions 0 .. L + r), once per group of
        # draws that share them; the cache then gives every draw its copy (share_rows)
        one = slice(None, None, group)
        if group > 1 and not (torch.equal(text, text[one].repeat_interleave(group, 0)) and
                              (prompt is None or torch.equal(prompt, prompt[one].repeat_interleave(group, 0)))):
            raise ValueError(f"rows must come in groups of {group} with the same caption and prompt")
        x = model.embed(text[one], streams(codes[:, :r])[one] if r else None, start=0)
        h = model.hidden_states(x, start=0, cache=cache)
        cache.share_rows(group)
        _, logits = model.head_logits(h[:, -1:], start=L + r)
        draw(logits[:, 0].repeat_interleave(group, 0), r)
        for j in range(r + 1, N):
            pos = L + j  # the input i_j (codes[:, j - 1]) predicts token j
            x = model.embed(None, streams(codes[:, :j]), start=pos)
            h = model.hidden_states(x, start=pos, cache=cache)
            _, logits = model.head_logits(h, start=pos)
            draw(logits[:, 0], j)
    else:
        for j in range(r, N):
            x = model.embed(text, streams(codes[:, :j]) if j else None, start=0)
            h = model.hidden_states(x, start=0)
            _, logits = model.head_logits(h[:, -1:], start=L + j)
            draw(logits[:, 0], j)
    return codes


# the draws of a caption share its prefill and caption block (StaticKVCache.share_rows); False:
# every draw runs its own, the same tokens up to float rounding (the baseline of bench/sample.py)
share_caption_rows = True


@torch.no_grad()
def sample_image_codes(
    model: DalleTransformer,
    text: torch.Tensor,
    n_per_caption: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    prompt_codes: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Sample image codes for captions (see the module docstring).

    text: LongTensor [B, text_len] (`DalleTokenizer.encode_batch`);
    n_per_caption: candidates per caption (the paper reranks 512 of them);
    temperature > 0 (the paper: 1); top_k (>= 1) / top_p (in (0, 1]) filtering;
    seed: seeds the CPU `torch.Generator` that draws every uniform;
    use_cache: KV-cached decoding (one position per step) or full recomputation;
    prompt_codes: LongTensor [B, r] - the first r codes (top rows) of an image,
        kept as they are, the rest sampled;
    progress(done, total): called after every drawn token position of every
        chunk (total = number of chunks * (N - r));
    batch_size: at most this many rows are decoded together (None = all; with
        guidance, half as many captions' rows, each run in two streams), rounded
        down to whole captions, or to a divisor of n_per_caption when a caption's
        draws do not fit, so that draws of one caption share its caption block;
    guidance_scale: classifier-free guidance (module docstring; 1 = none, the paper's).

    Returns LongTensor [B * n_per_caption, N] on the model's device, caption-major
    (rows c * n .. c * n + n - 1 belong to caption c); reshape to
    [-1, grid, grid] for `dalle_core.dvae.model.decode_codes`.
    """
    top_k, prompt_codes = _check_inputs(model, text, n_per_caption, temperature, top_k, top_p,
                                        prompt_codes, batch_size, guidance_scale)
    cfg = model.config
    N = cfg.image_len
    device = _model_device(model)
    rows_text = text.to(device).long().repeat_interleave(n_per_caption, dim=0)
    rows_prompt = (None if prompt_codes is None
                   else prompt_codes.to(device).long().repeat_interleave(n_per_caption, dim=0))
    R = rows_text.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    uniforms = torch.rand(R, N, generator=gen, dtype=torch.float64).to(device)
    chunk = R if batch_size is None else batch_size
    if guidance_scale != 1.0 and batch_size is not None:
        chunk = max(1, chunk // 2)  # two streams a row: the same memory as batch_size plain rows
    # whole captions per chunk where they fit, else a divisor of a caption's draws, so that the
    # draws in a chunk share their caption's prefill and block (StaticKVCache.share_rows): at the
    # paper's size the caption block is 257 of the ~290 keys a row or column step reads. Every
    # chunk's rows then come in groups of `group` (chunks start at multiples of `chunk`, captions
    # at multiples of n_per_caption).
    if chunk >= n_per_caption:
        chunk -= chunk % n_per_caption
    else:
        chunk = max(d for d in range(1, chunk + 1) if n_per_caption % d == 0)
    group = math.gcd(chunk, n_per_caption) if share_caption_rows else 1
    r = 0 if rows_prompt is None else rows_prompt.shape[1]
    total = -(-R // chunk) * (N - r)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    was_training = model.training
    model.eval()
    try:
        out = []
        for s in range(0, R, chunk):
            e = min(s + chunk, R)
            out.append(_sample_chunk(model, rows_text[s:e], None if rows_prompt is None else rows_prompt[s:e],
                                     uniforms[s:e], float(temperature), top_k, top_p, use_cache, tick,
                                     float(guidance_scale), group))
    finally:
        model.train(was_training)
    return torch.cat(out, dim=0)


__all__ = ["StaticKVCache", "filter_logits", "guidance_refusal", "prompt_rows", "sample_from_logits", "sample_image_codes"]
