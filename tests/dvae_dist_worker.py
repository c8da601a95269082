"""Data-parallel dVAE training run under torchrun by tests/test_dvae_distributed.py.

    torchrun --nproc-per-node N tests/dvae_dist_worker.py OUT_DIR STEPS SOURCE

SOURCE: "share" (each rank's source yields only its share of the global batch)
or "global" (every rank reads the whole global batch and keeps its share).
Rank 0 writes OUT_DIR/params.pt (raw and EMA weights) and OUT_DIR/history.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.distributed.mesh import init_distributed  # noqa: E402
from dalle_core.dvae.train import train_dvae  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402
from synthetic_images import make_batch  # noqa: E402

GLOBAL_BATCH = 8
EPS = float(__import__("os").environ.get("DVAE_TEST_EPS", "1e-3"))


def config(total_steps: int):
    # the tiny dVAE with every batch statistic in play (k-means init, marginal KL) and the
    # paper's random crop; schedules fixed so a run of 3 steps resumed to 6 is one run of 6
    return get_profile("tiny").dvae.replace(
        batch_size=GLOBAL_BATCH, total_steps=total_steps, log_every=1, checkpoint_every=2,
        codebook_init="kmeans", codebook_init_images=16, marginal_kl_weight=1.0, pixel_mse_weight=10.0,
        random_crop=True, eps=EPS, lr=5e-4, lr_end=5e-5, kl_warmup_steps=4, temp_anneal_steps=6, lr_decay_steps=6)


def main() -> None:
    out, steps, source = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo")
    b = GLOBAL_BATCH // info.world_size

    def batches(start_step: int):
        step = start_step
        while True:
            x = make_batch(step, GLOBAL_BATCH)
            yield x[info.rank * b:(info.rank + 1) * b] if source == "share" else x
            step += 1

    result = train_dvae(config(steps), batches, out / "ckpt", device="cpu")
    if info.rank == 0:
        params = {}
        for prefix, m in [("enc.", result.raw_encoder), ("dec.", result.raw_decoder),
                          ("ema_enc.", result.encoder), ("ema_dec.", result.decoder)]:
            params.update({prefix + k: v.detach().clone().contiguous() for k, v in m.state_dict().items()})
        torch.save(params, out / "params.pt")
        (out / "history.json").write_text(json.dumps({"history": result.history, "step": result.step,
                                                      "resumed_from": result.resumed_from}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
