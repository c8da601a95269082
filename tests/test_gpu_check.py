"""bench/gpu_check.sh, the one GPU check, as a dry run: every part with tiny
shapes on the CPU, each part's JSON and the summary written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("prior", "prior_attention", "dvae", "sample", "inception")
PART_KEYS = {"part", "ok", "rc", "timed_out", "skipped", "wall_s", "timeout_s", "command", "result", "error"}
RESULT_KEYS = {
    "prior": {"runs", "parameters", "flops_per_token"},
    "dvae": {"train_step_s", "encode_images_per_s", "peak_memory_gib", "dtype"},
    "sample": {"results"},
    "inception": {"images_per_s", "batch_size", "weights"},
}


@pytest.mark.timeout(240)
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PARTS:
        rec = json.loads((out / f"{name}.json").read_text())
        assert PART_KEYS <= set(rec), (name, set(rec))
        assert rec["part"] == name
        if name == "prior_attention" and rec["skipped"]:  # bench/prior.py without --attention
            assert "--attention" in rec["note"]
            continue
        assert rec["ok"], (name, rec["error"])
        assert rec["timeout_s"] <= 60 and not rec["timed_out"]
        if name in RESULT_KEYS:
            assert RESULT_KEYS[name] <= set(rec["result"]), (name, set(rec["result"]))
    prior = json.loads((out / "prior.json").read_text())["result"]
    assert [r["precision"] for r in prior["runs"]] == ["fp16-per-resblock", "bf16"]
    assert all(r["tokens_per_s"] > 0 for r in prior["runs"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_ok"] and summary["tiny"] and summary["device"] == "cpu"
    assert set(summary["parts"]) == set(PARTS)
    figures = summary["figures"]
    assert {"prior_fp16-per-resblock", "prior_bf16", "dvae", "sample", "inception"} <= set(figures)
    assert figures["dvae"]["encode_images_per_s"] > 0 and figures["inception"]["images_per_s"] > 0
    assert figures["sample"][0]["identical_tokens"] == 1.0
    assert figures["sample"][0]["draws_per_caption"] == 2 and figures["sample"][0]["shared_caption_speedup"] > 0


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    """A part that crashes (here: an interpreter that fails for bench/dvae.py only) gets ok false,
    its exit code and stderr, and the summary is still written."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"  # the benches answer at once; bench/dvae.py fails
                    'case "$1" in bench/dvae.py) echo "boom: no GPU" >&2; exit 3;; '
                    'bench/*) echo \'{"runs": [], "results": []}\'; exit 0;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dvae = json.loads((out / "dvae.json").read_text())
    assert not dvae["ok"] and dvae["rc"] == 3 and "boom: no GPU" in dvae["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["all_ok"] and summary["parts"]["dvae"]["rc"] == 3
    assert summary["parts"]["sample"]["ok"] and summary["parts"]["inception"]["ok"]
