"""Configuration of the transformer prior (paper section 2.2, appendices B.1 and B.2).

Two config objects: `PriorConfig`, the model (shape, masks, loss weights), and
`PriorTrainingConfig`, how it is trained (optimiser, schedule, precision, run).
The sizes of each profile are built in `dalle_core.profiles`. Defaults are the
paper's 12B model and its training:

- shape (12B): 64 layers, 62 heads x 64 = 3968 wide, MLP 4x; one stream of 256
  text tokens (BPE vocab 16384, plus a distinct padding token for each of the
  256 positions) followed by 32 x 32 = 1024 image tokens (dVAE vocab 8192);
  row / column / convolutional (11 x 11) attention masks;
- loss: text and image cross-entropy, each averaged over its tokens, weighted
  1/8 and 7/8;
- optimiser: AdamW (0.9, 0.96, eps 1e-8), weight decay 4.5e-2; learning rate
  warmed up linearly to 4.5e-4 over 5000 updates, then halved on plateau (five
  times in the paper); gradient norm clipped at 4; EMA of the weights with decay
  0.99 (the paper updates it every 25 updates); batch 1024 for 430k updates;
- precision: fp16 with per-resblock gradient scaling (dalle_core.precision).

The model config is pinned inside every checkpoint as a plain dict (`to_dict`) and read
back with `from_dict`, so a checkpoint loads with the shape it was trained with
even if these defaults change later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The fields that determine the parameter layout (a checkpoint is only
# compatible with a config that agrees on all of them).
SHAPE_FIELDS = ("n_layer", "n_head", "d_head", "mlp_ratio", "bias", "text_vocab_size",
                "text_len", "image_vocab_size", "image_grid")

# "dense" (every earlier image position) is not the paper's: a demo-only choice for
# small priors whose sparse receptive field may slow what they learn (docs/benchmarks.md)
ATTENTION_KINDS = ("row", "column", "conv", "dense")
ATTENTION_CHOICES = ("sdpa", "flex", "block", "auto")  # PriorConfig.attention


@dataclass(frozen=True)
class PriorConfig:
    """The prior's model: shape, attention pattern, initialisation and loss weights
    (what `DalleTransformer` needs; pinned inside every checkpoint)."""

    # --- shape ---------------------------------------------------------------
    n_layer: int = 64
    n_head: int = 62
    d_head: int = 64  # n_embd = n_head * d_head (3968 for the 12B model)
    mlp_ratio: int = 4
    bias: bool = True  # biases in the attention / MLP linears (GPT style)
    # BPE vocabulary *without* the padding tokens; the text embedding has
    # text_vocab_size + text_len rows: padding at position p is token
    # text_vocab_size + p (the tokenizer maps pads that way).
    # In a profile these four are derived (dalle_core.profiles): the text sizes from
    # the tokenizer's TextConfig, the grid and image vocabulary from the DVAEConfig.
    text_vocab_size: int = 16384
    text_len: int = 256
    image_vocab_size: int = 8192
    image_grid: int = 32  # side of the dVAE code grid; image_len = image_grid ** 2
    conv_kernel: int = 11  # side of the causal convolutional attention kernel (last layer)
    conv_wraparound: bool = True  # the paper's conv mask wraps around rows like the row mask
    # Optional override of the per-layer attention kinds ("row" / "column" /
    # "conv"); None = the paper's pattern (masks.layer_attention_kind).
    attention_kinds: tuple[str, ...] | None = None
    dropout: float = 0.0
    init_std: float = 0.02
    # How attention is computed (not what: all give the same outputs, tested):
    # "sdpa" = scaled_dot_product_attention with the boolean mask (computes every
    # score); "flex" = FlexAttention with a block mask built from the same tensor,
    # skipping fully masked 128 x 128 tiles (dalle_core.prior.flex; needs a GPU to
    # train: no CPU backward in torch 2.13); "block" = block-sparse attention over
    # the keys each block of two image rows (columns) may see, written out in
    # matmuls (dalle_core.prior.block_sparse; the CPU path); "auto" = flex on CUDA,
    # block elsewhere (docs/benchmarks.md).
    # Left out of `to_dict` while "sdpa", so checkpoints and run-folder digests
    # written before the field existed are unchanged; old dicts load as "sdpa".
    attention: str = "sdpa"

    # --- loss ------------------------------------------------------------------
    text_loss_weight: float = 1 / 8
    image_loss_weight: float = 7 / 8

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_head", "mlp_ratio", "text_vocab_size", "text_len",
                     "image_vocab_size", "image_grid", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_kernel % 2 != 1:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_kinds is not None:
            kinds = tuple(self.attention_kinds)
            if len(kinds) != self.n_layer:
                raise ValueError(f"attention_kinds has {len(kinds)} entries for {self.n_layer} layers")
            bad = [k for k in kinds if k not in ATTENTION_KINDS]
            if bad:
                raise ValueError(f"unknown attention kinds {bad}: choose from {ATTENTION_KINDS}")
            object.__setattr__(self, "attention_kinds", kinds)
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.attention == "flex" and self.dropout > 0:
            raise ValueError("attention='flex' has no attention dropout: use 'sdpa' or 'auto' with dropout > 0")

    # --- derived sizes ---------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self.n_head * self.d_head

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        """Length of the one stream the transformer sees: text_len + image_len."""
        return self.text_len + self.image_len

    @property
    def text_embedding_size(self) -> int:
        """Rows of the text embedding (and classes of the text logits): the BPE
        vocabulary plus one padding token per text position."""
        return self.text_vocab_size + self.text_len

    @property
    def n_resblocks(self) -> int:
        """Two resblocks (attention, MLP) per layer: 128 for the 12B model."""
        return 2 * self.n_layer

    def layer_kinds(self) -> tuple[str, ...]:
        from .masks import layer_attention_kind

        if self.attention_kinds is not None:
            return tuple(self.attention_kinds)
        return tuple(layer_attention_kind(i, self.n_layer) for i in range(self.n_layer))

    # --- serialisation -------------------------------------------------------------
    def shape_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SHAPE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.attention_kinds is not None:
            d["attention_kinds"] = list(self.attention_kinds)
        if d["attention"] == "sdpa":  # the default is implied (see the field's comment)
            del d["attention"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PriorConfig":
        """Build a config from `to_dict` output. Keys this version does not know
        are ignored (checkpoints written before the training settings moved to
        `PriorTrainingConfig` carry them too); keys it lacks take today's
        defaults, except the shape fields, which must all be present (they
        define the parameter layout)."""
        missing = [k for k in SHAPE_FIELDS if k not in d]
        if missing:
            raise ValueError(f"prior config is missing shape fields {missing}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("attention_kinds") is not None:
            kw["attention_kinds"] = tuple(kw["attention_kinds"])
        return cls(**kw)

    def replace(self, **changes: Any) -> "PriorConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class SamplingConfig:
    """How the platform samples the prior for its samples and its zero-shot evaluation
    (a profile's `sampling` stage). The paper draws at temperature 1 from the full
    distribution and leaves the choice to the reranker (512 draws -> 1); a profile
    with few draws per caption may sharpen them (`medium`: measured there)."""

    temperature: float = 1.0
    top_k: int | None = None  # keep only the k most likely codes at each position (None: all)
    # Draws per caption the zero-shot evaluation's reranker chooses among. The paper reranks 512
    # ("gains level off past 32"; the paper profiles take 512); 8, what the laptop profiles drew
    # in the first runs, is the default (sampling is most of their evaluation's time); small
    # draws 16, medium 32 (profiles.py says what each bought).
    # Not part of key(): the evaluation's fingerprint and its chunks' keys hold it already.
    candidates: int = 8
    # Classifier-free guidance (dalle_core.prior.sampling; not the paper's, which is 1: no
    # guidance): draws from uncond + s * (cond - uncond) of the logits. Needs a prior trained
    # with PriorTrainingConfig.caption_dropout > 0 (a profile checks it); costs two streams a
    # row when sampling.
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 <= self.guidance_scale < float("inf"):
            raise ValueError(f"sampling guidance_scale must be a finite number >= 0 (1: none), got {self.guidance_scale}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling top_k must be >= 1 or None, got {self.top_k}")
        if not (isinstance(self.candidates, int) and self.candidates >= 1):
            raise ValueError(f"sampling candidates must be an integer >= 1, got {self.candidates!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "SamplingConfig":
        return replace(self, **changes)

    def key(self) -> dict[str, Any]:
        """The settings that differ from the paper's (temperature 1, no top-k, no guidance): what a cache
        key or an evaluation fingerprint adds, so that keys made at the paper's settings
        before this config existed stay valid. `candidates` is not one: every key that
        depends on it names it already."""
        return {k: v for k, v in asdict(self).items() if k != "candidates" and v != getattr(SamplingConfig, k)}


@dataclass(frozen=True)
class PriorTrainingConfig:
    """How the prior is trained: optimiser, learning-rate schedule, EMA, precision,
    PowerSGD variant, BPE dropout of the captions and the run's length (what
    `dalle_core.prior.train.train_prior` needs next to the model's `PriorConfig`)."""

    # BPE dropout of the training captions (paper: 10%), applied when a batch is
    # made (dalle_core.prior.data.code_batches), seeded per step and position;
    # evaluation and sampling never use it. In a profile: the tokenizer's TextConfig.bpe_dropout.
    bpe_dropout: float = 0.1
    # Not the paper's (0 = off): the share of training samples whose caption is replaced by
    # the empty one (every position its pad token), so that the prior also learns p(image)
    # and the sampler can guide with it (classifier-free guidance, Ho & Salimans 2022, as
    # Make-A-Scene did for an autoregressive prior: SamplingConfig.guidance_scale). Seeded
    # per step and position like the BPE dropout (dalle_core.prior.data). Left out of
    # `to_dict` while 0, so digests of runs without it are unchanged.
    caption_dropout: float = 0.0

    # --- optimiser: AdamW --------------------------------------------------------
    lr: float = 4.5e-4
    warmup_steps: int = 5000
    lr_plateau_factor: float = 0.5  # "halved on plateau"
    lr_max_decays: int = 5  # the paper halved the learning rate five times
    # The plateau detector (dalle_core.prior.lr_schedule; figures: tests/test_lr_schedule.py):
    # block medians of `window` updates, a line fitted against ln(step) over the last
    # max(window, lookback * step) updates since the last decay; a plateau when the
    # relative improvement it predicts over that span, plus noise_z standard errors, is
    # below `threshold`; a decay after `patience` plateau checks in a row, at least
    # `min_gap` updates after the previous one. 0.0003 over the last 15% of the run is
    # 0.185% per e-fold of updates; a healthy large run still gains >= 0.3% per e-fold.
    lr_plateau_window: int = 1000
    lr_plateau_lookback: float = 0.15
    lr_plateau_threshold: float = 0.0003
    lr_plateau_noise_z: float = 2.0
    lr_plateau_patience: int = 5
    lr_plateau_min_gap: int = 20_000
    # Not the paper's (0 = off, its schedule): over the last `lr_cooldown_steps` updates of
    # the run (`total_steps`) the rate falls linearly to 0, for short runs that end before
    # the loss plateaus (the demo profiles; figures where a profile sets it). Left out of
    # `to_dict` while 0, so digests of runs without it are unchanged.
    lr_cooldown_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = 1e-8
    weight_decay: float = 4.5e-2
    # Not the paper's ("adamw" = AdamW on every parameter, its choice): "muon" = Muon on the
    # resblocks' weight matrices, AdamW (the settings above) on the rest
    # (dalle_core/muon.py; the laptop profiles, where the prior has ~1,000 updates and a
    # held-out draw matched ~3x as often at 900 of them: docs/benchmarks.md). The matrices'
    # rate is lr x muon_lr_ratio (scaled to AdamW's update size per matrix). Both are left out
    # of `to_dict` while optimizer is "adamw", so digests of runs without Muon are unchanged.
    optimizer: str = "adamw"
    muon_lr_ratio: float = 1.0
    grad_clip: float = 4.0  # gradient norm clip (the paper: during warm-up)
    ema_decay: float = 0.99
    ema_every: int = 25

    # --- precision -----------------------------------------------------------------
    # "fp16" (with per-resblock gradient scaling: the paper's), "bf16", "fp32", or "auto":
    # what pays on the device (dalle_core.precision.device: bf16 on CPUs with AVX-512 BF16)
    amp_dtype: str = "fp16"
    per_resblock_grad_scaling: bool = True  # only used with fp16
    # PowerSGD across machines (dalle_core.distributed): "paper" = appendix E (a
    # Gaussian Q fixed at the start, no warm start, Householder of P + eps I,
    # embeddings / heads / gains / biases uncompressed); "torch" = torch's
    # powerSGD_hook (warm start, Gram-Schmidt). Rank etc.: ParallelConfig.
    powersgd_variant: str = "paper"

    # --- run -------------------------------------------------------------------------
    batch_size: int = 1024
    total_steps: int = 430_000
    log_every: int = 100
    checkpoint_every: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "total_steps", "ema_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PriorTrainingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {self.bpe_dropout}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.amp_dtype not in ("fp16", "bf16", "fp32", "auto"):
            raise ValueError(f"amp_dtype must be 'fp16', 'bf16', 'fp32' or 'auto', got {self.amp_dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' (the paper's) or 'muon', got {self.optimizer!r}")
        if not self.muon_lr_ratio > 0:
            raise ValueError(f"muon_lr_ratio must be > 0, got {self.muon_lr_ratio}")
        if self.powersgd_variant not in ("paper", "torch"):
            raise ValueError(f"powersgd_variant must be 'paper' or 'torch', got {self.powersgd_variant!r}")
        if not 0 <= self.lr_cooldown_steps <= self.total_steps:
            raise ValueError(f"lr_cooldown_steps must be in [0, total_steps={self.total_steps}], "
                             f"got {self.lr_cooldown_steps}")
        object.__setattr__(self, "betas", tuple(self.betas))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        for implied in ("lr_cooldown_steps", "caption_dropout"):  # off: implied (see the fields' comments)
            if d[implied] == 0:
                del d[implied]
        if d["optimizer"] == "adamw":  # the paper's: implied (see the field's comment)
            del d["optimizer"], d["muon_lr_ratio"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PriorTrainingConfig":
        """From `to_dict` output (or an old flat PriorConfig dict): unknown keys
        are ignored, missing ones take today's defaults."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    def replace(self, **changes: Any) -> "PriorTrainingConfig":
        return replace(self, **changes)


def count_parameters(config: PriorConfig) -> int:
    """Analytic parameter count of `DalleTransformer(config)`.

    embeddings: text (V_t + L) d, start-of-stream vector d, text positions L d,
                image V_i d, image rows and columns 2 g d
    per layer:  attention resblock  LN 2d + qkv 3d^2 (+3d) + proj d^2 (+d)
                MLP resblock        LN 2d + fc r d^2 (+r d) + proj r d^2 (+d)
    final LN 2d; heads (no bias): text d (V_t + L), image d V_i.
    """
    d, r, L, g = config.n_embd, config.mlp_ratio, config.text_len, config.image_grid
    b = 1 if config.bias else 0
    emb = (config.text_vocab_size + L) * d + d + L * d + config.image_vocab_size * d + 2 * g * d
    attn = 2 * d + 3 * d * d + 3 * d * b + d * d + d * b
    mlp = 2 * d + r * d * d + r * d * b + r * d * d + d * b
    heads = d * (config.text_vocab_size + L) + d * config.image_vocab_size
    return emb + config.n_layer * (attn + mlp) + 2 * d + heads
