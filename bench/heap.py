"""Freed pages kept for reuse (dalle_core/heap.py) against glibc's default, on the prior's
CPU training step.

Runs `bench/prior.py` (the real training loop on random tokens, one JSON line) in a child
process with DALLE_KEEP_FREED_HEAP=0 (the baseline: freed blocks handed back to the kernel)
and =1 (`keep_freed_heap`), alternating for ``--rounds`` rounds, and prints one JSON object:
each run's step time and the child's minor page faults, the median of each, and the
speed-up (baseline step / kept step) and fault ratio of the same run.

    .venv/bin/python bench/heap.py                          # small prior, bf16 where the CPU has it
    .venv/bin/python bench/heap.py --profile reference --precision fp32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.machine import matmul_rate  # noqa: E402
from dalle_core.precision.device import cpu_has_fast_bf16  # noqa: E402

PRIOR_BENCH = Path(__file__).resolve().parent / "prior.py"


def run_child(keep: bool, profile: str, precision: str, steps: int) -> dict:
    env = {**os.environ, "DALLE_KEEP_FREED_HEAP": "1" if keep else "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    out = subprocess.run([sys.executable, str(PRIOR_BENCH), "--profile", profile, "--device", "cpu",
                          "--precisions", precision, "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = result["runs"][0]
    if result.get("freed_heap_kept") != keep:
        raise RuntimeError(f"the child's heap setting is {result.get('freed_heap_kept')}, asked {keep} "
                           f"(not glibc? dalle_core/heap.py does nothing there)")
    return {"kept": keep, "step_s": run["step_s"], "minor_faults": faults, "final_loss": run["final_loss"],
            "threads": result["threads"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="small")
    p.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 where the CPU has it, as the demo)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    precision = args.precision or ("bf16" if cpu_has_fast_bf16() else "fp32")
    runs = []
    for _ in range(args.rounds):  # alternating, so the machine's drift falls on both
        for keep in (False, True):
            runs.append(run_child(keep, args.profile, precision, args.steps))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    med = {k: {"step_s": statistics.median(r["step_s"] for r in runs if r["kept"] == k),
               "minor_faults": statistics.median(r["minor_faults"] for r in runs if r["kept"] == k)}
           for k in (False, True)}
    print(json.dumps({
        "benchmark": "heap",
        "profile": args.profile,
        "precision": precision,
        "steps": args.steps,
        "baseline": "DALLE_KEEP_FREED_HEAP=0 (glibc's default: freed blocks go back to the kernel)",
        "step_s_baseline": med[False]["step_s"],
        "step_s_kept": med[True]["step_s"],
        "speedup": round(med[False]["step_s"] / med[True]["step_s"], 3),
        "minor_faults_baseline": med[False]["minor_faults"],
        "minor_faults_kept": med[True]["minor_faults"],
        "fault_ratio": round(med[False]["minor_faults"] / max(1, med[True]["minor_faults"]), 1),
        "same_loss": len({r["final_loss"] for r in runs}) == 1,
        "runs": runs,
        "matmul_gflops_fp32": round(matmul_rate("cpu") / 1e9, 1),
        "threads": runs[0]["threads"],  # the children's torch threads
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))


if __name__ == "__main__":
    main()
