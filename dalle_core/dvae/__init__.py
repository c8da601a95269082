"""The discrete VAE (paper section 2.1): 256x256 images <-> 32x32 grids of 8192 codes.

A plain torch library (no dagster / mlflow): the released `dall_e` layout
(model.py, which also saves and loads the weights file with its config pinned), the ELB objective (losses.py), cosine schedules (schedules.py), the
training loop with resumable checkpoints (train.py) and the converter for the
published weights (convert.py).
"""

from .config import SHAPE_FIELDS, DVAEConfig
from .convert import convert_released_state_dict, load_released_dvae
from .losses import code_stats, elb_loss, gumbel_softmax_relaxation, kl_to_uniform, logit_laplace_nll
from .model import (
    Conv2d,
    Decoder,
    DecoderBlock,
    Encoder,
    EncoderBlock,
    build_dvae,
    decode_codes,
    encode_to_codes,
    load_dvae,
    logit_laplace_eps,
    map_pixels,
    save_dvae,
    unmap_pixels,
    validate_images,
)
from .schedules import cosine_schedule, kl_weight_at, lr_at, temperature_at
from .train import TrainResult, train_dvae

__all__ = [
    "DVAEConfig", "SHAPE_FIELDS",
    "Conv2d", "EncoderBlock", "DecoderBlock", "Encoder", "Decoder", "build_dvae",
    "map_pixels", "unmap_pixels", "logit_laplace_eps", "validate_images",
    "encode_to_codes", "decode_codes", "save_dvae", "load_dvae",
    "logit_laplace_nll", "kl_to_uniform", "gumbel_softmax_relaxation", "elb_loss", "code_stats",
    "cosine_schedule", "temperature_at", "kl_weight_at", "lr_at",
    "train_dvae", "TrainResult",
    "convert_released_state_dict", "load_released_dvae",
]
