"""The end-of-training prior file gathered to rank 0 only, run under torchrun by
tests/test_checkpoint_s3.py:

    torchrun --nproc-per-node 2 tests/export_worker.py OUT_DIR

Builds the tiny prior sharded over 2 ranks (FSDP2 on mesh["gpu"]) as the trainer
does, with an EMA of DTensors, and writes it with `export.save_prior_rank0` and
with `model.save_prior`; each rank writes what it held to OUT_DIR/rank-N.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.distributed.mesh import ParallelConfig, build_mesh, init_distributed  # noqa: E402
from dalle_core.distributed.parallelize import parallelize_prior  # noqa: E402
from dalle_core.prior.export import save_prior_rank0  # noqa: E402
from dalle_core.prior.init import materialize_prior  # noqa: E402
from dalle_core.prior.model import DalleTransformer, save_prior  # noqa: E402
from dalle_core.prior.train import EMA  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    info = init_distributed()
    parallel = ParallelConfig(nodes=1, gpus_per_node=info.world_size)
    mesh = build_mesh(parallel, "cpu")
    config = get_profile("tiny").prior
    with torch.device("meta"):
        model = DalleTransformer(config)
    parallelize_prior(model, mesh, parallel)
    materialize_prior(model, "cpu", 7, config)
    ema = EMA(model, 0.9)
    with torch.no_grad():  # an EMA that differs from the weights
        for v in ema.shadow.values():
            v.to_local().mul_(0.5).add_(0.25)
    path, held = save_prior_rank0(out / "rank0.pt", model, config, ema.shadow, meta={"k": 1})
    old = save_prior(out / "old.pt", model, config, ema.shadow, meta={"k": 1})
    sharded = all(hasattr(v, "to_local") for v in ema.shadow.values())
    (out / f"rank-{info.rank}.json").write_text(json.dumps(
        {"path": str(path) if path else None, "held": held, "old_path": str(old) if old else None,
         "ema_is_dtensor": sharded}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
