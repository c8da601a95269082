"""The DALL-E prior: a decoder-only sparse transformer over text then image tokens.

Read top to bottom (nanoGPT style): layer norm in fp32, attention, the two
resblocks of a layer, the layer, the model. Paper: section 2.2, appendix B.1
(Figures 10 and 11).

The stream
----------
The model reads one stream of ``S = L + N`` positions (L = text_len, N = grid^2).
Its targets are the tokens ``y = [t_1 .. t_L, i_1 .. i_N]`` (captions already
padded to L by the tokenizer with a distinct pad token per position,
``text_vocab_size + p``); its inputs are the targets shifted right by one
behind a learned start-of-stream vector:

    position   0     1    ..  L-1      L      L+1  ..  L+N-1
    input      BOS   t_1  ..  t_{L-1}  t_L    i_1  ..  i_{N-1}
    predicts   t_1   t_2  ..  t_L      i_1    i_2  ..  i_N

so the first image token is predicted from the position holding the last text
token, every text token (the first included) gets a prediction, and the last
image token is never an input. A position's positional embedding is that of the
token it predicts: a learned text-position embedding for p < L; row + column
embeddings of image token j = p - L for p >= L (Figure 10: each image token
embedding is summed with a row and a column embedding). Logits for text
positions are over the text vocabulary (BPE + pads), for image positions over
the image vocabulary, from two heads.

Precision
---------
Parameters are fp32 masters; fp16/bf16 come from ``torch.autocast`` around the
forward. As in the paper (section 2.4), layer norms (their gains and biases),
embeddings and the logits stay in fp32: `FP32LayerNorm` and the heads run with
autocast disabled on fp32 inputs; the residual stream stays fp32 (a resblock's
fp16 branch output is cast back before the add). Inside each resblock the
matmuls run in the autocast dtype: that is the part the per-resblock gradient
scaler (dalle_core.precision) protects.

Extension points kept for code that wraps the model from outside (torchtitan
style): ``model.blocks`` is a ModuleList of `Block`; each has ``.attn``
(`AttentionResblock`) and ``.mlp`` (`MLPResblock`); a resblock computes
``x + branch(x)``; ``model.resblocks()`` yields the 2 * n_layer resblocks in
order. Activation checkpointing and sharding are applied by other modules.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_core.distributed.checkpoint import canonical_key
from dalle_core.distributed.mesh import get_rank
from dalle_core.io import atomic_torch_save, load_torch_file

from . import block_sparse, decode_attention, flex
from .config import PriorConfig, PriorTrainingConfig, count_parameters
from .masks import build_attention_mask

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _fp32_region(device: torch.device):
    """Disable autocast for `device` (a no-op context where autocast does not exist)."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 with fp32 gain and bias, whatever autocast says.

    Returns fp32; the next linear casts to the autocast dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a .double() model
        with _fp32_region(x.device):
            w = self.weight.to(dtype) if self.weight is not None else None
            b = self.bias.to(dtype) if self.bias is not None else None
            return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps)


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    ``cache.update(layer, k, v)`` appends [B, H, T, D] keys / values for the
    current positions and returns all keys / values so far.
    """

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def shared_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values of a prefix held once per group of rows (the sampler's
        `StaticKVCache.share_rows`); None: every row holds its own."""
        return None


class SelfAttention(nn.Module):
    """Multi-head attention under a boolean [S, S] mask (True = may attend), with
    `torch.nn.functional.scaled_dot_product_attention`; or, given `block_mask`, the
    same mask computed sparsely: a FlexAttention BlockMask (dalle_core.prior.flex)
    or a block-sparse layout (dalle_core.prior.block_sparse)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        d = config.n_embd
        self.n_head, self.d_head = config.n_head, config.d_head
        self.qkv = nn.Linear(d, 3 * d, bias=config.bias)
        self.proj = nn.Linear(d, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, layer: int = 0,
                cache: KVCache | None = None, block_mask=None, decode_keys=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if decode_keys is not None:  # a sampling step: (text_len, image-key slice, window mask)
            y = decode_attention.decode_attention(q, k, v, *decode_keys, caption=cache.shared_prefix(layer))
        elif isinstance(block_mask, block_sparse.BlockSparseLayout):
            y = block_sparse.block_sparse_attention(q, k, v, block_mask,
                                                    dropout_p=self.dropout if self.training else 0.0)
        elif block_mask is not None:
            y = flex.flex_attention(q, k, v, block_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        d, h = config.n_embd, config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(d, h, bias=config.bias)
        self.proj = nn.Linear(h, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class AttentionResblock(nn.Module):
    """``x + attn(ln(x))`` with this layer's mask kind ("row", "column" or "conv").

    The paper's resblock: the unit that owns one gradient scale.
    """

    def __init__(self, config: PriorConfig, layer_index: int, kind: str):
        super().__init__()
        self.layer_index, self.kind = layer_index, kind
        self.text_len, self.grid = config.text_len, config.image_grid
        self.kernel, self.wraparound = config.conv_kernel, config.conv_wraparound
        self.attention, self.dropout = config.attention, config.dropout
        self.ln = FP32LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)

    def mask(self, device: torch.device, start: int, length: int) -> torch.Tensor:
        """Rows start..start+length-1 of this layer's mask, keys 0..start+length-1."""
        full = build_attention_mask(self.kind, self.text_len, self.grid, device,
                                    kernel=self.kernel, wraparound=self.wraparound)
        end = start + length
        if start == 0 and end == full.shape[0]:
            return full
        return full[start:end, :end]

    def block_mask(self, device: torch.device, start: int, length: int):
        """This layer's mask in the sparse form the resolved `attention` computes
        (a FlexAttention BlockMask, a block-sparse layout), or None for SDPA. Both
        run on the whole stream only (training, scoring): the sampler's steps are
        one query row, or a caption-long prefill (sampling.py)."""
        if start != 0 or length != self.text_len + self.grid**2:
            return None
        how = flex.resolve_attention(self.attention, device, self.dropout)
        if how == "flex":
            return flex.block_mask(self.kind, self.text_len, self.grid, length, device,
                                   kernel=self.kernel, wraparound=self.wraparound)
        if how == "block":
            return block_sparse.layer_layout(self.kind, self.text_len, self.grid, device,
                                             kernel=self.kernel, wraparound=self.wraparound)
        return None

    # a sampling step reads only its mask row's keys (decode_attention.py); False: dense masked
    # SDPA over every cached key, the same attention (the baseline of bench/sample.py)
    sparse_decode = True

    def branch(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        if self.sparse_decode and cache is not None and x.shape[1] == 1 and start > self.text_len:
            # a sampling step of one image query: read only the keys its mask row keeps
            plan = decode_attention.key_plan(self.kind, self.text_len, self.grid, self.kernel,
                                             self.wraparound, start, x.device)
            return self.attn(self.ln(x), None, layer=self.layer_index, cache=cache,
                             decode_keys=(self.text_len, *plan))
        mask = self.mask(x.device, start, x.shape[1])
        block_mask = self.block_mask(x.device, start, x.shape[1])
        return self.attn(self.ln(x), mask, layer=self.layer_index, cache=cache, block_mask=block_mask)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        return x + self.branch(x, start=start, cache=cache).to(x.dtype)


class MLPResblock(nn.Module):
    """``x + mlp(ln(x))``: the second resblock of a layer."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.ln = FP32LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x).to(x.dtype)


class Block(nn.Module):
    """One transformer layer: an attention resblock then an MLP resblock."""

    def __init__(self, config: PriorConfig, layer_index: int, kind: str):
        super().__init__()
        self.attn = AttentionResblock(config, layer_index, kind)
        self.mlp = MLPResblock(config)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = self.attn(x, start=start, cache=cache)
        return self.mlp(x)


class DalleTransformer(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        d, L, g = config.n_embd, config.text_len, config.image_grid
        # embeddings (fp32; see module docstring)
        self.text_embedding = nn.Embedding(config.text_embedding_size, d)
        self.bos = nn.Parameter(torch.empty(d))  # input at position 0
        self.text_position = nn.Parameter(torch.empty(L, d))
        self.image_embedding = nn.Embedding(config.image_vocab_size, d)
        self.image_row = nn.Parameter(torch.empty(g, d))
        self.image_col = nn.Parameter(torch.empty(g, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, i, kind) for i, kind in enumerate(config.layer_kinds()))
        self.ln_f = FP32LayerNorm(d)
        self.text_head = nn.Linear(d, config.text_embedding_size, bias=False)
        self.image_head = nn.Linear(d, config.image_vocab_size, bias=False)
        if self.bos.device.type != "meta":  # on meta there is nothing to initialise
            self.init_weights()

    # --- parameters -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, init_std) for weights and embeddings, zero
        biases, unit LN gains; the projections back into the residual stream
        scaled by 1/sqrt(2 * n_layer). Callable again after `to_empty` (meta-device
        construction followed by materialisation)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.bos, self.text_position, self.image_row, self.image_col):
            nn.init.normal_(p, 0.0, std)
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.attn.proj.weight, 0.0, out_std)
            nn.init.normal_(block.mlp.mlp.proj.weight, 0.0, out_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def resblocks(self) -> Iterator[nn.Module]:
        """The 2 * n_layer resblocks in forward order: attn_0, mlp_0, attn_1, ..."""
        for block in self.blocks:
            yield block.attn
            yield block.mlp

    # --- the stream -----------------------------------------------------------
    def position_embeddings(self, start: int, end: int) -> torch.Tensor:
        """[end - start, d]: text positions for p < L, row + column of image token
        p - L for p >= L."""
        L, g = self.config.text_len, self.config.image_grid
        parts = []
        if start < L:
            parts.append(self.text_position[start:min(end, L)])
        if end > L:
            # the image rows the span touches, each row + every column, then the span: sliced,
            # not gathered. Gathering `image_col[j % g]` repeats every column index, and the
            # CPU backward of such an index accumulates them in a thread-dependent order, so
            # two identical training runs drifted apart (bf16: losses differed at update 10).
            lo, hi = max(start, L) - L, end - L
            r0, r1 = lo // g, -(-hi // g)
            rows = (self.image_row[r0:r1, None, :] + self.image_col[None, :, :]).flatten(0, 1)
            parts.append(rows[lo - r0 * g: hi - r0 * g])
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]

    def embed(self, text: torch.Tensor | None, image: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """Input embeddings [B, T, d] of positions start .. L + n, where `image`
        holds the first n image tokens (n <= N - 1; None = 0) and position p's input
        is BOS (p = 0), t_p (1 <= p <= L) or i_{p-L} (p > L). `text` may be None
        when start > L (incremental decoding past the caption)."""
        cfg = self.config
        L = cfg.text_len
        n = 0 if image is None else image.shape[1]
        end = L + 1 + n
        if n > cfg.image_len - 1:
            raise ValueError(f"at most {cfg.image_len - 1} image tokens are inputs, got {n}")
        if not 0 <= start < end:
            raise ValueError(f"start {start} out of range for a stream of {end} inputs")
        pieces = []
        if start == 0:
            B = (text if text is not None else image).shape[0]
            pieces.append(self.bos.view(1, 1, -1).expand(B, 1, -1))
        if start <= L:
            if text is None:
                raise ValueError("text is needed for positions <= text_len")
            pieces.append(self.text_embedding(text[:, max(start - 1, 0):]))
        if n and end > max(start, L + 1):
            pieces.append(self.image_embedding(image[:, max(start, L + 1) - L - 1:]))
        tok = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return self.drop(tok + self.position_embeddings(start, end))

    def hidden_states(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Run the blocks and the final LN over input embeddings x [B, T, d] of
        positions start .. start + T - 1 (keys from `cache` for earlier ones)."""
        for block in self.blocks:
            x = block(x, start=start, cache=cache)
        return self.ln_f(x)

    def head_logits(self, h: torch.Tensor, start: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """fp32 (text_logits, image_logits) for the positions of h; each None when
        h has no positions of that kind."""
        L = self.config.text_len
        T = h.shape[1]
        n_text = max(0, min(L - start, T))
        with _fp32_region(h.device):
            h = h.to(torch.promote_types(h.dtype, torch.float32))
            text = self.text_head(h[:, :n_text]) if n_text > 0 else None
            image = self.image_head(h[:, n_text:]) if n_text < T else None
        return text, image

    # --- training ------------------------------------------------------------------
    def check_tokens(self, text: torch.Tensor, image: torch.Tensor) -> None:
        cfg = self.config
        if text.dim() != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be [batch, {cfg.text_len}] token ids, got {tuple(text.shape)}")
        if image.dim() != 2 or image.shape[1] != cfg.image_len:
            raise ValueError(f"image must be [batch, {cfg.image_len}] codes "
                             f"({cfg.image_grid}x{cfg.image_grid}), got {tuple(image.shape)}")
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"batch sizes differ: text {text.shape[0]}, image {image.shape[0]}")
        if text.device.type == "cpu" and text.numel():  # cheap here; on GPUs it would sync
            lo, hi = int(text.min()), int(text.max())
            if lo < 0 or hi >= cfg.text_embedding_size:
                raise ValueError(f"text ids must be in [0, {cfg.text_embedding_size}) "
                                 f"(BPE {cfg.text_vocab_size} + {cfg.text_len} pads), got [{lo}, {hi}]")
        if image.device.type == "cpu" and image.numel():
            lo, hi = int(image.min()), int(image.max())
            if lo < 0 or hi >= cfg.image_vocab_size:
                raise ValueError(f"image codes must be in [0, {cfg.image_vocab_size}), got [{lo}, {hi}]")

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, L] ids, image [B, N] codes -> fp32 logits
        (text [B, L, text_vocab_size + L], image [B, N, image_vocab_size]);
        logits[:, p] predict token p of the same stream (see module docstring)."""
        self.check_tokens(text, image)
        x = self.embed(text, image[:, :-1])
        h = self.hidden_states(x)
        text_logits, image_logits = self.head_logits(h)
        return text_logits, image_logits

    def loss(self, text: torch.Tensor, image: torch.Tensor,
             text_weight: float | None = None, image_weight: float | None = None) -> dict[str, torch.Tensor]:
        """Cross-entropy of text and image tokens, each averaged over its tokens;
        total = text_weight * text + image_weight * image (1/8 and 7/8 by default)."""
        wt = self.config.text_loss_weight if text_weight is None else text_weight
        wi = self.config.image_loss_weight if image_weight is None else image_weight
        text_logits, image_logits = self(text, image)
        text_ce = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text.reshape(-1))
        image_ce = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        return {"total": wt * text_ce + wi * image_ce, "text": text_ce, "image": image_ce}


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices of the linears (heads included);
    none on embeddings, positional parameters, LN gains and biases."""
    decay, no_decay = [], []
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The resblocks' 2-D weights (attention qkv and output, MLP in and out): what Muon is
    for (dalle_core/muon.py); not embeddings, heads, gains or biases."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and n.startswith("blocks.")]


def build_optimizer(model: nn.Module, config: PriorTrainingConfig, fused: bool | None = None):
    """AdamW with the config's (the paper's) hyper-parameters; with `config.optimizer ==
    "muon"` (not the paper's: the laptop profiles) Muon on the resblocks' matrices and that
    AdamW on the rest (dalle_core/muon.py)."""
    if config.optimizer == "muon":
        from dalle_core.muon import build_muon_with_adamw

        return build_muon_with_adamw([p for _, p in hidden_matrices(model)],
                                     optimizer_param_groups(model, config.weight_decay), lr=config.lr,
                                     muon_lr_ratio=config.muon_lr_ratio, weight_decay=config.weight_decay,
                                     betas=config.betas, eps=config.eps)
    kw = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(optimizer_param_groups(model, config.weight_decay), lr=config.lr,
                             betas=config.betas, eps=config.eps, **kw)


# --- the model file: weights + EMA weights with the shape pinned ------------------------------------

PRIOR_FORMAT = "dalle-prior/1"


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU state dict with canonical keys; collective under FSDP (rank 0
    gets the tensors, the others an empty dict)."""
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {canonical_key(k): v.detach().cpu() for k, v in sd.items()}


def save_prior(path: str | Path, model: nn.Module, config: PriorConfig,
               ema: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> Path | None:
    """One file: {"format", "config" (pinned: PriorConfig.to_dict), "state_dict",
    "ema_state_dict", "meta"}. Collective under FSDP; rank 0 writes. Returns the
    path on rank 0."""
    sd = _full_state(model)
    ema_sd = None
    if ema is not None:
        ema_sd = {}
        for k, v in ema.items():  # same order on every rank: full_tensor is collective
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            ema_sd[k] = full.detach().cpu().clone()
    if get_rank() != 0:
        return None
    blob = {"format": PRIOR_FORMAT, "config": config.to_dict(), "state_dict": sd,
            "ema_state_dict": ema_sd, "meta": json.loads(json.dumps(meta or {}, default=str))}
    return atomic_torch_save(blob, path)


def read_prior_file(path: str | Path) -> dict[str, Any]:
    return load_torch_file(path, (PRIOR_FORMAT,), "prior")


def load_prior(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> DalleTransformer:
    """The `DalleTransformer` saved by `save_prior`, with the shape pinned in the
    file (``model.config``); the EMA weights when present and `use_ema`. The file's meta
    (the trainer's: steps, precision, caption dropout, ...) rides along as
    ``model.training_meta``: the sampler reads it (`sampling.guidance_refusal`)."""
    blob = read_prior_file(path)
    config = PriorConfig.from_dict(blob["config"])
    model = DalleTransformer(config)
    sd = dict(blob["state_dict"])
    if use_ema and blob.get("ema_state_dict"):
        sd.update(blob["ema_state_dict"])
    model.load_state_dict(sd)
    model.training_meta = dict(blob.get("meta") or {})
    return model.to(device)


__all__ = [
    "AttentionResblock", "Block", "DalleTransformer", "FP32LayerNorm", "KVCache", "MLP", "MLPResblock",
    "SelfAttention", "build_optimizer", "count_parameters", "hidden_matrices", "optimizer_param_groups",
    "PRIOR_FORMAT", "load_prior", "read_prior_file", "save_prior",
]
