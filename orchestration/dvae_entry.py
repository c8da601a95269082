"""The torchrun target the `dvae` asset launches through Dagster Pipes (nproc_per_node > 1).

    torchrun --nproc-per-node N -m orchestration.dvae_entry --config-json FILE --shards-json FILE --out DIR

(--config-json: the DVAEConfig, `to_dict`; --shards-json: the local shard paths, a JSON list.)

Data parallel as the paper trained its dVAE (64 GPUs at batch 512): each rank reads
its share of every global batch (`dalle_core.dvae.train.rank_image_batches`: the same
order the in-process asset reads), `train_dvae` wraps the models in DDP and makes the
batch statistics global. Every rank inherits the Pipes environment, so only rank 0
opens the Pipes session: it streams each logged step to the Dagster run (a log line)
and to the MLflow run the asset opened (MLFLOW_RUN_ID), writes DIR/metrics.jsonl and
DIR/result.json (step, resumed_from, history, codebook init) next to the checkpoints
and DIR/dvae.pt, and reports the final figures as the materialization's metadata.
A rerun with the same DIR resumes from the newest checkpoint. Without Pipes (a plain
torchrun) it runs the same.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

from dalle_core.heap import freed_heap_kept, keep_freed_heap
from orchestration.rank0_report import rank0_reporter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dvae_entry", description=__doc__.splitlines()[0])
    p.add_argument("--config-json", required=True, help="DVAEConfig.to_dict() as JSON")
    p.add_argument("--shards-json", required=True, help="JSON list of local shard paths")
    p.add_argument("--out", required=True, help="checkpoint folder (shared by the ranks)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    return p.parse_args(argv)


def run(args: argparse.Namespace, on_log=None) -> dict:
    """Train on this rank; rank 0 returns what it wrote to result.json (others {})."""
    import torch.distributed as dist

    from dalle_core.distributed.mesh import init_distributed
    from dalle_core.dvae.config import DVAEConfig
    from dalle_core.dvae.train import rank_image_batches, train_dvae

    cfg = DVAEConfig.from_dict(json.loads(Path(args.config_json).read_text()))
    paths = [Path(p) for p in json.loads(Path(args.shards_json).read_text())]
    info = init_distributed()
    out = Path(args.out)

    def batches(start_step: int):
        return rank_image_batches(paths, cfg.batch_size, cfg.image_size, seed=cfg.seed, start_step=start_step,
                                  rank=info.rank, world=info.world_size)

    try:
        result = train_dvae(cfg, batches, out, on_log=on_log, device=info.device, resume=not args.fresh)
        summary = {}
        if info.rank == 0:
            summary = {"step": result.step, "resumed_from": result.resumed_from, "world_size": info.world_size,
                       "history": result.history, "codebook_init": result.codebook_init,
                       "model_path": str(result.model_path)}
            (out / "result.json").write_text(json.dumps(summary, default=float))
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_heap()  # each step reuses the last one's pages (dalle_core/heap.py)
    faulthandler.enable()  # a rank killed by a signal prints its Python stack (torchrun prints only the signal)
    with rank0_reporter() as report:
        metrics_file = Path(args.out) / "metrics.jsonl"

        def forward(step: int, metrics: dict) -> None:  # called on rank 0 only (train_dvae)
            record = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
            with metrics_file.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
            report.log(record, default=float)

        summary = run(args, on_log=forward if report.is_rank0 else None)
        if report.is_rank0:
            last = summary["history"][-1] if summary.get("history") else {}
            meta = {f"train_{k}": v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}
            meta.update(train_steps=summary["step"], world_size=summary["world_size"],
                        freed_heap_kept=freed_heap_kept())  # a condition of the step times (dalle_core/heap.py)
            report.materialize(meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
