"""`dalle compare` on two runs in a temporary SQLite MLflow, and the tags every
run gets from MlflowResource.start_run."""

import argparse
import hashlib
import re

import pytest

from orchestration.compare import add_compare_parser, cmd_compare
from assets.resources import MlflowResource, code_version, data_version


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    resource = MlflowResource(tracking_uri=f"sqlite:///{tmp}/m.db", artifact_root=str(tmp / "artifacts"))
    ids = {}
    for name, lr, loss, extra in (("base", 0.001, 1.5, {}), ("tuned", 0.0003, 1.25, {"warmup": "500"})):
        with resource.start_run(name, tags={"stage": "prior", "profile": "tiny"}, data_version="abc") as run:
            import mlflow

            mlflow.log_params({"lr": lr, "batch_size": 64, **extra})
            mlflow.log_metrics({"loss": loss, "image_loss": 2.0})
            mlflow.set_tag("note", name if name == "tuned" else "same")
            ids[name] = run.info.run_id
    return resource, ids


def _compare(resource, *argv):
    parser = argparse.ArgumentParser(prog="dalle")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *argv, "--tracking-uri", resource.tracking_uri])
    return args.func(args)


def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("param", "tag", "metric"):
            rows[f"{parts[0]} {parts[1]}"] = parts[2:]
    return rows


def test_compare_lists_exactly_what_differs(tracking, capsys):
    resource, ids = tracking
    assert _compare(resource, ids["base"], ids["tuned"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == {"param lr", "param warmup", "tag note", "metric loss"}
    assert rows["param lr"] == ["0.001", "0.0003"]
    assert rows["param warmup"] == ["-", "500"]
    assert rows["metric loss"] == ["1.5", "1.25", "-0.25"]
    # aligned: column A starts at the same offset on every row
    rows_text = [l for l in out.splitlines() if l.split()[:1] and l.split()[0] in ("param", "tag", "metric")]
    assert len({re.match(r"\S+\s+\S+\s+", l).end() for l in rows_text}) == 1


def test_compare_by_run_name_and_identical_runs(tracking, capsys):
    resource, ids = tracking
    assert _compare(resource, "base", "tuned") == 0
    assert set(_table(capsys.readouterr().out)) == {"param lr", "param warmup", "tag note", "metric loss"}
    assert _compare(resource, ids["base"], "base") == 0
    assert "no differences" in capsys.readouterr().out


def test_compare_unknown_run(tracking, capsys):
    resource, ids = tracking
    assert _compare(resource, ids["base"], "no-such-run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("dalle compare: error:") and "no-such-run" in err


def test_start_run_tags_code_profile_and_data_version(tracking):
    from mlflow import MlflowClient

    resource, ids = tracking
    tags = MlflowClient(resource.tracking_uri).get_run(ids["base"]).data.tags
    assert tags["dalle.profile"] == "tiny"
    assert tags["dalle.data_version"] == "abc"
    assert tags["dalle.code_version"] == code_version()
    # a git commit (maybe +dirty) in a checkout, else the package version
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|\d+\.\d+.*", tags["dalle.code_version"])


def test_data_version_is_the_manifest_checksum(tmp_path):
    from dalle_core.storage import LocalStorage

    store = LocalStorage(tmp_path)
    assert data_version(store) is None
    store.put_text("shards/manifest.json", '{"shards": [], "total": 0}')
    assert data_version(store) == hashlib.sha256(b'{"shards": [], "total": 0}').hexdigest()
