"""Load OpenAI's released dVAE weights (`encoder.pkl`, `decoder.pkl`) into our classes.

The released files are whole pickled modules of the `dall_e` package (classes
`dall_e.encoder.Encoder`, `dall_e.decoder.Decoder`, `dall_e.utils.Conv2d`, ...),
written with `torch.save(module)`. Unpickling them needs those import paths
and `torch.load(weights_only=False)`. `load_released_dvae` registers a stub
`dall_e` package in `sys.modules` for the duration of the load, mapping those
names to our classes (which have the same attributes and parameter names), then
copies the weights into freshly built modules through
`convert_released_state_dict`, which checks every name and shape. The `dall_e`
package itself is never imported or needed.

SECURITY: unpickling runs code chosen by whoever wrote the file. Use
`load_released_dvae` only on files you trust (the official downloads, checked
against a known hash); afterwards keep the result with `save_dvae`, which
stores plain tensors that load with `weights_only=True`.
"""

from __future__ import annotations

import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Mapping

import torch

from . import model as _model
from .config import DVAEConfig
from .model import Conv2d, Decoder, DecoderBlock, Encoder, EncoderBlock

Kind = Literal["encoder", "decoder"]

# the released architecture (the paper's dVAE)
RELEASED_SHAPE = dict(group_count=4, n_hid=256, n_blk_per_group=2, n_init=128, vocab_size=8192,
                      input_channels=3)


# -----------------------------------------------------------------------------
# Names and shapes


def _infer_kind(sd: Mapping[str, torch.Tensor]) -> Kind:
    w = sd.get("blocks.input.w")
    if w is None or w.dim() != 4:
        raise ValueError("not a dall_e Encoder/Decoder state dict: no 4d 'blocks.input.w' "
                         f"(keys start with {sorted(sd)[:5]})")
    # encoder input: 7x7 conv on pixels; decoder input: 1x1 conv on one-hot codes
    if w.shape[-1] == 7:
        return "encoder"
    if w.shape[-1] == 1:
        return "decoder"
    raise ValueError(f"cannot tell encoder from decoder: 'blocks.input.w' has shape {tuple(w.shape)}")


def infer_shape(sd: Mapping[str, torch.Tensor], kind: Kind | None = None) -> dict[str, int]:
    """Read the model shape (group_count, n_hid, ...) off a dall_e-layout state dict."""
    kind = kind or _infer_kind(sd)
    groups = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not groups or not blocks or "blocks.output.conv.w" not in sd:
        raise ValueError(f"not a dall_e {kind} state dict: missing groups, blocks or 'blocks.output.conv.w'")
    w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
    shape = dict(group_count=max(groups), n_blk_per_group=max(blocks))
    if kind == "encoder":
        shape.update(n_hid=w_in.shape[0], input_channels=w_in.shape[1], vocab_size=w_out.shape[0])
    else:
        shape.update(n_init=w_in.shape[0], vocab_size=w_in.shape[1], n_hid=w_out.shape[1],
                     input_channels=w_out.shape[0] // 2)
    return {k: int(v) for k, v in shape.items()}


def _reference_module(kind: Kind, shape: Mapping[str, int]) -> torch.nn.Module:
    common = dict(group_count=shape["group_count"], n_hid=shape["n_hid"],
                  n_blk_per_group=shape["n_blk_per_group"], vocab_size=shape["vocab_size"],
                  device="meta")  # names and shapes only, no memory
    if kind == "encoder":
        return Encoder(input_channels=shape["input_channels"], **common)
    return Decoder(n_init=shape.get("n_init", 128), output_channels=shape["input_channels"], **common)


def convert_released_state_dict(state_dict: Mapping[str, torch.Tensor], kind: Kind | None = None,
                                config: DVAEConfig | None = None) -> dict[str, torch.Tensor]:
    """A released dall_e Encoder/Decoder state dict -> ours.

    The names are identical by construction; this checks them. `kind` is
    inferred when not given (the encoder's input conv is 7x7, the decoder's
    1x1). The expected layout is that of `config` when given, else the shape
    read off the weights. Raises ValueError listing missing keys, unexpected
    keys and shape mismatches. Tensors come back as contiguous fp32 on the CPU.
    """
    sd = {k: v for k, v in state_dict.items()}
    kind = kind or _infer_kind(sd)
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    shape = config.shape_dict() if config is not None else infer_shape(sd, kind)
    expected = {k: tuple(v.shape) for k, v in _reference_module(kind, shape).state_dict().items()}

    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: got {tuple(sd[k].shape)}, expected {expected[k]}"
                  for k in sorted(expected) if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        lines = [f"released {kind} weights do not match the {kind} layout {shape}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
        raise ValueError("\n".join(lines))
    return {k: sd[k].detach().to("cpu", torch.float32).contiguous() for k in expected}


# -----------------------------------------------------------------------------
# Unpickling the released modules


@contextmanager
def released_module_aliases() -> Iterator[None]:
    """Temporarily make `dall_e`, `dall_e.encoder`, `dall_e.decoder`,
    `dall_e.utils` importable, resolving to our classes (restores sys.modules after)."""
    stubs = {
        "dall_e": dict(Encoder=Encoder, Decoder=Decoder, map_pixels=_model.map_pixels,
                       unmap_pixels=_model.unmap_pixels),
        "dall_e.encoder": dict(Encoder=Encoder, EncoderBlock=EncoderBlock, Conv2d=Conv2d),
        "dall_e.decoder": dict(Decoder=Decoder, DecoderBlock=DecoderBlock, Conv2d=Conv2d),
        "dall_e.utils": dict(Conv2d=Conv2d, map_pixels=_model.map_pixels,
                             unmap_pixels=_model.unmap_pixels,
                             logit_laplace_eps=_model.logit_laplace_eps),
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name, attrs in stubs.items():
            mod = types.ModuleType(name, "stub of OpenAI's dall_e package, mapped to dalle_core.dvae.model")
            mod.__dict__.update(attrs)
            if name == "dall_e":
                mod.__path__ = []  # a package, so `dall_e.encoder` resolves
            sys.modules[name] = mod
        sys.modules["dall_e"].encoder = sys.modules["dall_e.encoder"]
        sys.modules["dall_e"].decoder = sys.modules["dall_e.decoder"]
        sys.modules["dall_e"].utils = sys.modules["dall_e.utils"]
        yield
    finally:
        for name, prev in saved.items():
            if prev is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = prev


def _collect_tensors(obj: object) -> dict[str, torch.Tensor]:
    """Parameters of an unpickled module by walking its `_parameters` / `_modules`
    dicts directly (a module pickled by an old torch may lack attributes that
    today's `state_dict()` expects). A plain state dict is returned as is."""
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict", obj)
        return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    out: dict[str, torch.Tensor] = {}

    def walk(m: object, prefix: str) -> None:
        d = getattr(m, "__dict__", {})
        for name, p in (d.get("_parameters") or {}).items():
            if p is not None:
                out[prefix + name] = p.detach()
        for name, b in (d.get("_buffers") or {}).items():
            if b is not None:
                out[prefix + name] = b.detach()
        for name, sub in (d.get("_modules") or {}).items():
            if sub is not None:
                walk(sub, prefix + name + ".")

    walk(obj, "")
    if not out:
        raise ValueError(f"unpickled object of type {type(obj).__name__} holds no parameters")
    return out


def load_released_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one released .pkl (TRUSTED files only: this unpickles)."""
    path = Path(path)
    with released_module_aliases():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: could not unpickle as a dall_e module ({type(e).__name__}: {e})") from e
    return _collect_tensors(obj)


def load_released_dvae(encoder_pkl: str | Path, decoder_pkl: str | Path, image_size: int = 256,
                       device: torch.device | str = "cpu",
                       requires_grad: bool = False) -> tuple[Encoder, Decoder, DVAEConfig]:
    """Load OpenAI's `encoder.pkl` and `decoder.pkl` into our Encoder / Decoder.

    Returns (encoder, decoder, config) where config carries the shape read off
    the weights (image_size is not stored in them: 256 for the release). Only
    use on trusted files: unpickling can run arbitrary code.
    """
    enc_sd = load_released_pickle(encoder_pkl)
    dec_sd = load_released_pickle(decoder_pkl)
    if _infer_kind(enc_sd) != "encoder":
        raise ValueError(f"{encoder_pkl}: holds a dall_e decoder, not an encoder (files swapped?)")
    if _infer_kind(dec_sd) != "decoder":
        raise ValueError(f"{decoder_pkl}: holds a dall_e encoder, not a decoder (files swapped?)")
    es, ds = infer_shape(enc_sd, "encoder"), infer_shape(dec_sd, "decoder")
    clash = {k: (es[k], ds[k]) for k in es if k in ds and es[k] != ds[k]}
    if clash:
        raise ValueError(f"encoder and decoder shapes disagree: {clash}")
    config = DVAEConfig(image_size=image_size, **{**es, **ds})
    enc_sd = convert_released_state_dict(enc_sd, "encoder", config)
    dec_sd = convert_released_state_dict(dec_sd, "decoder", config)
    encoder, decoder = _model.build_dvae(config, requires_grad=requires_grad)
    encoder.load_state_dict(enc_sd)
    decoder.load_state_dict(dec_sd)
    return encoder.to(device).eval(), decoder.to(device).eval(), config


__all__ = ["convert_released_state_dict", "load_released_dvae", "load_released_pickle",
           "released_module_aliases", "infer_shape", "RELEASED_SHAPE"]
