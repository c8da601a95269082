"""Per-resblock gradient scaling (paper section 2.4, Figure 4, appendix D).

Why
---
In fp16, one loss scale for the whole network cannot serve every resblock of a
deep transformer: the gradient norms of resblocks differ by orders of magnitude
(the paper saw them fall from the early to the late blocks), so a scale small
enough not to overflow in one block underflows another block's gradients to
zero. The paper gives every resblock its own gradient scale.

Mechanism (Figure 4)
--------------------
A resblock computes ``x + branch(x)``; the residual stream ``x`` and its
gradient stay fp32, the branch computes in fp16. `ScaledResblock` wraps a
resblock from outside and places two small autograd functions at the edges of
its branch, both the identity in the forward pass:

    x ──┬────────────────────────────────────────────(+)──> out
        └─ UnscaleAndFilter ─ branch (fp16) ─ to fp32 ─ Scale ─┘

- `_ScaleGrad` (branch output): the fp32 gradient arriving from the residual
  stream is multiplied by the block's scale s before it is cast to fp16 and
  enters the branch, so the branch's fp16 backward (and the gradients of its
  parameters) carry ``s x`` the true values;
- `_UnscaleAndFilterGrad` (branch input): the gradient leaving the branch, back
  in fp32, is divided by s; non-finite values are replaced by zero and the block
  is flagged, so nothing non-finite reaches the rest of the network.

The big scale thus lives only inside the block. After backward,
`PerResblockGradScaler.unscale_` divides each block's parameter gradients by its
scale (fp32 masters: exact when s is a power of two), checks them for non-finite
values, and zeroes all the parameter gradients of every flagged block.

Scale dynamics (the paper's numbers): one scale per resblock, initialised to
M * 2^13 (M = number of data-parallel ranks); multiplied by 2^(1/1000) after each
update in which that block's gradients were finite; on a non-finite gradient
divided by sqrt(2) and the update skipped; clamped to [M * 2^7, M * 2^24].

Skipping "at most once per 125 updates": our reading is that the optimizer step
is skipped when any block (or a parameter outside the blocks) saw a non-finite
gradient, unless a step was already skipped within the last `skip_interval`
calls to `step`; then the step is taken with the flagged blocks' gradients
zeroed (filtered), which keeps a run with a persistently overflowing block from
stalling. The flagged block's scale is backed off either way.

Usage
-----
    model = DalleTransformer(cfg)
    scaler = PerResblockGradScaler(list(model.resblocks()), n_data_parallel=M)
    apply_per_resblock_grad_scaling(model, scaler)
    ...
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model.loss(text, image)["total"]
    loss.backward()                # no global loss scale
    scaler.unscale_(optimizer)     # optional: before clipping
    torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
    stepped = scaler.step(optimizer)   # False when the update was skipped
    scaler.update()
    optimizer.zero_grad()

Under data parallelism the non-finite flags are all-reduced (max) over the
default process group (or `process_group`) so every rank takes the same
decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 gradients), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the block's scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaler: "PerResblockGradScaler", index: int) -> torch.Tensor:
        ctx.scaler, ctx.index = scaler, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s = ctx.scaler._scale_tensor(grad.device)[ctx.index]
        return grad * s.to(grad.dtype), None, None


class _UnscaleAndFilterGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the block's scale,
    zeroes non-finite values and records that the block saw them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaler: "PerResblockGradScaler", index: int) -> torch.Tensor:
        ctx.scaler, ctx.index = scaler, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scaler, index = ctx.scaler, ctx.index
        g = grad.float() / scaler._scale_tensor(grad.device)[index]
        finite = torch.isfinite(g)
        scaler._record_nonfinite(index, ~finite.all())
        g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
        return g.to(grad.dtype), None, None


_PREFIX = "resblock."


class ScaledResblock(nn.Module):
    """A resblock (``forward(x, **kw) = x + branch(x, **kw)``) whose branch runs
    between the scale / unscale-and-filter gradient functions of block `index` of
    `scaler`.

    Transparent to checkpoints: the state dict has the wrapped resblock's keys
    (no ``resblock.`` infix), so wrapped and plain models load each other's
    weights; attribute look-ups fall through to the wrapped resblock.
    """

    def __init__(self, resblock: nn.Module, scaler: "PerResblockGradScaler", index: int):
        super().__init__()
        if not hasattr(resblock, "branch"):
            raise TypeError(f"{type(resblock).__name__} has no branch(x): it cannot be gradient-scaled")
        self.resblock = resblock
        self.index = index
        object.__setattr__(self, "scaler", scaler)  # not a submodule, not in the state dict
        self._register_state_dict_hook(ScaledResblock._strip_prefix)
        self.register_load_state_dict_pre_hook(ScaledResblock._add_prefix)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.scaler.enabled):
            return self.resblock(x, *args, **kwargs)
        h = _UnscaleAndFilterGrad.apply(x, self.scaler, self.index)
        y = self.resblock.branch(h, *args, **kwargs).to(x.dtype)  # "to_float32"
        y = _ScaleGrad.apply(y, self.scaler, self.index)
        return x + y

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("resblock")
            if inner is None:
                raise
            return getattr(inner, name)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in super().named_parameters(prefix=prefix, recurse=recurse,
                                                remove_duplicate=remove_duplicate):
            yield name.replace(_PREFIX, ""), p

    @staticmethod
    def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> dict:
        for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
            state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)
        return state_dict

    @staticmethod
    def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
            state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)

    def extra_repr(self) -> str:
        return f"index={self.index}"


class PerResblockGradScaler:
    """One gradient scale per resblock, with the paper's update rule.

    `model_resblocks`: the resblocks (modules whose parameters each scale
    covers), in the order of the scale indices, or just their number (then
    `apply_per_resblock_grad_scaling` attaches the modules).
    """

    def __init__(self, model_resblocks: Sequence[nn.Module] | int, n_data_parallel: int = 1,
                 init_scale: float | None = None, growth: float = 2 ** (1 / 1000),
                 backoff: float = 1 / math.sqrt(2), min_scale: float | None = None,
                 max_scale: float | None = None, skip_interval: int = 125, enabled: bool = True,
                 process_group: Any = None):
        if isinstance(model_resblocks, int):
            n, modules = model_resblocks, None
        else:
            modules = list(model_resblocks)
            n = len(modules)
        if n < 1:
            raise ValueError("need at least one resblock")
        M = int(n_data_parallel)
        if M < 1:
            raise ValueError(f"n_data_parallel must be >= 1, got {n_data_parallel}")
        self.n_data_parallel = M
        self.init_scale = float(M * 2**13 if init_scale is None else init_scale)
        self.min_scale = float(M * 2**7 if min_scale is None else min_scale)
        self.max_scale = float(M * 2**24 if max_scale is None else max_scale)
        if not 0 < self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError("need 0 < min_scale <= init_scale <= max_scale, got "
                             f"{self.min_scale}, {self.init_scale}, {self.max_scale}")
        if not (growth >= 1.0 and 0.0 < backoff <= 1.0):
            raise ValueError(f"need growth >= 1 and 0 < backoff <= 1, got {growth}, {backoff}")
        self.growth, self.backoff = float(growth), float(backoff)
        self.skip_interval = int(skip_interval)
        self.enabled = enabled
        self.process_group = process_group
        self.n = n
        self._modules: list[nn.Module] | None = modules
        self._scales: list[float] = [self.init_scale] * n
        self._scale_cache: dict[torch.device, torch.Tensor] = {}
        self._found: torch.Tensor | None = None  # [n + 1]; slot n = parameters outside the blocks
        self._unscaled = False
        self._found_list: list[bool] | None = None
        # counters
        self.step_count = 0  # calls to step()
        self.last_skip_step: int | None = None
        self.n_skipped = 0
        self.n_filtered = 0  # steps taken with some block's gradients zeroed
        self.last_step_skipped = False

    # --- state used by the autograd functions ---------------------------------
    def _scale_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._scale_cache.get(device)
        if t is None:
            t = torch.tensor(self._scales, dtype=torch.float32, device=device)
            self._scale_cache[device] = t
        return t

    def _found_tensor(self, device: torch.device) -> torch.Tensor:
        if self._found is None:
            self._found = torch.zeros(self.n + 1, dtype=torch.float32, device=device)
        return self._found

    def _record_nonfinite(self, index: int, flag: torch.Tensor) -> None:
        found = self._found_tensor(flag.device)
        found[index] = torch.maximum(found[index], flag.to(found.device, torch.float32))

    # --- modules -----------------------------------------------------------------
    def attach(self, modules: Sequence[nn.Module]) -> None:
        modules = list(modules)
        if len(modules) != self.n:
            raise ValueError(f"scaler has {self.n} scales, got {len(modules)} resblocks")
        self._modules = modules

    def block_parameters(self, index: int) -> Iterable[nn.Parameter]:
        if self._modules is None:
            raise RuntimeError("no resblocks attached: pass them to the constructor or use "
                               "apply_per_resblock_grad_scaling")
        return self._modules[index].parameters()

    # --- scales ----------------------------------------------------------------------
    @property
    def scales(self) -> list[float]:
        return list(self._scales)

    def set_scale(self, index: int, value: float) -> None:
        self._scales[index] = min(max(float(value), self.min_scale), self.max_scale)
        self._scale_cache.clear()

    def found_nonfinite(self) -> list[bool]:
        """Per-block non-finite flags seen so far in this step (syncs)."""
        if self._found_list is not None:
            return list(self._found_list[: self.n])
        if self._found is None:
            return [False] * self.n
        return [v > 0 for v in self._found.tolist()[: self.n]]

    # --- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer | None = None) -> list[bool]:
        """Divide each block's parameter gradients by its scale, flag non-finite
        ones, zero every gradient of a flagged block (and non-finite gradients of
        `optimizer`'s other parameters). Idempotent within a step. Returns the
        per-block flags."""
        if self._unscaled:
            return list(self._found_list[: self.n])
        if self._modules is None:
            raise RuntimeError("no resblocks attached")
        block_params: list[list[torch.Tensor]] = []
        seen: set[int] = set()
        device = None
        for i in range(self.n):
            ps = [p for p in self.block_parameters(i) if p.grad is not None]
            seen.update(id(p) for p in self.block_parameters(i))
            block_params.append(ps)
            if device is None and ps:
                device = _local(ps[0].grad).device
        others: list[torch.Tensor] = []
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in seen and p.grad is not None:
                        others.append(p)
                        if device is None:
                            device = _local(p.grad).device
        if device is None:
            device = self._found.device if self._found is not None else torch.device("cpu")
        found = self._found_tensor(device)
        if self.enabled:
            scales = self._scale_tensor(device)
            for i, ps in enumerate(block_params):
                flags = []
                for p in ps:
                    g = _local(p.grad)
                    g.div_(scales[i].to(g.dtype))
                    flags.append((~torch.isfinite(g)).any())
                if flags:
                    found[i] = torch.maximum(found[i], torch.stack(flags).any().float())
        if others:
            flags = [(~torch.isfinite(_local(p.grad))).any() for p in others]
            found[self.n] = torch.maximum(found[self.n], torch.stack(flags).any().float())
        self._all_reduce_found(found)
        found_list = [v > 0 for v in found.tolist()]  # the one host sync of the step
        for i, ps in enumerate(block_params):
            if found_list[i]:
                for p in ps:
                    _local(p.grad).zero_()
        if found_list[self.n]:
            for p in others:
                g = _local(p.grad)
                g.copy_(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
        self._found_list = found_list
        self._unscaled = True
        return found_list[: self.n]

    def _all_reduce_found(self, found: torch.Tensor) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.process_group)

    def should_skip(self) -> bool:
        """Whether the current step would be skipped (after unscale_)."""
        if not self._unscaled:
            raise RuntimeError("call unscale_() first")
        if not any(self._found_list):
            return False
        return self.last_skip_step is None or self.step_count - self.last_skip_step >= self.skip_interval

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Unscale (if not done), then take the optimizer step unless it must be
        skipped. Returns True when the optimizer stepped."""
        self.unscale_(optimizer)
        skip = self.should_skip()
        if skip:
            self.last_skip_step = self.step_count
            self.n_skipped += 1
        else:
            if any(self._found_list):
                self.n_filtered += 1
            optimizer.step(*args, **kwargs)
        self.step_count += 1
        self.last_step_skipped = skip
        return not skip

    def update(self) -> None:
        """Back off the scales of blocks that saw non-finite gradients, grow the
        others, clamp, and reset the step's flags."""
        flags = self._found_list if self._found_list is not None else (
            [v > 0 for v in self._found.tolist()] if self._found is not None else [False] * (self.n + 1))
        for i in range(self.n):
            s = self._scales[i] * (self.backoff if flags[i] else self.growth)
            self._scales[i] = min(max(s, self.min_scale), self.max_scale)
        self._scale_cache.clear()
        if self._found is not None:
            self._found.zero_()
        self._found_list = None
        self._unscaled = False

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "scales": list(self._scales),
            "step_count": self.step_count,
            "last_skip_step": self.last_skip_step,
            "n_skipped": self.n_skipped,
            "n_filtered": self.n_filtered,
            "n_data_parallel": self.n_data_parallel,
            "init_scale": self.init_scale,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "growth": self.growth,
            "backoff": self.backoff,
            "skip_interval": self.skip_interval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scales = [float(s) for s in state["scales"]]
        if len(scales) != self.n:
            raise ValueError(f"checkpoint has {len(scales)} gradient scales, this model {self.n} resblocks")
        for key in ("n_data_parallel", "init_scale", "min_scale", "max_scale", "growth", "backoff",
                    "skip_interval"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
        self._scales = scales
        self.step_count = int(state.get("step_count", 0))
        last = state.get("last_skip_step")
        self.last_skip_step = None if last is None else int(last)
        self.n_skipped = int(state.get("n_skipped", 0))
        self.n_filtered = int(state.get("n_filtered", 0))
        self._scale_cache.clear()
        self._found = None
        self._found_list = None
        self._unscaled = False

    def stats(self) -> dict[str, float]:
        """Numbers worth logging: min / median / max scale, skipped and filtered steps."""
        s = sorted(self._scales)
        return {"grad_scale_min": s[0], "grad_scale_median": s[len(s) // 2], "grad_scale_max": s[-1],
                "grad_scale_skipped_steps": self.n_skipped, "grad_scale_filtered_steps": self.n_filtered}


def apply_per_resblock_grad_scaling(model: nn.Module, scaler: PerResblockGradScaler,
                                    resblock_names: Sequence[str] = ("attn", "mlp")) -> nn.Module:
    """Replace ``block.<name>`` for every block in ``model.blocks`` and every name
    in `resblock_names` (attention then MLP: the order of ``model.resblocks()``)
    by a `ScaledResblock` with consecutive indices, and attach the wrappers to
    `scaler`. Returns the model (modified in place)."""
    wrappers = []
    for block in model.blocks:
        for name in resblock_names:
            inner = getattr(block, name)
            if isinstance(inner, ScaledResblock):
                raise ValueError("model already has per-resblock gradient scaling")
            w = ScaledResblock(inner, scaler, len(wrappers))
            setattr(block, name, w)
            wrappers.append(w)
    scaler.attach(wrappers)
    return model


__all__ = ["PerResblockGradScaler", "ScaledResblock", "apply_per_resblock_grad_scaling"]
