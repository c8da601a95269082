"""Meta-device construction + per-shard initialisation, run under torchrun by
tests/test_meta_init.py.

    torchrun --nproc-per-node N tests/meta_init_worker.py OUT.json

For every (nodes x gpus) layout of the N ranks: build the prior on the meta
device, wrap it as the trainer does (per-resblock gradient scaling, activation
checkpointing), shard it (FSDP2 over mesh["gpu"], PowerSGD across mesh["node"]),
materialise each rank's shards, and compare the gathered parameters with the
unsharded initialisation drawn in one process (bitwise). Rank 0 writes the
figures to OUT.json; a failed check raises (torchrun then exits non-zero).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.distributed.checkpoint import canonical_key  # noqa: E402
from dalle_core.distributed.mesh import ParallelConfig, build_mesh, init_distributed  # noqa: E402
from dalle_core.distributed.parallelize import parallelize_prior  # noqa: E402
from dalle_core.distributed.plan import plan  # noqa: E402
from dalle_core.precision import PerResblockGradScaler, apply_per_resblock_grad_scaling  # noqa: E402
from dalle_core.prior.config import PriorConfig  # noqa: E402
from dalle_core.prior.init import init_prior_weights, materialize_prior  # noqa: E402
from dalle_core.prior.model import DalleTransformer  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402

SEED = 1234
# first dimensions that 2, 3 and 4 ranks do not divide (22, 9, 3 rows...), so shards are padded / uneven
ODD = PriorConfig(n_layer=2, n_head=2, d_head=4, text_vocab_size=17, text_len=5, image_vocab_size=9,
                  image_grid=3, conv_kernel=1)
CONFIGS = {"tiny": (get_profile("tiny").prior, None), "odd_small_chunks": (ODD, 16)}


def reference(config: PriorConfig, chunk_numel: int | None) -> dict[str, torch.Tensor]:
    model = DalleTransformer(config)  # materialised (init_weights), then overwritten
    kw = {} if chunk_numel is None else {"chunk_numel": chunk_numel}
    init_prior_weights(model, SEED, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_sharded(config: PriorConfig, mesh, parallel: ParallelConfig, chunk_numel: int | None):
    with torch.device("meta"):
        model = DalleTransformer(config)
    scaler = PerResblockGradScaler(list(model.resblocks()), n_data_parallel=parallel.nodes)
    apply_per_resblock_grad_scaling(model, scaler)
    setup = parallelize_prior(model, mesh, parallel, grad_scaler=scaler)
    kw = {} if chunk_numel is None else {"chunk_numel": chunk_numel}
    materialize_prior(model, "cpu", SEED, **kw)
    return model, setup


def main() -> None:
    out_path = Path(sys.argv[1])
    info = init_distributed()
    world = info.world_size
    layouts = [(n, world // n) for n in (1, 2, 4) if world % n == 0 and n <= world]
    results: dict = {"world_size": world, "layouts": {}}
    for nodes, gpus in layouts:
        parallel = ParallelConfig(nodes=nodes, gpus_per_node=gpus, activation_checkpointing=True,
                                  powersgd_rank=4 if nodes > 1 else None, powersgd_variant="paper")
        mesh = build_mesh(parallel)
        for label, (config, chunk_numel) in CONFIGS.items():
            ref = reference(config, chunk_numel)
            model, setup = build_sharded(config, mesh, parallel, chunk_numel)
            assert not any(p.is_meta for p in model.parameters())
            worst, local_numel = 0.0, 0
            for name, p in model.named_parameters():
                key = canonical_key(name)
                local_numel += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                if not torch.equal(full, ref[key]):
                    worst = max(worst, float((full - ref[key]).abs().max()))
            assert worst == 0.0, (nodes, gpus, label, worst)
            entry = {"max_abs_diff": worst, "local_numel": local_numel}
            if setup.reducer is not None and label == "tiny":
                # the reducer's parameter names (captured before materialisation) still apply:
                # the bytes it sends are the planner's, embeddings and heads uncompressed
                g = torch.Generator().manual_seed(info.rank)
                text = torch.randint(0, config.text_embedding_size, (2, config.text_len), generator=g)
                image = torch.randint(0, config.image_vocab_size, (2, config.image_len), generator=g)
                model.loss(text, image)["total"].backward()
                predicted = plan(config, nodes, gpus, 2, powersgd_rank=4, grad_bytes=4)
                sent = int(2 * (nodes - 1) / nodes * setup.reducer.bytes_sent)  # ring all-reduce
                assert sent == predicted.inter_bytes_powersgd, (sent, predicted.inter_bytes_powersgd)
                entry["powersgd_bytes"] = sent
            gathered = [None] * world
            dist.all_gather_object(gathered, local_numel)
            entry["local_numel_by_rank"] = gathered
            results["layouts"][f"{nodes}x{gpus}/{label}"] = entry
    if info.rank == 0:
        out_path.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
