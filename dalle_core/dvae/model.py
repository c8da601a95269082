"""The discrete VAE (paper section 2.1, appendix A): encoder and decoder.

The module tree and parameter names are exactly those of OpenAI's released
`dall_e` package (dall_e/encoder.py, decoder.py, utils.py), so the published
`encoder.pkl` / `decoder.pkl` weights load into these classes name for name
(see `convert.py`). The released models are

    Encoder(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)
    Decoder(group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192)

mapping a 256x256 RGB image to a 32x32 grid of logits over 8192 codes and back.
Here `group_count` is configurable (the release fixes it at 4): every group but
the last halves (encoder) or doubles (decoder) the resolution, so the grid side is
image_size / 2**(group_count - 1), and group g is 2**(g-1) * n_hid channels wide
in the encoder (2**(group_count-g) * n_hid in the decoder), as in the release.

Read top to bottom: Conv2d -> blocks -> Encoder -> Decoder -> pixel mapping ->
encode_to_codes / decode_codes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_core.io import atomic_torch_save, load_torch_file

from .config import DVAEConfig

# Pixels are squeezed into [eps, 1 - eps] before the logit-Laplace likelihood is
# evaluated, so that logit(x) stays finite (paper appendix A.3; dall_e/utils.py).
logit_laplace_eps: float = 0.1


# -----------------------------------------------------------------------------
# Conv2d with parameters `w` and `b`, "same" padding (dall_e/utils.py)


class Conv2d(nn.Module):
    """A square-kernel convolution with the released parameter names `w`, `b`.

    Weights are N(0, 1/fan_in), biases zero, as in dall_e. With `use_float16`
    on a CUDA device the convolution runs in fp16 (the released behaviour);
    layers built with `use_float16=False` (the encoder's logits, the decoder's
    one-hot input) always run in fp32, even inside `torch.autocast`.
    """

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True,
                 device: torch.device | str | None = None, requires_grad: bool = False):
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"Conv2d needs n_in >= 1 and n_out >= 1, got {n_in}, {n_out}")
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"Conv2d kernel width must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.requires_grad = requires_grad

        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=self.device)
        w.normal_(std=1 / ((n_in * kw**2) ** (1 / 2)))
        b = torch.zeros((n_out,), dtype=torch.float32, device=self.device)
        self.w = nn.Parameter(w, requires_grad=requires_grad)
        self.b = nn.Parameter(b, requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kw - 1) // 2
        dev = self.w.device.type
        on_cuda = dev == "cuda"
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            # Under autocast the trainer picks the precision (bf16, or fp16 with a
            # GradScaler on GPUs; bf16 on CPUs that have it); layers marked fp32 in
            # the release are kept fp32.
            if self.use_float16:
                return F.conv2d(x, self.w, self.b, padding=pad)
            with torch.autocast(dev, enabled=False):
                return F.conv2d(x.float(), self.w, self.b, padding=pad)
        if self.use_float16 and on_cuda:
            # The released inference path: fp16 activations and weights on GPU.
            if x.dtype != torch.float16:
                x = x.half()
            w, b = self.w.half(), self.b.half()
        else:
            if x.dtype != torch.float32:
                x = x.float()
            w, b = self.w, self.b
        return F.conv2d(x, w, b, padding=pad)


# -----------------------------------------------------------------------------
# Bottleneck residual blocks: x + post_gain * res_path(x)
# post_gain = 1 / n_layers**2 keeps the residual stream stable at init
# (n_layers = group_count * n_blk_per_group, the total number of blocks).


def _check_block_args(n_in: int, n_out: int, n_layers: int) -> None:
    if n_in < 1:
        raise ValueError(f"block n_in must be >= 1, got {n_in}")
    if n_out < 4 or n_out % 4 != 0:
        raise ValueError(f"block n_out must be a positive multiple of 4, got {n_out}")
    if n_layers < 1:
        raise ValueError(f"block n_layers must be >= 1, got {n_layers}")


class EncoderBlock(nn.Module):
    """3x3 -> 3x3 -> 3x3 -> 1x1 bottleneck (width n_out / 4), pre-activation ReLU."""

    def __init__(self, n_in: int, n_out: int, n_layers: int,
                 device: torch.device | str | None = None, requires_grad: bool = False,
                 use_float16: bool = True):
        super().__init__()
        _check_block_args(n_in, n_out, n_layers)
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)

        def conv(a: int, b: int, k: int) -> Conv2d:
            return Conv2d(a, b, k, use_float16=use_float16, device=device, requires_grad=requires_grad)

        # a 1x1 projection only where the width changes (first block of a group)
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", conv(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()),
            ("conv_2", conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()),
            ("conv_3", conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", conv(self.n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """1x1 -> 3x3 -> 3x3 -> 3x3 bottleneck (width n_out / 4), pre-activation ReLU."""

    def __init__(self, n_in: int, n_out: int, n_layers: int,
                 device: torch.device | str | None = None, requires_grad: bool = False,
                 use_float16: bool = True):
        super().__init__()
        _check_block_args(n_in, n_out, n_layers)
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)

        def conv(a: int, b: int, k: int) -> Conv2d:
            return Conv2d(a, b, k, use_float16=use_float16, device=device, requires_grad=requires_grad)

        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", conv(n_in, self.n_hid, 1)),
            ("relu_2", nn.ReLU()),
            ("conv_2", conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()),
            ("conv_3", conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", conv(self.n_hid, n_out, 3)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _check_shape_args(group_count: int, n_hid: int, n_blk_per_group: int, channels: int,
                      vocab_size: int) -> None:
    # The release asks n_hid >= 64 and vocab_size >= 512; the small profiles go
    # below that, so only what the layout itself needs is checked here.
    if group_count < 1:
        raise ValueError(f"group_count must be >= 1, got {group_count}")
    if n_hid < 4 or n_hid % 4 != 0:
        raise ValueError(f"n_hid must be a positive multiple of 4, got {n_hid}")
    if n_blk_per_group < 1:
        raise ValueError(f"n_blk_per_group must be >= 1, got {n_blk_per_group}")
    if channels < 1:
        raise ValueError(f"image channels must be >= 1, got {channels}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")


# -----------------------------------------------------------------------------
# Encoder: image [B, C, H, W] (mapped pixels) -> logits [B, vocab, H/2^(G-1), W/2^(G-1)]


class Encoder(nn.Module):
    group_count: int = 4  # a class attribute in the release too (not pickled per instance)

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192,
                 device: torch.device | str | None = None, requires_grad: bool = False,
                 use_mixed_precision: bool = True):
        super().__init__()
        _check_shape_args(group_count, n_hid, n_blk_per_group, input_channels, vocab_size)
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.requires_grad = requires_grad
        # use_mixed_precision=False builds every conv with use_float16=False (fp32 on GPU)
        self.use_mixed_precision = use_mixed_precision

        n_layers = group_count * n_blk_per_group
        f16 = use_mixed_precision

        def conv(a: int, b: int, k: int, use_float16: bool = f16) -> Conv2d:
            return Conv2d(a, b, k, use_float16=use_float16, device=device, requires_grad=requires_grad)

        def blk(a: int, b: int) -> EncoderBlock:
            return EncoderBlock(a, b, n_layers, device=device, requires_grad=requires_grad, use_float16=f16)

        layers: list[tuple[str, nn.Module]] = [("input", conv(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(1, group_count + 1):
            out = 2 ** (g - 1) * n_hid  # 1x, 2x, 4x, 8x n_hid for the release
            group = [(f"block_{i + 1}", blk(width if i == 0 else out, out)) for i in range(n_blk_per_group)]
            if g < group_count:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        # the logits stay fp32 (use_float16=False), as in the release
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", conv(width, vocab_size, 1, use_float16=False)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.shape) != 4:
            raise ValueError(f"encoder input shape {tuple(x.shape)} is not 4d [B, C, H, W]")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"encoder input has {x.shape[1]} channels but model built for {self.input_channels}")
        if x.dtype != torch.float32:
            raise ValueError(f"encoder input must have dtype torch.float32, got {x.dtype}")
        return self.blocks(x)


# -----------------------------------------------------------------------------
# Decoder: (relaxed) one-hot codes [B, vocab, h, w] -> [B, 2*C, H, W]
# channels [:C] are the logit-Laplace mu, [C:] its log-scale ln(b).


class Decoder(nn.Module):
    group_count: int = 4

    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256,
                 n_blk_per_group: int = 2, output_channels: int = 3, vocab_size: int = 8192,
                 device: torch.device | str | None = None, requires_grad: bool = False,
                 use_mixed_precision: bool = True):
        super().__init__()
        _check_shape_args(group_count, n_hid, n_blk_per_group, output_channels, vocab_size)
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        self.group_count = group_count
        self.n_init = n_init
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.output_channels = output_channels
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.requires_grad = requires_grad
        self.use_mixed_precision = use_mixed_precision

        n_layers = group_count * n_blk_per_group
        f16 = use_mixed_precision

        def conv(a: int, b: int, k: int, use_float16: bool = f16) -> Conv2d:
            return Conv2d(a, b, k, use_float16=use_float16, device=device, requires_grad=requires_grad)

        def blk(a: int, b: int) -> DecoderBlock:
            return DecoderBlock(a, b, n_layers, device=device, requires_grad=requires_grad, use_float16=f16)

        # the one-hot input projection stays fp32 (use_float16=False), as in the release
        layers: list[tuple[str, nn.Module]] = [("input", conv(vocab_size, n_init, 1, use_float16=False))]
        width = n_init
        for g in range(1, group_count + 1):
            out = 2 ** (group_count - g) * n_hid  # 8x, 4x, 2x, 1x n_hid for the release
            group = [(f"block_{i + 1}", blk(width if i == 0 else out, out)) for i in range(n_blk_per_group)]
            if g < group_count:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", conv(width, 2 * output_channels, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.shape) != 4:
            raise ValueError(f"decoder input shape {tuple(x.shape)} is not 4d [B, vocab, h, w]")
        if x.shape[1] != self.vocab_size:
            raise ValueError(f"decoder input has {x.shape[1]} channels but model built for {self.vocab_size}")
        if x.dtype != torch.float32:
            raise ValueError(f"decoder input must have dtype torch.float32, got {x.dtype}")
        return self.blocks(x)


# -----------------------------------------------------------------------------
# Pixel mapping (dall_e/utils.py): [0, 1] <-> [eps, 1 - eps]


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    if len(x.shape) != 4:
        raise ValueError("map_pixels expects a 4d tensor [B, C, H, W]")
    if x.dtype != torch.float:
        raise ValueError(f"map_pixels expects dtype torch.float32, got {x.dtype}")
    return (1 - 2 * logit_laplace_eps) * x + logit_laplace_eps


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    if len(x.shape) != 4:
        raise ValueError("unmap_pixels expects a 4d tensor [B, C, H, W]")
    if x.dtype != torch.float:
        raise ValueError(f"unmap_pixels expects dtype torch.float32, got {x.dtype}")
    return torch.clamp((x - logit_laplace_eps) / (1 - 2 * logit_laplace_eps), 0, 1)


# -----------------------------------------------------------------------------
# Input checks shared by the trainer and the tokenizer helpers below


def validate_images(images: torch.Tensor, image_size: int | None = None, channels: int = 3,
                    what: str = "images") -> None:
    """Raise a ValueError naming the problem unless `images` is a float32
    [B, channels, image_size, image_size] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{what}: expected a 4d tensor [B, {channels}, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        hint = " (grayscale? convert to RGB first)" if images.shape[1] == 1 and channels == 3 else ""
        hint = hint or (" (channels-last? use .permute(0, 3, 1, 2))" if images.shape[-1] == channels else "")
        raise ValueError(f"{what}: expected {channels} channels, got {images.shape[1]} "
                         f"in shape {tuple(images.shape)}{hint}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(f"{what}: expected {image_size}x{image_size} images, got "
                         f"{images.shape[2]}x{images.shape[3]} (resize/crop them first)")
    if images.dtype != torch.float32:
        hint = " (uint8 pixels? use images.float() / 255)" if images.dtype == torch.uint8 else ""
        raise ValueError(f"{what}: expected dtype torch.float32, got {images.dtype}{hint}")
    if images.numel() and images.device.type != "meta":
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            hint = " (0..255 pixels? divide by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0.0 else ""
            raise ValueError(f"{what}: values must lie in [0, 1], got min {lo:.4g} max {hi:.4g}{hint}")


# -----------------------------------------------------------------------------
# Image tokens for the prior, and back


@torch.no_grad()
def encode_to_codes(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Images float [B, C, H, W] in [0, 1] -> codes LongTensor [B, H', W'].

    The paper's image tokens: the argmax of the encoder logits, no gumbel noise.
    """
    validate_images(images, channels=encoder.input_channels)
    factor = 2 ** (encoder.group_count - 1)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"images: height and width must be multiples of {factor} for "
                         f"group_count={encoder.group_count}, got {images.shape[2]}x{images.shape[3]}")
    images = images.to(encoder.blocks.input.w.device)
    logits = encoder(map_pixels(images))
    return torch.argmax(logits, dim=1).long()


@torch.no_grad()
def decode_codes(decoder: Decoder, codes: torch.Tensor) -> torch.Tensor:
    """Codes LongTensor [B, h, w] in [0, vocab) -> images float32 [B, C, H, W] in [0, 1].

    As in dall_e's usage notebook: one-hot -> decoder -> sigmoid(mu) -> unmap_pixels.
    """
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes: expected a 3d tensor [B, h, w], got {shape}")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= decoder.vocab_size):
        raise ValueError(f"codes: values must lie in [0, {decoder.vocab_size}), "
                         f"got min {int(codes.min())} max {int(codes.max())}")
    codes = codes.long().to(decoder.blocks.input.w.device)
    z = F.one_hot(codes, num_classes=decoder.vocab_size).permute(0, 3, 1, 2).float()
    stats = decoder(z).float()
    mu = stats[:, : decoder.output_channels]
    return unmap_pixels(torch.sigmoid(mu))


def build_dvae(config, device: torch.device | str | None = None, requires_grad: bool = False,
               use_mixed_precision: bool = True) -> tuple[Encoder, Decoder]:
    """Encoder and Decoder with the shape of a `DVAEConfig`."""
    common = dict(group_count=config.group_count, n_hid=config.n_hid,
                  n_blk_per_group=config.n_blk_per_group, vocab_size=config.vocab_size,
                  device=device, requires_grad=requires_grad, use_mixed_precision=use_mixed_precision)
    enc = Encoder(input_channels=config.input_channels, **common)
    dec = Decoder(n_init=config.n_init, output_channels=config.input_channels, **common)
    return enc, dec


# -----------------------------------------------------------------------------
# Model files: weights + the pinned config

MODEL_FORMAT = "dalle-dvae/1"
CHECKPOINT_FORMAT = "dalle-dvae-train/1"  # a training checkpoint (train.py); load_dvae reads its EMA weights


def save_dvae(path: str | Path, encoder: Encoder, decoder: Decoder, config: DVAEConfig) -> Path:
    """Write encoder + decoder weights with the config pinned in the file (atomically)."""
    obj = {
        "format": MODEL_FORMAT,
        "config": config.to_dict(),
        "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "decoder": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
    }
    return atomic_torch_save(obj, path)


def _load_state(module: nn.Module, state: dict, what: str, path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: {what} weights do not match its pinned config: "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatches {shapes[:10]}")
    module.load_state_dict(state)


def load_dvae(path: str | Path, device: torch.device | str = "cpu",
              requires_grad: bool = False) -> tuple[Encoder, Decoder, DVAEConfig]:
    """Read a `save_dvae` file (or a training checkpoint: its EMA weights).

    The model is built from the config pinned in the file, not from today's
    defaults. Only tensors and plain containers are unpickled (weights_only)."""
    path = Path(path)
    obj = load_torch_file(path, (MODEL_FORMAT, CHECKPOINT_FORMAT), "dVAE")
    config = DVAEConfig.from_dict(obj["config"])
    enc, dec = build_dvae(config, requires_grad=requires_grad)
    if obj["format"] == CHECKPOINT_FORMAT:
        enc_sd, dec_sd = obj["ema_encoder"], obj["ema_decoder"]
    else:
        enc_sd, dec_sd = obj["encoder"], obj["decoder"]
    _load_state(enc, enc_sd, "encoder", path)
    _load_state(dec, dec_sd, "decoder", path)
    return enc.to(device), dec.to(device), config
