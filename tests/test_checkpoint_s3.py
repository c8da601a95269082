"""DCP checkpoints behind a URL (issue 16, item 2): written to and resumed from
S3 (moto's S3-protocol server, tests/services.py) directly.

- one process: a checkpoint saved to s3://bucket/prefix loads back bitwise
  (model, optimizer, extra state, meta, per-rank state); `keep` prunes old ones;
  the same through another fsspec URL (memory://);
- a checkpoint without DCP's .metadata (or without meta.json) is incomplete and
  ignored on resume, on S3 and in a local directory, and the next save removes it;
- two gloo processes (torchrun, FSDP over 2 ranks) train the tiny prior with
  --out s3://...; one rank is killed hard after the checkpoint of update 6; the
  run resumed from the S3 URL ends with the weights of a run never interrupted
  (bitwise) and uploads prior.pt there;
- the end-of-training prior file (export.save_prior_rank0): rank 1 holds no full
  copy of the weights or the EMA, and the file equals model.save_prior's.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_core.distributed.checkpoint import latest_step, list_checkpoints, load_latest, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The platform's S3 settings pointed at the test server."""
    monkeypatch.setenv("DALLE_S3_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


def _client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _keys(endpoint, bucket, prefix="") -> list[str]:
    r = _client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in r.get("Contents", []))


def _model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _extra(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"state": {"ema": {"w": torch.randn(5, 6, generator=g)}}, "meta": {"seed": seed},
            "rank": {"rng": torch.randn(3, generator=g)}}


def test_checkpoint_roundtrip_through_s3(s3_env, s3_bucket):
    url = f"s3://{s3_bucket}/runs/a/"
    model, opt = _model(0)
    extra = _extra(0)
    for step in (1, 2, 3):
        path = save_checkpoint(url, step, model, opt, extra, keep=2)
    assert path == f"s3://{s3_bucket}/runs/a/step-00000003"
    assert [s for s, _ in list_checkpoints(url)] == [2, 3]
    assert latest_step(url) == 3
    keys = _keys(s3_env, s3_bucket, "runs/a/")
    assert not any(k.startswith("runs/a/step-00000001/") for k in keys)  # pruned
    assert {"runs/a/step-00000003/.metadata", "runs/a/step-00000003/meta.json",
            "runs/a/step-00000003/rank-00000.pt"} <= set(keys)

    other, other_opt = _model(1)
    got = {"state": {"ema": {"w": torch.zeros(5, 6)}}}
    assert load_latest(url, other, other_opt, got) == 3
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    assert torch.equal(got["state"]["ema"]["w"], extra["state"]["ema"]["w"])
    assert got["meta"] == {"seed": 0}
    assert torch.equal(got["rank"]["rng"], extra["rank"]["rng"])


def _drop(endpoint, bucket, key):
    _client(endpoint).delete_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize("marker", [".metadata", "meta.json"])
def test_s3_checkpoint_without_its_markers_is_ignored(s3_env, s3_bucket, marker):
    url = f"s3://{s3_bucket}/run"
    model, opt = _model(0)
    save_checkpoint(url, 1, model, opt, _extra(1), keep=None)
    later, later_opt = _model(5)
    save_checkpoint(url, 2, later, later_opt, _extra(2), keep=None)
    _drop(s3_env, s3_bucket, f"run/step-00000002/{marker}")  # as if killed before it was written

    assert [s for s, _ in list_checkpoints(url)] == [1]
    fresh, fresh_opt = _model(9)
    got: dict = {"state": {"ema": {"w": torch.zeros(5, 6)}}}
    assert load_latest(url, fresh, fresh_opt, got) == 1
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert got["meta"] == {"seed": 1}

    # the next save clears the leftover; saving the incomplete step again replaces it whole
    save_checkpoint(url, 3, model, opt, _extra(3), keep=None)
    assert not any(k.startswith("run/step-00000002/") for k in _keys(s3_env, s3_bucket, "run/"))
    save_checkpoint(url, 3, later, later_opt, _extra(4), keep=None)
    assert [s for s, _ in list_checkpoints(url)] == [1, 3]
    assert load_latest(url, fresh, fresh_opt, got) == 3 and got["meta"] == {"seed": 4}


def test_any_fsspec_url():
    # an fsspec URL other than s3:// goes through fsspec itself (here its in-memory file system)
    url = "memory://dalle-ckpt-test/run"
    model, opt = _model(0)
    for step in (1, 2):
        save_checkpoint(url, step, model, opt, _extra(step), keep=1)
    assert [s for s, _ in list_checkpoints(url)] == [2]
    fresh, fresh_opt = _model(9)
    got: dict = {"state": {"ema": {"w": torch.zeros(5, 6)}}}
    assert load_latest(url, fresh, fresh_opt, got) == 2 and got["meta"] == {"seed": 2}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_local_checkpoint_without_dcp_metadata_is_ignored(tmp_path):
    model, opt = _model(0)
    save_checkpoint(tmp_path, 1, model, opt, _extra(1))
    later, later_opt = _model(5)
    save_checkpoint(f"file://{tmp_path}", 2, later, later_opt, _extra(2))
    (tmp_path / "step-00000002" / ".metadata").unlink()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    fresh, fresh_opt = _model(9)
    assert load_latest(tmp_path, fresh, fresh_opt, {}) == 1
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


# --- two gloo processes: kill and resume against the S3 server -------------------------------------

STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _train_cmd(codes: Path, out: str, metrics: Path, *extra: str) -> list[str]:
    return ["-m", "dalle_core.prior.train", "--profile", "tiny", "--codes", str(codes), "--out", out,
            "--metrics", str(metrics), "--nodes", "1", "--gpus-per-node", "2", "--batch-size", "4",
            "--data-split", "sample", "--log-every", "1", "--quiet", "--steps", str(STEPS),
            "--checkpoint-every", "3", *extra]


def _losses(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "log"}


@pytest.mark.timeout(300)
def test_killed_rank_resumes_from_s3_to_the_same_weights(s3_env, s3_bucket, tmp_path):
    from dalle_core.prior.data import write_synthetic_code_shards
    from dalle_core.prior.model import read_prior_file
    from dalle_core.profiles import get_profile
    from dalle_core.storage import LocalStorage

    write_synthetic_code_shards(LocalStorage(tmp_path / "codes"), "image_codes", get_profile("tiny").prior,
                                n_shards=2, per_shard=24, seed=2)
    codes = tmp_path / "codes" / "image_codes"
    env = {"DALLE_S3_ENDPOINT_URL": s3_env}

    # never interrupted, in a local directory
    ref = tmp_path / "ref"
    _check(_torchrun(_train_cmd(codes, str(ref), tmp_path / "ref.jsonl"), env))

    # to S3: rank 1 exits hard right after the checkpoint of update 6
    url = f"s3://{s3_bucket}/prior-run"
    metrics = tmp_path / "s3.jsonl"
    crashed = _torchrun(_train_cmd(codes, url, metrics, "--crash-after-step", "6", "--crash-rank", "1"), env)
    assert crashed.returncode != 0
    assert [s for s, _ in list_checkpoints(url)] == [3, 6]
    keys = _keys(s3_env, s3_bucket, "prior-run/")
    assert "prior-run/prior.pt" not in keys
    # both ranks wrote their DCP shards and their per-rank state (RNG) to S3
    assert {"prior-run/step-00000006/__0_0.distcp", "prior-run/step-00000006/__1_0.distcp",
            "prior-run/step-00000006/rank-00000.pt", "prior-run/step-00000006/rank-00001.pt"} <= set(keys)

    _check(_torchrun(_train_cmd(codes, url, metrics), env))
    starts = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == 6
    assert latest_step(url) == STEPS

    body = _client(s3_env).get_object(Bucket=s3_bucket, Key="prior-run/prior.pt")["Body"].read()
    local = tmp_path / "from-s3.pt"
    local.write_bytes(body)
    a, b = read_prior_file(local), read_prior_file(ref / "prior.pt")
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in b[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    ref_losses, got = _losses(tmp_path / "ref.jsonl"), _losses(metrics)
    assert set(got) == set(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == ref_losses[step], step


# --- the end-of-training prior file: full copies on rank 0 only -----------------------------------

@pytest.mark.timeout(120)
def test_prior_file_is_gathered_to_rank0_only(tmp_path):
    from dalle_core.prior.model import read_prior_file

    _check(_torchrun([str(ROOT / "tests" / "export_worker.py"), str(tmp_path)]))
    r0, r1 = (json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1))
    assert r0["ema_is_dtensor"] and r1["ema_is_dtensor"]
    assert r0["path"] == str(tmp_path / "rank0.pt") and r1["path"] is None
    # rank 1 held no full tensor, of the weights or of the EMA; rank 0 all of them
    assert r1["held"] == {"state_dict": 0, "ema_state_dict": 0}
    assert r0["held"]["state_dict"] > 0 and r0["held"]["ema_state_dict"] == r0["held"]["state_dict"]
    # ... and the file is model.save_prior's, tensor for tensor
    a, b = read_prior_file(tmp_path / "rank0.pt"), read_prior_file(tmp_path / "old.pt")
    assert a.keys() == b.keys()
    for key in ("format", "config", "meta"):
        assert a[key] == b[key], key
    for key in ("state_dict", "ema_state_dict"):
        assert list(a[key]) == list(b[key])
        for k in b[key]:
            assert a[key][k].dtype == b[key][k].dtype and torch.equal(a[key][k], b[key][k]), (key, k)
    assert not torch.equal(a["state_dict"][next(iter(a["state_dict"]))],
                           a["ema_state_dict"][next(iter(a["ema_state_dict"]))])
