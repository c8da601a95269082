"""dVAE configuration: model shape and training hyper-parameters.

Defaults are the paper's (appendix A.2): AdamW (0.9, 0.999, 1e-8), weight decay
1e-4; learning rate 1e-4 -> 1.25e-6 over 1.2M updates; KL weight 0 -> 6.6 over
the first 5k updates; temperature 1 -> 1/16 over the first 150k updates (all
cosine; a linear temperature schedule diverged); EMA decay 0.999; batch 512
(64 GPUs x 8) for 3M updates; the released shape 256x256 -> 32x32, 8192 codes.

A config is pinned inside every checkpoint as a plain dict (`to_dict`), and read
back with `from_dict`, so a checkpoint loads with the shape it was trained with
even if these defaults change later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The fields that determine the parameter layout (a checkpoint is only
# compatible with a config that agrees on all of them).
SHAPE_FIELDS = ("image_size", "group_count", "n_hid", "n_blk_per_group", "n_init",
                "vocab_size", "input_channels")


@dataclass(frozen=True)
class DVAEConfig:
    # --- model shape (the released dall_e Encoder/Decoder) -------------------
    image_size: int = 256
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    n_init: int = 128  # decoder: width of the 1x1 projection of the one-hot codes
    vocab_size: int = 8192
    input_channels: int = 3

    # --- optimiser: AdamW ----------------------------------------------------
    lr: float = 1e-4
    lr_end: float = 1.25e-6
    lr_decay_steps: int = 1_200_000
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4

    # --- ELB schedules (cosine) ----------------------------------------------
    kl_weight_start: float = 0.0
    kl_weight: float = 6.6  # beta at the end of the warm-up
    kl_warmup_steps: int = 5_000
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temp_anneal_steps: int = 150_000

    # --- codebook initialisation (codebook_init.py) --------------------------
    # "random": the paper's init. "kmeans": the logits layer set from k-means
    # centroids of the encoder's features on the first `codebook_init_images`
    # training images (keeps short runs from collapsing to a dozen codes).
    codebook_init: str = "random"
    codebook_init_images: int = 512
    codebook_init_logit_std: float = 5.0
    # weight of KL(average code distribution || uniform), losses.marginal_kl_to_uniform;
    # 0 = the paper's ELB
    marginal_kl_weight: float = 0.0
    # weight of the squared error of the decoded image next to the logit-Laplace
    # (losses.pixel_mse: makes short runs draw object edges); 0 = the paper's ELB
    pixel_mse_weight: float = 0.0

    # --- training-time augmentation (augment.py) -------------------------------
    # The paper's dVAE preprocessing (appendix A, Listing 1): a random crop, zoomed
    # back to image_size (the crop covers 1/zoom of the side, zoom ~ U[9/8, 12/8]),
    # mirrored left-right half of the time. Drawn per image from (seed, step, index
    # in the global batch): resume and any split over ranks crop alike. On in the
    # paper presets; off by default (the demo's profiles train on the images as they are).
    random_crop: bool = False
    random_crop_zoom: tuple[float, float] = (9 / 8, 12 / 8)
    random_crop_flip: bool = True

    # --- EMA of the weights (what is exported and evaluated) -----------------
    ema_decay: float = 0.999

    # --- run -----------------------------------------------------------------
    batch_size: int = 512
    total_steps: int = 3_000_000
    log_every: int = 100
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 2  # training checkpoints kept on disk (newest)
    amp_dtype: str = "bf16"  # on CUDA: "bf16", "fp16" (with GradScaler) or "fp32"
    # bf16 autocast on a CPU too, where it has bf16 matrix instructions (AVX-512 BF16 / AMX:
    # dalle_core.precision.device); off: fp32 on every CPU. A CPU without them stays fp32.
    cpu_bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"2**(group_count-1) = {self.downsample_factor}")
        if self.amp_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"amp_dtype must be 'bf16', 'fp16' or 'fp32', got {self.amp_dtype!r}")
        for name in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.temperature_end <= 0 or self.temperature_start <= 0:
            raise ValueError("temperatures must be > 0")
        lo, hi = self.random_crop_zoom
        if not 1.0 <= lo <= hi:
            raise ValueError(f"random_crop_zoom must be (lo, hi) with 1 <= lo <= hi, got {self.random_crop_zoom}")
        if self.codebook_init not in ("random", "kmeans"):
            raise ValueError(f"codebook_init must be 'random' or 'kmeans', got {self.codebook_init!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / 2**(group_count - 1) (32 for the paper)."""
        return self.image_size // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def shape_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SHAPE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["random_crop_zoom"] = list(self.random_crop_zoom)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DVAEConfig":
        """Build a config from `to_dict` output. Keys this version does not know
        are ignored; keys it lacks take today's defaults, except the shape
        fields, which must all be present (they define the parameter layout)."""
        missing = [k for k in SHAPE_FIELDS if k not in d]
        if missing:
            raise ValueError(f"dVAE config is missing shape fields {missing}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("betas", "random_crop_zoom"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def replace(self, **changes: Any) -> "DVAEConfig":
        return replace(self, **changes)


def _scaled(total_steps: int, **kw: Any) -> dict[str, Any]:
    """Schedules as fractions of the run, with the paper's proportions where they
    make sense for short runs: KL warm-up over the first 10% (the paper's 5k of 3M
    is too short to matter for a few hundred steps), temperature annealed over the
    first 60%, learning rate decayed over the whole run."""
    return dict(total_steps=total_steps,
                kl_warmup_steps=max(1, total_steps // 10),
                temp_anneal_steps=max(1, (6 * total_steps) // 10),
                lr_decay_steps=total_steps, **kw)
