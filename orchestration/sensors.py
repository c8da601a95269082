"""Sensors: a new URL list landing in the inbox becomes a crawl batch partition."""


import dagster as dg

from assets.data import crawl_batches
from orchestration.jobs import crawl_job
from orchestration.resources import CrawlSourceResource


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
