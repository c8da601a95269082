"""Kill the whole demo (SIGKILL to its process group, torchrun included) while
the dVAE trains, again while the prior trains, and again while the zero-shot
evaluation computes; each rerun resumes from the last checkpoint (or the
finished chunks of generated images), and the final artifacts are complete with
no duplicates."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from services import free_port

pytestmark = pytest.mark.slow


def _start(run_dir: Path, port: int) -> subprocess.Popen:
    # a clean deployment environment: the session's in-process demo exported its own
    # DALLE_* / MLFLOW_* / DAGSTER_HOME settings into os.environ
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DALLE_", "MLFLOW_")) and k != "DAGSTER_HOME"}
    env["DALLE_DEMO_PORT"] = str(port)
    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "demo", "--profile", "tiny",
                             "--run-dir", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> bool:
    """SIGKILL the demo's whole process group as soon as `ready()`; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the demo never reached the point to kill it at")


def test_demo_killed_in_training_resumes_to_complete_artifacts(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    scratch = run_dir / "scratch"

    # 1. killed while the dVAE trains (its first checkpoint is on disk)
    killed = _kill_when(_start(run_dir, port), lambda: any(scratch.glob("dvae-checkpoints/*/dvae-step-*.pt")))
    assert killed
    assert not (run_dir / "storage" / "dvae" / "dvae.pt").exists()

    # 2. rerun, killed while the prior trains (a DCP checkpoint step is on disk)
    killed = _kill_when(_start(run_dir, port), lambda: any(scratch.glob("prior-runs/*/step-*")))
    assert killed

    # 3. rerun, killed in the evaluation, once a chunk of zero-shot images is on disk
    killed = _kill_when(_start(run_dir, port), lambda: any(scratch.glob("zero-shot-generated/chunk-*.npz")))
    assert killed
    assert not (run_dir / "storage" / "reports" / "zero_shot" / "latest.json").exists()
    chunks = {p.name: p.stat().st_mtime_ns for p in scratch.glob("zero-shot-generated/chunk-*.npz")}

    # 4. rerun to the end
    proc = _start(run_dir, port)
    assert proc.wait(timeout=600) == 0

    instance = dg.DagsterInstance.from_config(str(run_dir / "dagster_home"))

    def meta(key):
        return instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization.metadata

    # the dVAE of run 2 went on from run 1's checkpoint instead of starting over
    # (runs 3 and 4 load the finished dVAE back: no materialization started from scratch)
    dvae_events = instance.fetch_materializations(dg.AssetKey("dvae"), limit=10).records
    assert len(dvae_events) == 3
    assert all(e.asset_materialization.metadata["resumed_from"].value != "none" for e in dvae_events)
    # ... and the prior of run 3 resumed from run 2's checkpoint
    runs = list(scratch.glob("prior-runs/*/metrics.jsonl"))
    assert len(runs) == 1
    starts = [json.loads(l) for l in runs[0].read_text().splitlines() if '"start"' in l]
    assert len(starts) >= 2 and starts[0]["resumed_from"] is None and starts[-1]["resumed_from"] >= 20

    # complete, no duplicates: every shard sample once, every code once, all assets landed
    manifest = json.loads((run_dir / "storage" / "shards" / "manifest.json").read_text())
    assert meta("shards")["samples"].value == sum(s["count"] for s in manifest["shards"])
    codes = json.loads((run_dir / "storage" / "image_codes" / "manifest.json").read_text())
    assert sum(s["count"] for s in codes["shards"]) == meta("shards")["samples"].value
    for key in ("raw_pairs", "filtered_pairs", "shards", "bpe_tokenizer", "dvae", "image_codes", "prior",
                "reranker", "samples", "coco_zero_shot_report"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    assert meta("prior")["train_step"].value == 60
    # the evaluation of run 4 read run 3's finished chunks back instead of generating them again
    report = meta("coco_zero_shot_report")
    assert report["resumed_chunks"].value.startswith(f"{len(chunks)} of ")
    assert all((scratch / "zero-shot-generated" / n).stat().st_mtime_ns == t for n, t in chunks.items())
    assert report["captions"].value == meta("coco_eval_set")["images"].value
    assert len(list((run_dir / "storage" / "reports" / "zero_shot").glob("2*.html"))) == 1  # one report, not two
