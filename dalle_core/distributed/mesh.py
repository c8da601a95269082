"""Process groups and the 2-D device mesh (machines x GPUs per machine).

The paper's layout (section 2.5, appendix D): the parameters of the prior are
sharded across the 8 GPUs of one machine, and machines are data-parallel
replicas whose gradients are averaged with PowerSGD-compressed all-reduces.
That is a 2-D mesh:

    mesh["gpu"]   ranks of one machine: parameter sharding (FSDP2 all-gather /
                  reduce-scatter over NVLink)
    mesh["node"]  the same GPU index on every machine: cross-machine gradient
                  all-reduce (over the slower network; compressed)

Ranks are laid out row-major, rank = node * gpus_per_node + gpu, which is how
torchrun numbers them (RANK = node_rank * nproc_per_node + local_rank).

On CPU (tests) the "GPUs" are processes on one box: 4 processes started with
``torchrun --nproc-per-node 4`` form a 2 x 2 mesh when gpus_per_node is 2 (from
`ParallelConfig.gpus_per_node` or the ``DALLE_GPUS_PER_NODE`` environment
variable, which override torchrun's LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from .powersgd import POWERSGD_VARIANTS, UNCOMPRESSED_ROLES

GPUS_PER_NODE_ENV = "DALLE_GPUS_PER_NODE"
MESH_DIM_NAMES = ("node", "gpu")


@dataclass(frozen=True)
class ParallelConfig:
    """How the prior is spread over machines; one object drives every `apply_*`.

    nodes, gpus_per_node: the mesh (world size = nodes * gpus_per_node).
    powersgd_rank: rank of the PowerSGD approximation of each GPU's gradient
        shard for the cross-machine all-reduce; None = uncompressed all-reduce.
        The paper: 112 per GPU at 12B (896 over a machine's 8 GPUs).
    powersgd_variant: "paper" (appendix E: a Gaussian Q fixed at the start, no
        warm start, Householder orthogonalisation of P + epsilon I) or "torch"
        (torch's powerSGD_hook: Gram-Schmidt, warm-started Q); None = the prior
        config's `powersgd_variant` (the trainer), "torch" elsewhere.
        `powersgd_orthogonalization` / `powersgd_warm_start` override the
        variant's choice when set.
    powersgd_exclude_roles: parameter roles sent uncompressed (powersgd.parameter_role:
        the paper's embeddings, heads, gains and biases).
    activation_checkpointing: recompute each transformer layer in backward.
    prefetch: explicitly prefetch the next layer's all-gather (forward) and the
        previous layer's (backward); see parallelize.apply_fsdp.
    """

    nodes: int = 1
    gpus_per_node: int = 1
    powersgd_rank: int | None = None
    activation_checkpointing: bool = False
    prefetch: bool = True
    reshard_after_forward: bool = True
    # PowerSGD details (torch's powerSGD_hook defaults where the paper is silent)
    powersgd_min_compression_rate: float = 2.0
    powersgd_variant: str | None = None  # "paper" or "torch"; None = the prior config's
    powersgd_orthogonalization: str | None = None  # "gram_schmidt" / "householder"; None = the variant's
    powersgd_orthogonalization_epsilon: float = 1e-8  # x identity added to P before Householder (paper)
    powersgd_warm_start: bool | None = None  # None = the variant's (torch: True, paper: False, fixed Q)
    powersgd_exclude_roles: tuple[str, ...] = UNCOMPRESSED_ROLES
    powersgd_error_feedback: bool = True
    powersgd_start_iter: int = 0  # plain all-reduce for the first updates
    powersgd_seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need nodes >= 1 and gpus_per_node >= 1, got {self.nodes}, {self.gpus_per_node}")
        if self.powersgd_rank is not None and self.powersgd_rank < 1:
            raise ValueError(f"powersgd_rank must be >= 1 or None, got {self.powersgd_rank}")
        if self.powersgd_orthogonalization not in (None, "gram_schmidt", "householder"):
            raise ValueError("powersgd_orthogonalization must be 'gram_schmidt' or 'householder', "
                             f"got {self.powersgd_orthogonalization!r}")
        if self.powersgd_variant not in (None, *POWERSGD_VARIANTS):
            raise ValueError(f"powersgd_variant must be one of {POWERSGD_VARIANTS}, got {self.powersgd_variant!r}")
        if self.powersgd_orthogonalization_epsilon < 0:
            raise ValueError("powersgd_orthogonalization_epsilon must be >= 0")
        object.__setattr__(self, "powersgd_exclude_roles", tuple(self.powersgd_exclude_roles))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParallelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when CUDA is available,
    gloo otherwise. Idempotent. On CUDA, binds this process to GPU LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if not dist.is_initialized():
            raise RuntimeError("init_distributed needs torchrun's environment (RANK, WORLD_SIZE, "
                               "MASTER_ADDR, MASTER_PORT): launch with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, backend=dist.get_backend())


def resolve_topology(world_size: int, parallel: ParallelConfig | None = None) -> tuple[int, int]:
    """(nodes, gpus_per_node) for `world_size` ranks: gpus_per_node from
    `parallel`, else $DALLE_GPUS_PER_NODE, else torchrun's LOCAL_WORLD_SIZE."""
    if parallel is not None:
        gpus = parallel.gpus_per_node
        if parallel.world_size != world_size:
            raise ValueError(f"ParallelConfig asks for {parallel.nodes} nodes x {parallel.gpus_per_node} "
                             f"GPUs = {parallel.world_size} ranks, but the job has {world_size}")
    elif os.environ.get(GPUS_PER_NODE_ENV):
        gpus = int(os.environ[GPUS_PER_NODE_ENV])
    else:
        gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if gpus < 1 or world_size % gpus:
        raise ValueError(f"{world_size} ranks do not split into machines of {gpus} GPUs")
    return world_size // gpus, gpus


def build_mesh(parallel: ParallelConfig | None = None, device_type: str | None = None):
    """The ("node", "gpu") DeviceMesh over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("call init_distributed() first")
    nodes, gpus = resolve_topology(dist.get_world_size(), parallel)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (nodes, gpus), mesh_dim_names=MESH_DIM_NAMES)


def data_parallel_replicas(mesh: Any = None) -> int:
    """M of the paper's gradient scales: the number of data-parallel replicas.
    On the ("node", "gpu") mesh a machine holds one replica sharded over its
    GPUs, so M = mesh["node"].size() (the paper: GPUs / 8); plain data
    parallelism (one GPU per machine, or no mesh) has one replica per rank."""
    if mesh is None:
        return get_world_size()
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "node" in names:
        return int(mesh["node"].size())
    return int(mesh.size())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


__all__ = ["DistInfo", "GPUS_PER_NODE_ENV", "MESH_DIM_NAMES", "ParallelConfig", "barrier", "build_mesh",
           "data_parallel_replicas", "get_rank", "get_world_size", "init_distributed", "is_distributed", "resolve_topology"]
