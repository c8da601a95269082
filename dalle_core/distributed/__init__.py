"""Distribution of the prior's training (paper section 2.5, appendix D).

Parameters sharded across the GPUs of a machine (FSDP2 over mesh["gpu"], next
layer's all-gather prefetched, gradients reduce-scattered); machines are
data-parallel replicas whose gradient shards are averaged with PowerSGD (error
feedback, warm start) in FSDP2's all-reduce hook; atomic sharded checkpoints;
an analytic planner for memory and communication at paper scale.

mesh.py         ParallelConfig, init_distributed, build_mesh (("node", "gpu") DeviceMesh)
parallelize.py  apply_activation_checkpointing, apply_fsdp, apply_cross_node_reduction, parallelize_prior
powersgd.py     CrossNodeReducer (plain), PowerSGDCompressor
checkpoint.py   save_checkpoint, load_latest (torch.distributed.checkpoint)
plan.py         plan(...) -> Plan: parameters, memory per GPU (and per rank as trained), bytes per step
init.py         materialize / fill_parameters: a meta-built, sharded model filled shard by shard
                from per-parameter seeded generators (the same values for any world size)

The torchrun entry point is ``python -m dalle_core.prior.train``.
"""

from .checkpoint import latest_step, list_checkpoints, load_latest, save_checkpoint
from .mesh import ParallelConfig, build_mesh, init_distributed, resolve_topology
from .parallelize import (
    ParallelSetup,
    apply_activation_checkpointing,
    apply_cross_node_reduction,
    apply_fsdp,
    parallelize_prior,
)
from .plan import Plan, plan
from .powersgd import CrossNodeReducer, PowerSGDCompressor, paper_compression

__all__ = [
    "CrossNodeReducer", "ParallelConfig", "ParallelSetup", "Plan", "PowerSGDCompressor",
    "apply_activation_checkpointing", "apply_cross_node_reduction", "apply_fsdp", "build_mesh",
    "init_distributed", "latest_step", "list_checkpoints", "load_latest", "paper_compression",
    "parallelize_prior", "plan", "resolve_topology", "save_checkpoint",
]
