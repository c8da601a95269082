"""Stage one as assets (tiny profile): tokenizer, dVAE in the MLflow registry,
image codes the prior reads, and the `dalle dvae` command."""

import json

import dagster as dg
import numpy as np
import pytest

pytestmark = pytest.mark.slow


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
    assert any("tokenizer, dVAE and image codes: ok" in l for l in lines)


def test_dvae_registered_with_alias_and_loads_by_it(demo_run):
    import mlflow

    from dalle_core.dvae.train import load_dvae
    from orchestration.model_registry import resolve_weights

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


def test_image_codes_resume_skips_encoded_shards(demo_run):
    from orchestration.definitions import build_definitions
    from orchestration.demo import prepare_instance

    settings, _, _ = demo_run
    instance = prepare_instance(settings)
    defs = build_definitions(settings)
    job = dg.define_asset_job("codes_only", selection=dg.AssetSelection.assets("image_codes"))
    defs = dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
    store = _store(settings)
    before = store.get_bytes("image_codes/manifest.json")
    first = json.loads(before)["shards"][0]["name"]
    store.delete(f"image_codes/{first}.done.json")  # as if killed while writing shard 0
    result = defs.resolve_job_def("codes_only").execute_in_process(instance=instance)
    meta = result.asset_materializations_for_node("image_codes")[0].metadata
    n = len(json.loads(before)["shards"])
    assert meta["resumed_shards"].value == n - 1
    after = json.loads(store.get_bytes("image_codes/manifest.json"))
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in json.loads(before)["shards"]]


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
