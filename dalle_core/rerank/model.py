"""A small contrastive image-text model (in the spirit of CLIP) that reranks samples.

The paper draws many candidate images per caption (512) and keeps those that a
pretrained contrastive model (CLIP, Radford et al. 2021) scores highest against
the caption (section 2.6, Figure 9: gains level off past 32 candidates). No
pretrained weights can be downloaded here, so the platform trains its own
contrastive model on the same image-text pairs as the prior.

Architecture (CPU-cheap; shape pinned by `RerankerConfig`)
---------------------------------------------------------
image encoder  pixels in [0, 1] (resized to ``image_size`` if needed), centred;
               a 3x3 stem conv, then one stage per entry of ``image_widths``:
               a stride-2 3x3 conv and a residual 3x3 conv, GroupNorm + GELU
               (no batch statistics: an image's score never depends on the
               other images of its batch); the final ``s x s`` feature map is
               flattened (so where things are - "to the left of" - survives)
               and projected to ``embed_dim``.
text encoder   BPE ids of `dalle_core.text.bpe.DalleTokenizer` (``text_len``
               positions, the per-position pads ``>= text_vocab_size``):
               token + position embeddings, ``text_layers`` pre-LN transformer
               blocks in which no position attends to a pad, a pooling to one
               vector (``text_pool``, below), a projection to ``embed_dim``.
               Pads are ignored entirely: a caption's features do not depend
               on which pad ids fill its tail (nor on the other captions of
               its batch: positions that are pads in every caption of a batch
               are dropped before the blocks, which only saves time).
text pooling   ``"mean"``: the mean of the non-pad positions (the first
               design: with two layers it is close to a bag of words, "red
               circle ... blue square" and "blue circle ... red square" come
               out alike); ``"cls"``: a learned summary token in front of the
               caption (its own position embedding), read at the top, so the
               last layer can gather which word goes with which;
               ``"attention"``: a learned query attends over the non-pad
               positions. Files written before ``text_pool`` existed are
               ``"mean"`` (`RerankerConfig.from_dict`).
shared space   both projections L2-normalised; ``logits = exp(logit_scale) *
               img @ txt.T`` with a learnable temperature (init 1/0.07, the
               scale clamped at 100 as in CLIP); the loss is the symmetric
               InfoNCE (cross-entropy image->text and text->image, averaged),
               with optional hard-negative captions per image (NegCLIP) as
               extra image->text columns, plus ``hard_negative_weight`` times
               a cross-entropy of the true caption against its own hard
               negatives only (``loss_hard``).
precision      ``amp_dtype`` "bf16" trains under ``torch.autocast`` in
               bfloat16 where the device has fast bf16 (CUDA with bf16, a CPU
               with AVX-512 BF16 or AMX: `dalle_core.precision.device`), in fp32 elsewhere;
               features for reranking and evaluation are always fp32.

Use
---
``score(images, text)`` cosine similarity of each image with its caption;
``rerank(images, text, keep)`` the indices of the best ``keep`` images for one
caption; ``rerank_groups`` the same for the ``B * n`` candidates of ``B``
captions (the layout of `dalle_core.prior.sampling.sample_image_codes`);
``image_features`` the (unit) image embeddings, the space in which the
evaluation stage computes its own Frechet distance. ``save_reranker`` /
``load_reranker``: one file with the config pinned inside.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dalle_core.dvae.model import validate_images
from dalle_core.io import atomic_torch_save, load_torch_file
from dalle_core.precision.device import fast_low_precision

RERANKER_FORMAT = "dalle-reranker-v1"
CHECKPOINT_FORMAT = "dalle-reranker-checkpoint-v1"  # training checkpoints (rerank/train.py)

# The fields that determine the parameter layout.
SHAPE_FIELDS = ("image_size", "image_stem", "image_widths", "text_vocab_size", "text_len", "text_width",
                "text_layers", "text_heads", "embed_dim", "text_pool", "image_pool", "text_conv")
# Shape fields added after the first files were written, with the value those files
# were built with: a file without the field loads as it was trained.
LEGACY_SHAPE = {"text_pool": "mean", "image_pool": "flatten", "text_conv": 0}
TEXT_POOLS = ("mean", "cls", "attention")
IMAGE_POOLS = ("flatten", "moments", "flatten+moments")
AMP_DTYPES = ("fp32", "bf16", "auto")


@dataclass(frozen=True)
class RerankerConfig:
    # --- image encoder ---------------------------------------------------------------
    image_size: int = 32  # images are resized to this side before encoding
    image_stem: int = 16  # channels of the stem conv
    image_widths: tuple[int, ...] = (32, 64, 64)  # one stride-2 stage each
    # "flatten", "moments" or "flatten+moments" (module docstring). "moments" (where each
    # channel fires: its mean and x-/y-weighted means) binds positions: bench/reranker.py
    image_pool: str = "flatten"
    # --- text encoder ----------------------------------------------------------------
    text_vocab_size: int = 512  # BPE vocabulary without the pads (TextConfig.vocab_size)
    text_len: int = 16  # text positions (TextConfig.text_len)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_pool: str = "mean"  # "mean", "cls" or "attention" (module docstring)
    # kernel of a convolution over the embedded words before the blocks (0: none): each word
    # sees its neighbours ("red" next to "circle"), the binding mean pooling loses
    text_conv: int = 0
    token_init_std: float = 1.0  # initial spread of the token embeddings (positions: 0.02)
    # --- shared space ----------------------------------------------------------------
    embed_dim: int = 64
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # --- training (AdamW, linear warm-up then cosine decay to lr * lr_end_factor) ---
    lr: float = 2e-3
    lr_end_factor: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    # Not the CLIP recipe ("adamw"): "muon" = Muon on the linear layers' weight matrices
    # (the text blocks, both projections), AdamW (the settings above) on embeddings, convs,
    # gains and biases (dalle_core/muon.py), at muon_lr_ratio x the rate. The small profile's,
    # measured in bench/reranker.py. Both left out of `to_dict` while "adamw", so digests of
    # earlier rerankers are unchanged.
    optimizer: str = "adamw"
    muon_lr_ratio: float = 1.0
    hard_negative_weight: float = 0.0  # weight of loss_hard (the true caption against its hard negatives)
    hard_negatives: int = 3  # swapped-word captions per image (NegCLIP); 0: in-batch negatives only
    binding_negatives: float = 0.0  # share of them that are typed attribute swaps (negatives.binding_negatives)
    # mirror images added to each batch (negatives.with_mirrored_pairs): the same objects in
    # opposite places with the relation reversed, so position must be read from the image
    mirrored_pairs: int = 0
    amp_dtype: str = "fp32"  # "bf16" | "auto": autocast where the device has fast bf16 (module docstring)
    batch_size: int = 64
    total_steps: int = 150
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_widths", tuple(int(w) for w in self.image_widths))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("image_size", "image_stem", "text_vocab_size", "text_len", "text_width", "text_layers",
                     "text_heads", "embed_dim", "batch_size", "total_steps", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RerankerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.image_widths or min(self.image_widths) < 1:
            raise ValueError(f"RerankerConfig.image_widths must be positive widths, got {self.image_widths}")
        if self.image_size % (2 ** len(self.image_widths)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.image_widths)} "
                             f"(one halving per stage of image_widths)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")
        if not 0 < self.init_temperature < 1 or self.max_logit_scale <= 1:
            raise ValueError("init_temperature must be in (0, 1) and max_logit_scale > 1")
        if self.image_pool not in IMAGE_POOLS:
            raise ValueError(f"RerankerConfig.image_pool must be one of {IMAGE_POOLS}, got {self.image_pool!r}")
        if self.text_conv < 0 or (self.text_conv and self.text_conv % 2 == 0):
            raise ValueError(f"RerankerConfig.text_conv must be 0 or an odd kernel size, got {self.text_conv}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"RerankerConfig.text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"RerankerConfig.amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        if self.hard_negatives < 0 or self.mirrored_pairs < 0 or not 0 <= self.binding_negatives <= 1:
            raise ValueError("RerankerConfig.hard_negatives and mirrored_pairs must be >= 0, "
                             f"binding_negatives in [0, 1], got {self.hard_negatives}, {self.mirrored_pairs}, "
                             f"{self.binding_negatives}")
        if self.hard_negative_weight < 0:
            raise ValueError(f"RerankerConfig.hard_negative_weight must be >= 0, got {self.hard_negative_weight}")
        if self.optimizer not in ("adamw", "muon") or not self.muon_lr_ratio > 0:
            raise ValueError(f"RerankerConfig.optimizer must be 'adamw' or 'muon' and muon_lr_ratio > 0, "
                             f"got {self.optimizer!r}, {self.muon_lr_ratio}")
        if self.lr <= 0 or self.batch_size < 2:
            raise ValueError("lr must be > 0 and batch_size >= 2 (contrastive batches need negatives)")

    @property
    def feature_size(self) -> int:
        """Side of the image encoder's last feature map."""
        return self.image_size // 2 ** len(self.image_widths)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_widths"] = list(self.image_widths)
        d["betas"] = list(self.betas)
        if d["optimizer"] == "adamw":  # implied (see the field's comment)
            del d["optimizer"], d["muon_lr_ratio"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RerankerConfig":
        """From `to_dict` output: unknown keys are ignored, missing training keys
        take today's defaults, the shape fields must all be present (those added
        later, `LEGACY_SHAPE`, take the value older files were built with)."""
        d = {**LEGACY_SHAPE, **d}
        missing = [k for k in SHAPE_FIELDS if k not in d]
        if missing:
            raise ValueError(f"reranker config is missing shape fields {missing}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "RerankerConfig":
        return replace(self, **changes)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


# --- image encoder ---------------------------------------------------------------------------

class _ConvUnit(nn.Sequential):
    def __init__(self, n_in: int, n_out: int, stride: int = 1):
        super().__init__(nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(_groups(n_out), n_out), nn.GELU())


class _Stage(nn.Module):
    """Halve the resolution (stride-2 conv), then a residual conv."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.down = _ConvUnit(n_in, n_out, stride=2)
        self.res = _ConvUnit(n_out, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.res(x)


class ImageEncoder(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.stem = _ConvUnit(3, config.image_stem)
        widths = (config.image_stem, *config.image_widths)
        self.stages = nn.Sequential(*(_Stage(a, b) for a, b in zip(widths[:-1], widths[1:])))
        s, c = config.feature_size, widths[-1]
        self.pool = config.image_pool
        n_in = {"flatten": c * s * s, "moments": 3 * c, "flatten+moments": c * s * s + 3 * c}[self.pool]
        self.proj = nn.Linear(n_in, config.embed_dim)
        if "moments" in self.pool:  # cell centres in [-1, 1]: x across, y down
            t = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
            self.register_buffer("coords", torch.stack([t.expand(s, s), t.unsqueeze(1).expand(s, s)]),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem((x - 0.5) / 0.25))
        parts = [x.flatten(1)] if "flatten" in self.pool else []
        if "moments" in self.pool:  # the mean, and the x- and y-weighted means, of each channel
            c = self.coords.to(x.dtype)
            parts += [x.mean((2, 3)), (x * c[0]).mean((2, 3)), (x * c[1]).mean((2, 3))]
        return self.proj(torch.cat(parts, 1))


# --- text encoder ----------------------------------------------------------------------------

class _TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        # Half precision on a CPU: SDPA's flash kernel runs these short captions' attention (forward
        # and backward) ~4x slower than its math kernel (128 captions x 4 heads x 32 positions, bf16:
        # 20-23 vs 5.2 ms; fp32 flash 6 ms), ~30 ms of the small reranker's ~0.28 s update (two blocks)
        cpu_half = q.device.type == "cpu" and q.dtype != torch.float32
        with sdpa_kernel(SDPBackend.MATH) if cpu_half else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.vocab = config.text_vocab_size
        self.pool = config.text_pool
        w = config.text_width
        self.token = nn.Embedding(config.text_vocab_size + 1, w)  # + one row every pad maps to
        nn.init.normal_(self.token.weight, std=config.token_init_std)
        self.position = nn.Parameter(torch.randn(config.text_len, w) * 0.02)
        if config.text_conv:  # n-gram features: each word with its neighbours
            self.conv = nn.Conv1d(w, w, config.text_conv, padding=config.text_conv // 2)
        if self.pool == "cls":  # the summary token and its own position
            self.cls = nn.Parameter(torch.randn(w) * 0.02)
        elif self.pool == "attention":  # a learned query over the final states
            self.query = nn.Parameter(torch.randn(w) * 0.02)
            self.pool_kv = nn.Linear(w, 2 * w)
        self.blocks = nn.ModuleList(_TextBlock(w, config.text_heads) for _ in range(config.text_layers))
        self.ln = nn.LayerNorm(w)
        self.proj = nn.Linear(w, config.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids < self.vocab  # [B, T]: not a pad
        # positions after every caption's last word are pads in every row: never read, so
        # not computed (captions of the demo world fill ~12 of 32 positions)
        used = real.any(0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 1
        ids, real = ids[:, :last], real[:, :last]
        x = self.token(ids.clamp(max=self.vocab)) + self.position[: ids.shape[1]]
        if hasattr(self, "conv"):  # pads count as zeros: their ids never matter
            x = x * real.unsqueeze(-1).to(x.dtype)
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        if self.pool == "cls":
            x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
            real = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
        T = x.shape[1]
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)
        # no query attends to a pad (a pad query sees itself only; its output is never used)
        mask = (real[:, None, None, :] | eye)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "attention":
            k, v = self.pool_kv(x).chunk(2, dim=-1)
            att = (k @ self.query.to(k.dtype)) / math.sqrt(k.shape[-1])  # [B, T]
            att = att.masked_fill(~real, float("-inf")).softmax(-1)
            pooled = (att.unsqueeze(-1) * v).sum(1)
        else:
            w = real.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.proj(pooled)


# --- the model -------------------------------------------------------------------------------

class ContrastiveReranker(nn.Module):
    """Image and text encoders into one space, a learnable temperature, and the
    symmetric InfoNCE loss (see the module docstring)."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # --- inputs ----------------------------------------------------------------------------
    def prepare_images(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        """Validated float32 [B, 3, S, S] on the model's device (resized to
        ``image_size`` with antialiased bilinear interpolation if needed)."""
        validate_images(images, channels=3, what=what)
        images = images.to(self.device)
        s = self.config.image_size
        if tuple(images.shape[2:]) != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True,
                                   align_corners=False).clamp(0, 1)
        return images

    def prepare_text(self, text: torch.Tensor, what: str = "text") -> torch.Tensor:
        cfg = self.config
        if not isinstance(text, torch.Tensor) or text.dim() != 2:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"{what}: expected token ids [B, {cfg.text_len}], got {shape}")
        if text.shape[1] != cfg.text_len:
            raise ValueError(f"{what}: expected {cfg.text_len} ids per caption (DalleTokenizer.encode_batch "
                             f"with text_len {cfg.text_len}), got {text.shape[1]}")
        if text.dtype.is_floating_point or text.dtype == torch.bool:
            raise ValueError(f"{what}: expected integer token ids, got dtype {text.dtype}")
        if text.numel():
            lo, hi = int(text.min()), int(text.max())
            if lo < 0 or hi >= cfg.text_vocab_size + cfg.text_len:
                raise ValueError(f"{what}: ids must be in [0, {cfg.text_vocab_size + cfg.text_len}) "
                                 f"(BPE {cfg.text_vocab_size} + {cfg.text_len} pads), got [{lo}, {hi}]")
            empty = (text < cfg.text_vocab_size).sum(1) == 0
            if bool(empty.any()):
                rows = empty.nonzero().flatten().tolist()
                raise ValueError(f"{what}: captions {rows[:10]} hold only pad ids (empty captions)")
        return text.to(self.device).long()

    # --- features --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, embed_dim]."""
        return self.image_encoder(self.prepare_images(images))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised caption embeddings [B, embed_dim]."""
        return self.text_encoder(self.prepare_text(text))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        """Image embeddings [B, embed_dim] (unit length by default), in eval mode,
        computed in chunks of `batch_size`; fp32 on the CPU."""
        return self._chunked(lambda x: self.encode_image(x), images, normalize, batch_size)

    @torch.no_grad()
    def text_features(self, text: torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        return self._chunked(lambda t: self.encode_text(t), text, normalize, batch_size)

    def _chunked(self, fn, x: torch.Tensor, normalize: bool, batch_size: int) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            out = [fn(x[i:i + batch_size]).float().cpu() for i in range(0, max(len(x), 1), batch_size)]
        finally:
            self.train(was)
        feats = torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)
        return F.normalize(feats, dim=-1) if normalize else feats

    # --- training ---------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """logits_per_image [B, B]: scaled cosine similarity of image i and caption j."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        return self.scale() * img @ txt.t()

    def loss(self, images: torch.Tensor, text: torch.Tensor,
             negatives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch, with in-batch retrieval accuracies
        (image -> its caption among the batch's captions, and back).

        `negatives` [b, K, L] (or [b, L]): optional hard-negative captions per
        image (e.g. the caption with its two colours swapped), added to that
        image's candidates in the image -> text direction (as in NegCLIP); the
        accuracies count them too. With them, ``loss_hard`` is the cross-entropy
        of the true caption against only its own K negatives, and
        ``acc_hard`` how often it scores above all of them; ``loss`` adds
        ``hard_negative_weight * loss_hard``."""
        if images.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes differ: {images.shape[0]} images, {text.shape[0]} captions")
        if images.shape[0] < 2:
            raise ValueError("a contrastive batch needs at least 2 pairs")
        b = images.shape[0]
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        scale = self.scale()
        logits = scale * img @ txt.t()
        logits_i = logits
        if negatives is not None:
            if negatives.dim() == 2:
                negatives = negatives.unsqueeze(1)
            if negatives.dim() != 3 or negatives.shape[0] != b:
                raise ValueError(f"negatives must be [{b}, K, L] caption ids, got {tuple(negatives.shape)}")
            K = negatives.shape[1]
            neg = F.normalize(self.encode_text(negatives.reshape(b * K, -1)), dim=-1).view(b, K, -1)
            neg_logits = scale * torch.einsum("bd,bkd->bk", img, neg)
            logits_i = torch.cat([logits, neg_logits], dim=1)
        logits, logits_i = logits.float(), logits_i.float()
        target = torch.arange(b, device=logits.device)
        li = F.cross_entropy(logits_i, target)
        lt = F.cross_entropy(logits.t(), target)
        with torch.no_grad():
            acc_i = (logits_i.argmax(1) == target).float().mean()
            acc_t = (logits.argmax(0) == target).float().mean()
        out = {"loss": (li + lt) / 2, "loss_image": li, "loss_text": lt,
               "acc": (acc_i + acc_t) / 2, "acc_image_to_text": acc_i, "acc_text_to_image": acc_t}
        if negatives is not None:
            own = torch.cat([logits.diagonal().unsqueeze(1), neg_logits.float()], dim=1)  # [b, 1 + K]
            zero = torch.zeros(b, dtype=torch.long, device=own.device)
            out["loss_hard"] = F.cross_entropy(own, zero)
            with torch.no_grad():
                out["acc_hard"] = (own[:, 1:] < own[:, :1]).all(1).float().mean()
            if self.config.hard_negative_weight > 0:
                out["loss"] = out["loss"] + self.config.hard_negative_weight * out["loss_hard"]
        return out

    # --- reranking ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: torch.Tensor, text: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Cosine similarity [B] of image i with caption i; one caption ([L] or
        [1, L]) is compared with every image."""
        if isinstance(text, torch.Tensor) and text.dim() == 1:
            text = text.unsqueeze(0)
        txt = self.text_features(text, batch_size=batch_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            validate_images(images)
        if txt.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"{txt.shape[0]} captions for {images.shape[0]} images: give one caption, "
                             f"or one per image")
        img = self.image_features(images, batch_size=batch_size)
        return (img * txt).sum(-1)

    @torch.no_grad()
    def rerank(self, images: torch.Tensor, text: torch.Tensor, keep: int, batch_size: int = 256) -> torch.Tensor:
        """Indices LongTensor [keep] of the images that best match one caption,
        best first (ties: the lower index first)."""
        if isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[0] != 1:
            raise ValueError(f"rerank takes one caption ([L] or [1, L]), got {text.shape[0]}; "
                             f"use rerank_groups for several")
        n = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else 0
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= max(n, 1) or n == 0:
            raise ValueError(f"keep must be an integer in [1, {n}] (the number of images), got {keep!r}")
        scores = self.score(images, text, batch_size=batch_size)
        order = torch.sort(scores, descending=True, stable=True).indices
        return order[:keep]

    @torch.no_grad()
    def rerank_groups(self, images: torch.Tensor, text: torch.Tensor, keep: int,
                      batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """For B captions and their B * n candidates (caption-major, as
        `sample_image_codes` returns them): (indices [B, keep] into `images`, best
        first; their scores [B, keep])."""
        text = self.prepare_text(text)
        B = text.shape[0]
        if B == 0 or not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] % B:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [B * n, 3, H, W] for {B} captions, got {got}")
        n = images.shape[0] // B
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
            raise ValueError(f"keep must be an integer in [1, {n}] (candidates per caption), got {keep!r}")
        scores = self.score(images, text.repeat_interleave(n, 0), batch_size=batch_size).view(B, n)
        top = torch.sort(scores, dim=1, descending=True, stable=True)
        idx = top.indices[:, :keep] + torch.arange(B).unsqueeze(1) * n
        return idx, top.values[:, :keep]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- files -----------------------------------------------------------------------------------

def save_reranker(path: str | Path, model: ContrastiveReranker, meta: dict | None = None) -> Path:
    """One file {"format", "config" (pinned), "state_dict", "meta"}, written atomically."""
    blob = {"format": RERANKER_FORMAT, "config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": json.loads(json.dumps(meta or {}, default=str))}
    return atomic_torch_save(blob, path)


def read_reranker_file(path: str | Path) -> dict[str, Any]:
    return load_torch_file(path, (RERANKER_FORMAT, CHECKPOINT_FORMAT), "reranker")


def load_reranker(path: str | Path, device: str | torch.device = "cpu") -> ContrastiveReranker:
    """The model saved by `save_reranker` (or a training checkpoint), built with
    the config pinned in the file, in eval mode."""
    blob = read_reranker_file(path)
    config = RerankerConfig.from_dict(blob["config"])
    model = ContrastiveReranker(config)
    state = blob["state_dict"] if "state_dict" in blob else blob["model"]
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        pool = [k for k in bad if k.startswith(("text_encoder.cls", "text_encoder.query", "text_encoder.pool_kv"))]
        why = (f"; the text pooling differs: the config says text_pool={config.text_pool!r}"
               f"{' (a file without text_pool is read as mean pooling)' if 'text_pool' not in blob['config'] else ''}"
               if pool else "")
        raise ValueError(f"{path}: weights do not match the pinned config ({bad[:10]}){why}")
    model.load_state_dict(state)
    return model.to(device).eval()


def autocast_dtype(config: RerankerConfig, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype training uses for `config` on `device`: None for fp32."""
    # bf16 only where it pays (dalle_core.precision.device): elsewhere it is emulated, slower than fp32
    wants = config.amp_dtype in ("bf16", "auto")
    return torch.bfloat16 if wants and fast_low_precision(device) == "bf16" else None


__all__ = [
    "AMP_DTYPES", "CHECKPOINT_FORMAT", "LEGACY_SHAPE", "RERANKER_FORMAT", "TEXT_POOLS", "ContrastiveReranker",
    "ImageEncoder", "RerankerConfig", "TextEncoder", "autocast_dtype", "load_reranker",
    "read_reranker_file", "save_reranker",
]
