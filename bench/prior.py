"""Prior training speed: tokens/s, step time and model FLOPs utilisation (MFU).

Runs the real training loop (`dalle_core.prior.train.train_prior`) on random
token batches for a few steps per precision and prints one JSON object. The
baseline, measured in the same run, is the device's dense matmul rate in the
same dtype; MFU is also given against the GPU's datasheet peak when on CUDA.

    .venv/bin/python bench/prior.py                                    # small, CPU, fp32
    .venv/bin/python bench/prior.py --profile gpu-1B --device cuda \\
        --precisions fp16-per-resblock bf16 --batch 8 --steps 12          # the GPU check
    .venv/bin/python bench/prior.py --profile reference --precisions fp32 bf16 \\
        --baseline dalle-pytorch                                           # vs DALLE-pytorch 1.6.6

`--attention sdpa flex block` times each precision once per attention path in the same
run (PriorConfig.attention: SDPA with the boolean mask, FlexAttention skipping the empty
tiles, dalle_core.prior.flex, or the block-sparse CPU path, dalle_core.prior.block_sparse)
and adds the ratios flex / sdpa and block / sdpa of the training step and of a no-grad
forward. On the CPU flex has no backward (its training run records the error) and only
the forward is compared.

    .venv/bin/python bench/prior.py --profile gpu-1B --device cuda --precisions bf16 \
        --batch 8 --steps 12 --attention sdpa flex                        # the attention check

`--profile reference` is the equal-size shape of issue 15 (d 256, 8 layers, a 16x16
grid of 512 codes, 64 text positions, batch 8); `--baseline dalle-pytorch` times
DALLE-pytorch 1.6.6's training step at the same shape in the same run (its own venv,
bench/.venv-dalle-pytorch: bench/dalle_pytorch_step.py) and adds each run's
speed-up over it: with its default full attention, and with its sparse layers in our
pattern (axial_row, axial_col, axial_row, conv_like).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_venv import ensure_venv  # noqa: E402

from dalle_core.heap import keep_freed_heap  # noqa: E402
from dalle_core.machine import matmul_rate  # noqa: E402
from dalle_core.prior import DalleTransformer  # noqa: E402
from dalle_core.prior.config import ATTENTION_CHOICES, PriorConfig, PriorTrainingConfig, count_parameters  # noqa: E402
from dalle_core.prior.block_sparse import layer_layout  # noqa: E402
from dalle_core.prior.flex import resolve_attention, tiles_kept  # noqa: E402
from dalle_core.prior.train import train_prior  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402

# dense bf16/fp16 tensor-core peaks (datasheet, without sparsity), FLOP/s
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# ~1B parameters with the paper's sequence (256 text + 1024 image tokens): a shape
# that fits one GPU unsharded for the MFU check.
GPU_1B = dict(n_layer=20, n_head=16, d_head=128, text_vocab_size=16384, text_len=256,
              image_vocab_size=8192, image_grid=32)


# The equal-size reference of issue 15, for the comparison with DALLE-pytorch 1.6.6:
# d 256 (8 heads x 32), 8 layers, a 16x16 grid of 512 codes, 64 text positions.
REFERENCE = dict(n_layer=8, n_head=8, d_head=32, text_vocab_size=1024, text_len=64, image_vocab_size=512,
                 image_grid=16)
REFERENCE_BATCH = 8
# The paper's 1280-token stream (256 text + 32x32 image) at small width, for the SDPA vs
# flex comparison on a CPU, where the mask's empty tiles are what differs (row, column,
# row, conv layers: the paper's pattern for 4 layers).
SEQ1280 = dict(n_layer=4, n_head=4, d_head=32, text_vocab_size=1024, text_len=256, image_vocab_size=512,
               image_grid=32)
BENCH_DIR = Path(__file__).resolve().parent


def config_for(name: str) -> tuple[PriorConfig, PriorTrainingConfig]:
    """The prior's shape and training settings of a profile (gpu-1B: paper-1.3B's, reshaped;
    reference and seq1280: small's, reshaped)."""
    base = {"gpu-1B": "paper-1.3B", "reference": "small", "seq1280": "small"}.get(name, name)
    profile = get_profile(base)
    shape = {"gpu-1B": GPU_1B, "reference": REFERENCE, "seq1280": SEQ1280}.get(name)
    cfg = profile.prior.replace(**shape) if shape else profile.prior
    training = profile.prior_training.replace(batch_size=REFERENCE_BATCH) if name == "reference" else profile.prior_training
    return cfg, training


def dalle_pytorch_step_s(cfg: PriorConfig, batch: int, steps: int, attn_types: tuple[str, ...], install: bool) -> dict:
    """Seconds per training update of DALLE-pytorch 1.6.6 at `cfg`'s shape (fp32, this
    process's thread count), in its own venv."""
    py = ensure_venv(BENCH_DIR / ".venv-dalle-pytorch", BENCH_DIR / "requirements-dalle-pytorch.txt",
                     "import einops, axial_positional_embedding, rotary_embedding_torch, importlib.util; "
                     "assert importlib.util.find_spec('dalle_pytorch')", install)
    spec = dict(dim=cfg.n_embd, depth=cfg.n_layer, heads=cfg.n_head, dim_head=cfg.d_head, text_len=cfg.text_len,
                text_vocab=cfg.text_vocab_size, grid=cfg.image_grid, image_vocab=cfg.image_vocab_size, batch=batch,
                steps=steps, attn_types=list(attn_types), bf16=False, threads=torch.get_num_threads())
    proc = subprocess.run([str(py), str(BENCH_DIR / "dalle_pytorch_step.py"), json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DALLE-pytorch step failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flops_per_token(cfg: PriorConfig) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters) + attention scores
    and values (12 x layers x sequence x width, the dense upper bound SDPA computes)."""
    d = cfg.n_embd
    per_layer = 12 * d * d + 13 * d
    return 6 * cfg.n_layer * per_layer + 12 * cfg.n_layer * cfg.seq_len * d


def random_batches(cfg: PriorConfig, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)

    def fn(start: int):
        while True:
            text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
            image = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_len), generator=g)
            yield text, image

    return fn


def measure(cfg: PriorConfig, training: PriorTrainingConfig, precision: str, device: torch.device, batch: int,
            steps: int) -> dict:
    training = training.replace(batch_size=batch, warmup_steps=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_prior(cfg, training, random_batches(cfg, batch, device), tmp, device=str(device),
                             precision=precision, total_steps=steps, log_every=1,
                             checkpoint_every=10**9, resume=False)
    logs = [r for r in result.history if r.get("event") == "log"]
    steady = logs[2:] or logs  # skip warm-up steps (allocation, autotuning)
    tokens_per_s = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    return {
        "precision": precision,
        "optimizer": training.optimizer,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(batch * cfg.seq_len / tokens_per_s, 4),
        "achieved_tflops": round(tokens_per_s * flops_per_token(cfg) / 1e12, 4),
        "final_loss": result.final_loss,
        "skipped_steps": sum(bool(r.get("grad_scale_last_step_skipped")) for r in logs),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16-per-resblock": torch.float16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_forward(cfg: PriorConfig, precision: str, device: torch.device, batch: int, repeats: int = 3) -> dict:
    """Seconds of a no-grad forward (median of `repeats`, after one first call that
    includes compiling flex) of a fresh model in the precision's autocast dtype."""
    torch.manual_seed(0)
    model = DalleTransformer(cfg).to(device).eval()
    text, image = (t.to(device) for t in next(random_batches(cfg, batch, device)(0)))
    dtype = AUTOCAST.get(precision)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            model(text, image)
            _sync(device)
            times.append(time.perf_counter() - t)
    return {"forward_first_s": round(times[0], 4), "forward_s": round(sorted(times[1:])[len(times[1:]) // 2], 4)}


def measure_attention(cfg: PriorConfig, training: PriorTrainingConfig, precision: str, attention: str,
                      device: torch.device, batch: int, steps: int) -> dict:
    """One run of `measure` with `PriorConfig.attention = attention`, plus a forward
    timing; a training run that cannot run (flex on the CPU: no backward) records why."""
    cfg = cfg.replace(attention=attention)
    try:
        run = measure(cfg, training, precision, device, batch, steps)
    except NotImplementedError as e:
        run = {"precision": precision, "tokens_per_s": None, "step_s": None, "achieved_tflops": None,
               "training_error": str(e).splitlines()[0][:300]}
    run["attention"] = attention
    run["attention_resolved"] = resolve_attention(attention, device, cfg.dropout)
    run.update(measure_forward(cfg, precision, device, batch))
    return run


def attention_ratios(runs: list[dict], how: str) -> dict:
    """{precision: {"step_s": how / sdpa, "forward_s": how / sdpa}} (None where missing)."""
    out = {}
    for prec in dict.fromkeys(r["precision"] for r in runs):
        by = {r["attention"]: r for r in runs if r["precision"] == prec}
        if "sdpa" in by and how in by:
            out[prec] = {k: (round(by[how][k] / by["sdpa"][k], 3) if by[how].get(k) and by["sdpa"].get(k)
                             else None) for k in ("step_s", "forward_s")}
    return out


def _steps_by_optimizer(runs: list[dict]) -> dict[str, dict[str, float]]:
    by: dict[str, dict[str, float]] = {}
    for r in runs:
        if r.get("optimizer") and r.get("step_s"):
            by.setdefault(r["precision"], {})[r["optimizer"]] = r["step_s"]
    return by


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="small", help="profile whose prior to time, or gpu-1B (~1B params, paper sequence), "
                   "reference (issue 15's equal size), seq1280 (small width, paper sequence)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", nargs="+", default=None, help="fp32 | bf16 | fp16-per-resblock")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--baseline", choices=("matmul", "dalle-pytorch"), default="matmul",
                   help="dalle-pytorch: also time DALLE-pytorch 1.6.6 at the same shape (its own venv)")
    p.add_argument("--no-install", action="store_true", help="do not create/update the DALLE-pytorch venv")
    p.add_argument("--attention", nargs="+", choices=ATTENTION_CHOICES, default=None,
                   help="time each attention path (sdpa | flex | auto) in the same run, with the ratio flex / sdpa")
    p.add_argument("--optimizers", nargs="+", choices=("adamw", "muon"), default=None,
                   help="time each optimizer (PriorTrainingConfig.optimizer; default: the profile's) in the "
                        "same run, with the step ratio muon / adamw")
    args = p.parse_args()
    heap_kept = keep_freed_heap()  # as the platform's trainer does (DALLE_KEEP_FREED_HEAP=0: not; bench/heap.py)

    device = torch.device(args.device)
    cfg, training = config_for(args.profile)
    batch = args.batch or training.batch_size
    precisions = args.precisions or (["fp32"] if device.type == "cpu" else ["fp16-per-resblock", "bf16"])
    optimizers = [training.replace(optimizer=o) for o in (args.optimizers or [training.optimizer])]
    if args.attention:
        runs = [measure_attention(cfg, t, prec, att, device, batch, args.steps)
                for prec in precisions for att in args.attention for t in optimizers]
    else:
        runs = [measure(cfg, t, prec, device, batch, args.steps) for prec in precisions for t in optimizers]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    baseline = matmul_rate(device, dtype, n=4096 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
    for r in runs:
        if r["achieved_tflops"] is None:
            continue
        r["fraction_of_matmul_rate"] = round(r["achieved_tflops"] * 1e12 / baseline, 4)
        if peak:
            r["mfu"] = round(r["achieved_tflops"] * 1e12 / peak, 4)
    baselines = {}
    if args.baseline == "dalle-pytorch":
        pattern = tuple({"row": "axial_row", "column": "axial_col", "conv": "conv_like"}[k]
                        for k in cfg.layer_kinds())
        for name, attn in (("dalle_pytorch_full", ("full",)), ("dalle_pytorch_sparse", pattern)):
            b = dalle_pytorch_step_s(cfg, batch, args.steps, attn, install=not args.no_install)
            baselines[name] = {"attn_types": list(attn), "step_s": round(b["step_s"], 4),
                               "parameters": b["parameters"], "precision": "fp32"}
            for r in runs:
                r[f"speedup_vs_{name}"] = round(b["step_s"] / r["step_s"], 3)
    attention = {}
    if args.attention:
        attention = {**{f"ratio_{how}_over_sdpa": attention_ratios(runs, how) for how in args.attention
                        if how not in ("sdpa", "auto")},
                     "block_sparse_kept": {k: round(layer_layout(k, cfg.text_len, cfg.image_grid, "cpu", cfg.conv_kernel,
                                                                 cfg.conv_wraparound).kept, 4)
                                           for k in sorted(set(cfg.layer_kinds()))},
                     "tiles_kept": {k: round(tiles_kept(k, cfg.text_len, cfg.image_grid, cfg.conv_kernel,
                                                        cfg.conv_wraparound), 4) for k in sorted(set(cfg.layer_kinds()))},
                     "flex_compiled": os.environ.get("DALLE_FLEX_COMPILE", "1") != "0"}
    print(json.dumps({
        "benchmark": "prior",
        "profile": args.profile,
        "parameters": count_parameters(cfg),
        "seq_len": cfg.seq_len,
        "batch": batch,
        "device": name,
        "flops_per_token": flops_per_token(cfg),
        "matmul_baseline_tflops": round(baseline / 1e12, 4),
        "datasheet_peak_tflops": peak / 1e12 if peak else None,
        "runs": runs,
        "baselines": baselines,
        **({"attention": attention} if attention else {}),
        **({"step_muon_over_adamw": {prec: round(by["muon"] / by["adamw"], 3) for prec, by in _steps_by_optimizer(runs).items()
                                     if {"muon", "adamw"} <= by.keys()}} if args.optimizers else {}),
        "freed_heap_kept": heap_kept,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))


if __name__ == "__main__":
    main()
