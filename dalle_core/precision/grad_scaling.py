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
  stream is multiplied by the block's scale s (precisely its multiplier s / M,
  see "What M is" below) before it is cast to fp16 and
  enters the branch, so the branch's fp16 backward (and the gradients of its
  parameters) carry ``s x`` the true values;
- `_UnscaleAndFilterGrad` (branch input): the gradient leaving the branch, back
  in fp32, is divided by s; non-finite values are replaced by zero and the block
  is flagged, so nothing non-finite reaches the rest of the network.

The big scale thus lives only inside the block. After backward,
`PerResblockGradScaler.unscale_` divides each block's parameter gradients by its
scale (fp32 masters: exact when s is a power of two), checks them for non-finite
values, and zeroes all the parameter gradients of every flagged block.

Scale dynamics (the paper's numbers, appendix D): one scale per resblock,
initialised to M * 2^13; multiplied by 2^(1/1000) after each update in which
that block's gradients were finite; on a non-finite gradient divided by sqrt(2)
and the update skipped; consecutive divisions of the same scale are not allowed
within a window of 125 updates; clamped to [M * 2^7, M * 2^24].

The 125-update window limits *divisions*, per scale: every scale keeps a
record of the update at which it was last divided (`last_division`); a block
whose gradients are non-finite at update u is divided only if that record is
None or u - last_division >= `division_window` (125). Otherwise its scale is
left where it is (neither divided nor grown) and its update is still skipped.
"Updates" are iterations (calls to `update`), skipped or not.

"The update skipped" -- our reading (the paper does not say whether the whole
model's update or the block's): the update of the *non-finite block* is
skipped. Its parameters get ``grad = None`` just before ``optimizer.step``, so
torch's AdamW leaves their weights *and* state untouched (no momentum, no
weight decay, no step count moving a block whose gradient was filtered to
zero; also for FSDP2's DTensor gradients), while every other parameter steps.
Why not skip the whole model: the scales grow until they overflow (x sqrt(2)
in 500 updates), so each of the 12B model's 128 scales overflows every few
hundred updates and whole-model skipping would throw away a large fraction of
all updates; the filter of Figure 4 exists precisely so that one block's
overflow does not spoil the other blocks' gradients. A non-finite gradient
*outside* the resblocks (embeddings, final LN, heads: fp32, no scale, so a
genuinely bad step) skips the whole update.

What M is. M = number of data-parallel *replicas*: machines of the 2-D mesh
(mesh["node"].size(); each machine holds one replica sharded over its GPUs),
the world size only for plain data parallelism (one GPU per replica). The
scales are kept in the paper's units (M * 2^13 ...), but what the gradient
functions multiply by is s / M (`multipliers`). Why: the paper's M compensates
for the loss normalisation -- each replica's loss is its 1/M share of the
global mean and the cross-replica reduction *sums*, so inside a resblock the
gradient is (replica-mean gradient / M) * s = replica-mean gradient * 2^13 at
the start, whatever M. Our rank's loss is the rank-local *mean*, FSDP's
reduce-scatter *averages* over mesh["gpu"] (ReduceOp.AVG for fp32) and the
cross-machine reducer (plain or PowerSGD) sums and divides by the machine
count: the same final gradient (the global mean) but M times larger inside the
fp16 backward. Multiplying by s / M gives the fp16 branches exactly the
paper's magnitudes and makes the scale dynamics independent of the cluster size
(tested: 1 process and 4 ranks take the same decisions with the same s / M).
The old M = world size with local-mean losses made every block's fp16 gradient
world-size (1024 at 12B) times the paper's, with a floor (M * 2^7) that could
keep a block overflowing, and filtered, for good.

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
    stepped = scaler.step(optimizer)   # False when the whole update was skipped
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
    """One gradient scale per resblock, with the paper's update rule (see the
    module docstring for the readings taken).

    `model_resblocks`: the resblocks (modules whose parameters each scale
    covers), in the order of the scale indices, or just their number (then
    `apply_per_resblock_grad_scaling` attaches the modules).
    `n_data_parallel`: M, the number of data-parallel replicas
    (`dalle_core.distributed.mesh.data_parallel_replicas`).
    `division_window`: updates that must pass between two divisions of the same
    scale (the paper's 125). `skip_interval` is its old name (deprecated).
    """

    def __init__(self, model_resblocks: Sequence[nn.Module] | int, n_data_parallel: int = 1,
                 init_scale: float | None = None, growth: float = 2 ** (1 / 1000),
                 backoff: float = 1 / math.sqrt(2), min_scale: float | None = None,
                 max_scale: float | None = None, division_window: int = 125, enabled: bool = True,
                 process_group: Any = None, skip_interval: int | None = None):
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
        self.division_window = int(division_window if skip_interval is None else skip_interval)
        if self.division_window < 0:
            raise ValueError(f"division_window must be >= 0, got {self.division_window}")
        self.enabled = enabled
        self.process_group = process_group
        self.n = n
        self._modules: list[nn.Module] | None = modules
        self._scales: list[float] = [self.init_scale] * n
        # per scale: the update (step_count) at which it was last divided
        self.last_division: list[int | None] = [None] * n
        self._scale_cache: dict[torch.device, torch.Tensor] = {}
        self._found: torch.Tensor | None = None  # [n + 1]; slot n = parameters outside the blocks
        self._unscaled = False
        self._found_list: list[bool] | None = None
        # counters
        self.step_count = 0  # completed updates (calls to update())
        self.n_skipped = 0  # whole updates skipped (non-finite gradient outside the resblocks)
        self.n_filtered = 0  # updates taken with some block's update skipped
        self.n_block_skips = 0  # resblock updates skipped, summed over blocks
        self.n_divisions = 0  # scale divisions, summed over blocks
        self.last_step_skipped = False  # the whole update
        self.last_skipped_blocks: list[int] = []

    @property
    def skip_interval(self) -> int:  # the old name of division_window
        return self.division_window

    @property
    def multipliers(self) -> list[float]:
        """What each block's gradient is multiplied by in the backward: s_i / M
        (scales are in the paper's units; see "What M is")."""
        return [s / self.n_data_parallel for s in self._scales]

    def grad_multiplier(self, index: int) -> float:
        return self._scales[index] / self.n_data_parallel

    # --- state used by the autograd functions ---------------------------------
    def _scale_tensor(self, device: torch.device) -> torch.Tensor:
        """The gradient multipliers s_i / M (see "What M is") as a float32 tensor."""
        t = self._scale_cache.get(device)
        if t is None:
            t = torch.tensor(self.multipliers, dtype=torch.float32, device=device)
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
        """Whether the whole update will be skipped (after unscale_): a
        non-finite gradient outside the resblocks."""
        if not self._unscaled:
            raise RuntimeError("call unscale_() first")
        return bool(self._found_list[self.n])

    def skipped_blocks(self) -> list[int]:
        """The resblocks whose update this step skips (after unscale_)."""
        if not self._unscaled:
            raise RuntimeError("call unscale_() first")
        return [i for i in range(self.n) if self._found_list[i]]

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """Unscale (if not done), then take the optimizer step: the whole update
        is skipped when a gradient outside the resblocks is non-finite;
        otherwise the parameters of every block with a non-finite gradient get
        ``grad = None`` (AdamW then leaves their weights and state alone) and
        the others step. Returns True when the optimizer stepped."""
        self.unscale_(optimizer)
        skip = self.should_skip()
        blocks = self.skipped_blocks()
        if skip:
            self.n_skipped += 1
        else:
            if blocks:
                self.n_filtered += 1
                for i in blocks:
                    for p in self.block_parameters(i):
                        p.grad = None
            optimizer.step(*args, **kwargs)
        self.n_block_skips += self.n if skip else len(blocks)
        self.last_step_skipped = skip
        self.last_skipped_blocks = list(range(self.n)) if skip else blocks
        return not skip

    def update(self) -> None:
        """Close the update: divide the scale of each block that saw a non-finite
        gradient (unless it was divided within the last `division_window`
        updates), grow the others, clamp; reset the step's flags."""
        flags = self._found_list if self._found_list is not None else (
            [v > 0 for v in self._found.tolist()] if self._found is not None else [False] * (self.n + 1))
        u = self.step_count
        for i in range(self.n):
            s = self._scales[i]
            if flags[i]:
                last = self.last_division[i]
                if last is None or u - last >= self.division_window:
                    s *= self.backoff
                    self.last_division[i] = u
                    self.n_divisions += 1
            else:
                s *= self.growth
            self._scales[i] = min(max(s, self.min_scale), self.max_scale)
        self.step_count += 1
        self._scale_cache.clear()
        if self._found is not None:
            self._found.zero_()
        self._found_list = None
        self._unscaled = False

    # --- checkpoints -------------------------------------------------------------------
    STATE_FORMAT = 2  # 2: scales in the paper's units (multiplier s / M) and per-scale last_division

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": self.STATE_FORMAT,
            "scales": list(self._scales),
            "last_division": list(self.last_division),
            "step_count": self.step_count,
            "n_skipped": self.n_skipped,
            "n_filtered": self.n_filtered,
            "n_block_skips": self.n_block_skips,
            "n_divisions": self.n_divisions,
            "n_data_parallel": self.n_data_parallel,
            "init_scale": self.init_scale,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "growth": self.growth,
            "backoff": self.backoff,
            "division_window": self.division_window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's scaler state, keeping what each block's gradient
        is multiplied by: a run resumed on another number of replicas rescales
        the scales (and bounds) to its own M. Checkpoints of format 1 (no
        "format": scales multiplied the gradient as they were, 125-update rule
        on skips, no division record) load with their multipliers kept, this
        scaler's bounds, and no division on record (each scale may be divided
        at its next non-finite gradient)."""
        scales = [float(s) for s in state["scales"]]
        if len(scales) != self.n:
            raise ValueError(f"checkpoint has {len(scales)} gradient scales, this model {self.n} resblocks")
        M = self.n_data_parallel
        if int(state.get("format", 1)) >= 2:
            ratio = M / int(state.get("n_data_parallel", M))
            for key in ("init_scale", "min_scale", "max_scale"):
                if key in state:
                    setattr(self, key, float(state[key]) * ratio)
            scales = [v * ratio for v in scales]
            last = state.get("last_division") or [None] * self.n
            self.last_division = [None if v is None else int(v) for v in last]
        else:  # format 1: the scale itself multiplied the gradient
            scales = [v * M for v in scales]
            self.last_division = [None] * self.n
        for key in ("growth", "backoff"):
            if key in state:
                setattr(self, key, float(state[key]))
        window = state.get("division_window", state.get("skip_interval"))
        if window is not None:
            self.division_window = int(window)
        self._scales = [min(max(v, self.min_scale), self.max_scale) for v in scales]
        self.step_count = int(state.get("step_count", 0))
        self.n_skipped = int(state.get("n_skipped", 0))
        self.n_filtered = int(state.get("n_filtered", 0))
        self.n_block_skips = int(state.get("n_block_skips", 0))
        self.n_divisions = int(state.get("n_divisions", 0))
        self._scale_cache.clear()
        self._found = None
        self._found_list = None
        self._unscaled = False

    def stats(self) -> dict[str, float]:
        """Numbers worth logging: min / median / max scale (paper units), skipped
        updates (whole / per block), divisions."""
        s = sorted(self._scales)
        return {"grad_scale_min": s[0], "grad_scale_median": s[len(s) // 2], "grad_scale_max": s[-1],
                "grad_scale_skipped_steps": self.n_skipped, "grad_scale_filtered_steps": self.n_filtered,
                "grad_scale_block_skips": self.n_block_skips, "grad_scale_divisions": self.n_divisions}


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
