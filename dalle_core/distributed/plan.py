"""Analytic plan of a sharded training run: parameters, memory per GPU, bytes
moved per step inside and across machines, with and without PowerSGD.

Nothing here runs a model: the parameter shapes come from `DalleTransformer`
built on the meta device (exact counts for any profile, 12B included), the rest
is arithmetic on them. The layout is the one `dalle_core.distributed` runs:
every transformer layer is one FSDP unit sharded along dim 0 over the
`gpus_per_node` GPUs of a machine (dim 0 padded to a multiple of g), the root
unit holds embeddings, final LN and heads; machines are replicas.

Notation: P parameters, g GPUs per machine, n machines, B batch per GPU,
S = text_len + image_len, d = n_embd, h heads.

Memory per GPU (bytes)
    params      P_pad / g * param_bytes          16-bit sharded parameters
    grads       P_pad / g * grad_bytes           sharded gradients
    optimizer   P_pad / g * (4 + 8)              fp32 master + Adam's two fp32 moments
    unsharded   (root + 2 * layer) * param_bytes + (root + layer) * grad_bytes
                the root stays gathered from forward to backward; the current and
                the prefetched layer are gathered; one layer's and the root's
                unsharded gradients exist before their reduce-scatter
    activations with checkpointing: n_layer * B*S*d * residual_bytes (each layer's
                input; the residual stream is fp32 in our model, so 4) + one layer's
                working set; without: n_layer working sets. A layer's working set
                (upper bound, attention probabilities materialised):
                B*S*d*(2*4 + 14*act_bytes) + 2*B*h*S^2*act_bytes
                (two fp32 LN outputs; qkv 3, attention out 1, proj 1, fc 4, GELU 4,
                MLP out 1 in act_bytes), plus fp32 logits and their gradient:
                2 * 4 * B * (L * (V_text + L) + N * V_image)

Bytes sent per GPU per step (ring collectives: a GPU sends (k-1)/k of the
buffer for an all-gather or reduce-scatter over k ranks, 2 (k-1)/k for an
all-reduce)
    inside a machine  all-gather of every layer in forward and again in backward
                      (resharded after forward), of the root once:
                      (g-1)/g * (P_pad + P_layers_pad) * param_bytes;
                      reduce-scatter of all gradients: (g-1)/g * P_pad * grad_bytes
    across machines   all-reduce of the GPU's gradient shard:
                      uncompressed 2 (n-1)/n * P_pad/g * grad_bytes;
                      PowerSGD: each compressible shard matrix (a x b) sends
                      (a + b) * r values instead of a * b (torch's rule: compress
                      when (a + b) r * min_compression_rate < a b), the others
                      go uncompressed; so do embeddings, heads, gains and
                      biases (powersgd.parameter_role, the paper's appendix E:
                      `powersgd_exclude_roles`). The rule is powersgd.is_compressed,
                      the one the reducer applies (a test measures the bytes the
                      reducer hands to all_reduce on a 2 x 2 gloo mesh and
                      compares them with this plan).

Per rank as the trainer runs it (`Plan.rank_memory`, `rank_memory`): the
model is built on the meta device and each rank fills its own shards
(dalle_core.distributed.init), so no rank holds the whole model; FSDP2 keeps
fp32 sharded parameters (no separate master: autocast casts in compute), fp32
sharded gradients, AdamW's two fp32 moments and the fp32 EMA, and gathers
units in fp32 (default MixedPrecisionPolicy). Device bytes per rank:
    params, grads, adam, ema     shard * (4, 4, 8, 4)
    gathered                     (root + 2 * layer) * 4 + (root + layer) * 4
    powersgd (n > 1)             error feedback: every compressed shard matrix,
                                 fp32; the fixed (paper) or warm-start Q: b * r
                                 per matrix; transient, the largest unit's P and
                                 Q buffers + its uncompressed pieces + two
                                 temporaries of its largest matrix (M - P Q^T)
    activations                  as `mem_activations` (16-bit under autocast)
Host bytes per rank: the largest init chunk (`max_chunk_bytes`: before meta
init every rank built the whole fp32 model, 4 P), the largest local tensor
(DCP writes tensor by tensor), and at the end `save_prior`: rank 0 gathers
the full fp32 state dict and the full EMA (8 P), and every other rank a full
EMA copy (4 P: save_prior's EMA loop copies every gathered tensor to the host
on every rank before rank 0 alone writes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .powersgd import UNCOMPRESSED_ROLES, effective_rank, is_compressed, paper_compression, sent_numel

GIB = 1024**3


@dataclass
class RankMemory:
    """Peak device and host bytes of one rank as the trainer runs (module docstring)."""

    shard_numel: int  # parameters this rank holds (FSDP's padded shard)
    device_params: int
    device_grads: int
    device_adam: int
    device_ema: int
    device_gathered: int
    device_powersgd_errors: int
    device_powersgd_q: int
    device_powersgd_transient: int
    device_activations: int
    host_init_chunk: int  # largest chunk the meta-device init draws at once
    host_full_build_before: int  # what every rank built before meta init: the whole fp32 model
    host_checkpoint_tensor: int  # largest local tensor DCP copies to the host while writing
    host_final_save_rank0: int  # save_prior: full state dict + full EMA on rank 0
    host_final_save_other: int  # save_prior: the full EMA on every other rank

    @property
    def device_powersgd(self) -> int:
        return self.device_powersgd_errors + self.device_powersgd_q + self.device_powersgd_transient

    @property
    def device_sharded_state(self) -> int:
        return self.device_params + self.device_grads + self.device_adam + self.device_ema

    @property
    def device_peak(self) -> int:
        return self.device_sharded_state + self.device_gathered + self.device_powersgd + self.device_activations

    @property
    def host_peak_training(self) -> int:
        return max(self.host_init_chunk, self.host_checkpoint_tensor)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(device_powersgd=self.device_powersgd, device_sharded_state=self.device_sharded_state,
                 device_peak=self.device_peak, host_peak_training=self.host_peak_training)
        return d


def rank_memory(shapes: list[tuple[str, tuple[int, ...]]], n_layer: int, gpus_per_node: int, nodes: int,
                powersgd_rank: int | None, activations: int, *, min_compression_rate: float = 2.0,
                powersgd_exclude_roles: tuple[str, ...] = UNCOMPRESSED_ROLES) -> RankMemory:
    """Per-rank memory of the trainer (module docstring) from the model's parameter shapes."""
    from .init import max_chunk_bytes

    g = gpus_per_node

    def shard(shape: tuple[int, ...]) -> tuple[int, int]:
        return -(-shape[0] // g), _prod(shape[1:])

    units: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for nm, s in shapes:
        unit = ".".join(nm.split(".")[:2]) if nm.startswith("blocks.") else "root"
        units.setdefault(unit, []).append((nm, s))
    shard_numel = sum(r * c for r, c in (shard(s) for _, s in shapes))
    full = {u: sum(_prod(s) for _, s in ps) for u, ps in units.items()}
    root = full.get("root", 0)
    layer = max((v for u, v in full.items() if u != "root"), default=0)
    gathered = (root + 2 * layer) * 4 + (root + layer) * 4

    errors = qbytes = transient = 0
    if nodes > 1 and powersgd_rank is not None:
        for ps in units.values():
            p_buf = q_buf = plain = biggest = 0
            for nm, s in ps:
                rows, cols = shard(s)
                matrix = (rows, cols) if len(s) >= 2 else None
                if is_compressed(nm, matrix, powersgd_rank, min_compression_rate, powersgd_exclude_roles):
                    r = effective_rank(rows, cols, powersgd_rank)
                    errors += rows * cols * 4
                    qbytes += cols * r * 4
                    p_buf += rows * r * 4
                    q_buf += cols * r * 4
                    biggest = max(biggest, rows * cols * 4)
                else:
                    plain += rows * cols * 4
            transient = max(transient, p_buf + q_buf + plain + 2 * biggest)
    n_params = sum(_prod(s) for _, s in shapes)
    largest_local = max((r * c for r, c in (shard(s) for _, s in shapes)), default=0) * 4
    return RankMemory(
        shard_numel=shard_numel, device_params=shard_numel * 4, device_grads=shard_numel * 4,
        device_adam=shard_numel * 8, device_ema=shard_numel * 4, device_gathered=gathered,
        device_powersgd_errors=errors, device_powersgd_q=qbytes, device_powersgd_transient=transient,
        device_activations=activations, host_init_chunk=max_chunk_bytes([s for _, s in shapes]),
        host_full_build_before=n_params * 4, host_checkpoint_tensor=largest_local,
        host_final_save_rank0=n_params * 8, host_final_save_other=n_params * 4)


def _meta_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    import torch

    from dalle_core.prior.model import DalleTransformer

    with torch.device("meta"):
        model = DalleTransformer(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _prod(xs) -> int:
    return math.prod(xs) if xs else 1


@dataclass
class Plan:
    profile: dict[str, Any]
    nodes: int
    gpus_per_node: int
    batch_size_per_gpu: int
    global_batch: int
    powersgd_rank: int | None
    activation_checkpointing: bool
    n_params: int  # exact (meta-device model)
    n_params_layers: int
    n_params_root: int
    params_per_gpu: int  # padded shard
    # memory per GPU, bytes
    mem_params: int
    mem_grads: int
    mem_optimizer: int
    mem_unsharded: int
    mem_activations: int
    # bytes sent per GPU per step
    intra_allgather_bytes: int
    intra_reduce_scatter_bytes: int
    inter_bytes_uncompressed: int
    inter_bytes_powersgd: int | None
    compression: float | None  # 1 - powersgd / uncompressed, from the shapes
    paper_formula_compression: float | None  # 1 - 5 r_total / (8 d), r_total = r * g
    assumptions: dict[str, Any] = field(default_factory=dict)
    rank_memory: RankMemory | None = None  # as the trainer runs it (fp32 shards, EMA, PowerSGD buffers)

    @property
    def mem_total(self) -> int:
        return self.mem_params + self.mem_grads + self.mem_optimizer + self.mem_unsharded + self.mem_activations

    @property
    def intra_bytes(self) -> int:
        return self.intra_allgather_bytes + self.intra_reduce_scatter_bytes

    @property
    def inter_bytes(self) -> int:
        return self.inter_bytes_powersgd if self.inter_bytes_powersgd is not None else self.inter_bytes_uncompressed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mem_total=self.mem_total, intra_bytes=self.intra_bytes, inter_bytes=self.inter_bytes)
        if self.rank_memory is not None:
            d["rank_memory"] = self.rank_memory.to_dict()
        return d

    def to_table(self) -> str:
        def gib(x: int | None) -> str:
            if x is None:
                return "-"
            for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
                if x >= size:
                    return f"{x / size:,.2f} {unit}"
            return f"{x} B"

        rows = [
            ("model", f"{self.profile.get('n_layer')} layers, d {self.profile.get('n_embd')}, "
                      f"seq {self.profile.get('seq_len')}"),
            ("mesh", f"{self.nodes} machines x {self.gpus_per_node} GPUs, batch {self.batch_size_per_gpu}/GPU "
                     f"({self.global_batch} global)"),
            ("parameters", f"{self.n_params:,} ({self.n_params / 1e9:.2f}B; layers {self.n_params_layers:,}, "
                           f"root {self.n_params_root:,})"),
            ("parameters per GPU", f"{self.params_per_gpu:,}"),
            ("memory/GPU: params", gib(self.mem_params)),
            ("memory/GPU: grads", gib(self.mem_grads)),
            ("memory/GPU: Adam + master", gib(self.mem_optimizer)),
            ("memory/GPU: gathered units", gib(self.mem_unsharded)),
            ("memory/GPU: activations" + (" (ckpt)" if self.activation_checkpointing else ""),
             gib(self.mem_activations)),
            ("memory/GPU: total", gib(self.mem_total)),
            ("sent/GPU/step in machine: all-gather", gib(self.intra_allgather_bytes)),
            ("sent/GPU/step in machine: reduce-scatter", gib(self.intra_reduce_scatter_bytes)),
            ("sent/GPU/step across machines: plain", gib(self.inter_bytes_uncompressed)),
            (f"sent/GPU/step across machines: PowerSGD r={self.powersgd_rank}", gib(self.inter_bytes_powersgd)),
            ("PowerSGD compression (shapes)", "-" if self.compression is None else f"{self.compression:.1%}"),
            ("paper formula 1 - 5r/(8d), r = r_gpu * g",
             "-" if self.paper_formula_compression is None else f"{self.paper_formula_compression:.1%}"),
        ]
        m = self.rank_memory
        if m is not None:
            rows += [
                ("per rank as trained (meta init)", "fp32 shards + EMA, fp32 gathers, 16-bit activations"),
                ("  device: params + grads + Adam + EMA", f"{gib(m.device_sharded_state)} "
                 f"({gib(m.device_params)} + {gib(m.device_grads)} + {gib(m.device_adam)} + {gib(m.device_ema)})"),
                ("  device: gathered units", gib(m.device_gathered)),
                ("  device: PowerSGD errors + Q + transient", f"{gib(m.device_powersgd)} ({gib(m.device_powersgd_errors)}"
                 f" + {gib(m.device_powersgd_q)} + {gib(m.device_powersgd_transient)})"),
                ("  device: activations" + (" (ckpt)" if self.activation_checkpointing else ""),
                 gib(m.device_activations)),
                ("  device: peak", gib(m.device_peak)),
                ("  host: init chunk (was: whole model)", f"{gib(m.host_init_chunk)} (was {gib(m.host_full_build_before)})"),
                ("  host: training peak", gib(m.host_peak_training)),
                ("  host: final save_prior rank 0 / others", f"{gib(m.host_final_save_rank0)} / "
                 f"{gib(m.host_final_save_other)}"),
            ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def plan(profile_config, nodes: int, gpus_per_node: int, batch_size_per_gpu: int,
         powersgd_rank: int | None = None, activation_checkpointing: bool = True, *,
         param_bytes: int = 2, grad_bytes: int = 2, act_bytes: int = 2, residual_bytes: int = 4,
         min_compression_rate: float = 2.0, powersgd_exclude_roles: tuple[str, ...] = UNCOMPRESSED_ROLES) -> Plan:
    """Plan a run of `profile_config` (a PriorConfig) on `nodes` x `gpus_per_node`
    GPUs (see the module docstring for every formula). Byte sizes default to
    the paper's fp16 parameters / gradients / activations with fp32 optimizer
    state and our fp32 residual stream."""
    if nodes < 1 or gpus_per_node < 1 or batch_size_per_gpu < 1:
        raise ValueError("nodes, gpus_per_node and batch_size_per_gpu must be >= 1")
    cfg = profile_config
    g, n, B = gpus_per_node, nodes, batch_size_per_gpu
    shapes = _meta_shapes(cfg)

    def padded_shard(shape: tuple[int, ...]) -> tuple[int, int]:
        rows = -(-shape[0] // g)  # ceil
        return rows, _prod(shape[1:])

    n_params = sum(_prod(s) for _, s in shapes)
    layer_shapes = [(nm, s) for nm, s in shapes if nm.startswith("blocks.")]
    root_shapes = [(nm, s) for nm, s in shapes if not nm.startswith("blocks.")]
    n_layers_params = sum(_prod(s) for _, s in layer_shapes)
    n_root = n_params - n_layers_params
    per_layer = n_layers_params // cfg.n_layer

    shard_numel = sum(r * c for r, c in (padded_shard(s) for _, s in shapes))
    layers_padded = sum(r * c * g for r, c in (padded_shard(s) for _, s in layer_shapes))
    all_padded = shard_numel * g

    mem_params = shard_numel * param_bytes
    mem_grads = shard_numel * grad_bytes
    mem_optimizer = shard_numel * (4 + 8)
    mem_unsharded = (n_root + 2 * per_layer) * param_bytes + (n_root + per_layer) * grad_bytes

    S, d, h = cfg.seq_len, cfg.n_embd, cfg.n_head
    T = B * S
    working = T * d * (2 * 4 + 14 * act_bytes) + 2 * B * h * S * S * act_bytes
    logits = 2 * 4 * B * (cfg.text_len * cfg.text_embedding_size + cfg.image_len * cfg.image_vocab_size)
    if activation_checkpointing:
        mem_act = cfg.n_layer * T * d * residual_bytes + working + logits
    else:
        mem_act = cfg.n_layer * working + logits

    ag = (g - 1) * (all_padded + layers_padded) * param_bytes // g
    rs = (g - 1) * all_padded * grad_bytes // g
    if n > 1:
        ring = 2 * (n - 1) / n
        inter_plain = int(ring * shard_numel * grad_bytes)
        inter_psgd = None
        compression = None
        if powersgd_rank is not None:
            sent = 0
            for nm, s in shapes:
                rows, cols = padded_shard(s)
                matrix = (rows, cols) if len(s) >= 2 else None
                sent += sent_numel(matrix, rows * cols, powersgd_rank, min_compression_rate, name=nm,
                                   exclude_roles=powersgd_exclude_roles)
            inter_psgd = int(ring * sent * grad_bytes)
            compression = 1 - sent / shard_numel
    else:
        inter_plain, inter_psgd, compression = 0, (0 if powersgd_rank is not None else None), None
    formula = paper_compression(powersgd_rank * g, d) if powersgd_rank is not None else None

    return Plan(
        profile={"n_layer": cfg.n_layer, "n_embd": d, "n_head": h, "seq_len": S,
                 "text_len": cfg.text_len, "image_len": cfg.image_len},
        nodes=n, gpus_per_node=g, batch_size_per_gpu=B, global_batch=B * g * n,
        powersgd_rank=powersgd_rank, activation_checkpointing=activation_checkpointing,
        n_params=n_params, n_params_layers=n_layers_params, n_params_root=n_root, params_per_gpu=shard_numel,
        mem_params=mem_params, mem_grads=mem_grads, mem_optimizer=mem_optimizer, mem_unsharded=mem_unsharded,
        mem_activations=mem_act, intra_allgather_bytes=ag, intra_reduce_scatter_bytes=rs,
        inter_bytes_uncompressed=inter_plain, inter_bytes_powersgd=inter_psgd, compression=compression,
        paper_formula_compression=formula,
        rank_memory=rank_memory(shapes, cfg.n_layer, g, n, powersgd_rank, mem_act,
                                min_compression_rate=min_compression_rate,
                                powersgd_exclude_roles=powersgd_exclude_roles),
        assumptions={"param_bytes": param_bytes, "grad_bytes": grad_bytes, "act_bytes": act_bytes,
                     "residual_bytes": residual_bytes, "optimizer_bytes_per_param": 12,
                     "min_compression_rate": min_compression_rate, "shard_dim": 0,
                     "powersgd_uncompressed_roles": list(powersgd_exclude_roles)},
    )


__all__ = ["GIB", "Plan", "RankMemory", "plan", "rank_memory"]
