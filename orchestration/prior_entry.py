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

import sys

from orchestration.rank0_report import rank0_reporter


def main(argv: list[str] | None = None) -> int:
    from dalle_core.prior.train import main as train_main

    with rank0_reporter() as report:
        last: dict = {}

        def forward(record: dict) -> None:
            report.log(record, mlflow=record.get("event") != "end")
            last.clear()
            last.update(record)

        code = train_main(argv, extra_on_log=forward if report.is_rank0 else None)
        end = {k: v for k, v in last.items() if isinstance(v, (int, float, str)) and v is not None}
        report.materialize({f"train_{k}": v for k, v in end.items() if k != "event"})
        return code


if __name__ == "__main__":
    sys.exit(main())
