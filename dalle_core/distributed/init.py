"""Deterministic initialisation of (possibly sharded) parameters, the same for
any world size.

A model built on the meta device and sharded with FSDP2 holds no values; each
rank must fill only its own shards, and the result must not depend on how many
ranks there are (a 4-process run starts from the same model as a 1-process
run). A single RNG stream over the whole model cannot do that: a rank would
have to draw every value before its own. So every parameter is cut, along
dim 0 (the dim FSDP2 shards), into fixed *chunks* of rows whose size depends
only on the parameter's shape (`chunk_rows`: at most `chunk_numel` values),
and each chunk is drawn from its own CPU generator seeded by
``(seed, canonical parameter name, chunk index)`` (`chunk_seed`, SHA-256). A
rank draws the chunks that overlap its rows and copies the overlap into its
local shard; a single process draws every chunk. Same chunks, same values,
bitwise (tested on gloo with 1 and 4 processes against the unsharded fill).

Cost per rank: its share of the values plus at most two partial chunks per
parameter (drawn whole, then sliced), on the CPU (a CPU generator gives the
same values on any machine; values are then copied to the device). Host memory
at any time: one chunk, ``chunk_numel * 4`` bytes (16 MiB by default). Before
this, every rank built the whole fp32 model: ``4 * P`` bytes, 49 GB at 12B.

`fill_parameters(model, rule, seed)` does the filling; `rule(name, param)`
says, for a canonical name, ``("normal", std)``, ``("zeros", None)`` or
``("ones", None)``. `materialize(model, device, rule, seed)` first allocates
the meta model's storage on `device` (``to_empty``, keeping parameter objects,
so FSDP hooks and the PowerSGD reducer's name map stay valid) and then fills it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import canonical_key

INIT_CHUNK_NUMEL = 1 << 22  # values drawn per generator (16 MiB of fp32)

Rule = Callable[[str, torch.Tensor], tuple[str, float | None]]


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A 63-bit generator seed for chunk `chunk` of parameter `name` (canonical)."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}\0{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunk_rows(shape: tuple[int, ...] | torch.Size, chunk_numel: int = INIT_CHUNK_NUMEL) -> int:
    """Rows (dim-0 slices) per chunk: as many as fit in `chunk_numel` values, at least one."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, chunk_numel // max(1, row))


def max_chunk_bytes(shapes, chunk_numel: int = INIT_CHUNK_NUMEL, dtype_bytes: int = 4) -> int:
    """The largest chunk any of `shapes` draws (host memory the fill needs at once)."""
    best = 0
    for shape in shapes:
        shape = tuple(shape)
        rows = min(shape[0], chunk_rows(shape, chunk_numel)) if shape else 1
        best = max(best, rows * (math.prod(shape[1:]) if len(shape) > 1 else 1))
    return best * dtype_bytes


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this rank holds, the global row its first row is).

    A plain tensor: itself, row 0. A DTensor: its local shard and the shard's
    offset along dim 0; only Shard(0) and Replicate placements are handled
    (what FSDP2 uses), so the local tensor is a contiguous block of rows."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param, 0
    for pl in param.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise NotImplementedError(f"cannot initialise a DTensor placed as {param.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if param.dim() == 0:
        return local, 0
    return local, int(offset[0])


@torch.no_grad()
def fill_tensor(param: torch.Tensor, name: str, kind: str, std: float | None, seed: int,
                chunk_numel: int = INIT_CHUNK_NUMEL) -> None:
    """Fill this rank's part of `param` (plain or DTensor) per (kind, std); see the module docstring."""
    local, row0 = local_rows(param)
    if kind == "zeros":
        local.zero_()
        return
    if kind == "ones":
        local.fill_(1.0)
        return
    if kind != "normal":
        raise ValueError(f"unknown init kind {kind!r} for {name}")
    shape = tuple(param.shape)
    if not shape:  # a scalar: one chunk of one value
        g = torch.Generator().manual_seed(chunk_seed(seed, name, 0))
        local.copy_(torch.empty((), dtype=torch.float32).normal_(0.0, float(std), generator=g))
        return
    n_local = local.shape[0]
    if n_local == 0:
        return
    per = chunk_rows(shape, chunk_numel)
    lo, hi = row0, row0 + n_local
    for c in range(lo // per, (hi - 1) // per + 1):
        c_lo, c_hi = c * per, min((c + 1) * per, shape[0])
        g = torch.Generator().manual_seed(chunk_seed(seed, name, c))
        values = torch.empty((c_hi - c_lo, *shape[1:]), dtype=torch.float32).normal_(0.0, float(std), generator=g)
        a, b = max(lo, c_lo), min(hi, c_hi)
        local[a - lo:b - lo].copy_(values[a - c_lo:b - c_lo])


def fill_parameters(model: nn.Module, rule: Rule, seed: int, chunk_numel: int = INIT_CHUNK_NUMEL) -> None:
    """Fill every parameter of `model` (this rank's shards under FSDP) per `rule`,
    keyed by canonical names (wrapper infixes removed), so wrapped, sharded and
    plain models get the same values."""
    for raw, p in model.named_parameters():
        name = canonical_key(raw)
        kind, std = rule(name, p)
        fill_tensor(p, name, kind, std, seed, chunk_numel)


@contextmanager
def _swap_params_on_conversion():
    """Module._apply swaps tensor contents instead of making new Parameter objects
    (what FSDP2 expects of `to_empty`; keeps ids that hooks captured)."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def materialize(model: nn.Module, device: str | torch.device, rule: Rule, seed: int,
                chunk_numel: int = INIT_CHUNK_NUMEL) -> nn.Module:
    """Allocate a meta-built (and possibly FSDP-sharded) `model` on `device` and
    fill it per `rule` (see the module docstring). Returns the model."""
    device = torch.device(device)
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:  # to_empty would leave them as garbage and `rule` covers parameters only
        raise NotImplementedError(f"materialize initialises parameters only; the model has buffers: {buffers}")
    if any(p.is_meta for p in model.parameters()):
        with _swap_params_on_conversion():
            model.to_empty(device=device)
    fill_parameters(model, rule, seed, chunk_numel)
    return model


__all__ = ["INIT_CHUNK_NUMEL", "chunk_rows", "chunk_seed", "fill_parameters", "fill_tensor", "local_rows",
           "materialize", "max_chunk_bytes"]
