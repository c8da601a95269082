"""Stage one as assets (tiny profile): tokenizer, dVAE in the MLflow registry,
image codes the prior reads, and the `dalle dvae` command."""

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _store(settings):
    from dalle_core.storage import open_storage

    return open_storage(settings.storage_root)


def test_tokenizer_and_dvae_materialized_with_figures(demo_run):
    settings, _, lines = demo_run
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    tok = instance.get_latest_materialization_event(dg.AssetKey("bpe_tokenizer")).asset_materialization.metadata
    assert tok["text_len"].value == 16 and tok["trained_vocab"].value > 64
    meta = instance.get_latest_materialization_event(dg.AssetKey("dvae")).asset_materialization.metadata
    assert meta["steps"].value == 60
    assert "data:image/png;base64," in meta["reconstructions"].value
    assert 0 < meta["eval_codebook_usage"].value <= 1
    assert "recon" in meta["figures"].value and "perplexity" in meta["figures"].value
    assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
    assert any("tokenizer and dVAE: ok" in l for l in lines)
    n_shards = len(json.loads(_store(settings).get_text("shards/manifest.json"))["shards"])
    assert sum(l.startswith("[demo] encoded shard-") and ": ok" in l for l in lines) == n_shards  # a run each


def test_dvae_registered_with_alias_and_loads_by_it(demo_run):
    import mlflow

    from dalle_core.dvae.model import load_dvae
    from assets.model_registry import resolve_weights

    settings, _, _ = demo_run
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("dvae", "champion")
    assert int(version.version) >= 1
    encoder, decoder, cfg = load_dvae(resolve_weights("@champion", "dvae"))
    assert cfg.image_size == 32 and cfg.grid_size == 8  # the config pinned in the file
    run = mlflow.get_run(version.run_id)
    for key in ("recon", "kl", "total", "temperature", "beta", "usage", "perplexity", "caption_match_reconstruction"):
        assert key in run.data.metrics, key
    history = mlflow.MlflowClient().get_metric_history(version.run_id, "temperature")
    assert len(history) > 3 and history[-1].value < history[0].value  # annealed


def test_image_codes_cover_every_shard_sample(demo_run):
    from dalle_core.data import codes
    from dalle_core.data.shards import Manifest
    from dalle_core.text.bpe import DalleTokenizer

    settings, _, _ = demo_run
    store = _store(settings)
    src = Manifest.load(store, "shards")
    out = Manifest.load(store, "image_codes")
    assert out.total == src.total and [s.name for s in out.shards] == [s.name for s in src.shards]
    tok = DalleTokenizer.from_json(store.get_text("tokenizer/bpe.json"))
    with store.local_copy(f"image_codes/{out.shards[0].name}") as path:
        pairs = list(codes.iter_code_shard(path))
    p = pairs[0]
    assert p.codes.shape == (8, 8) and p.codes.dtype == np.int16
    assert p.codes.min() >= 0 and p.codes.max() < out.extra["image_vocab"]
    assert p.text.shape == (16,) and tok.decode(p.text.tolist()) == tok.normalize(p.caption)[: len(tok.decode(p.text.tolist()))]
    assert out.extra["text_vocab"] == tok.total_vocab_size


def _codes_defs(settings):
    from orchestration.definitions import build_definitions

    job = dg.define_asset_job("code_manifest_only", selection=dg.AssetSelection.assets("image_codes_manifest"))
    return dg.Definitions.merge(build_definitions(settings), dg.Definitions(jobs=[job]))


def _files(root):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir() if p.is_file()}


def test_a_shard_partition_encodes_only_that_shard_and_resumes(demo_run):

    from orchestration.demo import prepare_instance

    settings, _, _ = demo_run
    instance = prepare_instance(settings)
    defs = _codes_defs(settings)
    store = _store(settings)
    codes_dir = Path(settings.storage_root) / "image_codes"
    names = [s["name"] for s in json.loads(store.get_text("image_codes/manifest.json"))["shards"]]
    target = names[1]
    store.delete(f"image_codes/{target}.done.json")  # as if killed while writing this shard
    before = _files(codes_dir)
    result = defs.resolve_job_def("image_codes_job").execute_in_process(instance=instance, partition_key=target)
    meta = result.asset_materializations_for_node("image_codes")[0].metadata
    assert meta["resumed"].value is False and meta["source_shard"].value == target
    after = _files(codes_dir)
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {target, f"{target}.done.json"}, changed  # no other shard touched
    assert after[target][1] == before[target][1]  # the same codes again
    # a shard already encoded by this dVAE and tokenizer is skipped
    result = defs.resolve_job_def("image_codes_job").execute_in_process(instance=instance, partition_key=names[0])
    assert result.asset_materializations_for_node("image_codes")[0].metadata["resumed"].value is True
    assert _files(codes_dir)[names[0]] == after[names[0]]
    result = defs.resolve_job_def("code_manifest_only").execute_in_process(instance=instance)
    assert [s["name"] for s in json.loads(store.get_text("image_codes/manifest.json"))["shards"]] == names


def test_code_manifest_refuses_missing_and_stale_shards_naming_them(demo_run):
    from orchestration.demo import prepare_instance

    settings, _, _ = demo_run
    instance = prepare_instance(settings)
    store = _store(settings)
    names = [s["name"] for s in json.loads(store.get_text("image_codes/manifest.json"))["shards"]]
    missing, other = f"image_codes/{names[0]}.done.json", f"image_codes/{names[-1]}.done.json"
    backup = {k: store.get_text(k) for k in (missing, other)}
    try:
        store.delete(missing)
        store.put_text(other, json.dumps({**json.loads(backup[other]), "dvae_sha256": "f" * 64}))
        result = _codes_defs(settings).resolve_job_def("code_manifest_only").execute_in_process(
            instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = str(failure.step_failure_data.error)
        assert f"{names[0]}: not encoded" in message, message
        assert f"{names[-1]}: encoded with another dvae (ffffffffffff" in message, message
        assert not any(n in message for n in names[1:-1]), message
    finally:
        for k, v in backup.items():
            store.put_text(k, v)


def test_dvae_cli_encode_decode_and_bad_input(demo_run, tmp_path, capsys):
    from PIL import Image

    from orchestration.cli import main

    settings, _, _ = demo_run
    store = _store(settings)
    img = tmp_path / "in.png"
    with store.local_copy(f"coco_eval/images/{store.list('coco_eval/images/')[0].rsplit('/', 1)[-1]}") as p:
        Image.open(p).convert("RGB").save(img)
    run = ["--run-dir", str(settings.run_dir)]
    codes = tmp_path / "codes.json"
    assert main(["dvae", "encode", str(img), "--out", str(codes), "--resize", "--reconstruction", str(tmp_path / "rec.png"), *run]) == 0
    assert len(json.loads(codes.read_text())["codes"]) == 8
    assert main(["dvae", "decode", str(codes), "--out", str(tmp_path / "dec.png"), *run]) == 0
    assert Image.open(tmp_path / "dec.png").size == (32, 32)
    capsys.readouterr()
    # wrong size without --resize, grayscale, not an image, unknown alias: one line naming the cause
    assert main(["dvae", "encode", str(img), "--out", str(codes), *run]) == 2
    assert "expected 32x32" in capsys.readouterr().err
    Image.new("L", (32, 32)).save(tmp_path / "gray.png")
    assert main(["dvae", "encode", str(tmp_path / "gray.png"), "--out", str(codes), *run]) == 2
    assert "grayscale" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["dvae", "encode", str(tmp_path / "notes.png"), "--out", str(codes), *run]) == 2
    assert "notes.png: not a readable image" in capsys.readouterr().err
    assert main(["dvae", "encode", str(img), "--out", str(codes), "--model", "@nope", "--resize", *run]) == 2
    assert "not found in the MLflow registry" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_dvae_job_trains_data_parallel_on_two_processes(demo_run, tmp_path, monkeypatch):
    """The platform's own `dvae_job` with `nproc_per_node: 2` (on a copy of the demo run's
    storage, so the other tests keep their dVAE): the dVAE trains under torchrun on 2 gloo
    processes, rank 0's report arrives in the materialization, the model is saved and
    registered like a single-process one and encodes the demo's images."""
    import shutil

    import mlflow

    from dalle_core import heap
    from dalle_core.dvae.model import load_dvae
    from dalle_core.profiles import get_profile
    from orchestration.settings import Settings
    from platform_jobs import execute_platform_job

    settings, _, _ = demo_run
    shutil.copytree(settings.storage_root, tmp_path / "storage")
    copy = Settings(run_dir=tmp_path, profile="tiny", demo_port=settings.demo_port)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DALLE_TORCHRUN_BACKEND", "local")
    result = execute_platform_job(copy, "dvae_job", {"ops": {"dvae": {"config": {"nproc_per_node": 2}}}})
    assert result.success
    meta = result.asset_materializations_for_node("dvae")[0].metadata
    assert meta["world_size"].value == 2 and meta["steps"].value == 60
    assert meta["train_steps"].value == 60 and meta["train_recon"].value < 0  # rank 0's own figures
    # the torchrun entry kept freed pages for reuse (dalle_core/heap.py), and says so next to its times
    assert meta["freed_heap_kept"].value is (heap._glibc() is not None)
    assert 0 < meta["eval_codebook_usage"].value <= 1
    assert meta["model_version"].value.startswith("dvae v1")  # a fresh registry: the copy's
    encoder, _, cfg = load_dvae(tmp_path / "storage" / "dvae" / "dvae.pt")
    assert cfg.shape_dict() == get_profile("tiny").dvae.shape_dict()
    mlflow.set_tracking_uri(copy.mlflow_tracking_uri)
    run = mlflow.get_run(mlflow.MlflowClient().get_model_version("dvae", "1").run_id)
    assert run.data.params["total_steps"] == "60" and "caption_match_reconstruction" in run.data.metrics


def test_a_retrained_dvae_is_compared_with_the_champion_on_the_same_images(demo_run, tmp_path):
    """The platform's own `dvae_job` on a copy of the demo run whose champion holds figures only
    from other conditions (as one registered before the evaluation was fingerprinted): the
    champion is re-scored on the same held-out images in the same run, both versions' figures
    are recorded under one fingerprint naming those images, and the alias follows the rule."""
    import shutil

    import mlflow

    from assets.model_registry import FINGERPRINT_TAG, METRIC_TAG, RUN_TAG, champion_version, version_figures
    from orchestration.settings import Settings
    from platform_jobs import execute_platform_job

    settings, _, _ = demo_run
    shutil.copytree(settings.run_dir, tmp_path / "run")
    copy = Settings(run_dir=tmp_path / "run", profile="tiny", demo_port=settings.demo_port)
    mlflow.set_tracking_uri(copy.mlflow_tracking_uri)
    try:
        client = mlflow.MlflowClient()
        champion = champion_version("dvae")
        for tag in client.get_model_version("dvae", champion).tags:  # forget its fingerprinted figures
            if tag.startswith((FINGERPRINT_TAG, METRIC_TAG, RUN_TAG)):
                client.delete_model_version_tag("dvae", champion, tag)
        assert version_figures("dvae", champion) == {}
        res = execute_platform_job(copy, "dvae_job", {})
        assert res.success
        meta = res.asset_materializations_for_node("dvae")[0].metadata
        assert meta["champion_rescored"].value == "re-scored under these conditions"
        assert "| recon_mse |" in meta["comparison"].value and f"champion v{champion}" in meta["comparison"].value
        version = meta["model_version"].value.split()[1].lstrip("v")
        ours, theirs = version_figures("dvae", version), version_figures("dvae", champion)
        [fp] = list(ours)
        assert list(theirs) == [fp] and ours[fp].fingerprint["evaluation"] == "dvae held-out reconstructions"
        assert len(ours[fp].fingerprint["images"]) == 64  # a sha256 of the held-out pixels
        # the retrain resumed the run's finished checkpoint: the same model, the same figures, not a win
        assert ours[fp].metrics["recon_mse"] == pytest.approx(theirs[fp].metrics["recon_mse"], rel=1e-6)
        assert champion_version("dvae") == champion and "stays challenger" in meta["promotion"].value
    finally:
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
