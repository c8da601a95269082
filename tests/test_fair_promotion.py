"""Fair promotion and champions everywhere, on the tiny demo run with the platform's own
assets, jobs and resources: a second prior version is registered as challenger (and its
file written where the `prior` asset writes it), then

- `samples` still samples the champion prior, not the newest file in storage;
- the zero-shot report evaluates the challenger by version, says "prior v2 (challenger)
  vs champion v1", and scores the champion under the same fingerprint in the same run
  (the champion's figures under the demo's fingerprint stay as they were);
- the same conditions again: the champion's recorded figures are used, not replaced;
- other conditions without re-scoring: promotion refused, with the reason.
"""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

pytestmark = pytest.mark.slow


def _latest(instance, key):
    return instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization.metadata


@pytest.fixture(scope="module")
def challenger(demo_run, tmp_path_factory):
    """prior v2: the demo's prior with its weights scrambled, registered as challenger and
    written to storage's prior/prior.pt (what a newer `prior` run leaves there)."""
    import mlflow
    import torch

    from assets.prior import PRIOR_KEY
    from dalle_core.prior.model import read_prior_file
    from assets.model_registry import PriorModel, champion_version, log_and_register

    settings, _, _ = demo_run
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    champion = champion_version("prior")
    store_file = Path(settings.storage_root) / PRIOR_KEY
    saved = tmp_path_factory.mktemp("prior-backup") / "prior.pt"
    shutil.copy(store_file, saved)
    blob = read_prior_file(store_file)
    # as if trained with caption dropout, so that a guided evaluation may draw it (the champion cannot)
    blob["meta"]["caption_dropout"] = 0.1
    gen = torch.Generator().manual_seed(0)
    for sd in (blob["state_dict"], blob.get("ema_state_dict") or {}):
        for k, v in sd.items():
            if v.is_floating_point():
                sd[k] = v + 2.0 * torch.randn(v.shape, generator=gen)
    new = tmp_path_factory.mktemp("prior-v2") / "prior.pt"
    torch.save(blob, new)
    tok = Path(settings.storage_root) / "tokenizer" / "bpe.json"
    exp = mlflow.set_experiment("dalle")
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="prior (test challenger)"):
        version = log_and_register(new, "prior", PriorModel(), alias="challenger",
                                   extra_artifacts={"tokenizer": tok} if tok.is_file() else None)
    shutil.copy(new, store_file)
    yield settings, champion, version
    shutil.copy(saved, store_file)  # other tests read the demo's files and champions
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("prior", "champion", champion)
    client.set_registered_model_alias("prior", "challenger", champion)


def test_samples_use_the_champion_prior_not_the_newest_file(challenger):
    from assets.generation import samples
    from orchestration.definitions import build_definitions

    settings, champion, version = challenger
    assert version != champion
    root = Path(settings.storage_root) / "samples"
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    defs = build_definitions(settings)
    small = {"captions": 3, "candidates": 4, "keep": 2}

    def run(**extra):
        res = dg.materialize([samples], instance=instance, resources=defs.resources,
                             run_config={"ops": {"samples": {"config": {**small, **extra}}}})
        assert res.success
        return (_latest(instance, "samples")["models"].value, json.loads((root / "models.json").read_text()),
                [c["scores"] for c in json.loads((root / "captions.json").read_text())])

    described, models, scores = run()  # the default: @champion, though prior.pt in storage is v2
    assert described.startswith(f"prior v{champion} @champion") and models["versions"]["prior"] == champion
    # the champion's weights drew them: the same scores as naming the champion's version explicitly
    _, _, explicit = run(prior=champion)
    assert scores == explicit
    described, models, other = run(prior=version)  # an explicit version is honoured too
    assert described.startswith(f"prior v{version},") and other != scores
    # put the demo's samples back for the other tests
    dg.materialize([samples], instance=instance, resources=defs.resources)


def test_challenger_is_compared_under_its_own_fingerprint(challenger):
    import mlflow

    from orchestration.definitions import build_definitions
    from assets.model_registry import champion_version, version_figures

    settings, champion, version = challenger
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    defs = build_definitions(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    before = version_figures("prior", champion)  # the demo's evaluation (and any other test's, same session)
    assert before

    job = defs.resolve_job_def("evaluation_job")
    config = {"captions": 4, "candidates": 2, "radii": [2.0], "seed": 3}
    res = job.execute_in_process(instance=instance, run_config={"ops": {"coco_zero_shot_report": {"config": config}}})
    assert res.success
    meta = _latest(instance, "coco_zero_shot_report")
    fp = meta["fingerprint"].value
    assert meta["evaluated"].value == f"prior v{version} (challenger) vs champion v{champion}"
    assert fp not in before and meta["champion_rescored"].value.startswith("yes")
    assert f"prior v{version}" in meta["comparison"].value and f"champion v{champion}" in meta["comparison"].value
    assert "model that selected the samples" in meta["metrics"].value  # contrastive FD says whose space it is
    figures = version_figures("prior", champion)
    for earlier, fig in before.items():  # the champion's reference figures untouched
        assert figures[earlier].metrics == fig.metrics, earlier
    assert figures[fp].fingerprint["candidates"] == "2" and "contrastive_fd" in figures[fp].metrics
    run = mlflow.get_run(meta["mlflow_run"].value.rstrip("/").split("/")[-1])
    for k in ("contrastive_fd", "challenger_contrastive_fd", "champion_contrastive_fd"):
        assert k in run.data.metrics, k
    assert run.data.metrics["champion_contrastive_fd"] == pytest.approx(figures[fp].metrics["contrastive_fd"])
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/comparison.md" in arts and "evaluation/fingerprint.json" in arts
    promoted = meta["promoted"].value
    assert champion_version("prior") == (version if promoted else champion)
    if promoted:  # scrambled weights should lose; whatever happened, put the demo's champion back
        mlflow.MlflowClient().set_registered_model_alias("prior", "champion", champion)

    # the same conditions again: the champion's recorded figures serve, nothing re-scored or replaced
    res = job.execute_in_process(instance=instance, run_config={"ops": {"coco_zero_shot_report": {"config": config}}})
    meta2 = _latest(instance, "coco_zero_shot_report")
    assert res.success and meta2["fingerprint"].value == fp
    assert meta2["champion_rescored"].value.startswith("no: figures under fingerprint")
    assert version_figures("prior", champion)[fp].metrics == figures[fp].metrics
    assert meta2["promoted"].value == promoted  # the same figures, the same decision
    # (on 4 captions even scrambled weights can win: FD on so few images is mostly noise)
    mlflow.MlflowClient().set_registered_model_alias("prior", "champion", champion)

    # other conditions, re-scoring switched off: refused, with the reason, champion kept
    off = {**config, "seed": 4, "rescore_champion": False}
    res = job.execute_in_process(instance=instance, run_config={"ops": {"coco_zero_shot_report": {"config": off}}})
    meta3 = _latest(instance, "coco_zero_shot_report")
    assert res.success and not meta3["promoted"].value and champion_version("prior") == champion
    assert "no figures under this evaluation's fingerprint" in meta3["promotion"].value
    assert meta3["fingerprint"].value not in version_figures("prior", champion)


def test_the_sampling_temperature_is_one_of_the_conditions(challenger):
    """The zero-shot report drawn at another temperature or guidance scale (run config, or a
    profile's `sampling`, e.g. medium's 0.7) is another fingerprint: the champion is re-scored at that
    temperature, not compared with its figures at 1; MLflow records the temperature drawn. A guided
    draw of a champion trained without caption dropout is refused: no promotion at that scale, and
    the samples asset (which draws the champion) fails naming the cause."""
    import mlflow

    from orchestration.definitions import build_definitions
    from assets.model_registry import version_figures

    settings, champion, version = challenger
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    job = build_definitions(settings).resolve_job_def("evaluation_job")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    base = {"captions": 4, "candidates": 2, "radii": [2.0], "seed": 5}
    fps = {}
    for temperature, guidance in ((None, None), (0.7, None), (None, 2.0)):
        config = {**base, **({"temperature": temperature} if temperature else {}),
                  **({"guidance_scale": guidance} if guidance else {})}
        res = job.execute_in_process(instance=instance, run_config={"ops": {"coco_zero_shot_report": {"config": config}}})
        assert res.success
        meta = _latest(instance, "coco_zero_shot_report")
        fps[temperature, guidance] = meta["fingerprint"].value
        run = mlflow.get_run(meta["mlflow_run"].value.rstrip("/").split("/")[-1])
        assert float(run.data.params["temperature"]) == (temperature or 1.0)  # the tiny profile: the paper's 1
        assert float(run.data.params["guidance_scale"]) == (guidance or 1.0)
        mlflow.MlflowClient().set_registered_model_alias("prior", "champion", champion)
        if guidance:  # the challenger was trained with caption dropout, the champion without
            assert meta["champion_rescored"].value.startswith(f"no: champion v{champion} cannot be drawn")
            assert "caption dropout" in meta["champion_rescored"].value and not meta["promoted"].value
    assert len(set(fps.values())) == 3
    figures = version_figures("prior", champion)
    assert "sampling_temperature" not in figures[fps[None, None]].fingerprint  # the paper's sampling: the old fingerprint
    assert "sampling_guidance_scale" not in figures[fps[None, None]].fingerprint
    assert figures[fps[0.7, None]].fingerprint["sampling_temperature"] == "0.7"
    assert "contrastive_fd" in figures[fps[0.7, None]].metrics  # the champion scored at 0.7 too
    # classifier-free guidance is a condition as well: no champion figures under it (the champion
    # cannot be guided), none borrowed from the unguided fingerprint
    assert fps[None, 2.0] not in figures
    from assets.generation import samples

    defs = build_definitions(settings)
    res = dg.materialize([samples], instance=instance, resources=defs.resources, raise_on_error=False,
                         run_config={"ops": {"samples": {"config": {"captions": 2, "candidates": 2, "keep": 1,
                                                                    "guidance_scale": 2.0}}}})
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    assert "needs a prior trained with caption dropout" in failure.event_specific_data.error.to_string()


def test_the_report_draws_the_profiles_candidates_and_names_them(challenger, monkeypatch):
    """Without `candidates` in its run config the platform's evaluation_job reranks the
    profile's `sampling.candidates` draws per caption (medium: 32), and the figures'
    fingerprint, metadata and MLflow params name that N."""
    from dataclasses import replace

    import mlflow

    import assets.resources
    from orchestration.definitions import build_definitions
    from assets.model_registry import version_figures
    from dalle_core.profiles import get_profile

    settings, champion, version = challenger
    tiny = get_profile("tiny")
    monkeypatch.setattr(assets.resources, "get_profile",
                        lambda name: replace(tiny, sampling=tiny.sampling.replace(candidates=3)) if name == "tiny"
                        else get_profile(name))
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    job = build_definitions(settings).resolve_job_def("evaluation_job")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    config = {"captions": 4, "radii": [2.0], "seed": 7, "train_captions": 0}
    res = job.execute_in_process(instance=instance, run_config={"ops": {"coco_zero_shot_report": {"config": config}}})
    assert res.success
    meta = _latest(instance, "coco_zero_shot_report")
    assert meta["candidates"].value == 3
    run = mlflow.get_run(meta["mlflow_run"].value.rstrip("/").split("/")[-1])
    assert run.data.params["candidates"] == "3" and run.data.metrics["candidates_per_caption"] == 3.0
    figures = version_figures("prior", version)
    assert figures[meta["fingerprint"].value].fingerprint["candidates"] == "3"
    mlflow.MlflowClient().set_registered_model_alias("prior", "champion", champion)
