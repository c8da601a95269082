"""The dVAE's torchrun launch (orchestration/dvae_entry.py, issue 16 item 3): each rank
reads its share of the global batches the in-process asset reads, and a 2-rank run on
shards writes what the `dvae` asset reads back (dvae.pt, result.json, metrics.jsonl)."""

import io
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
from PIL import Image, ImageDraw

from dalle_core.data.loader import image_batches
from dalle_core.data.pairs import Pair
from dalle_core.data.shards import write_shards
from dalle_core.dvae.model import load_dvae
from dalle_core.dvae.train import rank_image_batches
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent


def png(seed: int, size: int = 32) -> bytes:
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
    x, y = rnd.randrange(0, size // 2), rnd.randrange(0, size // 2)
    ImageDraw.Draw(img).ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_paths(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    pairs = [Pair(f"b000-{i:06d}", f"a circle {i}", png(i), "png", {"url": f"http://x/{i}.png"}) for i in range(30)]
    manifest = write_shards(pairs, LocalStorage(root), "shards", shard_size=10)
    return [root / "shards" / s.name for s in manifest.shards]


def test_each_rank_reads_its_share_of_the_global_batches(shard_paths):
    glob = image_batches(shard_paths, 8, 32, seed=5, start_step=2)
    ranks = [rank_image_batches(shard_paths, 8, 32, seed=5, start_step=2, rank=r, world=2) for r in range(2)]
    for _ in range(6):  # across an epoch boundary (30 images, batches of 8)
        assert torch.equal(next(glob), torch.cat([next(r) for r in ranks]))
    with pytest.raises(ValueError, match="split evenly"):
        next(rank_image_batches(shard_paths, 9, 32, rank=0, world=2))


@pytest.mark.timeout(300)
def test_two_rank_entry_writes_what_the_asset_reads(shard_paths, tmp_path):
    cfg = get_profile("tiny").dvae.replace(total_steps=4, log_every=2, checkpoint_every=2, codebook_init_images=16)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "shards.json").write_text(json.dumps([str(p) for p in shard_paths]))
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "orchestration.dvae_entry",
           "--config-json", str(tmp_path / "cfg.json"), "--shards-json", str(tmp_path / "shards.json"),
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads((out / "result.json").read_text())
    assert summary["step"] == 4 and summary["world_size"] == 2 and summary["resumed_from"] is None
    assert [r["step"] for r in summary["history"]] == [2, 4]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # rank 0 alone reports
    encoder, _, loaded = load_dvae(out / "dvae.pt")
    assert loaded.shape_dict() == cfg.shape_dict()


@pytest.mark.timeout(300)
def test_the_asset_launch_reports_through_pipes(shard_paths, tmp_path, monkeypatch):
    """assets.dvae.train_dvae_torchrun (the dvae asset with nproc_per_node > 1, through the
    `torchrun` resource's local backend) inside a
    Dagster run: rank 0's figures arrive as the materialization's metadata, the EMA
    weights come back as a TrainResult."""
    from assets.dvae import train_dvae_torchrun
    from assets.launchers import TorchrunLauncher

    cfg = get_profile("tiny").dvae.replace(total_steps=2, log_every=1, checkpoint_every=2, codebook_init_images=16)
    seen = {}

    @dg.asset
    def launched(context: dg.AssetExecutionContext, torchrun: TorchrunLauncher):
        result, reported = train_dvae_torchrun(context, torchrun, cfg, shard_paths, tmp_path, 1, 2,
                                               tracking_uri="", run_id="")  # no MLflow run: rank 0 skips it
        seen.update(step=result.step, metadata=dict(reported.metadata), final=result.final_metrics,
                    enc=type(result.encoder).__name__)
        return dg.MaterializeResult(metadata=reported.metadata)

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = dg.materialize([launched], resources={"torchrun": TorchrunLauncher(workdir=str(ROOT))})
    assert res.success
    assert seen["step"] == 2 and seen["enc"] == "Encoder" and "recon" in seen["final"]
    meta = seen["metadata"]
    assert meta["train_steps"].value == 2 and meta["world_size"].value == 2
    assert meta["train_recon"].value == pytest.approx(seen["final"]["recon"])
