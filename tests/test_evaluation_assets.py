"""The `coco_zero_shot_report` asset on the tiny demo run: without Inception
weights it reports the contrastive-space figures and says plainly that FID / IS
were not computed; with a weights file configured it computes them (blur
included); the HTML report lands in storage and MLflow with stable metric names."""

from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import pytest

pytestmark = pytest.mark.slow

FIGURES = ("caption_match_reranked", "caption_match_first_draw", "caption_match_any", "caption_match_per_draw",
           "reranker_efficiency", "reranker_gap", "colour_rate", "shape_rate", "size_rate", "relation_rate",
           "picked_colour_rate", "picked_shape_rate", "picked_size_rate", "picked_relation_rate", "size_captions", "captions")


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.images = [], 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"

    def handle_data(self, data):
        self.text.append(data)


def _latest(settings, key="coco_zero_shot_report"):
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    return instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization.metadata


def test_report_without_inception_weights(demo_run):
    import mlflow

    settings, summary, lines = demo_run
    assert any("[demo] zero-shot report: ok" in l for l in lines)
    meta = _latest(settings)
    assert meta["captions"].value == 16
    assert "not computed: no Inception weights configured" in meta["metrics"].value
    assert "fid" not in meta and meta["contrastive_fd"].value >= 0
    assert 0 <= meta["contrastive_precision"].value <= 1 and 0 <= meta["contrastive_recall"].value <= 1
    assert meta["caption_match_reference"].value == 1.0  # the checker recognises the real images
    html = Path(meta["report"].value).read_text()
    p = _Text()
    p.feed(html)
    text = " ".join(p.text)
    assert "contrastive_fd_blur8" in text and "not computed" in text and p.images >= 2
    assert (Path(settings.storage_root) / "reports/zero_shot/latest.html").read_text() == html

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run = mlflow.get_run(meta["mlflow_run"].value.rstrip("/").split("/")[-1])
    for k in ("contrastive_fd", "contrastive_fd_blur1", "contrastive_fd_blur2", "contrastive_fd_blur4",
              "contrastive_fd_blur8", "contrastive_precision", "contrastive_recall", "caption_match"):
        assert k in run.data.metrics, k
    assert "fid" not in run.data.metrics and "not_computed.fid" in run.data.tags
    assert run.data.tags["dalle.profile"] == "tiny" and run.data.tags.get("dalle.data_version")

    # the caption-match diagnoses, on held-out and on training captions, under stable names
    assert meta["train_captions"].value == 32 and meta["candidates"].value == 8
    for split in ("heldout", "train"):
        for k in FIGURES:
            name = f"{split}/{k}"
            assert name in run.data.metrics and name in meta, name
            assert run.data.metrics[name] == pytest.approx(meta[name].value, abs=1e-4), name
        f = {k: run.data.metrics[f"{split}/{k}"] for k in FIGURES}
        assert all(0 <= f[k] <= 1 for k in FIGURES if k not in ("size_captions", "captions"))
        assert f["caption_match_reranked"] <= f["caption_match_any"] and f["caption_match_first_draw"] <= f["caption_match_any"]
        assert f["picked_colour_rate"] >= f["caption_match_reranked"]  # a match has both colours
    assert run.data.metrics["train/num_captions"] == 32
    # the old names stay: the held-out reranked figures
    assert run.data.metrics["caption_match"] == pytest.approx(run.data.metrics["heldout/caption_match_reranked"])
    assert run.data.metrics["colour_match"] == pytest.approx(run.data.metrics["heldout/picked_colour_rate"])
    diagnosis = meta["diagnosis"].value
    assert diagnosis.startswith(("falls short: ", "nothing falls short")) and "\n" not in diagnosis
    assert run.data.tags["diagnosis"] == diagnosis[:250]
    table = meta["caption_match_diagnosis"].value
    assert "| figure | held-out captions | training captions |" in table and diagnosis in table
    assert "Caption match: held-out vs training captions" in text and "Diagnosis" in text
    assert "heldout/caption_match_any" not in text.split("Earlier versions")[-1]  # not in the history table
    # the demo's summary: held-out and training figures, the reranker's swap binding, the diagnosis
    assert summary["caption_match"].startswith("caption match") and summary["diagnosis"].endswith(diagnosis)
    for part in ("held-out: reranked ", "first draw ", "any-of-8 ", "training captions: reranked ",
                 "reranker swap binding "):
        assert part in summary["caption_match"], part
    assert any(summary["caption_match"] in l for l in lines) and any(diagnosis in l for l in lines)


def test_report_with_inception_weights_and_history(demo_run, tmp_path):
    from dalle_core.eval.inception import write_random_weights
    from orchestration.definitions import build_definitions

    # torch-fidelity's Inception with seeded random weights (the real file cannot be downloaded here)
    weights = write_random_weights(tmp_path / "pt_inception-random.pth")

    settings, _, _ = demo_run
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    defs = build_definitions(settings)
    config = {"ops": {"coco_zero_shot_report": {"config": {
        "captions": 8, "candidates": 2, "radii": [2.0], "inception_weights": str(weights), "train_captions": 0}}}}
    res = defs.resolve_job_def("evaluation_job").execute_in_process(instance=instance, run_config=config)
    assert res.success
    meta = _latest(settings)
    assert meta["captions"].value == 8
    assert meta["fid"].value > 0 and meta["inception_score"].value >= 1.0
    assert "fid_blur2" in meta["metrics"].value and "not computed" not in meta["metrics"].value
    html = Path(meta["report"].value).read_text()
    assert "Earlier versions" in html  # the demo run before this one is the history
    # training captions off: the held-out diagnoses only
    assert meta["train_captions"].value == 0 and "train/caption_match_any" not in meta
    assert "heldout/caption_match_any" in meta and "| figure | held-out captions |" in meta["caption_match_diagnosis"].value

    # a configured weights path that does not exist is an error, not a silent skip
    bad = {"ops": {"coco_zero_shot_report": {"config": {"captions": 4, "inception_weights": "/no/such/weights.pth"}}}}
    res = defs.resolve_job_def("evaluation_job").execute_in_process(instance=instance, run_config=bad,
                                                                     raise_on_error=False)
    assert not res.success
    failure = res.get_step_failure_events()[0].event_specific_data.error
    assert "Inception weights file not found: /no/such/weights.pth" in failure.to_string()
