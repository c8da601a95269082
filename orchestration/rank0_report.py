"""What a torchrun entry launched by an asset reports, and from which rank.

Every rank inherits the Dagster Pipes environment and MLFLOW_RUN_ID, so only rank 0
opens the Pipes session and logs to MLflow: `rank0_reporter()` gives rank 0 a
`Reporter` that streams each metrics record to the Dagster run (a log line) and to
the MLflow run the asset opened, and reports the final figures as the
materialization's metadata; on the other ranks, and under a plain torchrun without
Pipes or MLflow, the same calls do nothing. Used by orchestration/prior_entry.py and
orchestration/dvae_entry.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator


def mlflow_logger() -> Callable[[dict], None] | None:
    """log(record) -> the numeric fields of `record` as metrics of the MLflow run
    MLFLOW_RUN_ID at its "step" ("/" in names becomes "_"); None without that run."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()

    def log(record: dict) -> None:
        step = int(record.get("step", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(key=k.replace("/", "_"), value=float(v), timestamp=now, step=step)
                   for k, v in record.items() if isinstance(v, (int, float)) and k != "step"]
        if metrics:
            client.log_batch(run_id, metrics=metrics)

    return log


class Reporter:
    """Rank 0's channels (each None when absent); `is_rank0` False = do nothing."""

    def __init__(self, is_rank0: bool, pipes=None, to_mlflow: Callable[[dict], None] | None = None):
        self.is_rank0, self.pipes, self.to_mlflow = is_rank0, pipes, to_mlflow

    def log(self, record: dict, mlflow: bool = True, default: Callable = str) -> None:
        """One metrics record to MLflow (unless `mlflow` is False) and to the Dagster run
        (a JSON line; `default` turns what JSON cannot hold into something it can)."""
        if mlflow and self.to_mlflow is not None:
            self.to_mlflow(record)
        if self.pipes is not None:
            self.pipes.log.info(json.dumps(record, default=default))

    def materialize(self, metadata: dict) -> None:
        """The asset's materialization metadata, when launched through Pipes."""
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)


@contextlib.contextmanager
def rank0_reporter() -> Iterator[Reporter]:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        yield Reporter(False)
        return
    pipes_ctx = contextlib.nullcontext(None)
    if os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes_ctx = open_dagster_pipes()
    with pipes_ctx as pipes:
        yield Reporter(True, pipes, mlflow_logger())
