"""The torchrun target the `prior` asset launches through Dagster Pipes.

    torchrun --nproc-per-node N -m orchestration.prior_entry --profile-json FILE --codes DIR --out DIR ...

(FILE: the resolved profile, `dalle_core.profiles.write_resolved_profile`.)

Every rank inherits the Pipes environment, so only rank 0 opens the Pipes
session: it streams each metrics record to the Dagster run (as a log line) and
to the MLflow run the asset opened (MLFLOW_RUN_ID), and reports the final
figures as the materialization's metadata. The training itself is
`dalle_core.prior.train.main`, unchanged; without Pipes (a plain torchrun) it
runs the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


def _mlflow_logger():
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow import MlflowClient

    client = MlflowClient()

    def log(record: dict) -> None:
        step = int(record.get("step", 0))
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if metrics:
            client.log_batch(run_id, metrics=[_metric(k, v, step) for k, v in metrics.items()])

    return log


def _metric(key, value, step):
    import time

    from mlflow.entities import Metric

    return Metric(key=key.replace("/", "_"), value=value, timestamp=int(time.time() * 1000), step=step)


def main(argv: list[str] | None = None) -> int:
    from dalle_core.prior.train import main as train_main

    rank = int(os.environ.get("RANK", "0"))
    pipes_ctx = contextlib.nullcontext(None)
    if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes_ctx = open_dagster_pipes()
    with pipes_ctx as pipes:
        to_mlflow = _mlflow_logger() if rank == 0 else None
        last: dict = {}

        def forward(record: dict) -> None:
            if to_mlflow is not None and record.get("event") != "end":
                to_mlflow(record)
            if pipes is not None:
                pipes.log.info(json.dumps(record, default=str))
            last.clear()
            last.update(record)

        code = train_main(argv, extra_on_log=forward if rank == 0 else None)
        if pipes is not None:
            end = {k: v for k, v in last.items() if isinstance(v, (int, float, str)) and v is not None}
            pipes.report_asset_materialization(metadata={f"train_{k}": v for k, v in end.items() if k != "event"})
        return code


if __name__ == "__main__":
    sys.exit(main())
