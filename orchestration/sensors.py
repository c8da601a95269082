"""Sensors: a new URL list landing in the inbox becomes a crawl batch partition; the
weekly retrain is chained past the per-shard encoding."""


import dagster as dg

from assets.data import code_shards, crawl_batches
from assets.resources import CrawlSourceResource
from orchestration.jobs import crawl_job, image_codes_job, retrain_job, retrain_tail_job


@dg.sensor(job=crawl_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED)
def new_url_list_sensor(context: dg.SensorEvaluationContext, crawl_source: CrawlSourceResource):
    """Adds a partition per new URL list and requests its crawl; old lists are never recrawled."""
    known = set(context.instance.get_dynamic_partitions(crawl_batches.name))
    new = [name for name in crawl_source.url_lists() if name not in known]
    if not new:
        return dg.SkipReason(f"no new URL list in {crawl_source.url_list_dir}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=name, partition_key=name) for name in new],
        dynamic_partitions_requests=[crawl_batches.build_add_request(new)],
    )


RETRAIN_TAG = "dalle/retrain"  # the retrain_job run that a chained run belongs to


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[retrain_job, image_codes_job],
    request_jobs=[image_codes_job, retrain_tail_job],
    default_status=dg.DefaultSensorStatus.RUNNING,  # it only follows retrain_job, whose schedule is off by default
)
def retrain_chain_sensor(context: dg.RunStatusSensorContext):
    """The weekly retrain past the code_shards fan-out (see orchestration/jobs.py): every shard
    re-encoded in a run of its own, then the tail once each of those runs succeeded."""
    run = context.dagster_run
    if run.job_name == retrain_job.name:
        return encode_every_shard(context.instance, run.run_id)
    return retrain_tail_when_coded(context.instance, run.tags.get(RETRAIN_TAG))


def encode_every_shard(instance, retrain_id: str) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(run_key=f"{retrain_id}:{shard}", job_name=image_codes_job.name, partition_key=shard,
                      tags={RETRAIN_TAG: retrain_id})
        for shard in instance.get_dynamic_partitions(code_shards.name)
    ]


def retrain_tail_when_coded(instance, retrain_id: str | None):
    if retrain_id is None:
        return dg.SkipReason("an image_codes run outside a retrain")
    latest: dict[str, dg.DagsterRun] = {}  # per shard, its latest run in this retrain (a rerun replaces a failure)
    for run in instance.get_runs(dg.RunsFilter(job_name=image_codes_job.name, tags={RETRAIN_TAG: retrain_id})):
        latest.setdefault(run.tags.get("dagster/partition", ""), run)
    waiting = sorted(s for s, r in latest.items() if r.status != dg.DagsterRunStatus.SUCCESS)
    if waiting:
        return dg.SkipReason(f"retrain {retrain_id}: shards not coded yet: {', '.join(waiting)}")
    return dg.RunRequest(run_key=f"{retrain_id}:tail", job_name=retrain_tail_job.name, tags={RETRAIN_TAG: retrain_id})
