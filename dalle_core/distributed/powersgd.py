"""Cross-machine gradient reduction for sharded training, with PowerSGD.

Where this sits
---------------
Inside a machine the prior's parameters are sharded with FSDP2 (`fully_shard`
on mesh["gpu"]): after a layer's backward its gradients are reduce-scattered
over the machine's GPUs, so each GPU holds the machine-averaged gradient of
*its shard*. Across machines the shards must then be averaged over mesh["node"]
(the same GPU index on every machine) — what native HSDP does with a plain
all-reduce. We do that step ourselves in FSDP2's all-reduce hook
(`FSDPModule.set_all_reduce_hook`, the "custom HSDP" path): FSDP calls the hook
once per FSDP unit per step with the unit's flat reduce-scatter output, and the
hook reduces it in place across machines; FSDP then views the flat buffer back
into the per-parameter sharded gradients.

Why our own PowerSGD
--------------------
torch ships `torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`, but it
is a DDP communication hook: it receives DDP's gradient buckets (full,
unsharded gradients of replicated parameters). FSDP1's `register_comm_hook`
takes hooks only for its own reduce-scatter / all-reduce signatures, and the
PowerSGD hook does not support sharded strategies; FSDP2 has no comm hooks at
all besides this all-reduce hook. So the algorithm is re-implemented here on the
shards the hook receives.

The algorithm (Vogels et al. 2019, as in torch's powerSGD_hook)
----------------------------------------------------------------
For each gradient matrix M (n x m) of this GPU's shard (a parameter's local
shard of a dim-0 sharded weight is a contiguous [rows_local, cols] block of the
flat buffer, rows padded to a multiple of the shard count by FSDP):

    M <- M + E                       error feedback: add what was lost last step
    P  = M Q                         Q (m x r): random Gaussian, then warm-started
    P  = all_reduce(P)               sum over machines
    P  = orthogonalize(P)            Gram-Schmidt, or Householder QR (the paper's)
    Q' = M^T P                       this machine's share of the new Q
    E  = M - P Q'^T                  error: the part of M outside span(P)
    Q  = all_reduce(Q')              sum over machines; kept for the next step
    M <- P Q^T / n_machines          = mean over machines of P P^T M_i

so a machine sends (n + m) r numbers instead of n m. What low rank cannot
represent goes uncompressed, by parameter role (`parameter_role`, the paper's
appendix E): the embeddings (text, image, positions, the start vector) and the
two output heads, whose gradients are row-sparse (only the rows of the tokens
in the batch are non-zero: no low-rank structure, and error feedback would
smear them over all rows), and gains and biases (1-D). Matrices where
(n + m) r * min_compression_rate >= n m are not worth it either (torch's
rule). All of these are all-reduced uncompressed in one flat buffer.

Gradient scale (per-resblock fp16 scaling, dalle_core.precision). The hook runs
*inside* backward, right after FSDP's reduce-scatter of a layer, long before
the scaler's `unscale_` (after backward): the gradients it sees are the true
gradients times that resblock's multiplier c = s / M. The reducer therefore
divides each piece by its block's c before compressing and multiplies the
decompressed mean back by c, so the error feedback buffers are kept in true
(unscaled) gradient units: after a scale back-off (c / sqrt(2)) the carried
error is re-injected at its true magnitude, not sqrt(2) too large (tested).

Variants (`variant`): "torch" — torch's powerSGD_hook: Gram-Schmidt, Q
warm-started from the previous step; "paper" (appendix E, the paper presets) —
a Gaussian Q drawn once at the start of training and used for every step (no
warm start), and Householder orthogonalisation (LAPACK geqrf through
torch.linalg.qr) of P + epsilon I (a small multiple of the identity, I the
rectangular n x r identity, added before orthogonalising so that a
rank-deficient P, e.g. an all-zero gradient, still gives r orthonormal
columns); epsilon is `orthogonalization_epsilon` (the paper gives no value;
we use 1e-8 in true gradient units, far below any P that carries signal). The error is the local decompression residual
Δ_i - P P^T Δ_i (the paper's definition), so sum_t output_t = sum_t mean_i g_i,t
- mean_i E_i,T exactly: nothing is lost, only delayed (tested).

Non-finite gradients (fp16 overflow, caught later by the per-resblock scaler):
a non-finite entry of M makes P = M Q non-finite (inf * q and inf * 0 are both
non-finite), and the sum over machines keeps it so: every machine sees the same
non-finite P and takes the same decision without an extra collective — that
matrix's output is set to NaN (so the scaler flags and filters its resblock),
its error buffer is reset and its Q is not warm-started from the bad step.

The compression target (paper section 2.5 / appendix D): rank 896 over the 8
GPUs of a machine (112 per GPU) for d_model = 3968, "about 85%", by the paper's
formula 1 - 5r / (8 d_model) with r = 896. Our reading of the formula: the
paper compresses q, k, v and the output projection (d x d each) and the two MLP
matrices (d x 4d, sharded over the 8 GPUs along the 4d side into d x d/2), each
GPU at rank r/8. Per GPU, a d x d shard [d/8, d] costs (d/8 + d) r/8 numbers
against d^2/8 (9r / 8d) and a d x d/2 MLP shard (d + d/2) r/8 against d^2/2
(3r / 8d); weighted by size over a layer (4 d^2 attention, 8 d^2 MLP):
(4 * 9/8 + 8 * 3/8) r d / 12 d^2 = 7.5 r / 12 d = 5r / 8d of the gradient is
sent. Our layer layout differs slightly (fused qkv [3d, d]; every matrix is
sharded along dim 0, so the MLP output projection [d, 4d] shards as [d/8, 4d]):
from the actual shapes, rank 112 per GPU sends 15.3% of a layer's gradient at
12B (84.7% compression; `dalle_core.distributed.plan` computes it), the
formula's 14.1% for the paper's layout.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """One parameter's slice of an FSDP unit's flat reduce-scatter output."""

    name: str
    offset: int
    numel: int  # padded sharded numel (FSDP pads dim 0 to a multiple of the shard count)
    matrix: tuple[int, int] | None  # (rows, cols) for a >= 2-D parameter sharded on dim 0
    param_id: int | None = None  # id() of the parameter (maps it to its resblock's gradient scale)


# --- what is compressed: parameter roles ------------------------------------------------

# The prior's parameters that are embeddings without "embedding" in their name.
EMBEDDING_PARAMETERS = frozenset({"bos", "text_position", "image_row", "image_col"})
NORM_MODULES = frozenset({"ln", "ln_f", "norm", "layer_norm"})
# Roles PowerSGD leaves uncompressed (the paper, appendix E).
UNCOMPRESSED_ROLES = ("embedding", "head", "gain", "bias")


def parameter_role(name: str, is_matrix: bool = True) -> str:
    """The role of a parameter, from its (canonical) name: "embedding" (a
    component ending in "embedding", or bos / text_position / image_row /
    image_col), "head" (a component ending in "head"), "bias" (leaf "bias"),
    "gain" (a layer norm's weight, or any other 1-D tensor), else "matrix"."""
    parts = name.split(".")
    if any(c.endswith("embedding") or c in EMBEDDING_PARAMETERS for c in parts):
        return "embedding"
    if any(c.endswith("head") for c in parts):
        return "head"
    if parts[-1] == "bias":
        return "bias"
    if not is_matrix or any(c in NORM_MODULES for c in parts[:-1]):
        return "gain"
    return "matrix"


def is_compressed(name: str, matrix: tuple[int, int] | None, rank: int | None,
                  min_compression_rate: float = 2.0,
                  exclude_roles: Sequence[str] = UNCOMPRESSED_ROLES) -> bool:
    """Whether PowerSGD compresses a shard: a matrix whose role is not excluded
    and which shrinks by `min_compression_rate` (shared by the reducer and the
    planner, so `dalle plan` predicts what the reducer sends)."""
    if rank is None or matrix is None:
        return False
    if parameter_role(name, True) in exclude_roles:
        return False
    return should_compress(*matrix, rank, min_compression_rate)


def effective_rank(rows: int, cols: int, rank: int) -> int:
    return max(1, min(rank, rows, cols))


def should_compress(rows: int, cols: int, rank: int, min_compression_rate: float = 2.0) -> bool:
    """torch's rule (powerSGD_hook._should_compress): compress when the factors,
    times `min_compression_rate`, are still smaller than the matrix."""
    r = effective_rank(rows, cols, rank)
    return (rows + cols) * r * min_compression_rate < rows * cols


def sent_numel(piece_matrix: tuple[int, int] | None, numel: int, rank: int | None,
               min_compression_rate: float = 2.0, name: str | None = None,
               exclude_roles: Sequence[str] = UNCOMPRESSED_ROLES) -> int:
    """Numbers one GPU all-reduces across machines for one piece (`name`: the
    parameter's, for the role exclusions; None = a plain matrix)."""
    if not is_compressed(name or "weight", piece_matrix, rank, min_compression_rate,
                         exclude_roles if name is not None else ()):
        return numel
    rows, cols = piece_matrix  # type: ignore[misc]
    return (rows + cols) * effective_rank(rows, cols, rank)  # type: ignore[arg-type]


def paper_compression(rank_total: int, d_model: int) -> float:
    """The paper's estimate of the fraction of gradient traffic saved: 1 - 5r / (8 d)."""
    return 1.0 - 5.0 * rank_total / (8.0 * d_model)


# --- layouts -------------------------------------------------------------------------

def fsdp_unit_layout(module: torch.nn.Module, names: dict[int, str] | None = None) -> list[Piece]:
    """The pieces of an FSDP2 module's flat reduce-scatter output, in order.

    Read from FSDP2's parameter group (``FSDPParam.padded_sharded_param_size``
    and ``fsdp_placement``), which is what `foreach_reduce` uses to view the
    buffer back into sharded gradients. `names`: id(parameter) -> its name in
    the model (FSDP2 leaves ``_param_fqn`` unset until a state dict is taken).
    """
    state = module._get_fsdp_state()  # type: ignore[attr-defined]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older layout: one group
        groups = [state._fsdp_param_group]
    pieces: list[Piece] = []
    offset = 0
    for group in groups:
        if group is None:
            continue
        for fp in group.fsdp_params:
            size = torch.Size(fp.padded_sharded_param_size)
            numel = size.numel()
            shard_dim = getattr(getattr(fp, "fsdp_placement", None), "dim", 0)
            matrix = None
            if len(size) >= 2 and shard_dim == 0 and size[0] > 0:
                matrix = (int(size[0]), numel // int(size[0]))
            param = getattr(fp, "sharded_param", None)
            pid = id(param) if param is not None else None
            name = (names or {}).get(pid) or fp._param_fqn or f"param{len(pieces)}"
            pieces.append(Piece(name, offset, numel, matrix, pid))
            offset += numel
    return pieces


def tensors_layout(tensors: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> list[Piece]:
    """Layout of plain tensors packed one after the other (for direct use and tests)."""
    pieces, offset = [], 0
    for i, t in enumerate(tensors):
        name = names[i] if names is not None else f"t{i}"
        matrix = (t.shape[0], t.numel() // t.shape[0]) if t.dim() >= 2 and t.shape[0] > 0 else None
        pieces.append(Piece(name, offset, t.numel(), matrix))
        offset += t.numel()
    return pieces


# --- orthogonalisation -------------------------------------------------------------------

def orthogonalize_gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    """In place, column by column (torch's _orthogonalize_gram_schmidt); a zero
    column stays zero instead of turning into NaN."""
    tiny = torch.finfo(p.dtype).tiny
    for i in range(p.shape[1]):
        col = p[:, i:i + 1]
        col.div_(torch.linalg.vector_norm(col).clamp_min(tiny))
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1:]
            rest.sub_(col * (col * rest).sum(dim=0, keepdim=True))
    return p


def orthogonalize_householder(p: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """In place, reduced QR by Householder reflections (LAPACK geqrf) of
    P + epsilon I (I: the n x r identity; the paper adds "a small multiple of
    the identity" before orthogonalising)."""
    if epsilon:
        p.diagonal().add_(epsilon)
    q, _ = torch.linalg.qr(p.to(torch.float32) if p.dtype in (torch.float16, torch.bfloat16) else p,
                           mode="reduced")
    p.copy_(q)
    return p


# --- reducers ------------------------------------------------------------------------------

class CrossNodeReducer:
    """Averages each FSDP unit's reduce-scattered gradient shard over
    `process_group` (mesh["node"]): an uncompressed all-reduce ("custom HSDP").

    Counts the payload it all-reduces: `bytes_uncompressed` (what a plain
    all-reduce sends) and `bytes_sent`. Ring all-reduce moves 2 (n-1)/n times
    the payload per GPU either way, so the ratio of payloads is the ratio of
    traffic.
    """

    def __init__(self, process_group: Any = None):
        self.process_group = process_group
        self.grad_scaler: Any = None  # a PerResblockGradScaler (set_grad_scaler)
        self._param_block: dict[int, int] | None = None
        self.world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.bytes_uncompressed = 0
        self.bytes_sent = 0
        self.calls = 0
        self.iteration = 0  # completed steps (end_step)
        self._layouts: dict[str, list[Piece]] = {}

    # --- wiring into FSDP2 ---------------------------------------------------------
    def set_grad_scaler(self, scaler: Any) -> None:
        """The per-resblock gradient scaler whose scaled gradients the hook sees
        (duck-typed: ``n``, ``block_parameters(i)``, ``grad_multiplier(i)``)."""
        self.grad_scaler = scaler
        self._param_block = None

    def grad_multiplier(self, piece: Piece) -> float:
        """What the piece's gradient is multiplied by when the hook sees it: its
        resblock's s / M, 1 outside the resblocks or without a scaler."""
        sc = self.grad_scaler
        if sc is None or piece.param_id is None or not getattr(sc, "enabled", True):
            return 1.0
        if self._param_block is None:
            self._param_block = {id(p): i for i in range(sc.n) for p in sc.block_parameters(i)}
        i = self._param_block.get(piece.param_id)
        return 1.0 if i is None else float(sc.grad_multiplier(i))

    def hook_for(self, unit: str, module: torch.nn.Module | None = None,
                 layout: list[Piece] | None = None,
                 names: dict[int, str] | None = None) -> Callable[[torch.Tensor], None]:
        """The callable for `module.set_all_reduce_hook`: reduces the unit's flat
        shard in place. `names`: id(parameter) -> name (for the role exclusions)."""
        if layout is not None:
            self._layouts[unit] = layout

        def hook(flat: torch.Tensor) -> None:
            pieces = self._layouts.get(unit)
            if pieces is None and module is not None:
                pieces = self._layouts[unit] = fsdp_unit_layout(module, names)
            if pieces is None or sum(p.numel for p in pieces) != flat.numel():
                # e.g. a parameter without a gradient this step: FSDP then packs
                # only the others; reduce the buffer whole, uncompressed.
                if pieces is not None:
                    log.warning("unit %s: flat gradient has %d elements, layout %d; reducing uncompressed",
                                unit, flat.numel(), sum(p.numel for p in pieces))
                pieces = [Piece(f"{unit}/flat", 0, flat.numel(), None)]
            self.reduce_flat(unit, flat, pieces)

        return hook

    def end_step(self) -> None:
        """Call once per optimizer step, after backward."""
        self.iteration += 1

    # --- the reduction -----------------------------------------------------------------
    def _all_reduce_mean_(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
            t.div_(self.world_size)

    def reduce_flat(self, unit: str, flat: torch.Tensor, pieces: list[Piece]) -> None:
        self.calls += 1
        nbytes = flat.numel() * flat.element_size()
        self.bytes_uncompressed += nbytes
        self.bytes_sent += nbytes
        self._all_reduce_mean_(flat)

    def all_reduce_(self, unit: str, tensors: Sequence[torch.Tensor],
                    names: Sequence[str] | None = None) -> None:
        """Average plain tensors across the group in place, as the hook would a
        unit holding them (each >= 2-D tensor a [rows, rest] matrix)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.reduce_flat(unit, flat, tensors_layout(tensors, names))
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    # --- numbers ------------------------------------------------------------------------
    @property
    def compression_ratio(self) -> float:
        """Measured bytes a plain all-reduce would send / bytes sent (>= 1)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def compression(self) -> float:
        """Measured fraction of cross-machine traffic saved (the paper's "85%")."""
        return 1.0 - self.bytes_sent / self.bytes_uncompressed if self.bytes_uncompressed else 0.0

    def stats(self) -> dict[str, float]:
        return {"xnode_bytes_uncompressed": float(self.bytes_uncompressed),
                "xnode_bytes_sent": float(self.bytes_sent),
                "xnode_compression_ratio": self.compression_ratio,
                "xnode_compression": self.compression}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "bytes_uncompressed": self.bytes_uncompressed,
                "bytes_sent": self.bytes_sent, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.bytes_uncompressed = int(state.get("bytes_uncompressed", 0))
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.calls = int(state.get("calls", 0))


POWERSGD_VARIANTS = ("torch", "paper")


class PowerSGDCompressor(CrossNodeReducer):
    """PowerSGD all-reduce of gradient shards across machines (see module docstring).

    rank: approximation rank per matrix (per GPU shard); min_compression_rate:
    matrices that would not shrink by this factor go uncompressed;
    exclude_roles: parameter roles never compressed (`parameter_role`; the
    paper's embeddings, heads, gains and biases by default, ``()`` to compress
    every matrix); warm_start: reuse last step's Q; fixed_q (without
    warm_start): the Gaussian Q drawn at the start for every step (else a fresh
    seeded Gaussian Q each step); use_error_feedback: keep the residual per
    matrix (in true gradient units) and add it next step; orthogonalization:
    "gram_schmidt" (torch's default) or "householder" (the paper's), with
    `orthogonalization_epsilon` times the identity added first (householder);
    start_iter: plain all-reduce for the first `start_iter` steps.
    `variant="paper"` sets warm_start False, fixed_q True, householder.
    """

    def __init__(self, rank: int, process_group: Any = None, min_compression_rate: float = 2.0,
                 warm_start: bool = True, use_error_feedback: bool = True,
                 orthogonalization: str = "gram_schmidt", seed: int = 0, start_iter: int = 0,
                 exclude_roles: Sequence[str] = UNCOMPRESSED_ROLES, fixed_q: bool = False,
                 orthogonalization_epsilon: float = 0.0, variant: str | None = None):
        super().__init__(process_group)
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        if variant is not None:
            if variant not in POWERSGD_VARIANTS:
                raise ValueError(f"PowerSGD variant must be one of {POWERSGD_VARIANTS}, got {variant!r}")
            if variant == "paper":
                warm_start, fixed_q, orthogonalization = False, True, "householder"
        if orthogonalization not in ("gram_schmidt", "householder"):
            raise ValueError(f"orthogonalization must be 'gram_schmidt' or 'householder', got {orthogonalization!r}")
        self.rank = int(rank)
        self.min_compression_rate = float(min_compression_rate)
        self.exclude_roles = tuple(exclude_roles)
        self.warm_start = warm_start
        self.fixed_q = bool(fixed_q) and not warm_start
        self.use_error_feedback = use_error_feedback
        self.orthogonalization = orthogonalization
        self.orthogonalization_epsilon = float(orthogonalization_epsilon)
        self.seed = int(seed)
        self.start_iter = int(start_iter)
        self.errors: dict[str, torch.Tensor] = {}  # true (unscaled) gradient units
        self.qs: dict[str, torch.Tensor] = {}  # warm start: last step's Q
        self._q0: dict[str, torch.Tensor] = {}  # fixed_q: the Q drawn at the start
        self.n_nonfinite = 0

    def _orthogonalize(self, p: torch.Tensor) -> None:
        if self.orthogonalization == "householder":
            orthogonalize_householder(p, self.orthogonalization_epsilon)
        else:
            orthogonalize_gram_schmidt(p)

    def _initial_q(self, key: str, cols: int, r: int, like: torch.Tensor) -> torch.Tensor:
        # Same seed on every machine (the key names the same parameter shard there);
        # drawn on the CPU so that it does not depend on the device. A fixed Q
        # (and the warm start's first Q) is salt 0; fresh ones are salted by step.
        salt = 0 if (self.warm_start or self.fixed_q) else self.iteration + 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode()) + salt * 7919) % (2**63))
        return torch.randn(cols, r, generator=g, dtype=torch.float32).to(like.device, like.dtype)

    def _q_for(self, key: str, cols: int, r: int, like: torch.Tensor) -> torch.Tensor:
        if self.warm_start:
            q0 = self.qs.get(key)
            if q0 is not None and q0.shape == (cols, r):
                return q0
        elif self.fixed_q:
            q0 = self._q0.get(key)
            if q0 is None or q0.shape != (cols, r) or q0.dtype != like.dtype or q0.device != like.device:
                q0 = self._q0[key] = self._initial_q(key, cols, r, like)
            return q0
        return self._initial_q(key, cols, r, like)

    def compressed(self, pc: Piece) -> bool:
        return is_compressed(pc.name, pc.matrix, self.rank, self.min_compression_rate, self.exclude_roles)

    def reduce_flat(self, unit: str, flat: torch.Tensor, pieces: list[Piece]) -> None:
        if self.iteration < self.start_iter:
            super().reduce_flat(unit, flat, pieces)
            return
        self.calls += 1
        esize = flat.element_size()
        lowrank = [pc for pc in pieces if self.compressed(pc)]
        plain = [pc for pc in pieces if pc not in lowrank]
        self.bytes_uncompressed += flat.numel() * esize

        # 1. What is not compressed: one uncompressed all-reduce (linear: the
        # gradient scale needs no care here).
        if plain:
            buf = torch.cat([flat[pc.offset:pc.offset + pc.numel] for pc in plain])
            self._all_reduce_mean_(buf)
            self.bytes_sent += buf.numel() * esize
            o = 0
            for pc in plain:
                flat[pc.offset:pc.offset + pc.numel].copy_(buf[o:o + pc.numel])
                o += pc.numel
        if not lowrank:
            return

        # 2. Matrices, in true gradient units (divided by their resblock's
        # multiplier c = s / M, the same on every machine): error feedback, P = M Q.
        keys = [f"{unit}/{pc.name}" for pc in lowrank]
        cs = [self.grad_multiplier(pc) for pc in lowrank]
        ms, ranks = [], []
        for key, pc, c in zip(keys, lowrank, cs):
            rows, cols = pc.matrix  # type: ignore[misc]
            m = flat[pc.offset:pc.offset + pc.numel].view(rows, cols)
            if c != 1.0:
                m.div_(c)
            if self.use_error_feedback and key in self.errors:
                m.add_(self.errors[key])
            ms.append(m)
            ranks.append(effective_rank(rows, cols, self.rank))
        p_sizes = [m.shape[0] * r for m, r in zip(ms, ranks)]
        q_sizes = [m.shape[1] * r for m, r in zip(ms, ranks)]
        p_buf = flat.new_empty(sum(p_sizes))
        q_buf = flat.new_empty(sum(q_sizes))
        ps, qs = [], []
        po = qo = 0
        for key, m, r, ns, nq in zip(keys, ms, ranks, p_sizes, q_sizes):
            p = p_buf[po:po + ns].view(m.shape[0], r)
            q = q_buf[qo:qo + nq].view(m.shape[1], r)
            q.copy_(self._q_for(key, m.shape[1], r, flat))
            torch.matmul(m, q, out=p)
            ps.append(p)
            qs.append(q)
            po, qo = po + ns, qo + nq

        # 3. All-reduce P, orthogonalise; Q' = M^T P; error; all-reduce Q.
        if self.world_size > 1:
            dist.all_reduce(p_buf, op=dist.ReduceOp.SUM, group=self.process_group)
        self.bytes_sent += p_buf.numel() * esize
        bad = (~torch.stack([torch.isfinite(p).all() for p in ps])).tolist()  # one host sync
        for p, b in zip(ps, bad):
            if b:
                p.zero_()
            else:
                self._orthogonalize(p)
        for key, m, p, q, b in zip(keys, ms, ps, qs, bad):
            torch.matmul(m.t(), p, out=q)
            if self.use_error_feedback:
                if b:
                    self.errors.pop(key, None)
                else:
                    self.errors[key] = m - p @ q.t()
        if self.world_size > 1:
            dist.all_reduce(q_buf, op=dist.ReduceOp.SUM, group=self.process_group)
        self.bytes_sent += q_buf.numel() * esize

        # 4. Decompress the mean into the flat buffer, back in scaled units (the
        # scaler's unscale_ divides by c after backward); keep Q for the next step.
        for key, m, p, q, b, c in zip(keys, ms, ps, qs, bad, cs):
            if b:
                m.fill_(float("nan"))
                self.n_nonfinite += 1
                continue
            torch.matmul(p, q.t(), out=m)
            m.div_(self.world_size / c if c != 1.0 else self.world_size)
            if self.warm_start:
                self.qs[key] = q.clone()

    def stats(self) -> dict[str, float]:
        s = super().stats()
        s["powersgd_rank"] = float(self.rank)
        s["powersgd_nonfinite"] = float(self.n_nonfinite)
        return s

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"rank": self.rank, "errors": dict(self.errors), "qs": dict(self.qs),
                  "n_nonfinite": self.n_nonfinite, "error_units": "true"})
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if int(state.get("rank", self.rank)) != self.rank:
            log.warning("PowerSGD rank changed from %s to %s: starting without error feedback / warm start",
                        state.get("rank"), self.rank)
            self.errors, self.qs = {}, {}
            return
        if state.get("error_units") != "true" and state.get("errors"):
            # older checkpoints kept the errors in scaled units (unknown scale): drop them
            log.warning("PowerSGD error buffers of an older checkpoint are in scaled units: starting without them")
            self.errors = {}
        else:
            self.errors = {k: v.clone() for k, v in state.get("errors", {}).items()}
        self.qs = {k: v.clone() for k, v in state.get("qs", {}).items()}
        self.n_nonfinite = int(state.get("n_nonfinite", 0))


__all__ = ["CrossNodeReducer", "EMBEDDING_PARAMETERS", "POWERSGD_VARIANTS", "Piece", "PowerSGDCompressor",
           "UNCOMPRESSED_ROLES", "effective_rank", "fsdp_unit_layout", "is_compressed",
           "orthogonalize_gram_schmidt", "orthogonalize_householder", "paper_compression", "parameter_role",
           "sent_numel", "should_compress", "tensors_layout"]
