"""Run one of the platform's own jobs on another run directory (a copy of a demo run) in
this process, leaving the environment as it was: `prepare_instance` points DAGSTER_HOME,
storage and MLflow at the run directory it is given."""

import os


def execute_platform_job(settings, job: str, run_config: dict, partition_key: str | None = None,
                         tags: dict | None = None):
    """`build_definitions(settings)`'s job `job`, executed in process on `settings`' instance (for one
    partition, with run tags, as a sensor's or schedule's run request would start it)."""
    from orchestration.definitions import build_definitions
    from orchestration.demo import prepare_instance

    saved = dict(os.environ)
    try:
        return build_definitions(settings).resolve_job_def(job).execute_in_process(
            instance=prepare_instance(settings), run_config=run_config, partition_key=partition_key, tags=tags)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def retrain_chain_result(instance, run):
    """What `retrain_chain_sensor` returns once `run` (a DagsterRun on `instance`) succeeded."""
    import dagster as dg

    from orchestration.sensors import retrain_chain_sensor

    event = dg.DagsterEvent(event_type_value="PIPELINE_SUCCESS", job_name=run.job_name)
    ctx = dg.build_run_status_sensor_context(sensor_name=retrain_chain_sensor.name, dagster_event=event,
                                             dagster_instance=instance, dagster_run=run)
    return retrain_chain_sensor(ctx)
