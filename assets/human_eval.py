"""Human evaluation report (paper section 3.1): majority-of-5 preference rates from the raters' app.

The votes live in the human-eval app's database (`dalle human-eval serve`); its URL
comes from the asset's config or $DALLE_HUMAN_EVAL_DB (default: SQLite under the
run directory), never from code, since a Postgres URL carries a password.
"""

import json
import math
import os

import dagster as dg
from sqlalchemy import select
from sqlalchemy.engine import make_url

from assets.metadata import md, md_table
from assets.resources import MlflowResource, default_run_dir
from dalle_core.eval.human import QUESTIONS, aggregate_votes
from dalle_core.eval.human_db import (ENV_DB, Study, default_db_url, get_study, model_votes, sessions,
                                      study_progress)

QUESTION_TEXT = {"realism": "Which image is more realistic?", "caption_match": "Which image matches the caption better?"}


def human_eval_db_url(configured: str = "") -> str:
    return configured or os.environ.get(ENV_DB) or default_db_url(default_run_dir())


def report_metrics(result: dict) -> dict[str, float]:
    """MLflow metric names are stable: human_eval/<question>_pref_a[_ci_low|_ci_high], ..."""
    out = {"human_eval/items_complete": float(result["items_complete"])}
    for q in QUESTIONS:
        r = result[q]
        out.update({f"human_eval/{q}_pref_a": r["pref_a"], f"human_eval/{q}_pref_a_ci_low": r["ci_low"],
                    f"human_eval/{q}_pref_a_ci_high": r["ci_high"], f"human_eval/{q}_ties": float(r["ties"])})
    return {k: v for k, v in out.items() if not math.isnan(v)}


def report_table(result: dict, model_a: str, model_b: str) -> str:
    rows = [(QUESTION_TEXT[q], f"{r['wins_a']}/{r['n']}", f"{r['pref_a']:.1%}",
             f"{r['ci_low']:.1%} - {r['ci_high']:.1%}", r["wins_b"], r["ties"])
            for q, r in ((q, result[q]) for q in QUESTIONS)]
    return md_table(["question", f"{model_a} (A) preferred", "rate", "95% Wilson CI", f"{model_b} (B)", "ties"], rows)


class HumanEvalConfig(dg.Config):
    db_url: str = ""  # default $DALLE_HUMAN_EVAL_DB, else sqlite under the run directory
    study: str = ""  # default the newest study


@dg.asset(
    deps=["samples"],
    group_name="evaluation",
    kinds={"sqlite"},
    description="The paper's human evaluation: raters compare two models' images for a caption (which is more "
    "realistic, which matches the caption better); each item's answer is the majority of its 5 votes; "
    "preference rates with Wilson 95% intervals, logged to MLflow.",
)
def human_eval_report(
    context: dg.AssetExecutionContext, config: HumanEvalConfig, mlflow: MlflowResource,
) -> dg.MaterializeResult:
    factory = sessions(human_eval_db_url(config.db_url))
    try:
        with factory() as s:
            study = get_study(s, config.study or None)
            progress = study_progress(s, study)
            result = aggregate_votes(model_votes(s, study.id), study.raters_per_item)
    except ValueError as e:
        raise dg.Failure(f"human evaluation: {e}") from None
    if result["items_complete"] == 0:
        raise dg.Failure(f"study {study.name!r}: no item has all its {study.raters_per_item} votes yet "
                         f"({progress['votes']} of {progress['votes_expected']} votes in)")
    metrics = report_metrics(result)
    with mlflow.start_run("human_eval", tags={"stage": "human_eval", "study": study.name}) as run:
        mlflow.log_params({"study": study.name, "model_a": study.model_a, "model_b": study.model_b,
                           "raters_per_item": study.raters_per_item, "items": progress["items"]})
        # the study's images come from the `samples` asset, which samples the champion prior (or the
        # version its config names); the names say which version made them, this says which is champion now
        champion_now = mlflow.champion_version("prior")
        mlflow.set_tag("champion_prior_now", champion_now or "none")
        mlflow.log_metrics(metrics)
        mlflow.log_text(json.dumps(result, indent=1), "human_eval/result.json")
        run_url = mlflow.run_url(run)
    context.log.info(f"human_eval {study.name}: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return dg.MaterializeResult(metadata={
        "study": study.name,
        "models": f"A = {study.model_a}, B = {study.model_b}",
        "champion_prior_now": f"prior v{champion_now}" if champion_now else "no prior registered",
        "items": f"{result['items_complete']} of {progress['items']} complete ({study.raters_per_item} votes each)",
        "result": md(report_table(result, study.model_a, study.model_b)),
        **{k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items()},
        "mlflow_run": dg.MetadataValue.url(run_url),
    })


@dg.sensor(target=[human_eval_report], minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def human_eval_complete_sensor(context: dg.SensorEvaluationContext):
    """Requests `human_eval_report` once per study when every item has all its votes.

    The cursor maps study id -> items complete when it was last reported, so each
    completion fires once (and a study extended later fires again)."""
    reported = json.loads(context.cursor) if context.cursor else {}
    url = make_url(human_eval_db_url())
    if url.get_backend_name() == "sqlite" and url.database and not os.path.exists(url.database):
        return dg.SkipReason(f"no human-eval database yet at {url.database}")
    try:
        with sessions(url.render_as_string(hide_password=False))() as s:
            studies = [(st.id, st.name, study_progress(s, st))
                       for st in s.scalars(select(Study).order_by(Study.id)).all()]
    except Exception as e:  # the database not being there yet is normal before a study starts
        return dg.SkipReason(f"human-eval database not readable: {type(e).__name__}: {e}")
    requests, waiting = [], []
    for sid, name, p in studies:
        if p["items"] and p["items_complete"] == p["items"] and reported.get(str(sid)) != p["items_complete"]:
            reported[str(sid)] = p["items_complete"]
            requests.append(dg.RunRequest(
                run_key=f"human-eval-{sid}-{p['items_complete']}",
                run_config={"ops": {"human_eval_report": {"config": {"study": name}}}}))
        elif p["items_complete"] < p["items"]:
            waiting.append(f"{name}: {p['items_complete']}/{p['items']} items complete")
    if not requests:
        return dg.SkipReason("; ".join(waiting) or "no study to report")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(reported))

