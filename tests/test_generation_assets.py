"""The `reranker` and `samples` assets of the tiny demo run, and `dalle generate`
against the models that run registered (by alias and by path), with its errors."""

import json
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from orchestration.cli import main

pytestmark = pytest.mark.slow


def _meta(settings, key):
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was not materialized"
    return event.asset_materialization.metadata


def test_reranker_registered_with_held_out_figures(demo_run):
    import mlflow

    from dalle_core.rerank import load_reranker
    from assets.model_registry import resolve_weights

    settings, _, lines = demo_run
    assert any("[demo] reranker and samples: ok" in l for l in lines)
    meta = _meta(settings, "reranker")
    assert meta["steps"].value == 60
    for k in ("retrieval_image_to_text", "retrieval_text_to_image", "swap_binding"):
        assert 0.0 <= meta[k].value <= 1.0
    # 16 held-out pairs: chance is 1/16; 60 tiny steps already do better
    assert meta["retrieval_image_to_text"].value > 1 / 16
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("reranker", "champion")
    history = mlflow.MlflowClient().get_metric_history(version.run_id, "loss")
    assert len(history) >= 3 and history[-1].value < history[0].value
    model = load_reranker(resolve_weights("@champion", "reranker"))
    assert model.config.text_len == 16


@pytest.mark.timeout(600)
def test_a_retrained_reranker_is_judged_by_its_near_miss_loss(demo_run, tmp_path):
    """The platform's own generation_job retrains the reranker on a copy of the tiny demo run:
    the challenger and the champion are compared on near_miss_loss (the cross-entropy of
    picking the true evaluation image among its 7 near misses: graded, where the pick's share
    saturates) under one fingerprint, and the champion alias follows it."""
    import shutil

    import mlflow

    from assets.model_registry import champion_version, version_figures
    from orchestration.settings import Settings
    from platform_jobs import execute_platform_job

    settings, summary, _ = demo_run
    first = _meta(settings, "reranker")
    assert 0.0 <= first["near_miss_pick"].value <= 1.0
    assert any("near-miss pick" in line for line in summary["lines"])  # the demo's summary prints it
    shutil.copytree(settings.run_dir, tmp_path / "run")
    copy = Settings(run_dir=tmp_path / "run", profile="tiny", demo_port=settings.demo_port)
    mlflow.set_tracking_uri(copy.mlflow_tracking_uri)
    champion = champion_version("reranker")
    res = execute_platform_job(copy, "generation_job", {"ops": {"reranker": {"config": {"steps": 20}}}})
    assert res.success
    meta = res.asset_materializations_for_node("reranker")[0].metadata
    assert meta["steps"].value == 20 and 0.0 <= meta["near_miss_pick"].value <= 1.0
    assert meta["near_miss_loss"].value > 0.0
    promotion = meta["promotion"].value
    assert "near_miss_loss" in promotion and f"champion v{champion}" in promotion, promotion
    assert "| near_miss_loss |" in meta["comparison"].value and "| near_miss_pick |" in meta["comparison"].value
    mlflow.set_tracking_uri(copy.mlflow_tracking_uri)
    version = meta["model_version"].value.split()[1].lstrip("v")
    ours, theirs = version_figures("reranker", version), version_figures("reranker", champion)
    fp = next(iter(ours))  # one evaluation of the challenger: the champion holds figures under the same one
    assert fp in theirs and "near_miss_loss" in theirs[fp].metrics
    better = ours[fp].metrics["near_miss_loss"] < theirs[fp].metrics["near_miss_loss"]
    assert champion_version("reranker") == (version if better else champion)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)


def test_samples_asset_grid_rates_and_mlflow(demo_run):
    import mlflow

    settings, summary, _ = demo_run
    meta = _meta(settings, "samples")
    root = Path(settings.storage_root) / "samples"
    caps = json.loads((root / "captions.json").read_text())
    assert len(caps) == 16 and all(len(c["scores"]) == 4 for c in caps)
    assert all(c["scores"][0] >= c["scores"][-1] for c in caps)  # best first
    grid = Image.open(root / "grid.png")
    assert grid.size[0] > grid.size[1] / 4  # 8 images a row (4 reranked, 4 draws), 16 rows
    assert len(list(root.glob("0*-*.png"))) == 16 * 4
    for k in ("caption_match_reranked", "caption_match_top1", "caption_match_random", "caption_match_shuffled"):
        assert 0.0 <= meta[k].value <= 1.0
    assert "grid" in meta and "references" in meta
    assert any(l.startswith("samples") for l in summary["lines"])
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run_id = meta["mlflow_run"].value.rstrip("/").split("/")[-1]
    run = mlflow.get_run(run_id)
    assert "caption_match_reranked" in run.data.metrics
    # every candidate judged: the report's held-out figures, on the samples' 16 captions x 32 candidates
    for k in ("caption_match_reranked", "caption_match_first_draw", "caption_match_any", "reranker_efficiency",
              "colour_rate", "shape_rate", "size_rate", "relation_rate", "picked_colour_rate"):
        assert f"heldout/{k}" in run.data.metrics and f"heldout/{k}" in meta, k
    assert meta["heldout/caption_match_reranked"].value == pytest.approx(meta["caption_match_top1"].value, abs=1e-4)
    assert meta["heldout/caption_match_first_draw"].value <= meta["heldout/caption_match_any"].value
    assert meta["diagnosis"].value and "held-out captions" in meta["caption_match_diagnosis"].value
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "samples")]
    assert "samples/grid.png" in arts


def _env(monkeypatch, settings):
    for k, v in settings.export().items():
        monkeypatch.setenv(k, v)


def test_dalle_generate_by_alias_and_by_path(demo_run, tmp_path, monkeypatch, capsys):
    settings, _, _ = demo_run
    _env(monkeypatch, settings)
    out = tmp_path / "grid.png"
    rc = main(["generate", "a red circle above a blue square", "--n", "6", "--keep", "3", "--out", str(out),
               "--quiet", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kept 3, reranked by the contrastive model" in printed and "scores:" in printed
    assert Image.open(out).size[0] > Image.open(tmp_path / "grid_01.png").size[0]
    assert sorted(p.name for p in tmp_path.glob("grid_*.png")) == ["grid_01.png", "grid_02.png", "grid_03.png"]
    first = (tmp_path / "grid_01.png").read_bytes()

    # by path, same seed: the same images
    store = Path(settings.storage_root)
    out2 = tmp_path / "b" / "g.png"
    rc = main(["generate", "a red circle above a blue square", "--n", "6", "--keep", "3", "--out", str(out2),
               "--quiet", "--seed", "1", "--prior", str(store / "prior/prior.pt"), "--dvae", str(store / "dvae/dvae.pt"),
               "--reranker", str(store / "reranker/reranker.pt")])
    assert rc == 0 and (tmp_path / "b" / "g_01.png").read_bytes() == first

    # an image prompt: top rows of a real evaluation image
    prompt = next((store / "coco_eval" / "images").iterdir())
    rc = main(["generate", "a red circle above a blue square", "--n", "2", "--keep", "1", "--quiet",
               "--out", str(tmp_path / "p.png"), "--image-prompt", str(prompt), "--prompt-rows", "4",
               "--reranker", "none"])
    assert rc == 0 and "in draw order (no reranker)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "  "], "the caption is empty"),
    (["generate", " ".join(["a red circle above a blue square"] * 6)], "longer than the prior's text context of 16"),
    (["generate", "a red circle", "--prior", "@nosuchalias"], "not found in the MLflow registry"),
    (["generate", "a red circle", "--dvae", "/no/such/dvae.pt"], "no such file"),
    (["generate", "a red circle", "--n", "2", "--keep", "3"], "--keep <= --n"),
    # the demo's prior trained without caption dropout: guiding it is refused, naming why
    (["generate", "a red circle", "--guidance-scale", "2"], "needs a prior trained with caption dropout"),
])
def test_dalle_generate_user_errors(demo_run, tmp_path, monkeypatch, capsys, argv, message):
    settings, _, _ = demo_run
    _env(monkeypatch, settings)
    rc = main(argv + ["--out", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
