"""`dalle compare RUN_A RUN_B`: what differs between two MLflow runs.

A run is named by its id or by its name in the experiment (the latest run of
that name). Parameters, tags and last metric values that differ are printed as
one aligned table; MLflow's own `mlflow.*` tags (user, source, timestamps) are
left out unless `--all-tags`.
"""

from __future__ import annotations

import sys

EXPERIMENT = "dalle"


class UnknownRunError(LookupError):
    pass


def add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="the parameters, tags and metrics that differ between two MLflow runs")
    p.add_argument("run_a", metavar="RUN_A", help="run id, or run name in the experiment (its latest run)")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"where run names are looked up (default {EXPERIMENT})")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or the run directory's SQLite")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--all-tags", action="store_true", help="include MLflow's own mlflow.* tags")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from mlflow import MlflowClient

    uri = args.tracking_uri or _tracking_uri(args.run_dir)
    client = MlflowClient(tracking_uri=uri)
    try:
        a = resolve_run(client, args.run_a, args.experiment)
        b = resolve_run(client, args.run_b, args.experiment)
    except UnknownRunError as e:
        print(f"dalle compare: error: {e}", file=sys.stderr)
        return 2
    print(format_diff(a, b, all_tags=args.all_tags))
    return 0


def _tracking_uri(run_dir: str | None) -> str:
    from pathlib import Path

    from orchestration.settings import Settings

    return Settings.from_env(**({"run_dir": Path(run_dir)} if run_dir else {})).mlflow_tracking_uri


def resolve_run(client, ref: str, experiment: str):
    """The run with id `ref`, else the latest run named `ref` in `experiment`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass  # not an id: try it as a name
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        q = '"' if "'" in ref else "'"
        runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = {q}{ref}{q}",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0]
    raise UnknownRunError(f"no run {ref!r}: neither a run id nor a run name in experiment {experiment!r}")


def diff_rows(a, b, all_tags: bool = False) -> list[tuple[str, str, str, str, str]]:
    """(kind, key, value in A, value in B, B - A) for every param, tag and metric that differs."""
    rows = []

    def visible(tags: dict) -> dict:
        return tags if all_tags else {k: v for k, v in tags.items() if not k.startswith("mlflow.")}

    for kind, da, db in (("param", a.data.params, b.data.params),
                         ("tag", visible(a.data.tags), visible(b.data.tags))):
        for key in sorted(set(da) | set(db)):
            if da.get(key) != db.get(key):
                rows.append((kind, key, da.get(key, "-"), db.get(key, "-"), ""))
    ma, mb = a.data.metrics, b.data.metrics
    for key in sorted(set(ma) | set(mb)):
        va, vb = ma.get(key), mb.get(key)
        if va != vb:
            delta = f"{vb - va:+.6g}" if va is not None and vb is not None else ""
            rows.append(("metric", key, _num(va), _num(vb), delta))
    return rows


def _num(v) -> str:
    return "-" if v is None else f"{v:.6g}"


def format_diff(a, b, all_tags: bool = False) -> str:
    head = [f"A: {a.info.run_id} ({a.info.run_name})", f"B: {b.info.run_id} ({b.info.run_name})"]
    rows = diff_rows(a, b, all_tags)
    if not rows:
        return "\n".join(head + ["no differences in parameters, tags or metrics"])
    table = [("", "key", "A", "B", "B - A"), *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(head + [""] + lines)
