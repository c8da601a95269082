"""The prior's initialisation, per parameter, for meta-device construction.

`DalleTransformer.init_weights` draws the whole model from the global RNG, in
module order: right for one process, but a rank holding 1/8 of a 12B model
would have to draw (and hold) all of it. Here the same GPT-2 scheme is given
per *parameter name* (`prior_init_rule`) and drawn with
`dalle_core.distributed.init` (one seeded generator per fixed chunk of rows),
so each rank fills only its own FSDP shards and the model is the same for any
world size:

    weights of linears (heads included), embeddings, BOS, text positions,
    image rows / columns                      N(0, init_std)
    the projections back into the residual
    stream (attn.proj, mlp.proj weights)      N(0, init_std / sqrt(2 n_layer))
    biases                                    0
    layer-norm gains / biases                 1 / 0

The distributions are `init_weights`'; the values are not (another RNG
stream), so a model trained by `train_prior` starts from these values on any
number of processes, and `materialize_prior` is its one construction path:

    with torch.device("meta"):
        model = DalleTransformer(config)
    ... wrap / shard (per-resblock scaling, checkpointing, FSDP2) ...
    materialize_prior(model, device, seed)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dalle_core.distributed.checkpoint import canonical_key
from dalle_core.distributed.init import INIT_CHUNK_NUMEL, fill_parameters, materialize

from .config import PriorConfig

_NORMAL_LOOSE = ("bos", "text_position", "image_row", "image_col")
_RESIDUAL_OUT = (".attn.attn.proj.weight", ".mlp.mlp.proj.weight")


def prior_init_rules(model: nn.Module, config: PriorConfig) -> dict[str, tuple[str, float | None]]:
    """(kind, std) for every canonical parameter name of a `DalleTransformer`
    (built on any device, wrapped or sharded), by module type as `init_weights` does."""
    std = float(config.init_std)
    out_std = std / math.sqrt(2 * config.n_layer)
    rules: dict[str, tuple[str, float | None]] = {}
    for mname, module in model.named_modules():
        prefix = canonical_key(mname + ".") if mname else ""
        for pname, _ in module.named_parameters(recurse=False):
            name = prefix + pname
            if isinstance(module, nn.LayerNorm):
                rules[name] = ("ones", None) if pname == "weight" else ("zeros", None)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                if pname == "bias":
                    rules[name] = ("zeros", None)
                else:
                    rules[name] = ("normal", out_std if name.endswith(_RESIDUAL_OUT) else std)
            elif name in _NORMAL_LOOSE:
                rules[name] = ("normal", std)
    missing = sorted({canonical_key(n) for n, _ in model.named_parameters()} - set(rules))
    if missing:
        raise ValueError(f"no initialisation rule for {missing}")
    return rules


def prior_init_rule(model: nn.Module, config: PriorConfig):
    """`rule(name, param)` for `dalle_core.distributed.init`."""
    rules = prior_init_rules(model, config)
    return lambda name, param: rules[name]


def init_prior_weights(model: nn.Module, seed: int, config: PriorConfig | None = None,
                       chunk_numel: int = INIT_CHUNK_NUMEL) -> nn.Module:
    """Fill a materialised prior (plain, or this rank's FSDP shards) from `seed`."""
    config = config or model.config
    fill_parameters(model, prior_init_rule(model, config), seed, chunk_numel)
    return model


def materialize_prior(model: nn.Module, device: str | torch.device, seed: int, config: PriorConfig | None = None,
                      chunk_numel: int = INIT_CHUNK_NUMEL) -> nn.Module:
    """Allocate a meta-built prior on `device` (after any sharding) and fill it from `seed`."""
    config = config or model.config
    return materialize(model, device, prior_init_rule(model, config), seed, chunk_numel)


__all__ = ["init_prior_weights", "materialize_prior", "prior_init_rule", "prior_init_rules"]
