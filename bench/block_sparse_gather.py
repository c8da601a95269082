"""The block-sparse attention's gathers: our backward against index_select's own, in one run.

`dalle_core.prior.block_sparse.take_positions` gathers the keys (and reorders the
queries) of each block with a backward that sums rows of an [S, B*H*D] matrix, and
skips the query reorder where the blocks are in stream order. The baseline is the
path before it (2026-12-03): `index_select` along dim 2 for queries, keys, values and
the inverse reorder, whose CPU backward is index_add_ along dim 2. Both train the
same model on the same random batch, interleaved in rounds (this machine's speed
drifts by 2x over minutes), and the figure is the ratio of their median step times.
The first step's losses and gradients are compared too (equal up to bf16 rounding).

    .venv/bin/python bench/block_sparse_gather.py                    # small prior, bf16, batch 16
    .venv/bin/python bench/block_sparse_gather.py --precision fp32 --rounds 8

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dalle_core.prior.block_sparse as bs  # noqa: E402
from dalle_core.prior import DalleTransformer  # noqa: E402
from dalle_core.prior.model import build_optimizer  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402

FAST_TAKE, FAST_IN_ORDER = bs.take_positions, bs.BlockSparseLayout.in_order


@contextlib.contextmanager
def index_select_path():
    """The baseline: every gather an index_select with autograd's own backward."""
    bs.take_positions = lambda x, index, inverse=None: x.index_select(2, index)
    bs.BlockSparseLayout.in_order = property(lambda self: False)
    try:
        yield
    finally:
        bs.take_positions, bs.BlockSparseLayout.in_order = FAST_TAKE, FAST_IN_ORDER


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="small")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=6, help="rounds of --steps steps per path")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    profile = get_profile(a.profile)
    cfg, training = profile.prior.replace(attention="block"), profile.prior_training
    batch = a.batch or training.batch_size
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=gen)
    image = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_len), generator=gen)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()

    def fresh():
        torch.manual_seed(0)
        model = DalleTransformer(cfg)
        return model, build_optimizer(model, training)

    def first_step(path):
        model, _ = fresh()
        with path():
            with amp:
                loss = model.loss(text, image)["total"]
            loss.backward()
        return float(loss.detach()), torch.cat([q.grad.flatten().float() for q in model.parameters()])

    loss_fast, grad_fast = first_step(contextlib.nullcontext)
    loss_ref, grad_ref = first_step(index_select_path)

    runs = {"take_positions": fresh(), "index_select": fresh()}
    paths = {"take_positions": contextlib.nullcontext, "index_select": index_select_path}
    times: dict[str, list[float]] = {k: [] for k in runs}

    def steps(name: str, n: int) -> float:
        model, opt = runs[name]
        t = time.perf_counter()
        with paths[name]():
            for _ in range(n):
                with amp:
                    loss = model.loss(text, image)["total"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / n

    for name in runs:  # warm-up
        steps(name, 2)
    for r in range(a.rounds):
        for name in (runs if r % 2 == 0 else reversed(list(runs))):
            times[name].append(steps(name, a.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "block_sparse_gather", "profile": a.profile, "precision": a.precision, "batch": batch,
        "seq_len": cfg.seq_len, "step_s": round(med["take_positions"], 4),
        "step_s_index_select": round(med["index_select"], 4),
        "speedup": round(med["index_select"] / med["take_positions"], 3),
        "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "first_loss_diff": abs(loss_fast - loss_ref),
        "grad_max_abs_diff": float((grad_fast - grad_ref).abs().max()),
        "grad_max_abs": float(grad_ref.abs().max()),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))


if __name__ == "__main__":
    main()
