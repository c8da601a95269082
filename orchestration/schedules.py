"""Schedules: periodic retraining on whatever the shards hold by then.

Stopped by default (a demo machine should not start training on its own); turn
it on in the Dagster UI (Automation) or with `dagster schedule start`. It starts
retrain_job (tokenizer + dVAE); retrain_chain_sensor carries the retrain through
the per-shard encoding to the prior and the zero-shot report (orchestration/jobs.py
says why). New data between retrainings is handled by the sensor + automation
conditions: a new URL list is crawled, its filtered_pairs partition and shards
follow it (eager).
"""

import dagster as dg

from orchestration.jobs import retrain_job

retrain_schedule = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 3 * * 0",  # Sundays 03:00
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain the models from the current shards every week (retrain_job, then every shard "
    "re-encoded and retrain_tail_job, chained by retrain_chain_sensor); the new prior is champion only "
    "if its zero-shot report beats the champion's.",
)
